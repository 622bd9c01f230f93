"""Methods: one module per intervention statement, registered under its keyword (see base.py).

Every module in this package is imported here, so a new method is its module alone: no list to edit.
"""
import importlib
import pkgutil

from causal.methods.base import METHODS, JobMethod, Method, SelfDriven, Variable

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # each registers itself with @method(keyword)

__all__ = ["METHODS", "JobMethod", "Method", "SelfDriven", "Variable"]
