"""steer SITES by EXPR [on BASE]: activation addition along a vector of mean activations.

`steer SITES by loreft("FILE")` instead applies a LoReFT a `reft` run learned and saved (bases/):
h -> h + R (W h + b − Rᵀ h) at the selected positions.

The vector is linear in `mean(column [at positions])` terms (e.g. 4 * (mean(pos) - mean(neg)));
each mean is over examples and positions of that column's unpatched run, at the steered site.
On SAE feature sites a number may stand alone or be added: `steer sae(...)[feature=7] by 4` adds
4 to the feature, i.e. 4 x its decoder direction to the activation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from causal.engine.stats import MaskedMean
from causal.engine.writes import Write, grouped
from causal.errors import CausalError, Span
from causal.lang import ast
from causal.methods.base import Method, method
from causal.methods.rotations import loreft_edit
from causal.methods.subspace import loreft_parameters
from causal.models.adapter import FEATURE
from causal.resolve.positions import position_masks


@dataclass(frozen=True, eq=False)
class MeanTerm:
    """coef * mean activation of `column` over examples and the positions in `mask`."""

    coef: float
    column: str
    mask: torch.Tensor  # (examples, width) bool


@method("steer")
@dataclass
class Steer(Method):
    terms: tuple[MeanTerm, ...]
    constant: float = 0.0  # added as it is: feature sites only (a number of feature activation)
    loreft: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # R, W, b a `reft` run saved

    @classmethod
    def resolve(cls, node, resolution):
        base = node.get("on") or resolution.default_base(node.span)
        resolution.run_prompt(base, node.span_of("on") or node.span)
        sweep = resolution.sweep(node.sites, base)
        name, statement = resolution.name_for(node, node.sites[0].name), resolution.statement(node.span)
        if node.get("loreft") is not None:
            return cls(name, statement, base, sweep, (), loreft=loreft_parameters(resolution, node, sweep))
        features = all(resolution.adapter.site_info(t.site).role == FEATURE for point in sweep.points for t in point)
        means, constant = linear_terms(node.get("vector"), node.span, features)
        terms = tuple(cls.mean_term(resolution, coef, mean) for coef, mean in means)
        return cls(name, statement, base, sweep, terms, constant)

    @staticmethod
    def mean_term(resolution, coef: float, mean: ast.MeanOf) -> MeanTerm:
        prompts = resolution.prompt(mean.column, mean.span)
        mask = position_masks(mean.positions, prompts, resolution.named, default_last=False)
        return MeanTerm(coef, mean.column, mask)

    def statistics(self, experiment, state):
        vectors = state.setdefault("vectors", {})

        def adder(key, coef):
            def add(mean: torch.Tensor) -> None:
                vectors[key] = vectors.get(key, 0) + coef * mean
            return add
        return [MaskedMean(term.column, key, term.mask, adder(key, term.coef))
                for key in self.site_keys for term in self.terms]

    writes_past_prompt = True  # one vector for every position, generated ones too

    def writes(self, job, run, state):
        masks = run.masks.of_points(self, job)
        if self.loreft is not None:
            return grouped([(key, Write(where, None, edit=self.loreft_edit)) for (key, _), where in masks.items()])
        return grouped([(key, Write(where, self.vector(key, state), add=True)) for (key, _), where in masks.items()])

    def loreft_edit(self, h: torch.Tensor) -> torch.Tensor:
        basis, weight, bias = (t.to(h.device, h.dtype) for t in self.loreft)
        return loreft_edit(h, basis, weight, bias)

    def vector(self, key, state) -> torch.Tensor:
        """(1, 1, *trailing dims): the means' combination plus the constant, broadcast over rows and positions."""
        vector = state["vectors"].get(key, 0) + self.constant if self.terms else torch.tensor(self.constant)
        return vector.reshape(1, 1, *vector.shape) if vector.dim() else vector.reshape(1, 1, 1)


def linear_terms(expr: ast.Expr, span: Span, features: bool = False) -> tuple[list[tuple[float, ast.MeanOf]], float]:
    """A steering expression as coef * mean(...) terms and a constant; products of means are errors, and so is
    a constant on sites other than SAE features (what would a number added to every dimension mean?)."""
    def walk(node) -> tuple[list[tuple[float, ast.MeanOf]], float]:
        if isinstance(node, (int, float)):
            return [], float(node)
        if isinstance(node, ast.MeanOf):
            return [(1.0, node)], 0.0
        left, right = walk(node.left), walk(node.right)
        if node.op in "+-":
            sign = 1.0 if node.op == "+" else -1.0
            return left[0] + [(sign * c, m) for c, m in right[0]], left[1] + sign * right[1]
        if left[0] and right[0]:
            raise CausalError("a steering vector is linear in the means: one side of '*' must be a number", node.span)
        scale, terms = (left[1], right[0]) if right[0] else (right[1], left[0])
        return [(scale * c, m) for c, m in terms], left[1] * right[1]
    terms, constant = walk(expr)
    if features:
        return terms, constant
    if not terms:
        raise CausalError("a steering vector needs at least one mean(column) term, e.g. "
                          "4 * (mean(positive) - mean(negative))", span,
                          hint="a plain number steers SAE features: steer sae(\"...\")[feature=7] by 4")
    if constant:
        raise CausalError(f"a steering vector cannot add a plain number ({constant:g}) to activations", span)
    return terms, constant
