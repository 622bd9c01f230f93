"""Results: raw numbers -> labelled Dataset (assemble), saving and loading (io), summaries and plots."""
from causal.results.io import load, merge_runs, package_versions, save

__all__ = ["load", "merge_runs", "package_versions", "save"]
