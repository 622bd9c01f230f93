"""AST + loaded model + data -> a typed Experiment, with every index, column and token checked.

All user mistakes that can be found without running the model are found here, so a
run never fails half-way for a reason the file already showed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from causal import interventions as iv
from causal.data import Examples, Prompts, answer_ids, load_examples, tokenize_column
from causal.errors import CausalError, Span, did_you_mean
from causal.resolve.experiment import Experiment, Metric, NamedPositions, Sweep
from causal.lang import ast
from causal.models import LoadedModel
from causal.resolve.positions import check_anchor_alignment, position_masks, resolve_positions
from causal.resolve.sweeps import SweepBuilder

ABLATIONS = ("zero", "mean", "resample")
LOGIT_METRICS = {"logprob": 1, "prob": 1, "logit_diff": 2, "rank": 1, "accuracy": 1, "kl": 1}
EMBEDDING_METRICS = {"similarity": 1}
METRICS = {**LOGIT_METRICS, **EMBEDDING_METRICS}
NEXT_TOKEN = "next"
SEVERABLE = {"mlp": "mlp_out", "attn": "attn_out"}
FREEZABLE = {"mlp": "mlp_out"}
PATH_SENDERS = ("z", "attn_out", "mlp_out")
PATH_RECEIVERS = ("q", "k", "v")
ATTRIBUTABLE = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "neuron")
DEFAULT_NOISE = {"samples": 10, "seed": None}
RESERVED = {"layer", "pos", "head", "neuron", "key_pos", "example", "metric"}  # result dims: not variable names


class _Resolver:
    def __init__(self, file: ast.ExperimentFile, model: LoadedModel, examples: Examples, seed: int):
        self.file, self.model, self.examples, self.seed = file, model, examples, seed
        self.adapter = model.adapter
        self.prompts: dict[str, Prompts] = {}
        self.runs: set[str] = set()
        self.named = NamedPositions(None)
        self.sites = SweepBuilder(self.adapter, self.named, file.text)

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
            prompts = tokenize_column(self.column(name, span), self.model.tokenizer, name, span, self.file.text)
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
        self.named = resolve_positions(self.file.positions, anchor, prompts, self.examples, self.file.text)
        self.sites.positions = self.named

    def default_anchor(self) -> str:
        if "clean" in self.examples.columns:
            return "clean"
        texts = [c for c, values in self.examples.columns.items() if isinstance(values[0], (str, list))]
        if not texts:
            raise self.error("named positions are located in a prompt column, and the data has none (columns: "
                             f"{', '.join(self.examples.columns)})", self.file.positions[0].span)
        return texts[0]

    # sweeps
    def sweep(self, sites: tuple[ast.SiteRef, ...], base: str, allowed: tuple[str, ...] | None = None) -> Sweep:
        prompts = self.prompts[base]
        sweep = self.sites.sweep(sites, (int(prompts.lengths.min()), int(prompts.lengths.max())), allowed)
        for target in {t for point in sweep.points for t in point}:
            if isinstance(target.pos, str):
                check_anchor_alignment(self.named, prompts, target.pos, sites[0].span, self.file.text)
        return sweep

    # interventions
    def intervention(self, node: ast.Intervention, taken: set[str]) -> iv.Intervention:
        handler = {ast.Patch: self.patch, ast.Ablate: self.ablate, ast.Steer: self.steer, ast.Trace: self.trace,
                   ast.PathPatch: self.path, ast.Attribute: self.attribute}[type(node)]
        return handler(node, taken)

    def name_for(self, node, kind: str, site: str, taken: set[str]) -> str:
        label = node.label or f"{kind}_{site.split(':')[0]}"
        if node.label and (node.label in RESERVED or node.label.startswith("token_")):
            raise self.error(f"{node.label!r} names a dimension or coordinate of the results; choose another label",
                             node.span)
        if node.label and node.label in taken:
            raise self.error(f"the name {node.label!r} is already used (by a data column or another statement)",
                             node.span)
        return unique_name(label, taken)

    def statement(self, span: Span) -> str:
        lines = self.file.text.splitlines()[span.line - 1: (span.end_line or span.line)]
        if len(lines) == 1:
            return lines[0][span.column - 1: span.end_column - 1 if span.end_column else None].strip()
        lines[0] = lines[0][span.column - 1:]
        return " ".join(line.split("#")[0].strip() for line in lines)

    def patch(self, node: ast.Patch, taken: set[str]) -> iv.Patch:
        self.run_prompt(node.base, node.base_span)
        self.run_prompt(node.source, node.source_span)
        self.check_aligned(node.source, node.base, node.span)
        sweep = self.sweep(node.sites, node.base)
        return iv.Patch(self.name_for(node, "patch", node.sites[0].name, taken), self.statement(node.span), node.base,
                        sweep, node.source)

    def ablate(self, node: ast.Ablate, taken: set[str]) -> iv.Ablate:
        if node.method not in ABLATIONS:
            raise self.error(f"unknown ablation {node.method!r}; use one of {', '.join(ABLATIONS)}",
                             node.method_span, did_you_mean(node.method, ABLATIONS))
        base = node.base or self.default_base(node.span)
        self.run_prompt(base, node.base_span or node.span)
        reference = node.over or base
        if node.over and node.method == "zero":
            raise self.error("'over' names the reference prompts of a mean or resample ablation; zero needs none",
                             node.over_span)
        self.run_prompt(reference, node.over_span or node.span)
        if node.method == "mean":
            self.check_reference_covers(reference, base, node.over_span or node.span)
        if node.method == "resample":
            self.check_resample(reference, base, node.over_span or node.span)
        sweep = self.sweep(node.sites, base)
        return iv.Ablate(self.name_for(node, "ablate", node.sites[0].name, taken), self.statement(node.span), base,
                         sweep, node.method, reference)

    def check_reference_covers(self, reference: str, base: str, span: Span) -> None:
        longest_ref, longest_base = int(self.prompts[reference].lengths.max()), int(self.prompts[base].lengths.max())
        if longest_ref < longest_base:
            raise self.error(f"the mean is taken per position, but the {reference!r} prompts have at most "
                             f"{longest_ref} tokens and the {base!r} prompts up to {longest_base}", span)

    def check_resample(self, reference: str, base: str, span: Span) -> None:
        lengths = torch.cat([self.prompts[reference].lengths, self.prompts[base].lengths])
        if len(self.examples) < 2:
            raise self.error("resample ablation takes another example's activations; the data has one example", span)
        if int(lengths.min()) != int(lengths.max()):
            raise self.error("resample ablation takes another example's activation at the same position, so every "
                             f"prompt must have the same token length; here lengths range from {int(lengths.min())} "
                             f"to {int(lengths.max())}", span, hint="use 'with mean', or data of one template")

    def steer(self, node: ast.Steer, taken: set[str]) -> iv.Steer:
        base = node.base or self.default_base(node.span)
        self.run_prompt(base, node.base_span or node.span)
        terms = tuple(self.mean_term(coef, mean) for coef, mean in linear_terms(node.vector, node.span, self.file.text))
        sweep = self.sweep(node.sites, base)
        return iv.Steer(self.name_for(node, "steer", node.sites[0].name, taken), self.statement(node.span), base,
                        sweep, terms)

    def mean_term(self, coef: float, mean: ast.MeanOf) -> iv.MeanTerm:
        prompts = self.prompt(mean.column, mean.span)
        mask = position_masks(mean.positions, prompts, self.named, self.file.text, default_last=False)
        return iv.MeanTerm(coef, mean.column, mask)

    def trace(self, node: ast.Trace, taken: set[str]) -> iv.Trace:
        base = node.base or self.default_base(node.span)
        prompts = self.run_prompt(base, node.base_span or node.span)
        options = dict(DEFAULT_NOISE)
        for key, value, span in node.noise.options:
            if key not in options:
                raise self.error(f"noise takes no option {key!r}; it takes {', '.join(options)}", span,
                                 did_you_mean(key, options))
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "samples" else 0):
                raise self.error(f"noise option {key!r} must be a {'positive' if key == 'samples' else 'non-negative'} "
                                 f"whole number, got {value!r}", span)
            options[key] = value
        if node.noise.scale <= 0:
            raise self.error(f"the noise scale must be positive, got {node.noise.scale}", node.noise.span)
        noised = position_masks(node.noised, prompts, self.named, self.file.text, default_last=False)
        severing = []
        for kind, span in node.severing:
            if kind not in SEVERABLE:
                raise self.error(f"cannot sever {kind!r}; choose from {', '.join(SEVERABLE)}", span,
                                 did_you_mean(kind, SEVERABLE))
            severing.append(self.require_site(SEVERABLE[kind], span))
        restored = {site.name for site in node.sites}
        for site, (kind, span) in zip(severing, node.severing):
            if site in restored:
                raise self.error(f"severing {kind} freezes {site} at the noised values at the restored token, the "
                                 f"very site this statement restores there; restore another site", span)
        seed = self.seed if options["seed"] is None else options["seed"]
        noise = iv.NoiseSpec(node.noise.scale, node.noise.relative, options["samples"], seed, noised)
        sweep = self.sweep(node.sites, base)
        name = self.name_for(node, "trace", node.sites[0].name, taken)
        return iv.Trace(name, self.statement(node.span), base, sweep, noise, tuple(severing),
                        unique_name(f"{name}_noised", taken))

    def require_site(self, site: str, span: Span) -> str:
        if site not in self.adapter.site_names:
            raise self.error(f"this model ({self.adapter.arch}) has no {site!r} site", span)
        return site

    def path(self, node: ast.PathPatch, taken: set[str]) -> iv.PathPatch:
        self.run_prompt(node.base, node.base_span)
        self.run_prompt(node.source, node.source_span)
        self.check_aligned(node.source, node.base, node.span, "path patching")
        sweep = self.sweep(node.senders, node.base, PATH_SENDERS)
        receivers = None
        if node.receivers is not None:  # one joint set: every selected receiver at once, nothing swept
            receivers = tuple(dict.fromkeys(t for site in node.receivers
                                            for point in self.sweep((site,), node.base, PATH_RECEIVERS).points
                                            for t in point))
        freezing = tuple(self.require_site(FREEZABLE[k], s) if k in FREEZABLE else self._bad_freeze(k, s)
                         for k, s in node.freezing)
        return iv.PathPatch(self.name_for(node, "path", node.senders[0].name, taken), self.statement(node.span),
                            node.base, sweep, node.source, receivers, freezing)

    def _bad_freeze(self, kind: str, span: Span):
        raise self.error(f"cannot freeze {kind!r}; path patching always freezes every other head, and can also "
                         f"freeze: {', '.join(FREEZABLE)}", span, did_you_mean(kind, FREEZABLE))

    def attribute(self, node: ast.Attribute, taken: set[str]) -> iv.Attribute:
        self.run_prompt(node.base, node.base_span)
        self.run_prompt(node.source, node.source_span)
        self.check_aligned(node.source, node.base, node.span, "attribution patching")
        sweep = self.sweep(node.sites, node.base, ATTRIBUTABLE)
        if node.verify_top is not None and node.verify_top > len(sweep.points):
            raise self.error(f"verify top {node.verify_top}: the statement has only {len(sweep.points)} sites",
                             node.span)
        name = self.name_for(node, "attribute", node.sites[0].name, taken)
        exact = unique_name(f"{name}_exact", taken) if node.verify_top else None
        return iv.Attribute(name, self.statement(node.span), node.base, sweep, node.source, node.verify_top, exact)

    # metrics
    def metric_columns(self, node: ast.MetricDecl) -> None:
        """Tokenize the prompt columns a metric compares with, so they get baselines and positions."""
        if node.name in ("kl", "similarity") and len(node.args) == 1:
            self.run_prompt(*node.args[0])
        if node.normalized:
            for column in (node.normalized.clean, node.normalized.corrupt):
                self.run_prompt(column, node.normalized.span)

    def metric(self, node: ast.MetricDecl, bases: list[str]) -> Metric:
        if node.name not in METRICS:
            raise self.error(f"unknown metric {node.name!r}; metrics: {', '.join(METRICS)}", node.span,
                             did_you_mean(node.name, METRICS))
        self.check_head(node)
        arity = METRICS[node.name]
        if len(node.args) != arity:
            raise self.error(f"metric {node.name!r} takes {arity} answer column(s), got {len(node.args)}", node.span)
        next_token = node.name not in ("kl", "similarity") and node.args[0][0] == NEXT_TOKEN
        if any(name == NEXT_TOKEN for name, _ in node.args) and (arity != 1 or node.name in ("kl", "similarity")):
            raise self.error(f"'next' (each prompt's own next token) is an answer for logprob, prob, rank and "
                             f"accuracy, not for {node.name}", node.span)
        reference = None
        answers: tuple = ()
        if node.name in ("kl", "similarity"):
            reference = node.args[0][0]
            self.prompt(reference, node.args[0][1])
        elif not next_token:
            answers = tuple(answer_ids(self.column(name, span), self.model.tokenizer, name, span, self.file.text)
                            for name, span in node.args)
            for ids, (name, span) in zip(answers, node.args):
                self.check_has_logit(name, ids, span)
        if node.name == "similarity" and node.positions is not None:
            raise self.error("similarity compares whole-sentence embeddings (mean over tokens); it takes no 'at'",
                             node.positions.span)
        positions = {b: position_masks(node.positions, self.prompts[b], self.named, self.file.text,
                                       shift=1 if next_token else 0, what="metric position", span=node.span)
                     for b in bases}
        if reference and node.name == "kl":
            bases = [b for b in bases if b != reference]
            for b in bases:
                if not torch.equal(positions[b], positions[reference]):
                    raise self.error(f"kl compares with the {reference!r} run at the same positions, but they differ "
                                     f"from the {b!r} prompts' (prompts of different lengths?)", node.span)
        label = f"{node.name}({', '.join(a for a, _ in node.args)})"
        return Metric(label, node.name, answers, next_token, reference, positions, node.normalized)

    def check_has_logit(self, name: str, ids: torch.Tensor, span: Span) -> None:
        """An answer the tokenizer knows but the unembedding has no row for would index past the logits."""
        rows = self.model.model.get_output_embeddings().weight.shape[0]
        beyond = (ids >= rows).nonzero()
        if len(beyond):
            i = int(beyond[0, 0])
            raise self.error(f"column {name!r}, example {i}: answer token id {int(ids[i])} has no logit: the model "
                             f"scores {rows} tokens (its tokenizer knows more tokens than the model)", span)

    def check_head(self, node: ast.MetricDecl) -> None:
        head = getattr(self.model, "head", "lm")
        if node.name in LOGIT_METRICS and head != "lm":
            raise self.error(f"metric {node.name!r} reads next-token logits, but this model is an encoder without a "
                             "language-model head", node.span, hint="use similarity(column) to compare sentence "
                                                                    "embeddings")
        if node.name in EMBEDDING_METRICS and head == "lm":
            raise self.error(f"metric {node.name!r} compares sentence embeddings of an encoder model (BERT-style); "
                             "this model has a language-model head", node.span)


def linear_terms(expr: ast.Expr, span: Span, source: str) -> list[tuple[float, ast.MeanOf]]:
    """A steering expression as coef * mean(...) terms; constants alone or products of means are errors."""
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
            raise CausalError("a steering vector is linear in the means: one side of '*' must be a number",
                              node.span)
        scale, terms = (left[1], right[0]) if right[0] else (right[1], left[0])
        return [(scale * c, m) for c, m in terms], left[1] * right[1]
    terms, constant = walk(expr)
    if not terms:
        raise CausalError("a steering vector needs at least one mean(column) term, e.g. "
                          "4 * (mean(positive) - mean(negative))", span)
    if constant:
        raise CausalError(f"a steering vector cannot add a plain number ({constant:g}) to activations", span)
    return terms


def unique_name(name: str, taken: set[str]) -> str:
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    taken.add(candidate)
    return candidate


def resolve(file: ast.ExperimentFile, model: LoadedModel, seed: int = 0) -> Experiment:
    examples = load_examples(file.data, Path(file.path).resolve().parent, model.tokenizer, file.text)
    resolver = _Resolver(file, model, examples, seed)
    resolver.resolve_named_positions()
    taken: set[str] = set(examples.columns)
    interventions = [resolver.intervention(node, taken) for node in file.interventions]
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
