"""patch SITES from SOURCE into BASE [within basis(...)]: interchange (activation) patching.

The base run's activations at each swept site are replaced by the source run's at the same
site and position; both directions (noising, denoising) are the choice of SOURCE and BASE.
`within basis(...)` swaps only the span of a basis B, saved (`"FILE"`) or a difference of means
(an interchange intervention on a subspace, Geiger et al.): h' = h + B Bᵀ (h_source - h); the
rest of h stays the base run's.
"""
from __future__ import annotations

from dataclasses import dataclass

from causal.methods.base import JobMethod, method, source_writes
from causal.methods.edits import in_span
from causal.methods.subspace import BasisState, FixedBasis, MeansBasis, within_basis


@method("patch")
@dataclass
class Patch(JobMethod):
    source: str
    basis: FixedBasis | MeansBasis | None = None  # from `within basis(...)`

    @classmethod
    def resolve(cls, node, resolution):
        source, base = resolution.source_and_base(node)
        sweep = resolution.sweep(node.sites, base)
        basis = within_basis(resolution, node, sweep)
        return cls(resolution.name_for(node, node.sites[0].name), resolution.statement(node.span), base, sweep, source,
                   basis)

    def new_state(self, experiment) -> BasisState:
        return BasisState()

    def records(self, n_layers):
        return {self.source: self.site_keys}

    def statistics(self, experiment, state):
        return self.basis.statistics(self.site_keys, state) if self.basis else []

    def check_statistics(self, state):
        if self.basis:
            self.basis.check(self.site_keys, state)

    def writes(self, job, run, state):
        edits = source_writes(self, self.source, job, run)
        if self.basis:  # within a subspace: only its span takes the source's value
            return {key: [in_span(edit, self.basis.of(key, state)) for edit in group] for key, group in edits.items()}
        return edits
