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
from causal.methods.subspace import TENSOR

FOLDER = "bases"
SUFFIX = "_basis"
BASIS_DIMS = ("component", "direction")
SCORES = {"align": "_iia", "reft": "_accuracy"}  # per method: the variable of each candidate's held-out score
EXTRA = ("weight", "bias")  # reft's other parameters, saved beside its basis


def save_bases(dataset: xr.Dataset, folder: str | Path) -> list[Path]:
    """Every align variable's bases under folder/bases/; the paths written (none without align)."""
    written = []
    for name, variable in dataset.data_vars.items():
        if name.endswith(SUFFIX) and variable.attrs.get("method") in SCORES:
            written += _save_variable(dataset, name[: -len(SUFFIX)], Path(folder) / FOLDER)
    return written


def _save_variable(dataset: xr.Dataset, stem: str, folder: Path) -> list[Path]:
    basis, size = dataset[stem + SUFFIX], dataset[stem + "_size"]
    score = dataset[stem + SCORES[basis.attrs["method"]]]
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


__all__ = ["save_bases"]
