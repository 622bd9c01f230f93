"""Statistics passes: every example of a prompt column run once, before any patched job.

Methods declare what they need as accumulators (`Method.statistics`, causal.methods.statistics): a
column, a (site, layer) key, and what to do with each batch's activation there. All accumulators on
one column share one pass; `finish` then hands each its result.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from causal.methods.statistics import Accumulator


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
