"""Edits per (site, layer): the one way any method changes a forward pass.

An edit changes a site's activation where its mask is set: replaced by a value (zeros without one),
moved by a vector, moved only within a basis' span, or mapped by a function of the activation (a
trained intervention). Each kind is a class with one `apply`; the hook that runs them (`as_hook`) is a
plain loop, so a new kind is a class here and no engine file changes. The mask covers absolute
positions, so a forward that starts part-way (engine.forward) slices it. Rows of one pass may belong to
different sweep points: masks are per row (`Masks`), values are gathered per row from the cached base
runs. What to edit is the method's.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable

import torch

from causal.values import CacheKey, Experiment, Job, Target, absolute_positions


@dataclass
class Edit:
    """Where (rows, width, *extra dims) bool over absolute positions, and the value it writes or moves by
    ((rows or 1, width or 1, *trailing dims); None where the kind needs none)."""

    where: torch.Tensor
    value: torch.Tensor | None = None

    def apply(self, act: torch.Tensor, start: int) -> torch.Tensor:
        """The activation of positions start.. with this edit made."""
        raise NotImplementedError

    def mask(self, act: torch.Tensor, start: int) -> torch.Tensor:
        where = self.where[:, start:start + act.shape[1]].to(act.device)
        return where.reshape(*where.shape, *([1] * (act.dim() - where.dim())))

    def value_at(self, act: torch.Tensor, start: int) -> torch.Tensor | None:
        """The value at the positions the forward computes (one value for every position stays as it is)."""
        if self.value is None:
            return None
        value = self.value if self.value.shape[1] == 1 else self.value[:, start:start + act.shape[1]]
        return value.to(act.device, act.dtype)

    def moved_to(self, where: torch.Tensor, value: torch.Tensor | None) -> "Edit":
        """The same edit over other positions (generation widens a prompt's edit to the new tokens)."""
        return replace(self, where=where, value=value)


@dataclass
class Replace(Edit):
    """The activation becomes the value (another run's, a mean, a donor's), or zero without one."""

    def apply(self, act, start):
        where = self.mask(act, start)
        value = self.value_at(act, start)
        return act.masked_fill(where, 0.0) if value is None else torch.where(where, value, act)


@dataclass
class Add(Edit):
    """The value is added (a steering vector, tracing's noise)."""

    def apply(self, act, start):
        return act + self.mask(act, start) * self.value_at(act, start)


@dataclass
class InSpan(Edit):
    """Only the span of an orthonormal basis B (d, k) moves: h + B Bᵀ (value - h) (zero without a value),
    or h + B Bᵀ value when it adds."""

    basis: torch.Tensor | None = None
    adds: bool = False

    def apply(self, act, start):
        value = self.value_at(act, start)
        basis = self.basis.to(act.device, act.dtype)
        moved = value if self.adds else (-act if value is None else value - act)
        return act + self.mask(act, start) * ((moved @ basis) @ basis.T)


@dataclass
class Mapped(Edit):
    """The activation becomes a function of itself (a trained edit: a LoReFT)."""

    function: Callable[[torch.Tensor], torch.Tensor] | None = None

    def apply(self, act, start):
        return torch.where(self.mask(act, start), self.function(act), act)


def in_span(edit: Replace | Add, basis: torch.Tensor) -> InSpan:
    """A replacement or an addition confined to the span of `basis` (`within basis(...)`)."""
    return InSpan(edit.where, edit.value, basis, adds=isinstance(edit, Add))


def as_hook(edits: list[Edit]):
    """The adapter hook making `edits` in order on an activation that starts at position `start`."""
    def apply(act: torch.Tensor, start: int) -> torch.Tensor:
        for edit in edits:
            act = edit.apply(act, start)
        return act
    return apply


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


def grouped(edits: list[tuple[CacheKey, Edit]]) -> dict[CacheKey, list[Edit]]:
    """(key, edit) pairs -> edits per key, in order."""
    out: defaultdict = defaultdict(list)
    for key, edit in edits:
        out[key].append(edit)
    return dict(out)


__all__ = ["Add", "Edit", "InSpan", "Mapped", "Masks", "Replace", "as_hook", "grouped", "in_span", "target_first_position", "within_prompt"]
