"""The resolved experiment: what the resolver hands to the compiler, every name and index checked.

Indices here are final: layers and heads are 0-based and in range; positions are either
an integer (negative counts from each prompt's end), a named position (resolved per
example), or None for every position of the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from causal.data import Examples, Prompts
from causal.lang import ast
from causal.metrics import MetricKind
from causal.models import LoadedModel

Position = int | str | None


def absolute_positions(lengths: torch.Tensor, pos: int) -> torch.Tensor:
    """(examples,) where an integer position falls in each prompt: negative counts from its end."""
    return lengths + pos if pos < 0 else torch.full_like(lengths, pos)


@dataclass(frozen=True)
class Target:
    """One site to intervene on in a forward row: a site at some layers, a position, and a slice of its extra dims."""

    site: str
    layers: tuple[int | None, ...]  # (None,) for sites without layers (embed)
    pos: Position
    extra: tuple[tuple[int, ...] | None, ...] = ()  # per extra dim of the site (head, neuron, ...): indices or all


@dataclass
class Sweep:
    """Points of an intervention, row-major over `dims`; each point is the targets applied together."""

    dims: tuple[str, ...]
    coords: dict[str, list]
    points: list[tuple[Target, ...]]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.coords[d]) for d in self.dims)


@dataclass
class Metric:
    name: str  # label, e.g. "logit_diff(io, s)"
    kind: "MetricKind"  # its declaration in causal/metrics.py
    answers: tuple[torch.Tensor, ...]  # per answer column, (examples,) token ids
    next_token: bool
    reference: str | None  # prompt column whose unpatched output kl/similarity compare against
    positions: dict[str, torch.Tensor]  # base column -> (examples, width) bool mask of positions read
    normalization: ast.Normalization | None = None


@dataclass
class NamedPositions:
    """Named positions per example, located in the anchor column's prompts."""

    anchor: str | None
    indices: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)  # name -> per example
    lengths: torch.Tensor | None = None  # the anchor prompts' lengths, to check other prompts line up
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, name: str, width: int) -> torch.Tensor:
        """(examples, width) bool: where `name` falls in each example (built once per width)."""
        key = (name, width)
        if key not in self._masks:
            rows = self.indices[name]
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for example, positions in enumerate(rows):
                mask[example, list(positions)] = True
            self._masks[key] = mask
        return self._masks[key]

    def first(self, name: str) -> torch.Tensor:
        """(examples,) the first position `name` covers in each example."""
        return torch.tensor([min(positions) for positions in self.indices[name]])


@dataclass
class Experiment:
    file: ast.ExperimentFile
    name: str
    model: LoadedModel
    examples: Examples
    prompts: dict[str, Prompts]
    positions: NamedPositions
    metrics: list[Metric]
    interventions: list  # causal.methods.Method, one per intervention statement
    seed: int = 0
    runs: list[str] = field(default_factory=list)  # prompt columns the model runs on (each gets a baseline)

    @property
    def n_examples(self) -> int:
        return len(self.examples)
