"""patch SITES from SOURCE into BASE: interchange (activation) patching.

The base run's activations at each swept site are replaced by the source run's at the same
site and position; both directions (noising, denoising) are the choice of SOURCE and BASE.
"""
from __future__ import annotations

from dataclasses import dataclass

from causal.methods.base import Method, method, source_writes


@method("patch")
@dataclass
class Patch(Method):
    source: str

    @classmethod
    def resolve(cls, node, resolution):
        source, base = resolution.source_and_base(node)
        sweep = resolution.sweep(node.sites, base)
        return cls(resolution.name_for(node, node.sites[0].name), resolution.statement(node.span), base, sweep, source)

    def records(self, n_layers):
        return {self.source: self.site_keys}

    def writes(self, job, run, state):
        return source_writes(self, self.source, job, run)
