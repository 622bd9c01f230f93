"""What each intervention does to the rows of a forward pass, as masked writes per (site, layer).

A write replaces (or adds to) a site's activation where its mask is set; the mask
covers absolute positions, so a forward that starts part-way (causal.engine.forward) slices it.
Rows of one pass may belong to different sweep points: masks are per row, values are
gathered per row from the cached base runs.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from causal import interventions as iv
from causal.engine.plan import CacheKey, Job
from causal.resolve.experiment import Experiment, Target, absolute_positions

ZERO = None


@dataclass
class Write:
    where: torch.Tensor  # (rows, width, *extra dims) bool
    value: torch.Tensor | None  # None: zero; else (rows or 1, width or 1, *trailing dims)
    add: bool = False


def as_hook(writes: list[Write]):
    """The adapter hook applying `writes` in order to an activation that starts at position `start`."""
    def apply(act: torch.Tensor, start: int) -> torch.Tensor:
        length = act.shape[1]
        for write in writes:
            where = write.where[:, start:start + length].to(act.device)
            where = where.reshape(*where.shape, *([1] * (act.dim() - where.dim())))
            if write.value is None:
                act = act.masked_fill(where, 0.0)
                continue
            value = write.value if write.value.shape[1] == 1 else write.value[:, start:start + length]
            value = value.to(act.device, act.dtype)
            act = act + where * value if write.add else torch.where(where, value, act)
        return act
    return apply


class Caches:
    """Activations recorded by the base runs of one chunk of examples, indexed by stream row."""

    def __init__(self, first_example: int, samples: dict[str, int]):
        self.first, self.samples = first_example, samples
        self.tensors: dict[tuple[str, CacheKey], torch.Tensor] = {}
        self.resume: dict[tuple[str, int], torch.Tensor] = {}  # (stream, layer) -> input of that block
        self.keys_values: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def rows(self, stream: str, examples: torch.Tensor, samples: torch.Tensor | None = None) -> torch.Tensor:
        k = self.samples[stream]
        local = (examples - self.first) * k
        return local + samples if samples is not None and k > 1 else local

    def get(self, stream: str, key: CacheKey, examples: torch.Tensor, samples: torch.Tensor | None = None):
        tensor = self.tensors[(stream, key)]
        return tensor[self.rows(stream, examples, samples).to(tensor.device)]


class WriteBuilder:
    """Builds the writes of one job: masks per row from the sweep points, values from caches and stats."""

    def __init__(self, experiment: Experiment, caches: Caches, stats):
        self.experiment, self.caches, self.stats = experiment, caches, stats
        self.adapter = experiment.model.adapter

    def for_job(self, job: Job) -> dict[CacheKey, list[Write]]:
        intervention = self.experiment.interventions[job.intervention]
        if isinstance(intervention, iv.PathPatch):
            raise TypeError("path patching has two phases; use path_phase_a / path_phase_b")
        writes = self.noise_writes(intervention, job)
        per_point = self.point_masks(intervention, job)
        for (key, role), where in per_point.items():
            writes[key].append(self.write_for(intervention, job, key, role, where))
        return dict(writes)

    # masks
    def point_masks(self, intervention: iv.Intervention, job: Job) -> dict[tuple[CacheKey, str], torch.Tensor]:
        """(key, role) -> (rows, width, *extra) mask; role says which value the rows take there."""
        masks: dict[tuple[CacheKey, str], torch.Tensor] = {}
        for point_index in job.points.unique().tolist():
            rows = (job.points == point_index).nonzero()[:, 0]
            for target in intervention.sweep.points[point_index]:
                self.add_target(masks, target, "main", rows, job)
                if isinstance(intervention, iv.Trace):
                    for site in intervention.severing:
                        layers = range(job.start_layer, self.adapter.n_layers)
                        self.add_target(masks, Target(site, tuple(layers), target.pos), "sever", rows, job)
        return masks

    def add_target(self, masks: dict, target: Target, role: str, rows: torch.Tensor, job: Job) -> None:
        where = self.target_mask(target, job.examples[rows], intervention_base(self.experiment, job))
        for layer in target.layers:
            key = ((target.site, layer), role)
            if key not in masks:
                masks[key] = torch.zeros((len(job.examples), *where.shape[1:]), dtype=torch.bool)
            masks[key][rows] |= where

    def target_mask(self, target: Target, examples: torch.Tensor, base: str) -> torch.Tensor:
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
        for index, (_, size) in enumerate(self.extra_dims(target.site)):
            chosen = target.extra[index] if index < len(target.extra) else None
            size = size if size is not None else width
            dim_mask = torch.ones(size, dtype=torch.bool)
            if chosen is not None:
                dim_mask = torch.zeros(size, dtype=torch.bool)
                dim_mask[list(chosen)] = True
            where = where[..., None] & dim_mask.view(*([1] * where.dim()), size)
        return where

    def extra_dims(self, site: str):
        return self.adapter.site_info(site).extra_dims

    # values
    def write_for(self, intervention: iv.Intervention, job: Job, key: CacheKey, role: str,
                  where: torch.Tensor) -> Write:
        examples = job.examples
        if role == "sever":  # frozen at the noised run's own value
            return Write(where, self.caches.get(intervention.noised_name, key, examples, job.samples))
        if isinstance(intervention, iv.Patch):
            return Write(where, self.caches.get(intervention.source, key, examples))
        if isinstance(intervention, iv.Trace):
            return Write(where, self.caches.get(intervention.base, key, examples))
        if isinstance(intervention, iv.Steer):
            return Write(where, self.stats.steering[(intervention.name, key)][None, None], add=True)
        if isinstance(intervention, iv.Attribute):  # exact verification of its top sites
            return Write(where, self.caches.get(intervention.source, key, examples))
        if intervention.how == "zero":
            return Write(where, ZERO)
        if intervention.how == "mean":
            return Write(where, self.stats.means[(intervention.reference, key)][None])
        donors = self.stats.donors[intervention.reference][examples]
        return Write(where, self.caches.get(intervention.reference, key, donors))

    def noise_writes(self, intervention: iv.Intervention, job: Job) -> defaultdict:
        """Noised streams add their noise to the embeddings in every pass that runs on them."""
        writes: defaultdict = defaultdict(list)
        if isinstance(intervention, iv.Trace):
            key, write = self.stats.noise_write(intervention, job.examples, job.samples)
            writes[key].append(write)
        return writes

    # path patching (Wang et al. 2022)
    def path_phase_a(self, intervention: iv.PathPatch, job: Job) -> dict[CacheKey, list[Write]]:
        """Senders take the source run's values; every other head (and what `freezing` names) keeps its base value."""
        masks = self.point_masks(intervention, job)
        writes: defaultdict = defaultdict(list)
        n_layers = self.adapter.n_layers
        for point_index in job.points.unique().tolist():
            rows = (job.points == point_index).nonzero()[:, 0]
            first = min(layer for t in intervention.sweep.points[point_index] for layer in t.layers)
            for site in ("z", *intervention.freezing):  # the senders themselves are excluded below
                self.add_target(masks, Target(site, tuple(range(first, n_layers)), None), "freeze", rows, job)
        for (key, role), where in masks.items():
            if role == "freeze":
                senders = masks.get((key, "main"))
                keep = where & ~senders if senders is not None else where
                writes[key].insert(0, Write(keep, self.caches.get(intervention.base, key, job.examples)))
            else:
                writes[key].append(Write(where, self.caches.get(intervention.source, key, job.examples)))
        return dict(writes)

    def path_receivers(self, intervention: iv.PathPatch, job: Job) -> dict[CacheKey, torch.Tensor]:
        """(key -> (rows, width, *extra) mask) of the receiver inputs, the same for every row."""
        masks: dict = {}
        everyone = torch.arange(len(job.examples))
        for target in intervention.receivers or ():
            self.add_target(masks, target, "receiver", everyone, job)
        return {key: where for (key, _), where in masks.items()}


def intervention_base(experiment: Experiment, job: Job) -> str:
    return experiment.interventions[job.intervention].base


__all__ = ["Caches", "Write", "WriteBuilder", "as_hook"]
