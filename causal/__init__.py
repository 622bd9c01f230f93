"""causal: declarative causal-intervention experiments on HF language models."""
from causal.api import RunConfig, prepare, prepare_text, run, run_prepared, run_text
from causal.errors import CausalError
from causal.results import load, save

__all__ = ["CausalError", "RunConfig", "load", "prepare", "prepare_text", "run", "run_prepared", "run_text",
           "save"]
