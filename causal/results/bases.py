"""Learned interventions as files other experiments read (issue 14, items 4 and 7).

Each trained candidate (one site, layer, position or head, and k) becomes
bases/NAME-SITE-layer0-pos1-k1.safetensors beside results.nc, with metadata naming the model
it was learned on (which the readers check), the statement and the candidate's held-out score:
- align: one tensor `basis` (d, size), the directions that swap, for `within basis("FILE")`;
- reft: `basis` R (d, k), `weight` W (k, d) and `bias` b (k), for `steer ... by loreft("FILE")`.
"""
from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from causal.files import write_atomically
from causal.methods.kinds import kind_of
from causal.methods.subspace import TENSOR

FOLDER = "bases"
SUFFIX = "_basis"
BASIS_DIMS = ("component", "direction")
EXTRA = ("weight", "bias")  # reft's other parameters, saved beside its basis


def trained_statements(dataset: xr.Dataset) -> list[tuple[str, xr.DataArray, str]]:
    """(NAME, its held-out score variable, the score's label) for every align / reft statement in the Dataset."""
    found = []
    for name, variable in dataset.data_vars.items():
        suffix, label = kind_of(variable.attrs).score or (None, None)
        if suffix and name.endswith(suffix) and name[: -len(suffix)] + SUFFIX in dataset:
            found.append((name[: -len(suffix)], variable, label))
    return found


def save_bases(dataset: xr.Dataset, folder: str | Path) -> list[Path]:
    """Every align / reft statement's learned files under folder/bases/; the paths written (none without)."""
    return [path for stem, score, _ in trained_statements(dataset)
            for path in _save_variable(dataset, stem, score, Path(folder) / FOLDER)]


def _save_variable(dataset: xr.Dataset, stem: str, score: xr.DataArray, folder: Path) -> list[Path]:
    basis, size = dataset[stem + SUFFIX], dataset[stem + "_size"]
    extra = {name: dataset[f"{stem}_{name}"] for name in EXTRA if f"{stem}_{name}" in dataset}
    dims = [d for d in basis.dims if d not in BASIS_DIMS]
    written = []
    for values in product(*(basis[d].values.tolist() for d in dims)):
        at = dict(zip(dims, values))
        keep = int(size.sel(at))
        tensors = {TENSOR: _numbers(basis.sel(at).values[:, :keep])}
        for name, variable in extra.items():  # (direction, ...): the first `keep` directions
            tensors[name] = _numbers(variable.sel(at).values[:keep])
        label = "-".join(f"{d}{v}" for d, v in at.items())
        metadata = {"model": str(dataset.attrs.get("model", "")), "site": basis.attrs["site"],
                    "method": basis.attrs["method"], "statement": basis.attrs["statement"],
                    "candidate": json.dumps(at), "heldout_score": f"{float(score.sel(at)):.6f}"}
        revision = dataset.attrs.get("model_revision")
        if revision:
            metadata["model_revision"] = str(revision)
        written.append(_write(folder / f"{stem}-{basis.attrs['site']}-{label}.safetensors", tensors, metadata))
    return written


def _numbers(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomically, as results.nc: a killed run never leaves half a basis to be read later."""
    from safetensors.torch import save_file
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "basis")


__all__ = ["save_bases", "trained_statements"]
