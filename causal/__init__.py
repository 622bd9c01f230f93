"""causal: declarative causal-intervention experiments on HF language models.

The names below are imported on first use (PEP 562), so `import causal` and the command
line's `--help`, `--version` and syntax errors start without torch, transformers or xarray.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["CausalError", "RunConfig", "load", "merge_runs", "plot", "prepare", "prepare_text", "run", "run_prepared",
           "run_text", "save"]

_HOME = {  # where each public name lives
    "CausalError": "causal.errors",
    "RunConfig": "causal.app.settings",
    "load": "causal.results",
    "save": "causal.results",
    "merge_runs": "causal.results",
    "plot": "causal.results.plot",
    "prepare": "causal.app.api",
    "prepare_text": "causal.app.api",
    "run": "causal.app.api",
    "run_prepared": "causal.app.api",
    "run_text": "causal.app.api",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports them
    from causal.app.api import prepare, prepare_text, run, run_prepared, run_text
    from causal.app.settings import RunConfig
    from causal.errors import CausalError
    from causal.results import load, merge_runs, save
    from causal.results.plot import plot


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'causal' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once: later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
