"""Experiment -> Plan: which activations to cache, and the batched runs that apply each intervention.

A run packs (site point, example) rows into one forward pass, so a sweep over k sites
costs k*examples/batch_size forwards instead of k*examples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from causal.resolve import Experiment


@dataclass
class Run:
    intervention: int
    examples: torch.Tensor  # (rows,) example index per row
    points: torch.Tensor  # (rows,) index into the sweep's points per row


@dataclass
class Plan:
    batch_size: int
    # prompt column -> (site, layer) pairs whose activations that column's clean run must record
    caches: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(len(r.examples) for r in self.runs)


def compile_plan(experiment: Experiment, batch_size: int) -> Plan:
    plan = Plan(batch_size, {name: set() for name in experiment.prompts})
    n_examples = len(experiment.examples)
    for index, intervention in enumerate(experiment.interventions):
        sweep = intervention.sweep
        layers = sorted({layer for point in sweep.points for layer in point.layers})
        read_from = {"patch": intervention.source, "mean": intervention.base}.get(intervention.method)
        if read_from is not None:
            plan.caches[read_from] |= {(sweep.component, layer) for layer in layers}
        points = torch.arange(len(sweep.points)).repeat_interleave(n_examples)
        examples = torch.arange(n_examples).repeat(len(sweep.points))
        for start in range(0, len(points), batch_size):
            plan.runs.append(Run(index, examples[start:start + batch_size], points[start:start + batch_size]))
    return plan
