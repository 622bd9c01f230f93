"""What methods measure over whole prompt columns before any job (`Method.statistics`): accumulators the
engine's statistics pass feeds (causal.engine.stats), and the seeded draws more than one method takes
(noise, resample donors), fixed per (seed, example) so any batching draws the same numbers.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from causal.values import CacheKey


class Accumulator(Protocol):
    column: str  # the prompt column whose unpatched run it reads
    key: CacheKey

    def add(self, act: torch.Tensor, examples: torch.Tensor) -> None: ...

    def finish(self) -> None: ...


def standard_noise(seed: int, example: int, shape: tuple[int, ...]) -> torch.Tensor:
    """N(0, 1) draws for one example from a generator seeded by (seed, example): batching cannot change them."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + example)
    return torch.randn(shape, generator=generator)


def derangement(n: int, seed: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """A permutation with no fixed point, so every example takes another example's activations; with
    `groups` (a key per example, e.g. its token length), only within each group (each of 2 or more)."""
    generator = torch.Generator().manual_seed(seed)
    donors = torch.empty(n, dtype=torch.long)
    keys = torch.zeros(n, dtype=torch.long) if groups is None else groups
    for key in keys.unique().tolist():  # ascending: one group draws exactly what the ungrouped version drew
        members = (keys == key).nonzero().flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        donors[order] = order.roll(1)
    return donors


class PositionMean:
    """Mean over examples at each position, counting only examples long enough to have it."""

    def __init__(self, prompts, column: str, key: CacheKey, into: dict):
        self.prompts, self.column, self.key, self.into = prompts, column, key, into
        self.total = self.count = None

    def add(self, act: torch.Tensor, examples: torch.Tensor) -> None:
        valid = self.prompts.attention_mask[examples].to(act.device, act.dtype)
        weights = valid.view(*valid.shape, *([1] * (act.dim() - 2)))
        total, count = (act * weights).sum(0), weights.sum(0)
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count

    def finish(self) -> None:
        self.into[self.key] = (self.total / self.count.clamp(min=1)).cpu()


class MaskedMean:
    """Mean activation over the (example, position) pairs a mask selects: (*trailing)."""

    def __init__(self, column: str, key: CacheKey, mask: torch.Tensor, done: Callable[[torch.Tensor], None]):
        self.column, self.key, self.mask, self.done = column, key, mask, done
        self.total, self.count = None, 0

    def add(self, act: torch.Tensor, examples: torch.Tensor) -> None:
        chosen = act[self.mask[examples].to(act.device)]  # (positions, *trailing)
        total = chosen.sum(0)
        self.total = total if self.total is None else self.total + total
        self.count += len(chosen)

    def finish(self) -> None:
        self.done((self.total / max(self.count, 1)).cpu())
