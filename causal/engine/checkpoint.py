"""Completed chunks of a run on disk, so a killed run resumes where it stopped.

A checkpoint directory is named by a fingerprint of everything that decides the
numbers (experiment text, model revision, data, seed, dtype, batch size); a changed
file, model or setting gets a fresh directory, so old chunks are never mixed in.
Chunks are safetensors files (no pickle) written atomically.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from causal.errors import CausalError
from causal.locks import held

SAME_RUN_ADVICE = ("the same experiment with the same settings is running now; wait for it (a re-run then finds its "
                   "results), or give this run checkpoints=<another folder> or resume=false")


class ChunkStore:
    """`completed()` / `load(key)` / `save(key, tensor)` for finished pieces of a run, under root/<fingerprint>/."""

    def __init__(self, root: str | Path, key: str, description: dict):
        self.folder = Path(root) / key
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            manifest = self.folder / "manifest.json"
            if not manifest.exists():
                manifest.write_text(json.dumps(description, indent=2, default=str))
        except OSError as exc:
            raise CausalError(f"cannot write checkpoints under {str(root)!r}: {exc.strerror}") from None
        self.key = key

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def completed(self) -> set[str]:
        return {p.stem for p in self.folder.glob("*.safetensors")}

    def load(self, key: str) -> torch.Tensor:
        return self.load_tensors(key)["values"]

    def load_tensors(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(self._path(key))

    def save(self, key: str, values: torch.Tensor) -> None:
        self.save_tensors(key, {"values": values})

    def save_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp)
            os.replace(tmp, self._path(key))
        except OSError as exc:
            raise CausalError(f"cannot write checkpoint to {str(self.folder)!r}: {exc.strerror}") from None
        except SafetensorError as exc:  # its own type for a failed write (e.g. the disk is full)
            raise CausalError(f"cannot write checkpoint to {str(self.folder)!r}: {exc} (is the disk full?)") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @contextmanager
    def held(self) -> Iterator[None]:
        """The folder for this run alone while it computes: a second run of the same experiment and settings
        (the same fingerprint) at the same time is refused instead of finding the folder deleted under it."""
        with held(self.folder, SAME_RUN_ADVICE):
            yield

    def clear(self) -> None:
        """Remove the folder, unless another run holds it now (it resumed from these batches and will clear it)."""
        try:
            with held(self.folder, SAME_RUN_ADVICE):
                shutil.rmtree(self.folder, ignore_errors=True)
        except CausalError:
            pass
