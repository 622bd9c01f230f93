"""Result Datasets on disk: atomic save, load, and merging the runs of a Hydra sweep.

The schema is made in causal.results.assemble and documented in docs/results.md.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path

import xarray as xr

from causal.errors import CausalError

PACKAGES = ("causal", "torch", "transformers", "lark", "xarray", "hydra-core", "numpy")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def save(dataset: xr.Dataset, path: str | Path) -> Path:
    """Write to a temporary file beside the target, then rename: a killed run never leaves half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".nc.tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise CausalError(f"cannot write results to {str(path.parent)!r}: {exc.strerror}") from None
    try:
        dataset.to_netcdf(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise CausalError(f"cannot write results to {str(path)!r}: {exc.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: str | Path) -> xr.Dataset:
    """Open finished results: a `results.nc`, a run directory, or a Hydra multirun directory.

    A multirun directory (sub-directories each holding a run) comes back as one Dataset
    with each swept parameter as a new dimension; see `merge_runs`.
    """
    path = Path(path)
    if path.is_file():
        return _open(path)
    if (path / "results.nc").exists():
        return _open(path / "results.nc")
    runs = sorted(path.glob("*/results.nc"), key=lambda p: (len(p.parent.name), p.parent.name))
    if runs:
        return merge_runs([_open(p) for p in runs])
    raise CausalError(f"no results at {str(path)!r} (expected results.nc, a run directory or a multirun directory)")


def _open(path: Path) -> xr.Dataset:
    """Lazily (dask) when dask is installed, so a large sweep is not read into memory at once."""
    try:
        import dask  # noqa: F401
        return xr.open_dataset(path, chunks={})
    except ImportError:
        with xr.open_dataset(path) as dataset:
            return dataset.load()


def swept_parameters(datasets: list[xr.Dataset]) -> dict[str, list[str]]:
    """The command-line overrides whose values differ between runs: key -> value per run."""
    per_run = [dict(_parameter(o) for o in json.loads(ds.attrs.get("overrides", "[]")) if "=" in o)
               for ds in datasets]
    keys = sorted({k for run in per_run for k in run})
    return {k: [run.get(k, "") for run in per_run] for k in keys if len({run.get(k) for run in per_run}) > 1}


def _parameter(override: str) -> tuple[str, str]:
    """`+params.n=50` -> ("n", "50"): experiment parameters are named as in the file."""
    key, value = _unescape(override).split("=", 1)
    key = key.lstrip("+~")
    return key.removeprefix("params."), value


def _unescape(override: str) -> str:
    """Hydra's sweeper escapes characters such as ':' in the overrides it records."""
    return re.sub(r"\\(.)", r"\1", override)


def merge_runs(datasets: list[xr.Dataset]) -> xr.Dataset:
    """One Dataset from several runs, with a new dimension per swept parameter.

    Runs that differ in what they swept (e.g. models with different layer counts) are
    aligned by coordinate; what a run does not have is NaN.
    """
    swept = swept_parameters(datasets)
    if not swept:
        if len(datasets) == 1:
            return datasets[0]
        raise CausalError("these runs do not differ in any override, so there is nothing to merge along")
    labelled = []
    for i, ds in enumerate(datasets):
        labelled.append(ds.expand_dims({key: [_parse_value(values[i])] for key, values in swept.items()}))
    merged = xr.combine_by_coords(labelled, data_vars="all", join="outer", combine_attrs="drop_conflicts")
    merged.attrs["swept"] = json.dumps(sorted(swept))
    return merged


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
