"""AST + loaded model + data -> a typed Experiment, with every index, column and token checked.

All user mistakes that can be found without running the model are found here, so a
run never fails half-way for a reason the file already showed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from causal.data import Examples, Prompts, answer_ids, load_examples, tokenize_column
from causal.errors import CausalError, Span, did_you_mean
from causal.lang import ast
from causal.models import LoadedModel

ABLATIONS = ("zero", "mean")
METRICS = {"logprob": 1, "prob": 1, "logit_diff": 2}
NEXT_TOKEN = "next"


@dataclass(frozen=True)
class SitePoint:
    """One thing to intervene on in one forward row. None means 'all' for that dimension."""

    layers: tuple[int, ...]
    pos: int | None
    heads: tuple[int, ...] | None


@dataclass
class SiteSweep:
    component: str
    dims: tuple[str, ...]
    coords: dict[str, list[int]]
    points: list[SitePoint]  # row-major over dims


@dataclass
class Intervention:
    name: str
    method: str  # "patch", "zero" or "mean"
    sweep: SiteSweep
    base: str
    source: str | None
    statement: str


@dataclass
class Metric:
    name: str
    kind: str
    answers: tuple[torch.Tensor, ...]  # per answer column, (examples,) token ids; empty for next-token
    next_token: bool
    positions: dict[str, torch.Tensor]  # base column -> (examples, seq) bool mask of read positions


@dataclass
class Experiment:
    file: ast.ExperimentFile
    name: str
    model: LoadedModel
    examples: Examples
    prompts: dict[str, Prompts]
    metrics: list[Metric]
    interventions: list[Intervention]


class _Resolver:
    def __init__(self, file: ast.ExperimentFile, model: LoadedModel, examples: Examples):
        self.file, self.model, self.examples = file, model, examples
        self.adapter = model.adapter
        self.prompts: dict[str, Prompts] = {}

    def error(self, message: str, span: Span, hint: str | None = None) -> CausalError:
        return CausalError(message, span, self.file.text, hint)

    # columns
    def column(self, name: str, span: Span) -> list:
        columns = self.examples.columns
        if name not in columns:
            raise self.error(f"no data column {name!r}; the data has {', '.join(columns)}", span,
                             did_you_mean(name, columns))
        return columns[name]

    def prompt(self, name: str, span: Span) -> Prompts:
        if name not in self.prompts:
            self.prompts[name] = tokenize_column(self.column(name, span), self.model.tokenizer, name, span,
                                                 self.file.text)
        return self.prompts[name]

    # interventions
    def intervention(self, node: ast.Patch | ast.Ablate, taken: set[str]) -> Intervention:
        if isinstance(node, ast.Patch):
            base = self.prompt(node.base, node.base_span)
            source = self.prompt(node.source, node.source_span)
            self.check_aligned(node.source, source, node.base, base, node.span)
            method, base_name, source_name = "patch", node.base, node.source
        else:
            if node.method not in ABLATIONS:
                raise self.error(f"unknown ablation {node.method!r}; use one of {', '.join(ABLATIONS)}",
                                 node.method_span, did_you_mean(node.method, ABLATIONS))
            base_name = node.base or self.default_base(node.span)
            base = self.prompt(base_name, node.base_span or node.span)
            method, source_name = node.method, None
        sweep = self.sweep(node.site, base)
        name = unique_name(node.label or f"{'patch' if method == 'patch' else 'ablate'}_{sweep.component}", taken)
        statement = self.file.text.splitlines()[node.span.line - 1].split("#")[0].strip()
        return Intervention(name, method, sweep, base_name, source_name, statement)

    def default_base(self, span: Span) -> str:
        if "clean" in self.examples.columns:
            return "clean"
        raise self.error("which prompts does this ablation run on? the data has no 'clean' column",
                         span, hint=f"add 'on <column>' (columns: {', '.join(self.examples.columns)})")

    def check_aligned(self, source_name: str, source: Prompts, base_name: str, base: Prompts, span: Span):
        mismatch = (source.lengths != base.lengths).nonzero()
        if len(mismatch):
            i = int(mismatch[0])
            raise self.error(
                f"patching needs {source_name!r} and {base_name!r} prompts of equal token length; example {i} "
                f"has {int(source.lengths[i])} and {int(base.lengths[i])} tokens "
                f"({len(mismatch)} example(s) differ)", span)

    def sweep(self, site: ast.SiteRef, base: Prompts) -> SiteSweep:
        sites = self.adapter.site_names
        if site.name not in sites:
            raise self.error(f"unknown site {site.name!r}; sites: {', '.join(sites)}", site.span,
                             did_you_mean(site.name, sites))
        per_head = self.adapter.is_per_head(site.name)
        allowed = ["layer", "pos"] + (["head"] if per_head else [])
        chosen: dict[str, list[int]] = {}
        dims: list[str] = []
        for sel in site.selectors:
            if sel.dim not in allowed:
                raise self.error(f"site {site.name!r} has no dimension {sel.dim!r}; it has {', '.join(allowed)}",
                                 sel.span, did_you_mean(sel.dim, allowed))
            if sel.dim in chosen:
                raise self.error(f"dimension {sel.dim!r} is selected twice", sel.span)
            chosen[sel.dim] = self.indices(sel, base)
            dims.append(sel.dim)
        points = []
        for combo in itertools.product(*(chosen[d] for d in dims)):
            value = dict(zip(dims, combo))
            layers = (value["layer"],) if "layer" in value else tuple(range(self.adapter.n_layers))
            heads = (value["head"],) if "head" in value else None
            points.append(SitePoint(layers, value.get("pos"), heads))
        return SiteSweep(site.name, tuple(dims), chosen, points)

    def indices(self, sel: ast.Selector, base: Prompts) -> list[int]:
        """Layer and head indices are normalised to 0..n-1; positions keep their sign (per-example)."""
        if sel.dim == "pos":
            size, shortest = int(base.lengths.max()), int(base.lengths.min())
            if isinstance(sel.indices, ast.AllIndices):
                return list(range(size))
            values = expand(sel.indices, self.file.text)
            for v in values:
                if not -shortest <= v < shortest:
                    raise self.error(f"position {v} is outside the prompt: the shortest prompt has {shortest} "
                                     f"tokens (valid: {-shortest}..{shortest - 1})", sel.indices.span)
            return values
        size = self.adapter.n_layers if sel.dim == "layer" else self.adapter.n_heads
        values = list(range(size)) if isinstance(sel.indices, ast.AllIndices) else expand(sel.indices, self.file.text)
        what = "layers" if sel.dim == "layer" else "heads per layer"
        for v in values:
            if not -size <= v < size:
                raise self.error(f"{sel.dim} {v} is out of range: the model has {size} {what} "
                                 f"(valid: 0..{size - 1}, or -{size}..-1 from the end)", sel.indices.span)
        return [v % size for v in values]

    # metrics
    def metric(self, node: ast.MetricDecl, bases: list[str]) -> Metric:
        if node.name not in METRICS:
            raise self.error(f"unknown metric {node.name!r}; metrics: {', '.join(METRICS)}", node.span,
                             did_you_mean(node.name, METRICS))
        arity = METRICS[node.name]
        if len(node.args) != arity:
            raise self.error(f"metric {node.name!r} takes {arity} answer column(s), got {len(node.args)}",
                             node.span)
        next_token = arity == 1 and node.args[0][0] == NEXT_TOKEN
        answers = () if next_token else tuple(
            answer_ids(self.column(name, span), self.model.tokenizer, name, span, self.file.text)
            for name, span in node.args)
        positions = {b: self.metric_positions(node, self.prompts[b], next_token) for b in bases}
        label = f"{node.name}({', '.join(a for a, _ in node.args)})"
        return Metric(label, node.name, answers, next_token, positions)

    def metric_positions(self, node: ast.MetricDecl, prompts: Prompts, next_token: bool) -> torch.Tensor:
        n, width = prompts.ids.shape
        lengths = prompts.lengths
        usable = lengths - 1 if next_token else lengths  # the last token has no next token to score
        mask = torch.zeros(n, width, dtype=torch.bool)
        if node.positions is None or isinstance(node.positions, ast.AllIndices):
            if node.positions is None and not next_token:
                mask[torch.arange(n), lengths - 1] = True
                return mask
            mask[:] = torch.arange(width)[None, :] < usable[:, None]
        else:
            for v in expand(node.positions, self.file.text):
                absolute = torch.where(torch.tensor(v) < 0, lengths + v, torch.full_like(lengths, v))
                bad = ((absolute < 0) | (absolute >= usable)).nonzero()
                if len(bad):
                    i = int(bad[0])
                    limit = "the last scored position is len-2" if next_token else "valid positions are 0..len-1"
                    raise self.error(f"metric position {v} is outside example {i}, which has {int(lengths[i])} "
                                     f"tokens ({limit})", node.positions.span)
                mask[torch.arange(n), absolute] = True
        if not bool(mask.any(1).all()):
            i = int((~mask.any(1)).nonzero()[0])
            raise self.error(f"the metric reads no position of example {i}", node.span)
        return mask


def expand(indices: ast.IndexSet, source: str | None = None) -> list[int]:
    if isinstance(indices, ast.SingleIndex):
        return [indices.value]
    if isinstance(indices, ast.IndexList):
        return list(indices.values)
    if isinstance(indices, ast.IndexRange):
        if indices.stop < indices.start:
            raise CausalError(f"empty range {indices.describe()}: the end comes before the start", indices.span,
                              source)
        return list(range(indices.start, indices.stop + 1))
    raise TypeError(indices)


def unique_name(name: str, taken: set[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    taken.add(candidate)
    return candidate


def resolve(file: ast.ExperimentFile, model: LoadedModel) -> Experiment:
    examples = load_examples(file.data, Path(file.path).resolve().parent, model.tokenizer, file.text)
    resolver = _Resolver(file, model, examples)
    taken: set[str] = set(examples.columns)
    interventions = [resolver.intervention(node, taken) for node in file.interventions]
    bases = sorted(resolver.prompts)
    metrics = [resolver.metric(node, bases) for node in file.metrics]
    name = file.name or Path(file.path).stem
    return Experiment(file, name, model, examples, resolver.prompts, metrics, interventions)
