"""Result Datasets on disk: atomic save, load, and merging the runs of a Hydra sweep.

The schema is made in causal.results.assemble and documented in docs/results.md.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import xarray as xr

from causal.errors import CausalError
from causal.results import shards

log = logging.getLogger(__name__)

PACKAGES = ("causal", "torch", "transformers", "lark", "xarray", "hydra-core", "numpy")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


SCHEMA = 2  # the results layout of docs/results.md; a file of a newer schema is refused, not misread
SCHEMA_ATTR = "causal_schema"
CHECKSUM_ATTR = "checksum"  # on every variable and coordinate: sha256 of its values, checked on load
JSON_ATTR = "causal_json"  # names of the attrs (of the Dataset or a variable) stored as JSON text
LABELS_ATTR = "causal_labels"  # on a coordinate of names and numbers (pos with named positions), stored as text
MIXED = "numbers and names"
LEGACY_JSON = ("metrics", "params", "versions", "overrides", "swept", "qk_fix_layers", "qk_plain_gradient_layers")


def save(dataset: xr.Dataset, path: str | Path) -> Path:
    """Write to a temporary file beside the target, then rename: a killed run never leaves half a file.

    Stamped with the schema version and a checksum of each variable, which `load` verifies."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".nc.tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise CausalError(f"cannot write results to {str(path.parent)!r}: {exc.strerror}") from None
    try:
        _stamped(dataset).to_netcdf(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would keep collaborators out
        os.replace(tmp, path)
    except OSError as exc:
        raise CausalError(f"cannot write results to {str(path)!r}: {exc.strerror}") from None
    except RuntimeError as exc:  # netCDF's own errors, e.g. "NetCDF: HDF error" when the disk fills
        raise CausalError(f"cannot write results to {str(path)!r}: {exc} (is the disk full?)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stamped(dataset: xr.Dataset) -> xr.Dataset:
    """netCDF holds numbers and text: lists and dicts in attrs go as JSON, a coordinate of names and
    numbers as text, each marked so `load` restores it."""
    stamped = dataset.copy()
    for name in [name for name in stamped.coords if _is_mixed(stamped[name])]:
        attrs = {**stamped[name].attrs, LABELS_ATTR: MIXED}
        stamped = stamped.assign_coords({name: stamped[name].astype(str).assign_attrs(attrs)})
    stamped.attrs = _json_encoded(stamped.attrs)
    for name in [*stamped.data_vars, *stamped.coords]:
        stamped[name].attrs = _json_encoded(stamped[name].attrs)
    stamped.attrs[SCHEMA_ATTR] = SCHEMA
    for name in [*stamped.data_vars, *stamped.coords]:
        stamped[name].attrs[CHECKSUM_ATTR] = checksum(stamped[name])
    return stamped


def _is_mixed(coord: xr.DataArray) -> bool:
    return coord.dtype == object and any(not isinstance(v, str) for v in coord.values.ravel())


def _json_encoded(attrs: dict) -> dict:
    encoded = {k: json.dumps(v) if isinstance(v, (list, tuple, dict, bool)) else v for k, v in attrs.items()}
    named = [k for k, v in attrs.items() if isinstance(v, (list, tuple, dict, bool))]
    return {**encoded, JSON_ATTR: " ".join(named)} if named else encoded


def _json_decoded(attrs: dict, legacy: bool) -> dict:
    decoded = dict(attrs)
    marked = decoded.pop(JSON_ATTR, None)
    names = marked.split() if marked is not None else [k for k in LEGACY_JSON if k in attrs] if legacy else []
    for name in names:
        try:
            decoded[name] = json.loads(attrs[name])
        except (KeyError, TypeError, ValueError):
            pass  # an attr someone edited into plain text stays text
    return decoded


def _numbers_and_names(coord: xr.DataArray) -> np.ndarray:
    """'-1' -> -1, 'S1' stays 'S1': the labels as the statements wrote them."""
    values = [int(v) if re.fullmatch(r"-?\d+", str(v)) else str(v) for v in coord.values.ravel()]
    return np.array(values, dtype=object).reshape(coord.shape)


def checksum(variable: xr.DataArray) -> str:
    """sha256 of the values as they read back: numbers by their bytes, text by its UTF-8."""
    values = variable.values
    digest = hashlib.sha256(repr(variable.shape).encode())
    if values.dtype.kind in "OUS":
        digest.update("\x1f".join(str(v) for v in values.ravel()).encode("utf-8", "surrogatepass"))
    else:
        digest.update(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def load(path: str | Path, verify: bool = True) -> xr.Dataset:
    """Open finished results: a `results.nc`, a run directory, or a Hydra multirun directory.

    A multirun directory (sub-directories each holding a run) comes back as one Dataset
    with each swept parameter as a new dimension; see `merge_runs`. `verify`: check each
    variable's checksum (this reads every value once; pass False to open a large file lazily).
    A recording kept in a store (`record_store`) is opened lazily from its file (causal.methods.record_store).
    """
    from causal.methods.record_store import attach
    path = Path(path)
    if path.is_file():
        return attach(_open(path, verify))
    if (path / "results.nc").exists():
        return attach(_open(path / "results.nc", verify))
    runs = sorted(path.glob("*/results.nc"), key=lambda p: (len(p.parent.name), p.parent.name))
    if runs:
        datasets = [_open(p, verify) for p in runs]
        _check_one_sweep(datasets, path)
        return merge_runs(datasets, names=[str(p.parent) for p in runs])
    raise CausalError(f"no results at {str(path)!r} (expected results.nc, a run directory or a multirun directory)")


def _open(path: Path, verify: bool) -> xr.Dataset:
    """Lazily (dask) when dask is installed and `verify` is off, so a large sweep is not read into memory."""
    try:
        if not verify and importlib.util.find_spec("dask") is not None:
            dataset = xr.open_dataset(path, chunks={})
        else:
            with xr.open_dataset(path) as opened:
                dataset = opened.load()
    except (OSError, ValueError, RuntimeError) as exc:
        raise CausalError(f"cannot read results {str(path)!r}: {exc} (not a netCDF file, or a damaged one)") from None
    _checked_schema(dataset, path)
    if verify and dataset.attrs.get(SCHEMA_ATTR) is not None:
        _verify(dataset, path)
    return _unstamped(dataset)


def _checked_schema(dataset: xr.Dataset, path: Path) -> xr.Dataset:
    version = dataset.attrs.get(SCHEMA_ATTR)
    if version is None and {"experiment_text", "versions"} <= set(dataset.attrs):
        log.warning("%s was written before results carried checksums (schema 0): loaded without verifying", path)
        return dataset
    if version is None:
        raise CausalError(f"{str(path)!r} is not a causal results file (it has no {SCHEMA_ATTR!r} attribute; "
                          "open it with xarray.open_dataset)")
    if not isinstance(version, (int, np.integer)) or version > SCHEMA:
        version = int(version) if isinstance(version, (int, np.integer)) else version
        raise CausalError(f"{str(path)!r} has results schema {version!r}, newer than this causal reads "
                          f"(schema {SCHEMA}): upgrade causal to read it")
    return dataset


def _verify(dataset: xr.Dataset, path: Path) -> None:
    for name in [*dataset.data_vars, *dataset.coords]:
        stored = dataset[name].attrs.get(CHECKSUM_ATTR)
        if stored is None:
            raise CausalError(f"{str(path)!r}: variable {name!r} has no checksum; the file was not written by "
                              "causal.save, or was edited")
        if checksum(dataset[name]) != stored:
            raise CausalError(f"{str(path)!r}: variable {name!r} does not match its checksum: the file is damaged "
                              "(a changed byte on disk or in transfer); run the experiment again")


def _unstamped(dataset: xr.Dataset) -> xr.Dataset:
    """The Dataset as it was saved: the stamps describe the file, not the values once in memory."""
    legacy = int(dataset.attrs.pop(SCHEMA_ATTR, 0)) < 2  # JSON attrs unmarked, named positions as text
    for name in [*dataset.data_vars, *dataset.coords]:
        dataset[name].attrs.pop(CHECKSUM_ATTR, None)
        dataset[name].attrs = _json_decoded(dataset[name].attrs, legacy)
    dataset.attrs = _json_decoded(dataset.attrs, legacy)
    for name in list(dataset.coords):
        if dataset[name].attrs.pop(LABELS_ATTR, None) == MIXED or (legacy and name == "pos" and
                                                                   dataset[name].dtype.kind in "OUS"):
            attrs = dataset[name].attrs
            dataset = dataset.assign_coords({name: (dataset[name].dims, _numbers_and_names(dataset[name]), attrs)})
    return dataset


def swept_parameters(datasets: list[xr.Dataset]) -> dict[str, list[str]]:
    """The command-line overrides whose values differ between runs: key -> value per run."""
    per_run = [dict(_parameter(o) for o in ds.attrs.get("overrides", []) if "=" in o) for ds in datasets]
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


def merge_runs(datasets: list[xr.Dataset], names: list[str] | None = None) -> xr.Dataset:
    """One Dataset from several runs, with a new dimension per swept parameter.

    Runs that differ in what they swept (e.g. models with different layer counts) are
    aligned by coordinate; what a run does not have is NaN. The shards of a run (`shard=i/N`)
    are first put back together along `example`; `names` (each run's folder) name a missing one.
    """
    _check_one_experiment(datasets)
    datasets = shards.merge(datasets, names)
    swept = swept_parameters(datasets)
    if not swept:
        if len(datasets) == 1:
            return datasets[0]
        raise CausalError("these runs do not differ in any override, so there is nothing to merge along")
    per_run = _differing_attrs(datasets, skip=set(swept))
    labelled = [_labelled_run(ds, {key: _parse_value(values[i]) for key, values in swept.items()},
                              {name: values[i] for name, values in per_run.items()})
                for i, ds in enumerate(datasets)]
    merged = xr.combine_by_coords(labelled, data_vars="all", coords="different", compat="no_conflicts",
                                  join="outer", combine_attrs="drop_conflicts")
    merged.attrs["swept"] = sorted(swept)
    return merged


RUN_PREFIX = "run_"  # per-run provenance in a merged sweep: run_created, run_overrides, ... along the swept dims


def _differing_attrs(datasets: list[xr.Dataset], skip: set[str]) -> dict[str, list]:
    """Provenance that differs between runs (created, overrides, a model's revision): kept per run,
    where merging attrs would drop it."""
    names = [name for name in dict.fromkeys(k for ds in datasets for k in ds.attrs) if name not in skip]
    values = {name: [_scalar(ds.attrs.get(name, "")) for ds in datasets] for name in names}
    return {name: column for name, column in values.items() if len(set(column)) > 1}


def _scalar(value):
    return json.dumps(value) if isinstance(value, (list, tuple, dict, bool)) else value


def _labelled_run(dataset: xr.Dataset, point: dict, provenance: dict) -> xr.Dataset:
    """One run as a point of the sweep: the swept dims added to every variable and every per-example
    coordinate (token_*, prompt_*: the data can differ between runs), its own provenance as coords."""
    per_example = [name for name in dataset.coords if name not in dataset.dims and "example" in dataset[name].dims]
    labelled = dataset.reset_coords(per_example).expand_dims({key: [value] for key, value in point.items()})
    labelled = labelled.set_coords(per_example)
    dims = tuple(point)
    return labelled.assign_coords({RUN_PREFIX + name: (dims, np.full((1,) * len(dims), value))
                                   for name, value in provenance.items()})


def _check_one_sweep(datasets: list[xr.Dataset], folder: Path) -> None:
    """A folder holds one sweep's runs; runs of another sweep in it were put there by accident."""
    sweeps = {ds.attrs.get("sweep_dir") for ds in datasets}
    if len(sweeps) > 1:
        named = sorted(str(s) for s in sweeps if s)
        raise CausalError(f"{str(folder)!r} holds runs of {len(sweeps)} different sweeps ({', '.join(named)}"
                          f"{', and single runs' if None in sweeps else ''}); load each sweep's folder on its own, "
                          "or pass the runs to causal.merge_runs to merge them deliberately")


def _check_one_experiment(datasets: list[xr.Dataset]) -> None:
    """Runs of different experiment files merge only as one sweep that varied the file; otherwise a
    merge would line up numbers that measure different things."""
    sweeps = {ds.attrs.get("sweep_dir") for ds in datasets}
    if len({ds.attrs.get("experiment_text") for ds in datasets}) > 1 and (len(sweeps) > 1 or None in sweeps):
        files = sorted({f"{ds.attrs.get('experiment_file')} (experiment {ds.attrs.get('experiment')!r})"
                        for ds in datasets})
        raise CausalError(f"these runs are of different experiments: {'; '.join(files)}; load each run folder on "
                          "its own (runs of different files merge only as one sweep over the file)")


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
