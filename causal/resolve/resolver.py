"""AST + loaded model + data -> a typed Experiment, with every index, column and token checked.

All user mistakes that can be found without running the model are found here, so a
run never fails half-way for a reason the file already showed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from causal import tasks  # noqa: F401  (the built-in data generators: each registers itself on import)
from causal.data import Examples, Prompts, answer_ids, load_examples, tokenize_column
from causal.errors import CausalError, Span, did_you_mean, source_lines
from causal.lang import ast
from causal.metrics import METRICS
from causal.models import LoadedModel
from causal.models.sae import check_against, load_sae
from causal.resolve.names import metric_kind
from causal.resolve.positions import check_anchor_alignment, position_masks, resolve_positions
from causal.resolve.sweeps import SweepBuilder
from causal.values import EMBEDDING, LOGITS, Experiment, Metric, MetricKind, NamedPositions, Sweep

NEXT_TOKEN = "next"
RESERVED = {"layer", "pos", "head", "kv_head", "neuron", "key_pos", "feature", "example", "metric"}  # result dims: not variable names


class Resolution:
    """What every method's resolution shares: columns, prompts, positions, sweeps, names and errors."""

    def __init__(self, file: ast.ExperimentFile, model: LoadedModel, examples: Examples, seed: int,
                 methods: Mapping[str, type] | None = None):
        self.file, self.model, self.examples, self.seed = file, model, examples, seed
        self.methods = methods or {}  # statement keyword -> the method class that resolves it (causal.methods)
        self.taken: set[str] = set(examples.columns)  # variable names in use: data columns, earlier statements
        self.adapter = model.adapter
        self.prompts: dict[str, Prompts] = {}
        self.runs: set[str] = set()
        self.named = NamedPositions(None)
        self.sites = SweepBuilder(self.adapter, self.named)

    def error(self, message: str, span: Span, hint: str | None = None) -> CausalError:
        return CausalError(message, span, hint)

    # columns and prompts
    def column(self, name: str, span: Span) -> list:
        columns = self.examples.columns
        if name not in columns:
            raise self.error(f"no data column {name!r}; the data has {', '.join(columns)}", span,
                             did_you_mean(name, columns))
        return columns[name]

    def run_prompt(self, name: str, span: Span) -> Prompts:
        """A column the model is run on (and that gets a baseline), not only averaged over."""
        if name in RESERVED or name.startswith("token_"):  # its baseline variable would clash with a dimension
            raise self.error(f"the prompt column {name!r} is named like a dimension or coordinate of the results; "
                             "rename the column in the data", span)
        self.runs.add(name)
        return self.prompt(name, span)

    def prompt(self, name: str, span: Span) -> Prompts:
        if name not in self.prompts:
            prompts = tokenize_column(self.column(name, span), self.model.tokenizer, name, span)
            self.check_fits_model(name, prompts, span)
            self.prompts[name] = prompts
        return self.prompts[name]

    def check_fits_model(self, name: str, prompts: Prompts, span: Span) -> None:
        """Token ids the model has embeddings for, and no more positions than it was built for."""
        model = self.model.model
        rows = model.get_input_embeddings().num_embeddings
        too_big = (prompts.ids >= rows).nonzero()
        if len(too_big):
            i, p = (int(v) for v in too_big[0])
            raise self.error(f"column {name!r}, example {i}: token id {int(prompts.ids[i, p])} "
                             f"({prompts.tokens[i][p]!r}) at position {p} has no embedding: the model has {rows} "
                             "(its tokenizer knows more tokens than the model)", span)
        config = model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        longest = int(prompts.lengths.max())
        if context and longest > context:
            i = int(prompts.lengths.argmax())
            raise self.error(f"column {name!r}, example {i} has {longest} tokens, more than the {context} positions "
                             "the model was built for", span)

    def source_and_base(self, node: ast.Statement, why: str = "patching") -> tuple[str, str]:
        """`from SOURCE into BASE`: both run (with baselines), and token-aligned example by example."""
        base, source = node.get("base"), node.get("source")
        self.run_prompt(base, node.span_of("base"))
        self.run_prompt(source, node.span_of("source"))
        self.check_aligned(source, base, node.span, why)
        return source, base

    def default_base(self, span: Span) -> str:
        if "clean" in self.examples.columns:
            return "clean"
        raise self.error("which prompts does this run on? the data has no 'clean' column", span,
                         hint=f"add 'on <column>' (columns: {', '.join(self.examples.columns)})")

    def check_aligned(self, source_name: str, base_name: str, span: Span, why: str = "patching") -> None:
        source, base = self.prompts[source_name], self.prompts[base_name]
        mismatch = (source.lengths != base.lengths).nonzero()
        if len(mismatch):
            i = int(mismatch[0])
            raise self.error(
                f"{why} needs {source_name!r} and {base_name!r} prompts of equal token length; example {i} "
                f"has {int(source.lengths[i])} and {int(base.lengths[i])} tokens "
                f"({len(mismatch)} example(s) differ)", span)

    # named positions
    def resolve_named_positions(self) -> None:
        if not self.file.positions:
            return
        anchor, span = self.file.positions_in or (self.default_anchor(), self.file.positions[0].span)
        prompts = self.prompt(anchor, span)
        self.named = resolve_positions(self.file.positions, anchor, prompts, self.examples)
        self.sites.positions = self.named

    def default_anchor(self) -> str:
        if "clean" in self.examples.columns:
            return "clean"
        texts = [c for c, values in self.examples.columns.items() if isinstance(values[0], (str, list))]
        if not texts:
            raise self.error("named positions are located in a prompt column, and the data has none (columns: "
                             f"{', '.join(self.examples.columns)})", self.file.positions[0].span)
        return texts[0]

    # feature sites: sae("...") loads and checks an SAE once, before any statement uses it
    def attach_saes(self) -> None:
        loaded: set[str] = set()
        for node in self.file.interventions:
            for clause in node.clauses:
                refs = clause.value if isinstance(clause.value, tuple) else ()
                for site in refs:
                    if isinstance(site, ast.SiteRef) and site.name.startswith("sae:") and site.name not in loaded:
                        sae = load_sae(site.name[4:], Path(self.file.path).resolve().parent, site.span)
                        check_against(sae, self.adapter, site.span)
                        self.adapter.attach_sae(site.name, sae)
                        loaded.add(site.name)

    # sweeps
    def sweep(self, sites: tuple[ast.SiteRef, ...], base: str, allowed: tuple[str, ...] | None = None) -> Sweep:
        prompts = self.prompts[base]
        sweep = self.sites.sweep(sites, (int(prompts.lengths.min()), int(prompts.lengths.max())), allowed)
        for target in {t for point in sweep.points for t in point}:
            if isinstance(target.pos, str):
                check_anchor_alignment(self.named, prompts, target.pos, sites[0].span)
        return sweep

    # interventions: each statement keyword's method module resolves its own clauses
    def intervention(self, node: ast.Statement):
        method = self.methods.get(node.kind)
        if method is None:  # a grammar rule without its method module
            raise self.error(f"no method module resolves {node.kind!r} statements", node.span)
        return method.resolve(node, self)

    def name_for(self, node: ast.Statement, site: str) -> str:
        """The statement's variable name: its label, or `<keyword>_<site>` made unique."""
        label = node.label or f"{node.kind}_{site.split(':')[0]}"
        if node.label and (node.label in RESERVED or node.label.startswith("token_")):
            raise self.error(f"{node.label!r} names a dimension or coordinate of the results; choose another label",
                             node.span)
        if node.label and node.label in self.taken:
            raise self.error(f"the name {node.label!r} is already used (by a data column or another statement)",
                             node.span)
        return self.unique_name(label)

    def unique_name(self, name: str) -> str:
        """`name`, or `name_2`, `name_3`, ... : one no data column or earlier statement took."""
        return unique_name(name, self.taken)

    def statement(self, span: Span) -> str:
        lines = source_lines(self.file.text)[span.line - 1: (span.end_line or span.line)]
        if len(lines) == 1:
            return lines[0][span.column - 1: span.end_column - 1 if span.end_column else None].strip()
        lines[0] = lines[0][span.column - 1:]
        return " ".join(line.split("#")[0].strip() for line in lines)

    def require_site(self, site: str, span: Span) -> str:
        if site not in self.adapter.site_names:
            raise self.error(f"this model ({self.adapter.arch}) has no {site!r} site", span)
        return site

    # metrics: what each one reads and takes is its declaration in causal/metrics.py
    def metric_kind(self, node: ast.MetricDecl) -> MetricKind:
        return metric_kind(node)

    def metric_columns(self, node: ast.MetricDecl) -> None:
        """Tokenize the prompt columns a metric compares with, so they get baselines and positions."""
        if self.metric_kind(node).compares and len(node.args) == 1:
            self.run_prompt(*node.args[0])
        if node.normalized:
            for column in (node.normalized.clean, node.normalized.corrupt):
                self.run_prompt(column, node.normalized.span)

    def metric(self, node: ast.MetricDecl, bases: list[str]) -> Metric:
        kind = self.metric_kind(node)
        self.check_head(node, kind)
        if len(node.args) != kind.arity:
            raise self.error(f"metric {node.name!r} takes {kind.arity} answer column(s), got {len(node.args)}",
                             node.span)
        next_token = kind.takes_next and node.args[0][0] == NEXT_TOKEN
        if any(name == NEXT_TOKEN for name, _ in node.args) and not kind.takes_next:
            takers = [name for name, k in METRICS.items() if k.takes_next]
            raise self.error(f"'next' (each prompt's own next token) is an answer for {', '.join(takers[:-1])} and "
                             f"{takers[-1]}, not for {node.name}", node.span)
        reference = None
        answers: tuple = ()
        if kind.compares:
            reference = node.args[0][0]
            self.prompt(reference, node.args[0][1])
        elif not next_token:
            answers = tuple(answer_ids(self.column(name, span), self.model.tokenizer, name, span)
                            for name, span in node.args)
            for ids, (name, span) in zip(answers, node.args):
                self.check_has_logit(name, ids, span)
        if kind.reads_whole_prompt and node.positions is not None:
            raise self.error(f"{node.name} compares whole-sentence embeddings (mean over tokens); it takes no 'at'",
                             node.positions.span)
        positions = {b: position_masks(node.positions, self.prompts[b], self.named,
                                       shift=1 if next_token else 0, what="metric position", span=node.span)
                     for b in bases}
        if reference and kind.reads == LOGITS:
            bases = [b for b in bases if b != reference]
            for b in bases:
                if not torch.equal(positions[b], positions[reference]):
                    raise self.error(f"{node.name} compares with the {reference!r} run at the same positions, but they "
                                     f"differ from the {b!r} prompts' (prompts of different lengths?)", node.span)
        if len(answers) == 2 and torch.equal(answers[0], answers[1]):
            raise self.error(f"{node.name}({node.args[0][0]}, {node.args[1][0]}) is zero in every example: the two "
                             "answer columns hold the same token in each", node.span)
        if node.normalized:
            self.check_gap(node.normalized)
        label = f"{node.name}({', '.join(a for a, _ in node.args)})"
        return Metric(label, kind, answers, next_token, reference, positions, node.normalized)

    def check_gap(self, normalization: ast.Normalization) -> None:
        """`normalized by clean, corrupt` divides by the mean gap between the two runs: refuse a gap that is
        zero by construction (every normalized value would be inf or NaN)."""
        clean, corrupt = normalization.clean, normalization.corrupt
        if clean == corrupt:
            raise self.error(f"normalized by {clean}, {corrupt}: one run against itself, so the gap is zero and "
                             "every normalized value would be inf or NaN", normalization.span,
                             hint="normalize by the clean run and the corrupted one: normalized by clean, corrupt")
        a, b = self.prompts[clean], self.prompts[corrupt]
        if torch.equal(a.lengths, b.lengths) and torch.equal(a.ids * a.attention_mask, b.ids * b.attention_mask):
            raise self.error(f"normalized by {clean}, {corrupt}: the {clean!r} and {corrupt!r} prompts are the same "
                             "in every example, so the gap is zero and every normalized value would be inf or NaN",
                             normalization.span)

    def check_has_logit(self, name: str, ids: torch.Tensor, span: Span) -> None:
        """An answer the tokenizer knows but the unembedding has no row for would index past the logits."""
        rows = self.model.model.get_output_embeddings().weight.shape[0]
        beyond = (ids >= rows).nonzero()
        if len(beyond):
            i = int(beyond[0, 0])
            raise self.error(f"column {name!r}, example {i}: answer token id {int(ids[i])} has no logit: the model "
                             f"scores {rows} tokens (its tokenizer knows more tokens than the model)", span)

    def check_head(self, node: ast.MetricDecl, kind: MetricKind) -> None:
        head = getattr(self.model, "head", "lm")
        if kind.reads == LOGITS and head != "lm":
            raise self.error(f"metric {node.name!r} reads next-token logits, but this model is an encoder without a "
                             "language-model head", node.span, hint="use similarity(column) to compare sentence "
                                                                    "embeddings")
        if kind.reads == EMBEDDING and head == "lm":
            raise self.error(f"metric {node.name!r} compares sentence embeddings of an encoder model (BERT-style); "
                             "this model has a language-model head", node.span)


