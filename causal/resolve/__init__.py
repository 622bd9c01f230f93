"""AST + model + data -> a typed Experiment, every name, index and token checked before compute."""
from causal.resolve.resolver import resolve

__all__ = ["resolve"]
