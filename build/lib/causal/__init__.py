"""causal: declarative causal-intervention experiments on HF language models."""
from causal.api import RunConfig, prepare, run, run_prepared
from causal.errors import CausalError
from causal.results import load, save

__all__ = ["CausalError", "RunConfig", "load", "prepare", "run", "run_prepared", "save"]
