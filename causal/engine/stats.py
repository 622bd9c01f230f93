"""Statistics passes: every example of a prompt column run once, before any patched job.

Methods declare what they need as accumulators (`Method.statistics`): a column, a
(site, layer) key, and what to do with each batch's activation there. All accumulators
on one column share one pass; `finish` then hands each its result.

Also here, because more than one method draws on them: seeded noise and resample donors,
fixed per (seed, example) so any batching draws the same numbers.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Protocol

import torch

from causal.engine.plan import CacheKey


class Accumulator(Protocol):
    column: str  # the prompt column whose unpatched run it reads
    key: CacheKey

    def add(self, act: torch.Tensor, examples: torch.Tensor) -> None: ...

    def finish(self) -> None: ...


def run_statistics(accumulators: list[Accumulator], run_column: Callable) -> None:
    """`run_column(column, hooks)` runs every example of a column once with recording hooks."""
    by_column: dict[str, list[Accumulator]] = defaultdict(list)
    for accumulator in accumulators:
        by_column[accumulator.column].append(accumulator)
    for column, group in by_column.items():
        hooks = defaultdict(list)
        for accumulator in group:
            hooks[accumulator.key].append(accumulator)
        run_column(column, {key: _fan_out(members) for key, members in hooks.items()})
        for accumulator in group:
            accumulator.finish()


def _fan_out(accumulators: list[Accumulator]) -> Callable:
    def record(act: torch.Tensor, start: int, examples: torch.Tensor) -> None:
        for accumulator in accumulators:
            accumulator.add(act.detach().float(), examples)
    return record


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
