"""Methods: one module per intervention statement, registered under its keyword (see base.py)."""
from causal.methods import ablate, attribute, patch, path, steer, trace  # noqa: F401 -- each registers itself
from causal.methods.base import METHODS, Method, Variable

__all__ = ["METHODS", "Method", "Variable"]