def unique_name(name: str, taken: set[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    taken.add(candidate)
    return candidate


def resolve(file: ast.ExperimentFile, model: LoadedModel, methods: Mapping[str, type], seed: int = 0) -> Experiment:
    """`methods`: statement keyword -> method class (causal.methods.METHODS): handed in, as resolution sits
    below the methods in the layers (docs/architecture.md) and must not import them."""
    examples = load_examples(file.data, Path(file.path).resolve().parent, model.tokenizer)
    resolver = Resolution(file, model, examples, seed, methods)
    resolver.resolve_named_positions()
    resolver.attach_saes()
    interventions = [resolver.intervention(node) for node in file.interventions]
    for method in interventions:  # statements that name others (generate ... under s1), now all resolved
        method.link(interventions, resolver)
    for node in file.metrics:
        resolver.metric_columns(node)
    bases = sorted(resolver.runs)
    metrics = [resolver.metric(node, bases) for node in file.metrics]
    labels: dict[str, ast.MetricDecl] = {}
    for metric, node in zip(metrics, file.metrics):
        label = metric.name + (" normalized" if metric.normalization else "")
        if label in labels:
            raise CausalError(f"a second metric labelled {label!r} (the first is at line {labels[label].span.line}); "
                              "results could not tell them apart", node.span,
                              hint="read several positions with one metric: at [-1, -2]")
        labels[label] = node
    name = file.name or Path(file.path).stem
    return Experiment(file, name, model, examples, resolver.prompts, resolver.named, metrics, interventions, seed,
                      bases)
