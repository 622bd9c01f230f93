"""Learned bases as files another experiment's `within basis("FILE")` reads (issue 14, item 4).

Each trained candidate (one site, layer, position or head, and k) becomes
bases/NAME-SITE-layer0-pos1-k1.safetensors beside results.nc: one tensor `basis` (d, size),
only the directions that swap, and metadata naming the model it was learned on (which
`within basis` checks), the statement and the candidate's held-out IIA.
"""
from __future__ import annotations

import json
import os
import tempfile
from itertools import product
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from causal.errors import CausalError
from causal.methods.subspace import TENSOR

FOLDER = "bases"
SUFFIX = "_basis"
BASIS_DIMS = ("component", "direction")


def save_bases(dataset: xr.Dataset, folder: str | Path) -> list[Path]:
    """Every align variable's bases under folder/bases/; the paths written (none without align)."""
    written = []
    for name, variable in dataset.data_vars.items():
        if name.endswith(SUFFIX) and variable.attrs.get("method") == "align":
            written += _save_variable(dataset, name[: -len(SUFFIX)], Path(folder) / FOLDER)
    return written


def _save_variable(dataset: xr.Dataset, stem: str, folder: Path) -> list[Path]:
    basis, size, iia = dataset[stem + SUFFIX], dataset[stem + "_size"], dataset[stem + "_iia"]
    dims = [d for d in basis.dims if d not in BASIS_DIMS]
    written = []
    for values in product(*(basis[d].values.tolist() for d in dims)):
        at = dict(zip(dims, values))
        keep = int(size.sel(at))
        tensor = torch.from_numpy(np.ascontiguousarray(basis.sel(at).values[:, :keep], dtype=np.float32))
        label = "-".join(f"{d}{v}" for d, v in at.items())
        metadata = {"model": str(dataset.attrs.get("model", "")), "site": basis.attrs["site"],
                    "statement": basis.attrs["statement"], "candidate": json.dumps(at),
                    "heldout_iia": f"{float(iia.sel(at)):.6f}"}
        revision = dataset.attrs.get("model_revision")
        if revision:
            metadata["model_revision"] = str(revision)
        written.append(_write(folder / f"{stem}-{basis.attrs['site']}-{label}.safetensors", tensor, metadata))
    return written


def _write(path: Path, tensor: torch.Tensor, metadata: dict[str, str]) -> Path:
    """Atomically, as results.nc: a killed run never leaves half a basis to be read later."""
    from safetensors.torch import save_file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise CausalError(f"cannot write bases to {str(path.parent)!r}: {exc.strerror}") from None
    try:
        save_file({TENSOR: tensor}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        raise CausalError(f"cannot write basis {str(path)!r}: {exc.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


__all__ = ["save_bases"]
