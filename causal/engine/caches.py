"""What the base runs of one chunk of examples keep for its jobs: activations, block inputs to resume from,
keys/values, indexed by stream row."""
from __future__ import annotations

import torch

from causal.values import CacheKey


class Caches:
    """Activations recorded by the base runs of one chunk of examples, indexed by stream row."""

    def __init__(self, first_example: int, samples: dict[str, int]):
        self.first, self.samples = first_example, samples
        self.tensors: dict[tuple[str, CacheKey], torch.Tensor] = {}
        self.resume: dict[tuple[str, int], torch.Tensor] = {}  # (stream, layer) -> input of that block
        self.keys_values: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.prefix_buffers: dict[tuple, torch.Tensor] = {}  # reused by every job's prefix keys/values (execute)

    def rows(self, stream: str, examples: torch.Tensor, samples: torch.Tensor | None = None) -> torch.Tensor:
        k = self.samples[stream]
        local = (examples - self.first) * k
        return local + samples if samples is not None and k > 1 else local

    def get(self, stream: str, key: CacheKey, examples: torch.Tensor, samples: torch.Tensor | None = None):
        tensor = self.tensors[(stream, key)]
        return tensor[self.rows(stream, examples, samples).to(tensor.device)]
