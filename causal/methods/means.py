"""Linear combinations of mean activations: steering vectors and difference-of-means bases.

`4 * (mean(positive) - mean(negative))` becomes coef x mean(column [at positions]) terms, each mean
over every example and selected position of that column's unpatched run at the site it is used at.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from causal.errors import CausalError, Span
from causal.lang import ast
from causal.methods.statistics import MaskedMean
from causal.resolve.positions import position_masks


@dataclass(frozen=True, eq=False)
class MeanTerm:
    """coef * mean activation of `column` over examples and the positions in `mask`."""

    coef: float
    column: str
    mask: torch.Tensor  # (examples, width) bool


def mean_term(resolution, coef: float, mean: ast.MeanOf) -> MeanTerm:
    prompts = resolution.prompt(mean.column, mean.span)
    mask = position_masks(mean.positions, prompts, resolution.named, default_last=False)
    return MeanTerm(coef, mean.column, mask)


def mean_statistics(terms, keys, vectors: dict) -> list[MaskedMean]:
    """Statistics passes that leave sum(coef x mean) per site key in `vectors`."""
    def adder(key, coef):
        def add(mean: torch.Tensor) -> None:
            vectors[key] = vectors.get(key, 0) + coef * mean
        return add
    return [MaskedMean(term.column, key, term.mask, adder(key, term.coef)) for key in keys for term in terms]


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


__all__ = ["MeanTerm", "linear_terms", "mean_statistics", "mean_term"]
