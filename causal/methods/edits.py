"""Masked writes per (site, layer): the one way any method changes a forward pass.

A write replaces (or adds to) a site's activation where its mask is set; the mask
covers absolute positions, so a forward that starts part-way (engine.forward) slices it.
Rows of one pass may belong to different sweep points: masks are per row (`Masks`), values
are gathered per row from the cached base runs (`Caches`). What to write is the method's.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from causal.values import CacheKey, Experiment, Job, Target, absolute_positions

ZERO = None  # a Write value of None writes zeros


@dataclass
class Write:
    where: torch.Tensor  # (rows, width, *extra dims) bool
    value: torch.Tensor | None  # None: zero; else (rows or 1, width or 1, *trailing dims)
    add: bool = False
    basis: torch.Tensor | None = None  # (d, k) orthonormal: only the span moves, h + B Bᵀ (value - h), or + B Bᵀ value
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None  # a function of the activation itself (a LoReFT)


def as_hook(writes: list[Write]):
    """The adapter hook applying `writes` in order to an activation that starts at position `start`."""
    def apply(act: torch.Tensor, start: int) -> torch.Tensor:
        length = act.shape[1]
        for write in writes:
            where = write.where[:, start:start + length].to(act.device)
            where = where.reshape(*where.shape, *([1] * (act.dim() - where.dim())))
            if write.edit is not None:
                act = torch.where(where, write.edit(act), act)
                continue
            value = None if write.value is None else _at_positions(write.value, start, length).to(act.device, act.dtype)
            if write.basis is not None:  # only the span moves: to the value (zero without one), or by it (add)
                basis = write.basis.to(act.device, act.dtype)
                moved = value if write.add else (-act if value is None else value - act)
                act = act + where * ((moved @ basis) @ basis.T)
            elif value is None:
                act = act.masked_fill(where, 0.0)
            else:
                act = act + where * value if write.add else torch.where(where, value, act)
        return act
    return apply


def _at_positions(value: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """A write's value for the positions the forward computes (one value for all positions stays as it is)."""
    return value if value.shape[1] == 1 else value[:, start:start + length]


class Masks:
    """Where targets write, per row of a job: positions and extra-dim slices as (rows, width, *extra) bools."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self.adapter = experiment.model.adapter

    def of_points(self, method, job: Job, also=None) -> dict[tuple[CacheKey, str], torch.Tensor]:
        """(key, role) -> mask over the job's rows, each row masked by its own sweep point's targets.

        Targets write with role "main"; `also(target, point, job)` may name more (role, target) pairs
        for the same rows (tracing's severed sites, path patching's frozen heads).
        """
        masks: dict[tuple[CacheKey, str], torch.Tensor] = {}
        for point_index in job.points.unique().tolist():
            rows = (job.points == point_index).nonzero()[:, 0]
            point = method.sweep.points[point_index]
            for target in point:
                self.add(masks, target, "main", rows, job, method.base)
                for role, extra in (also(target, point, job) if also else ()):
                    self.add(masks, extra, role, rows, job, method.base)
        return masks

    def add(self, masks: dict, target: Target, role: str, rows: torch.Tensor, job: Job, base: str) -> None:
        where = self.target(target, job.examples[rows], base)
        for layer in target.layers:
            key = ((target.site, layer), role)
            if key not in masks:
                masks[key] = torch.zeros((len(job.examples), *where.shape[1:]), dtype=torch.bool)
            masks[key][rows] |= where

    def target(self, target: Target, examples: torch.Tensor, base: str) -> torch.Tensor:
        """(rows, width, *extra) bool: the positions and extra-dim slices a target writes, per row."""
        prompts = self.experiment.prompts[base]
        width = prompts.ids.shape[1]
        lengths = prompts.lengths[examples]
        positions = torch.arange(width)[None, :]
        if target.pos is None:
            where = positions < lengths[:, None]
        elif isinstance(target.pos, str):
            where = self.experiment.positions.mask(target.pos, width)[examples]
        else:
            where = positions == absolute_positions(lengths, target.pos)[:, None]
        for index, (_, size) in enumerate(self.adapter.site_info(target.site).extra_dims):
            chosen = target.extra[index] if index < len(target.extra) else None
            size = size if size is not None else width
            dim_mask = torch.ones(size, dtype=torch.bool)
            if chosen is not None:
                dim_mask = torch.zeros(size, dtype=torch.bool)
                dim_mask[list(chosen)] = True
            where = where[..., None] & dim_mask.view(*([1] * where.dim()), size)
        return where


def target_first_position(experiment: Experiment, target: Target, examples: torch.Tensor,
                          lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first position the target writes, whether the example has that position) per example."""
    has = within_prompt(experiment, target, lengths)
    if target.pos is None:
        return torch.zeros_like(lengths), has
    if isinstance(target.pos, str):
        return experiment.positions.first(target.pos)[examples], has
    absolute = absolute_positions(lengths, target.pos)
    return absolute.clamp(min=0), has & (absolute >= 0) & (absolute < lengths)


def within_prompt(experiment: Experiment, target: Target, lengths: torch.Tensor) -> torch.Tensor:
    """Whether each prompt has the positions the target's prompt-sized dims (key_pos) select."""
    ok = torch.ones_like(lengths, dtype=torch.bool)
    dims = experiment.model.adapter.site_info(target.site).extra_dims
    for (_, size), indices in zip(dims, target.extra):
        if size is None and indices is not None:
            ok &= max(indices) < lengths
    return ok


def grouped(writes: list[tuple[CacheKey, Write]]) -> dict[CacheKey, list[Write]]:
    """(key, write) pairs -> writes per key, in order."""
    out: defaultdict = defaultdict(list)
    for key, write in writes:
        out[key].append(write)
    return dict(out)


__all__ = ["Masks", "Write", "as_hook", "grouped", "target_first_position", "within_prompt"]
