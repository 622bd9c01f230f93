"""Statistics over all examples that interventions need before any patched run.

Mean ablation (per-position means over a reference column), steering vectors (linear
combinations of mean activations), the noise scale of causal tracing (ROME: a multiple
of the standard deviation of the noised token embeddings), resample donors, and the
noise itself (fixed per example, sample and seed, so any batching draws the same).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from causal import interventions as iv
from causal.engine.plan import CacheKey
from causal.resolve.experiment import Experiment
from causal.engine.writes import Write

EMBED: CacheKey = ("embed", None)


class Stats:
    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self.means: dict[tuple[str, CacheKey], torch.Tensor] = {}  # (column, key) -> (width, *trailing)
        self.steering: dict[tuple[str, CacheKey], torch.Tensor] = {}  # (statement, key) -> (*trailing)
        self.noise_scale: dict[str, float] = {}  # trace name -> absolute noise std
        self.donors: dict[str, torch.Tensor] = {}  # column -> (examples,) the example each one resamples from
        self._noise: dict[tuple[str, int], torch.Tensor] = {}

    def noise_write(self, trace: iv.Trace, examples: torch.Tensor, samples: torch.Tensor) -> tuple[CacheKey, Write]:
        where = trace.noise.positions[examples]
        value = torch.stack([self.noise(trace, int(e))[int(s)] for e, s in zip(examples, samples)])
        return EMBED, Write(where, value, add=True)

    def noise(self, trace: iv.Trace, example: int) -> torch.Tensor:
        """(samples, width, d) Gaussian noise for one example, at the trace's scale."""
        key = (trace.name, example)
        if key not in self._noise:
            shape = (trace.noise.samples, trace.noise.positions.shape[1], self.experiment.model.adapter.d_model)
            self._noise[key] = standard_noise(trace.noise.seed, example, shape) * self.noise_scale[trace.name]
        return self._noise[key]


def standard_noise(seed: int, example: int, shape: tuple[int, ...]) -> torch.Tensor:
    """N(0, 1) draws for one example from a generator seeded by (seed, example): batching cannot change them."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + example)
    return torch.randn(shape, generator=generator)


def compute_stats(experiment: Experiment, run_column: Callable) -> Stats:
    """`run_column(column, hooks)` runs every example of a prompt column once with recording hooks."""
    stats = Stats(experiment)
    needs: dict[str, list] = defaultdict(list)  # column -> accumulators
    for intervention in experiment.interventions:
        if isinstance(intervention, iv.Ablate) and intervention.how == "mean":
            for key in intervention.site_keys:
                needs[intervention.reference].append(_PositionMean(stats, intervention.reference, key))
        elif isinstance(intervention, iv.Ablate) and intervention.how == "resample":
            stats.donors[intervention.reference] = derangement(experiment.n_examples, experiment.seed)
        elif isinstance(intervention, iv.Steer):
            for key in intervention.site_keys:
                for term in intervention.terms:
                    needs[term.column].append(_SteeringTerm(stats, intervention.name, key, term))
        elif isinstance(intervention, iv.Trace):
            if intervention.noise.relative:
                needs[intervention.base].append(_NoiseScale(stats, intervention))
            else:
                stats.noise_scale[intervention.name] = intervention.noise.scale
    for column, accumulators in needs.items():
        hooks = defaultdict(list)
        for accumulator in accumulators:
            hooks[accumulator.key].append(accumulator)
        run_column(column, {key: _fan_out(group) for key, group in hooks.items()})
        for accumulator in accumulators:
            accumulator.finish()
    return stats


def _fan_out(accumulators: list) -> Callable:
    def record(act: torch.Tensor, start: int, examples: torch.Tensor) -> None:
        for accumulator in accumulators:
            accumulator.add(act.detach().float(), examples)
    return record


def derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation with no fixed point, so every example takes another example's activations."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    donors = torch.empty(n, dtype=torch.long)
    donors[order] = order.roll(1)
    return donors


class _PositionMean:
    """Mean over examples at each position, counting only examples long enough to have it."""

    def __init__(self, stats: Stats, column: str, key: CacheKey):
        self.stats, self.column, self.key = stats, column, key
        self.total = self.count = None

    def add(self, act: torch.Tensor, examples: torch.Tensor) -> None:
        valid = self.stats.experiment.prompts[self.column].attention_mask[examples].to(act.device, act.dtype)
        weights = valid.view(*valid.shape, *([1] * (act.dim() - 2)))
        total, count = (act * weights).sum(0), weights.sum(0)
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count

    def finish(self) -> None:
        self.stats.means[(self.column, self.key)] = (self.total / self.count.clamp(min=1)).cpu()


class _SteeringTerm:
    """Adds coef * mean(column at positions) into a statement's steering vector at one key."""

    def __init__(self, stats: Stats, name: str, key: CacheKey, term: iv.MeanTerm):
        self.stats, self.name, self.key, self.term = stats, name, key, term
        self.total, self.count = None, 0

    def add(self, act: torch.Tensor, examples: torch.Tensor) -> None:
        where = self.term.mask[examples].to(act.device)
        chosen = act[where]  # (positions, *trailing)
        total = chosen.sum(0)
        self.total = total if self.total is None else self.total + total
        self.count += len(chosen)

    def finish(self) -> None:
        vector = self.term.coef * (self.total / max(self.count, 1)).cpu()
        slot = (self.name, self.key)
        self.stats.steering[slot] = self.stats.steering.get(slot, 0) + vector


class _NoiseScale:
    """ROME: noise std = scale x the std of the embeddings of the noised (subject) tokens."""

    def __init__(self, stats: Stats, trace: iv.Trace):
        self.stats, self.trace, self.key = stats, trace, EMBED
        self.values: list[torch.Tensor] = []

    def add(self, act: torch.Tensor, examples: torch.Tensor) -> None:
        self.values.append(act[self.trace.noise.positions[examples].to(act.device)].flatten().cpu())

    def finish(self) -> None:
        self.stats.noise_scale[self.trace.name] = self.trace.noise.scale * float(torch.cat(self.values).std())
