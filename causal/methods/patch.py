"""patch SITES from SOURCE into BASE [within basis("FILE")]: interchange (activation) patching.

The base run's activations at each swept site are replaced by the source run's at the same
site and position; both directions (noising, denoising) are the choice of SOURCE and BASE.
`within basis(...)` swaps only the span of a saved basis B (an interchange intervention on a
subspace, Geiger et al.): h' = h + B Bᵀ (h_source - h); the rest of h stays the base run's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from causal.methods.base import Method, method, source_writes
from causal.methods.subspace import site_basis


@method("patch")
@dataclass
class Patch(Method):
    source: str
    basis: torch.Tensor | None = None  # (d, k) orthonormal, from `within basis(...)`

    @classmethod
    def resolve(cls, node, resolution):
        source, base = resolution.source_and_base(node)
        sweep = resolution.sweep(node.sites, base)
        basis = site_basis(resolution, node, sweep) if node.get("within") is not None else None
        return cls(resolution.name_for(node, node.sites[0].name), resolution.statement(node.span), base, sweep, source,
                   basis)

    def records(self, n_layers):
        return {self.source: self.site_keys}

    def writes(self, job, run, state):
        writes = source_writes(self, self.source, job, run)
        for write in (w for group in writes.values() for w in group):
            write.basis = self.basis
        return writes
