"""Names the language fixes, checked on the parsed file alone: no model, no data, no torch.

The CLI runs this right after parsing, so a misspelt metric is reported as fast as a syntax
error; the resolver runs the same check, so the message is the same either way.
"""
from __future__ import annotations

from causal.errors import CausalError, did_you_mean
from causal.lang import ast
from causal.metrics import METRICS
from causal.values import MetricKind


def metric_kind(node: ast.MetricDecl) -> MetricKind:
    kind = METRICS.get(node.name)
    if kind is None:
        raise CausalError(f"unknown metric {node.name!r}; metrics: {', '.join(METRICS)}", node.span,
                          did_you_mean(node.name, METRICS))
    return kind


def check_names(file: ast.ExperimentFile) -> None:
    for node in file.metrics:
        metric_kind(node)
