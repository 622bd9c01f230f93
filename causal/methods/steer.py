"""steer SITES by EXPR [on BASE]: activation addition along a vector of mean activations.

`within basis(...)` adds only the vector's part in the span of B: h + B Bᵀ v.
`steer SITES by loreft("FILE")` instead applies a LoReFT a `reft` run learned and saved (bases/):
h -> h + R (W h + b − Rᵀ h) at the selected positions.

The vector is linear in `mean(column [at positions])` terms (e.g. 4 * (mean(pos) - mean(neg)));
each mean is over examples and positions of that column's unpatched run, at the steered site.
On SAE feature sites a number may stand alone or be added: `steer sae(...)[feature=7] by 4` adds
4 to the feature, i.e. 4 x its decoder direction to the activation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from causal.methods.base import JobMethod, method
from causal.methods.edits import Add, Mapped, grouped, in_span
from causal.methods.means import MeanTerm, linear_terms, mean_statistics, mean_term
from causal.methods.rotations import loreft_edit
from causal.methods.subspace import BasisState, FixedBasis, MeansBasis, loreft_parameters, within_basis
from causal.models.adapter import FEATURE


@dataclass
class SteerState(BasisState):
    """The mean activations its vector combines, per site."""

    vectors: dict[tuple, torch.Tensor] = field(default_factory=dict)


@method("steer")
@dataclass
class Steer(JobMethod):
    terms: tuple[MeanTerm, ...]
    constant: float = 0.0  # added as it is: feature sites only (a number of feature activation)
    loreft: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # R, W, b a `reft` run saved
    basis: FixedBasis | MeansBasis | None = None  # `within basis(...)`: only the vector's part in its span is added

    @classmethod
    def resolve(cls, node, resolution):
        base = node.get("on") or resolution.default_base(node.span)
        resolution.run_prompt(base, node.span_of("on") or node.span)
        sweep = resolution.sweep(node.sites, base)
        name, statement = resolution.name_for(node, node.sites[0].name), resolution.statement(node.span)
        basis = within_basis(resolution, node, sweep)
        if node.get("loreft") is not None:
            if basis is not None:
                raise resolution.error("a LoReFT edits its own subspace; drop within basis(...)",
                                       node.span_of("within") or node.span_of("within_means"))
            return cls(name, statement, base, sweep, (), loreft=loreft_parameters(resolution, node, sweep))
        features = all(resolution.adapter.site_info(t.site).role == FEATURE for point in sweep.points for t in point)
        means, constant = linear_terms(node.get("vector"), node.span, features)
        terms = tuple(mean_term(resolution, coef, mean) for coef, mean in means)
        return cls(name, statement, base, sweep, terms, constant, basis=basis)

    def new_state(self, experiment) -> SteerState:
        return SteerState()

    def statistics(self, experiment, state):
        basis = self.basis.statistics(self.site_keys, state) if self.basis else []
        return mean_statistics(self.terms, self.site_keys, state.vectors) + basis

    def check_statistics(self, state):
        if self.basis:
            self.basis.check(self.site_keys, state)

    writes_past_prompt = True  # one vector for every position, generated ones too

    def writes(self, job, run, state):
        masks = run.masks.of_points(self, job)
        if self.loreft is not None:
            return grouped([(key, Mapped(where, function=self.loreft_edit)) for (key, _), where in masks.items()])
        edits = [(key, Add(where, self.vector(key, state))) for (key, _), where in masks.items()]
        if self.basis:  # only the vector's part in the span is added
            edits = [(key, in_span(edit, self.basis.of(key, state))) for key, edit in edits]
        return grouped(edits)

    def loreft_edit(self, h: torch.Tensor) -> torch.Tensor:
        basis, weight, bias = (t.to(h.device, h.dtype) for t in self.loreft)
        return loreft_edit(h, basis, weight, bias)

    def vector(self, key, state) -> torch.Tensor:
        """(1, 1, *trailing dims): the means' combination plus the constant, broadcast over rows and positions."""
        vector = state.vectors.get(key, 0) + self.constant if self.terms else torch.tensor(self.constant)
        return vector.reshape(1, 1, *vector.shape) if vector.dim() else vector.reshape(1, 1, 1)
