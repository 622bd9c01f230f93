"""reft SITES on PROMPTS predicting COLUMN by loreft(k=4): representation fine-tuning (Wu et al. 2024).

LoReFT edits a site's vectors h -> h + R (W h + b − Rᵀ h): the k coordinates of h in the span of R
(d x k, orthonormal) become a learned linear function W h + b of h. Trained with the model frozen,
on the next-token loss of COLUMN (one token per example) at the prompt's last position; the held-out
accuracy says how far the edit alone makes the model answer COLUMN. Its parameters are written with
the results (bases/), and `steer SITES by loreft("FILE")` applies them in another experiment.

Training is align's (causal.methods.training): candidates (sweep point x k) in the rows of one
forward and backward, a seeded train / dev / held-out split, early stopping, epoch checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from causal.methods.align import Align, AlignState
from causal.methods.base import Variable, method
from causal.methods.kinds import ResultKind, result_kind
from causal.methods.rotations import Loreft

TRAINERS = ("loreft",)


REFT = result_kind(ResultKind("reft", score=("_accuracy", "held-out accuracy")))


@method("reft")
@dataclass
class Reft(Align):
    @classmethod
    def resolve(cls, node, resolution):
        base = node.get("on") or resolution.default_base(node.span)
        resolution.run_prompt(base, node.span_of("on") or node.span)
        return cls.trained(node, resolution, base, None, TRAINERS)

    def new_module(self, point: int, k_index: int, generator: torch.Generator, dtype: torch.dtype):
        return Loreft(self.width, self.training.ks[k_index], generator, dtype)

    def variables(self, effects, state: AlignState) -> list[Variable]:
        t = self.training
        attrs = self.training_attrs(state)
        k = {"k": list(t.ks)}
        epochs = {"epoch": list(range(1, t.epochs + 1))}
        width, most = list(range(self.width)), list(range(max(t.ks)))
        weights = torch.full((*state.size.shape, max(t.ks), self.width), float("nan"))
        biases = torch.full((*state.size.shape, max(t.ks)), float("nan"))
        for (p, j), saved in state.saved.items():
            weights[p, j, : saved["weight"].shape[0]] = saved["weight"]
            biases[p, j, : saved["bias"].shape[0]] = saved["bias"]
        return [
            Variable(f"{self.name}_accuracy", state.iia, self.sweep,
                     {**attrs, "long_name": f"held-out accuracy of {self.column} under the learned edit"}, ("k",), k),
            Variable(f"{self.name}_loss", state.loss, self.sweep, {**attrs, "long_name": "mean training loss"},
                     ("k", "epoch"), {**k, **epochs}),
            Variable(f"{self.name}_dev_accuracy", state.dev, self.sweep,
                     {**attrs, "long_name": f"accuracy of {self.column} on the dev examples, per epoch"},
                     ("k", "epoch"), {**k, **epochs}),
            Variable(f"{self.name}_size", state.size, self.sweep,
                     {**attrs, "long_name": "dimensions of the edited subspace"}, ("k",), k),
            Variable(f"{self.name}_basis", state.bases, self.sweep,
                     {**attrs, "long_name": "R: the edited subspace's basis (component, direction), NaN past k"},
                     ("k", "component", "direction"), {**k, "component": width, "direction": most}),
            Variable(f"{self.name}_weight", weights, self.sweep,
                     {**attrs, "long_name": "W: each direction's target as a linear function of h, NaN past k"},
                     ("k", "direction", "component"), {**k, "direction": most, "component": width}),
            Variable(f"{self.name}_bias", biases, self.sweep,
                     {**attrs, "long_name": "b: each direction's target offset, NaN past k"},
                     ("k", "direction"), {**k, "direction": most}),
        ]

    def attrs(self) -> dict:
        return {**super().attrs(), "kind": REFT.kind}


__all__ = ["Reft"]
