"""Summaries over examples, computed from the per-example values the Dataset keeps.

Results store every example; these functions reduce them on demand, so a summary
never goes stale against the data it came from.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from causal.errors import CausalError


def effect(dataset: xr.Dataset, name: str) -> xr.DataArray:
    """Per-example change caused by an intervention, relative to its unpatched base prompts."""
    variable = dataset[name]
    return variable - dataset[variable.attrs["prompts"]]


def normalized_effect(dataset: xr.Dataset, name: str) -> xr.DataArray:
    """(patched - base) / (source - base): the share of the source run's metric the patch carries over.

    Denoising (`from clean into corrupt`) gives the usual (patched - corrupt) / (clean - corrupt);
    noising gives the share of the damage done. Means are taken over examples first, as
    the per-example ratio explodes where base ~ source. Only variables with a source run have
    this share: an ablation or a steering vector has none, so asking is an error, not a KeyError.
    """
    variable = dataset[name]
    if variable.attrs.get("source") not in dataset:
        what = variable.attrs.get("statement") or "a baseline"
        raise CausalError(f"normalized_effect({name!r}): {name!r} ({what}) has no source run to normalize by "
                          "(only patch, path, attribute and trace variables have one)",
                          hint=f"use effect(ds, {name!r}), its change from the base prompts")
    base, source = dataset[variable.attrs["prompts"]], dataset[variable.attrs["source"]]
    return (variable - base).mean("example") / (source - base).mean("example")


def mean(values: xr.DataArray, dim: str = "example") -> xr.DataArray:
    return values.mean(dim, skipna=True)


def standard_error(values: xr.DataArray, dim: str = "example") -> xr.DataArray:
    count = values.notnull().sum(dim)
    return values.std(dim, ddof=1, skipna=True) / np.sqrt(count)


def bootstrap_ci(values: xr.DataArray, dim: str = "example", level: float = 0.95, samples: int = 1000,
                 seed: int = 0) -> xr.Dataset:
    """Percentile bootstrap interval of the mean over `dim` (NaN-aware), as `low` and `high`."""
    rng = np.random.default_rng(seed)
    n = values.sizes[dim]
    picks = rng.integers(0, n, size=(samples, n))
    moved = values.transpose(..., dim).values
    means = np.nanmean(moved[..., picks], axis=-1)  # (..., samples)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(means, [tail, 100 - tail], axis=-1)
    dims = [d for d in values.transpose(..., dim).dims if d != dim]
    coords = {d: values[d] for d in dims if d in values.coords}
    return xr.Dataset({"low": (dims, low), "high": (dims, high)}, coords=coords)
