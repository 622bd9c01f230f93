"""What each intervention statement resolves to: the prompts it runs on, its sweep, and its own settings.

How these turn into edits of a forward pass is `causal.engine.writes`; how rows are batched is
`causal.engine.plan`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from causal.resolve.experiment import Sweep, Target


@dataclass
class Intervention:
    name: str
    statement: str
    base: str  # the prompt column the forward pass runs on
    sweep: Sweep

    kind = "intervention"

    @property
    def method(self) -> str:
        return self.kind

    @property
    def site_keys(self) -> set[tuple[str, int | None]]:
        """Every (site, layer) some point of the sweep writes."""
        return {(t.site, layer) for point in self.sweep.points for t in point for layer in t.layers}


@dataclass
class Patch(Intervention):
    """Activations of the base run replaced by the source run's at the same site and position."""

    source: str
    kind = "patch"


@dataclass
class Ablate(Intervention):
    """Activations replaced by zero, their mean over `reference`, or another example's (resample)."""

    how: str  # zero | mean | resample
    reference: str
    kind = "ablate"

    @property
    def method(self) -> str:
        return self.how


@dataclass(frozen=True, eq=False)
class MeanTerm:
    """coef * mean activation of `column` over examples and the positions in `mask`."""

    coef: float
    column: str
    mask: torch.Tensor  # (examples, width) bool


@dataclass
class Steer(Intervention):
    """A vector added at the site: a linear combination of mean activations."""

    terms: tuple[MeanTerm, ...]
    kind = "steer"


@dataclass(frozen=True, eq=False)
class NoiseSpec:
    """Gaussian noise added to the token embeddings at `positions` (ROME's corruption)."""

    scale: float
    relative: bool  # scale is in units of the standard deviation of the noised embeddings
    samples: int
    seed: int
    positions: torch.Tensor  # (examples, width) bool


@dataclass
class Trace(Intervention):
    """Causal tracing: restore clean states into a run whose subject embeddings are noised."""

    noise: NoiseSpec
    severing: tuple[str, ...]  # sites frozen at their noised values at the restored token (mlp_out, attn_out)
    noised_name: str  # the noised run's baseline variable
    kind = "trace"


@dataclass
class PathPatch(Intervention):
    """Sender outputs from the source run reach only the receivers (Wang et al. 2022)."""

    source: str
    receivers: tuple[Target, ...] | None  # None: the logits, through the residual stream
    freezing: tuple[str, ...]  # besides every other head: sites frozen at base values (mlp_out)
    kind = "path"

    @property
    def first_receiver_layer(self) -> int | None:
        """Where the second pass (receivers patched) may start; None when the receivers are the logits."""
        if self.receivers is None:
            return None
        return min(layer or 0 for target in self.receivers for layer in target.layers)


@dataclass
class Attribute(Intervention):
    """Attribution patching: first-order estimate of patching each site, from one backward pass."""

    source: str
    verify_top: int | None
    exact_name: str | None  # the variable of exactly patched top sites
    kind = "attribute"
