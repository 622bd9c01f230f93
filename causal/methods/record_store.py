"""On-disk store of a recording too large for memory: one netCDF file, written batch by batch.

The file holds the recording with its final dims (the sweep's, `example`, the trailing ones) and a
`recorded` flag per example, set as each batch's values are written; a run that stops and is run
again skips the examples already written (the file's fingerprint must match: same statement, model,
data). `attach` puts the recording, opened lazily (xarray reads only the slices asked for, no dask
needed), in place of the small marker variable a run's Dataset carries for it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from causal.errors import CausalError
from causal.files import fingerprint
from causal.methods.kinds import ResultKind, result_kind

log = logging.getLogger(__name__)
STORE_KIND = result_kind(ResultKind("recording_store")).kind  # a store's marker in results.nc; `attach` replaces it
RECORDING = result_kind(ResultKind("recording", figure="patterns"))  # drawn where it is attention patterns


class RecordingStore:
    """One recording's netCDF file; created at the first write (a module's trailing shape is known then)."""

    def __init__(self, path: Path, name: str, key: str, dims: list[str], coords: dict, trailing_names: list[str],
                 sweep_shape: tuple[int, ...], n_examples: int):
        self.path, self.name, self.key = path, name, key
        self.dims, self.coords, self.trailing_names = dims, coords, trailing_names
        self.sweep_shape, self.n_examples = sweep_shape, n_examples
        self.file = None
        if path.exists():
            self._reopen()

    @classmethod
    def open(cls, method, experiment) -> "RecordingStore":
        sweep = method.sweep
        coords = {d: list(sweep.coords[d]) for d in sweep.dims}
        coords.update({d: list(range(s)) for d, s in method.selection.trailing
                       if s and d not in ("d_model", "d_head", "feature")})
        key = fingerprint({"statement": method.statement, "model": experiment.model.ref,
                           "revision": experiment.model.revision, "data": fingerprint(experiment.examples.columns),
                           "under": method.under})
        names = [d for d, _ in method.selection.trailing]
        return cls(Path(method.store_path), method.name, key, list(sweep.dims), coords, names, sweep.shape,
                   experiment.n_examples)

    def _reopen(self) -> None:
        import netCDF4
        try:
            file = netCDF4.Dataset(self.path, "a")
        except OSError as exc:
            log.warning("recording store %s is unreadable (%s); writing it again", self.path, exc)
            self.path.unlink()
            return
        file.set_auto_mask(False)  # a fill value (0 for `recorded`) is a value, not a gap
        if getattr(file, "causal_fingerprint", None) != self.key:
            file.close()
            log.warning("recording store %s holds another recording; writing it again", self.path)
            self.path.unlink()
            return
        self.file = file

    def done(self, examples: torch.Tensor) -> bool:
        return self.file is not None and bool(self.file["recorded"][examples.numpy()].all())

    def recorded(self) -> torch.Tensor:
        """(examples,) 1 where an example's values are in the file (read once the file is closed)."""
        import netCDF4
        if self.file is not None or not self.path.exists():
            return torch.zeros(self.n_examples) if self.file is None else \
                torch.from_numpy(np.asarray(self.file["recorded"][:], dtype=np.float32))
        with netCDF4.Dataset(self.path, "r") as file:
            file.set_auto_mask(False)
            return torch.from_numpy(np.asarray(file["recorded"][:], dtype=np.float32))

    def write(self, examples: torch.Tensor, values: torch.Tensor) -> None:
        """values: (points, rows, *trailing) for contiguous examples."""
        first, last = int(examples[0]), int(examples[-1])
        if last - first + 1 != len(examples):
            raise ValueError("a recording store is written for contiguous examples")
        if self.file is None:
            self._create(values.shape[2:])
        data = values.reshape(*self.sweep_shape, len(examples), *values.shape[2:]).numpy()
        index = (slice(None),) * len(self.sweep_shape) + (slice(first, last + 1),)
        self.file[self.name][index] = data
        self.file["recorded"][first:last + 1] = 1
        self.file.sync()

    def _create(self, trailing: tuple[int, ...]) -> None:
        import netCDF4
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".nc.tmp")
        file = netCDF4.Dataset(tmp, "w")
        names = self.trailing_names
        if len(names) != len(trailing):  # a module's output: its dims as it returned them
            names = ["feature"] if len(trailing) == 1 else [f"feature_{i}" for i in range(len(trailing))]
        sizes = dict(zip(self.dims, self.sweep_shape)) | {"example": self.n_examples} | dict(zip(names, trailing))
        for dim, size in sizes.items():
            file.createDimension(dim, size)
        for dim, values in self.coords.items():
            if dim not in sizes:
                continue
            textual = any(isinstance(v, str) for v in values)
            var = file.createVariable(dim, str if textual else "i8", (dim,))
            var[:] = np.array([str(v) for v in values], object) if textual else np.array(values)
        file.createVariable("example", "i8", ("example",))[:] = np.arange(self.n_examples)
        shape = [*self.dims, "example", *names]
        chunks = [1] * len(self.dims) + [1] + list(trailing)
        file.createVariable(self.name, "f4", shape, fill_value=np.float32(np.nan), chunksizes=chunks)
        file.createVariable("recorded", "i1", ("example",), fill_value=np.int8(0))[:] = 0
        file.causal_fingerprint = self.key
        file.close()
        tmp.replace(self.path)
        self.file = netCDF4.Dataset(self.path, "a")
        self.file.set_auto_mask(False)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def attach(dataset: xr.Dataset) -> xr.Dataset:
    """Each stored recording opened lazily in place of its marker variable."""
    for name in [n for n, v in dataset.data_vars.items() if v.attrs.get("kind") == STORE_KIND]:
        marker = dataset[name]
        path = Path(marker.attrs["store"])
        if not path.exists():
            raise CausalError(f"the recording {name!r} is stored in {str(path)!r}, which does not exist "
                              "(moved or deleted?)")
        stored = xr.open_dataset(path, engine="netcdf4", cache=False)
        recording = stored[name]
        if "pos" in recording.coords and recording["pos"].dtype.kind in "OU":
            recording = recording.assign_coords(pos=np.array([_number_or_name(p) for p in recording["pos"].values],
                                                             object))
        if not bool(stored["recorded"].values.all()):
            missing = int((stored["recorded"].values == 0).sum())
            log.warning("recording %s: %d examples were not written to %s (NaN there)", name, missing, path)
        attrs = {**marker.attrs, "kind": RECORDING.kind, "store": str(path)}
        dataset = dataset.drop_vars(name)
        dataset[name] = recording.drop_vars([c for c in recording.coords if c not in recording.dims])
        dataset[name].attrs = attrs
    return dataset


def _number_or_name(position: str):
    return int(position) if position.lstrip("-").isdigit() else str(position)
