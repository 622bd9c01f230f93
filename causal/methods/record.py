"""record SITE [on BASE] [under LABEL] [top K] [as NAME]: a site's activations, kept per example for later analysis.

Selectors choose what is kept, not what is swept: `layer` and `pos` left out mean every layer and every
position; an extra dim (head, neuron, key_pos) left out is kept whole, after `example`. One forward per
batch of examples records every chosen layer at once (a hook per layer gathers the chosen positions as
the activation passes). `under LABEL` records what the model computes while a one-point patch, ablate
or steer statement's writes are applied. Recordings larger than the `record_memory_gb` setting are
refused unless `record_store` names a folder: they are then written per chunk of examples into a
netCDF file there (causal.methods.record_store), which `causal.load` opens lazily. On an SAE's features
(`sae(...)`), `top K` keeps each token's K largest features instead of all, and every recording of
features summarises them: how often each fires and its max-activating tokens (causal.methods.features).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from causal.errors import CausalError, Span
from causal.files import readable_size
from causal.lang import ast
from causal.methods.base import JobMethod, SelfDriven, Variable, hooks, method
from causal.methods.features import FeatureSummary, top_features
from causal.methods.kinds import ResultKind, result_kind
from causal.methods.record_store import RECORDING, STORE_KIND, RecordingStore
from causal.models.adapter import EMBEDDING, FEATURE, MODULE, PATTERN, RESIDUAL
from causal.values import Job, Sweep, Target, absolute_positions

ELEMENT_BYTES = 4  # recordings are kept as float32
FEATURE_SUMMARIES = ("frequency", "max_activation", "max_example", "max_pos", "max_text")
HEAD_SCORES = ("previous_token", "induction", "bos")
SCORED_HEADS = result_kind(ResultKind("head_scores", figure="head_score_grid"))
FEATURES = result_kind(ResultKind("feature_recording", figure="feature_activations"))  # an SAE recording's summaries


@dataclass
class Selection:
    """What a sweep of one site keeps: per point its layer, the position per example, the extra dims' slices."""

    site: str
    layers: list[int | None]
    positions: torch.Tensor  # (sweep positions, examples) absolute position, -1 where the prompt has none
    swept_extra: list[tuple[int, list[int]]]  # (index among the site's extra dims, chosen indices)
    trailing: list[tuple[str, int | None]]  # dims after example: unswept extra dims, then features (None: as seen)
    lengths: torch.Tensor  # (examples,) prompt lengths, for key positions past a prompt's end
    masks_keys: bool  # a pattern: key positions past the prompt are NaN, as queries are

    def hooks(self, examples: torch.Tensor, keep: Callable[[int | None, torch.Tensor], None]) -> dict:
        """(site, layer) -> a hook that hands `keep(layer, kept)` the gathered (positions, rows, ...) values."""
        def hook(layer):
            def record(act: torch.Tensor, start: int) -> None:
                keep(layer, self.gather(act, examples, start))
            return record
        return {(self.site, layer): hook(layer) for layer in self.layers}

    def gather(self, act: torch.Tensor, examples: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(rows, seq, *rest) -> (positions, *swept extra, rows, *unswept rest) float32 on the CPU, NaN where absent."""
        act = act.detach()
        positions = self.positions[:, examples].to(act.device) - start
        absent = positions < 0
        rows = torch.arange(act.shape[0], device=act.device)[None]
        out = act[rows, positions.clamp(min=0)].float()  # (P, rows, *rest)
        out[absent] = float("nan")
        if self.masks_keys:
            keys = torch.arange(out.shape[-1], device=out.device)
            past = keys[None, :] >= self.lengths[examples].to(out.device)[:, None]  # (rows, keys)
            out = out.masked_fill(past[None, :, None, :], float("nan"))
        for index, chosen in self.swept_extra:
            out = out.index_select(2 + index, torch.tensor(chosen, device=out.device))
        swept = [2 + index for index, _ in self.swept_extra]
        rest = [d for d in range(2, out.dim()) if d not in swept]
        return out.permute(0, *swept, 1, *rest).cpu()


def selection_for(resolution, site: ast.SiteRef, base: str, allowed: tuple[str, ...] | None = None,
                  what: str = "record") -> tuple[Sweep, Selection]:
    """A single site with its selectors: `layer` and `pos` default to every value, so the sweep names them."""
    if window := next((s for s in site.selectors if s.window is not None), None):
        raise resolution.error(f"{what} takes no layer window; list the layers to {what}", window.span)
    info = resolution.sites.site_info(site, allowed)
    given = {s.dim for s in site.selectors}
    added = [ast.Selector(dim, ast.AllIndices(site.span), None, site.span)
             for dim in (["layer"] if info.per_layer and info.layers is None else []) + ["pos"] if dim not in given]
    extra_names = [name for name, _ in info.extra_dims]
    order = ["layer", "pos", *extra_names]
    selectors = sorted([*site.selectors, *added], key=lambda s: order.index(s.dim) if s.dim in order else -1)
    ref = replace(site, selectors=tuple(selectors))
    sweep = resolution.sweep((ref,), base)
    prompts = resolution.prompts[base]
    positions = torch.stack([_absolute(resolution, p, prompts.lengths, site.span, what) for p in sweep.coords["pos"]])
    width = int(prompts.ids.shape[1])
    swept_extra = [(i, sweep.coords[name]) for i, name in enumerate(extra_names) if name in sweep.coords]
    trailing = [(name, size if size is not None else width) for name, size in info.extra_dims if name not in sweep.coords]
    feature = _feature_dim(info, resolution.adapter)
    if feature:
        trailing.append(feature)
    layers = sweep.coords["layer"] if "layer" in sweep.coords else list(info.layers or [None])
    return sweep, Selection(info.name, list(layers), positions, swept_extra, trailing, prompts.lengths,
                            info.role == PATTERN)


def _feature_dim(info, adapter) -> tuple[str, int | None] | None:
    if info.role == MODULE:
        return ("feature", None)  # as the module returns it: known at the first forward
    if info.role in (RESIDUAL, EMBEDDING):
        return ("d_model", adapter.d_model)
    return ("d_head", info.features) if (info.features or 1) > 1 else None


def _absolute(resolution, position, lengths: torch.Tensor, span: Span, what: str) -> torch.Tensor:
    """(examples,) where a position falls in each prompt; -1 past a prompt's end. A named position reads one token."""
    if isinstance(position, str):
        spans = resolution.named.indices[position]
        wide = next((i for i, p in enumerate(spans) if len(p) != 1), None)
        if wide is not None:
            raise resolution.error(f"{what} reads one token per position, but {position!r} covers "
                                   f"{len(spans[wide])} tokens in example {wide}", span,
                                   hint="name one token of it, e.g. first(column) or last(column)")
        return torch.tensor([p[0] for p in spans])
    absolute = absolute_positions(lengths, int(position))
    return torch.where(absolute < lengths, absolute, torch.full_like(absolute, -1))


def under_clause(resolution, node: ast.Statement, what: str) -> tuple[str | None, str]:
    """`under LABEL`: the labelled statement whose writes apply while reading, and the prompts both run on."""
    label, span = node.get("under"), node.span_of("under")
    on = node.get("on")
    if label is None:
        base = on or resolution.default_base(node.span)
        resolution.run_prompt(base, node.span_of("on") or node.span)
        return None, base
    other = next((s for s in resolution.file.interventions if s.label == label), None)
    if other is None:
        labels = [s.label for s in resolution.file.interventions if s.label]
        from causal.errors import did_you_mean
        raise resolution.error(f"{what} under {label!r}: no statement is labelled {label!r} (labels: "
                               f"{', '.join(labels) or 'none; label one with `as NAME`'})", span,
                               did_you_mean(label, labels))
    if other.kind in ("record", "lens"):  # statements that read and change nothing
        raise resolution.error(f"{what} under {label!r}: that statement reads activations and changes nothing", span)
    base = other.get("base") or other.get("on") or resolution.default_base(node.span)
    if on is not None and on != base:
        raise resolution.error(f"{what} under {label!r} runs on that statement's {base!r} prompts, not {on!r}",
                               node.span_of("on"))
    resolution.run_prompt(base, span)
    return label, base


def check_under(method, experiment) -> None:
    """The statement named by `under` must be one forward with its writes at a single sweep point."""
    if method.under is None:
        return
    other = next(m for m in experiment.interventions if m.name == method.under)
    why = None
    if len(other.sweep.points) != 1:
        why = (f"it sweeps {len(other.sweep.points)} points; {method.keyword} under a statement that makes one "
               "change (give every swept dim one value)")
    elif not isinstance(other, JobMethod) or not other.is_plain_writes:
        why = "its forwards are not one plain pass with writes (record under a patch, ablate or steer statement)"
    if why:
        raise CausalError(f"'{method.statement}' under {other.name!r}: {why}", method.span)
    method.under_index = experiment.interventions.index(other)


def under_hooks(method, run, examples: torch.Tensor, recorders: dict) -> dict:
    """The `under` statement's writes for these examples, each followed by the recorder at the same site."""
    writes: dict = {}
    if method.under is not None:
        other = run.experiment.interventions[method.under_index]
        zeros = torch.zeros(len(examples), dtype=torch.long)
        job = Job(method.under_index, examples, zeros, zeros, 0, 0)
        writes = hooks(other.writes(job, run, run.state(other.name)))

    def chained(write, record):
        def apply(act, start):
            new = write(act, start) if write else None
            if record:
                record(act if new is None else new, start)
            return new
        return apply
    return {key: chained(writes.get(key), recorders.get(key)) for key in set(writes) | set(recorders)}


def forward_keeping(method, run, examples: torch.Tensor, selection: Selection) -> dict:
    """One forward of the examples (under the statement `under` names, if any): layer -> gathered values."""
    kept: dict = {}
    prompts = run.experiment.prompts[method.base]
    edits = under_hooks(method, run, examples, selection.hooks(examples, kept.__setitem__))
    last = (prompts.lengths[examples] - 1)[:, None]  # no logits are read: unembed one position
    run.forward(prompts.ids[examples], prompts.attention_mask[examples], edits, read=last,
                what=f"{len(examples)} '{method.base}' prompts while recording '{method.statement}'")
    return kept


@dataclass
class RecordState:
    values: torch.Tensor | None  # (points, examples, *trailing), None until the first batch (module sites) or in a store
    scores: torch.Tensor | None  # (layers, examples, heads, 3): per-head pattern scores, where they apply
    ids: torch.Tensor
    lengths: torch.Tensor
    store: RecordingStore | None = None
    top_ids: torch.Tensor | None = None  # (positions, examples, K) SAE feature ids under `top K`, -1: none fired
    top_activation: torch.Tensor | None = None  # (positions, examples, K)
    summary: FeatureSummary | None = None  # on SAE features


@method("record")
@dataclass
class Record(SelfDriven):
    selection: Selection
    under: str | None
    span: Span
    scores_name: str | None  # patterns over every position: per-head previous-token / induction / BOS scores
    store_folder: str | None = None  # set by check_run where the recording is over record_memory_gb
    store_path: str | None = None
    under_index: int | None = None
    features: list[int] | None = None  # the SAE features kept, on an SAE site
    top: int | None = None  # `top K`: each token's K largest features, not all
    tokenizer: object = field(default=None, repr=False)

    @classmethod
    def resolve(cls, node, resolution):
        if len(node.sites) != 1:
            raise resolution.error("record takes one site; write one record statement per site", node.sites[1].span)
        under, base = under_clause(resolution, node, "record")
        sweep, selection = selection_for(resolution, node.sites[0], base)
        name = resolution.name_for(node, node.sites[0].name)
        scores = None
        if selection.masks_keys and not selection.swept_extra and sweep.coords["pos"] == list(range(
                int(resolution.prompts[base].ids.shape[1]))):
            scores = resolution.unique_name(f"{name}_scores")
        features, top = cls.kept_features(resolution, node, sweep, selection)
        if features is not None:
            for suffix in ("top", "top_activation") * bool(top) + FEATURE_SUMMARIES:
                resolution.unique_name(f"{name}_{suffix}")
        return cls(name, resolution.statement(node.span), base, sweep, selection, under, node.span, scores,
                   features=features, top=top, tokenizer=resolution.model.tokenizer)

    @staticmethod
    def kept_features(resolution, node, sweep: Sweep, selection: Selection) -> tuple[list[int] | None, int | None]:
        """An SAE site's features kept (those selected, or all), and `top K` checked against them."""
        top = node.get("top")
        if resolution.adapter.site_info(selection.site).role != FEATURE:
            if top is not None:
                raise resolution.error(f"top {top} keeps each token's largest SAE features; {selection.site!r} is not "
                                       "an SAE's features", node.span_of("top"), hint='record sae("...") top K')
            return None, None
        features = sweep.coords.get("feature") or list(range(dict(selection.trailing)["feature"]))
        if top is not None and not 1 <= top <= len(features):
            raise resolution.error(f"top {top}: choose 1..{len(features)} features (those recorded)", node.span_of("top"))
        return features, top

    # sizes and settings
    def trailing_sizes(self) -> list[int]:
        return [size or 1 for _, size in self.selection.trailing]

    def n_bytes(self, n_examples: int) -> int:
        if self.top:  # an int64 id and a float32 activation per kept feature
            return (8 + ELEMENT_BYTES) * len(self.selection.positions) * n_examples * self.top
        count = len(self.sweep.points) * n_examples
        for size in self.trailing_sizes():
            count *= size
        return ELEMENT_BYTES * count

    def check_run(self, experiment, config) -> None:
        check_under(self, experiment)
        size, bound = self.n_bytes(experiment.n_examples), config.record_memory_gb * 2 ** 30
        self.store_folder = None
        if size <= bound:
            return
        if not config.record_store or self.top:
            sparse = "keep each token's largest features with `top K`, " if self.features and not self.top else ""
            store = "" if self.top else ("set record_store=<folder> to write it there per chunk of examples "
                                         "(causal.load opens it lazily), ")
            raise CausalError(f"'{self.statement}' records {readable_size(size)} ({size} bytes), more than "
                              f"record_memory_gb={config.record_memory_gb:g} allows in memory", self.span,
                              hint=f"{sparse}{store}raise record_memory_gb, or record fewer layers, positions or "
                                   "examples")
        self.store_folder = config.record_store
        self.store_path = str(Path(config.record_store).resolve() / f"{experiment.name}-{self.name}.nc")

    def shard_problem(self):
        if self.store_folder:
            return f"'{self.statement}' writes one store file for every example; run it unsharded"
        return None

    def describe_runs(self, plan, index):
        n = sum(len(chunk.examples) for chunk in plan.chunks)
        batches = sum(-(-len(chunk.examples) // plan.batch_size) for chunk in plan.chunks)
        size = self.n_bytes(n)
        trailing = " x ".join(f"{d} {s}" if s else d for d, s in self.selection.trailing) or "one number"
        if self.top:
            trailing = f"the top {self.top} of {len(self.features)} features (id and activation)"
        where = f"into {self.store_folder}" if self.store_folder else "in memory"
        estimate = " (module outputs: sized as d_model until run)" if self.selection.site.startswith("module:") else ""
        under = f" under {self.under}" if self.under else ""
        return (f"one forward per batch{under} ({batches} batches); records {readable_size(size)} ({size} bytes{estimate}"
                f"; {len(self.sweep.points)} points x {n} examples x {trailing}, float32) {where}")

    # work
    def new_state(self, experiment) -> RecordState:
        prompts = experiment.prompts[self.base]
        n = experiment.n_examples
        sizes = self.trailing_sizes()
        known = all(size is not None for _, size in self.selection.trailing)
        values = None
        if known and not self.store_folder and not self.top:
            values = torch.full((len(self.sweep.points), n, *sizes), float("nan"))
        scores = None
        if self.scores_name:
            heads = dict(self.selection.trailing)["head"]
            scores = torch.full((len(self.selection.layers), n, heads, len(HEAD_SCORES)), float("nan"))
        state = RecordState(values, scores, prompts.ids, prompts.lengths)
        if self.features is not None:
            state.summary = FeatureSummary.empty(len(self.features))
        if self.top:
            shape = (len(self.selection.positions), n, self.top)
            state.top_ids, state.top_activation = torch.full(shape, -1), torch.full(shape, float("nan"))
        return state

    def chunk_pass(self, run, chunk, state):
        examples = chunk.examples
        if self.store_folder:
            state.store = state.store or RecordingStore.open(self, run.experiment)
        summary = FeatureSummary.empty(len(self.features)) if self.features is not None else None
        for start in range(0, len(examples), run.batch_size):
            batch = examples[start:start + run.batch_size]
            if state.store and state.store.done(batch) and not self.scores_name and summary is None:
                continue  # written by an earlier run that stopped later
            kept = forward_keeping(self, run, batch, self.selection)
            values = torch.stack([kept[layer] for layer in self.selection.layers])  # (L, P, *swept, rows, *rest)
            values = values.flatten(0, 1 + len(self.selection.swept_extra))  # points row-major over the sweep
            if summary is not None:
                per_token = self.per_token_features(values)
                summary.add(per_token, batch, self.selection.positions[:, batch])
                if self.top:
                    state.top_ids[:, batch], state.top_activation[:, batch] = top_features(
                        per_token, self.top, torch.tensor(self.features))
                    continue
            if self.scores_name:
                state.scores[:, batch] = head_scores(values.view(len(self.selection.layers), -1, *values.shape[1:]),
                                                     state.ids[batch], state.lengths[batch])
            if state.store:
                state.store.write(batch, values)
            else:
                if state.values is None:
                    state.values = torch.full((values.shape[0], len(state.ids), *values.shape[2:]), float("nan"))
                state.values[:, batch] = values
        saved = {} if state.store or self.top else {"values": state.values[:, examples].contiguous()}
        if self.scores_name:
            saved["scores"] = state.scores[:, examples].contiguous()
        if self.top:
            saved.update(top_ids=state.top_ids[:, examples].contiguous(),
                         top_activation=state.top_activation[:, examples].contiguous())
        if summary is not None:
            state.summary.merge(summary)
            saved.update(summary.saved())
        return saved or None

    def per_token_features(self, values: torch.Tensor) -> torch.Tensor:
        """A batch of recorded SAE features -> (positions, rows, features), whether features were swept or kept whole."""
        if "feature" in self.sweep.coords:  # (positions x features, rows)
            return values.view(len(self.selection.positions), -1, values.shape[-1]).transpose(1, 2)
        return values

    def restore_chunk(self, chunk, saved, state):
        if "values" in saved:
            if state.values is None:
                state.values = torch.full((saved["values"].shape[0], len(state.ids), *saved["values"].shape[2:]),
                                          float("nan"))
            state.values[:, chunk.examples] = saved["values"]
        if "scores" in saved:
            state.scores[:, chunk.examples] = saved["scores"]
        for key in ("top_ids", "top_activation"):
            if key in saved:
                getattr(state, key)[:, chunk.examples] = saved[key]
        if state.summary is not None and "summary_fired" in saved:
            state.summary.merge(FeatureSummary.from_saved(saved))

    def finish(self, run, state):
        if state.store is None and self.store_folder:  # every chunk came back from checkpoints
            state.store = RecordingStore.open(self, run.experiment)
        if state.store:
            state.store.close()

    # results
    def variables(self, effects, state):
        attrs = {**self.attrs(), "kind": RECORDING.kind, "under": self.under or "",
                 "long_name": f"{self.selection.site} activations on the {self.base} prompts"
                              + (f" under {self.under}" if self.under else ""), "units": "1"}
        dims, coords = self.trailing_labels(state)
        out = []
        if self.store_folder:
            store = state.store
            out.append(Variable(self.name, store.recorded()[None], Sweep((), {}, [()]), {
                **attrs, "kind": STORE_KIND, "store": str(store.path), "store_dims": [*self.sweep.dims, "example", *dims],
                "long_name": f"examples recorded into {store.path} (causal.load opens the recording there lazily)"},
                dims=("example",)))
        elif not self.top:
            out.append(Variable(self.name, state.values, self.sweep, attrs, dims=("example", *dims), coords=coords))
        if self.features is not None:
            out.extend(self.feature_variables(state, attrs))
        if self.scores_name:
            layers = self.selection.layers
            sweep = Sweep(("layer",), {"layer": layers}, [(Target(self.selection.site, (layer,), None),)
                                                         for layer in layers])
            out.append(Variable(self.scores_name, state.scores, sweep, {
                **self.attrs(), "kind": SCORED_HEADS.kind, "recording": self.name,
                "long_name": "per-head attention scores: previous_token (to position i-1), induction (to the token "
                             "after an earlier copy of the current token), bos (to position 0)", "units": "1"},
                dims=("example", "head", "score"),
                coords={"head": list(range(state.scores.shape[2])), "score": list(HEAD_SCORES)}))
        return out

    def feature_variables(self, state, attrs: dict) -> list[Variable]:
        """`top K` per token (over positions, example, top), and the per-feature summaries (feature, rank)."""
        attrs = {**attrs, "kind": FEATURES.kind, "recording": self.name}
        out = []
        if self.top:
            positions = self.sweep.coords["pos"]
            sweep = Sweep(("pos",), {"pos": positions}, [(Target(self.selection.site, (self.selection.layers[0],), p),)
                                                          for p in positions])
            ranks = {"top": list(range(self.top))}
            out += [Variable(f"{self.name}_top", state.top_ids, sweep, {
                        **attrs, "long_name": f"the {self.top} largest SAE features of each token (-1: fewer fired)"},
                        ("example", "top"), ranks),
                    Variable(f"{self.name}_top_activation", state.top_activation, sweep, {
                        **attrs, "long_name": "their activations (NaN where fewer fired)"}, ("example", "top"), ranks)]
        summary, none = state.summary, Sweep((), {}, [()])
        label = {"feature": self.features}
        ranked = {**label, "rank": list(range(summary.max_activation.shape[1]))}
        found = summary.max_example >= 0
        texts = np.array(summary.texts(state.ids, self.tokenizer.decode), dtype=object)
        described = {"frequency": ("fraction of recorded tokens where the feature fired (> 0)", summary.frequency(),
                                   ("feature",), label),
                     "max_activation": ("largest activations of each feature over the recorded tokens",
                                        summary.max_activation.masked_fill(~found, float("nan")), ("feature", "rank"), ranked),
                     "max_example": ("example of each max activation (-1: none)", summary.max_example, ("feature", "rank"), ranked),
                     "max_pos": ("position of each max activation (-1: none)", summary.max_pos, ("feature", "rank"), ranked),
                     "max_text": ("the tokens before each max activation and [the token itself]", texts, ("feature", "rank"),
                                  ranked)}
        for suffix, (long_name, values, dims, coords) in described.items():
            out.append(Variable(f"{self.name}_{suffix}", values[None], none, {**attrs, "long_name": long_name},
                                dims, coords))
        return out

    def trailing_labels(self, state) -> tuple[list[str], dict]:
        names = [d for d, _ in self.selection.trailing]
        if state.values is not None and self.selection.site.startswith("module:"):  # as the module returned it
            extra = state.values.dim() - 2
            names = ["feature"] if extra == 1 else [f"feature_{i}" for i in range(extra)]
        coords = {d: list(range(s)) for d, s in self.selection.trailing if s and d not in ("d_model", "d_head")}
        return names, coords


def head_scores(patterns: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(layers, queries, rows, heads, keys) patterns -> (layers, rows, heads, 3): previous-token, induction, BOS.

    Each is a mean over the queries i >= 1 of a prompt of the attention to: i - 1 (previous_token); the keys
    k <= i whose previous token k - 1 is the query's token, i.e. the token after an earlier copy (induction,
    averaged only over queries whose token occurred before; NaN if none did); position 0 (bos).
    """
    layers, queries, rows, heads, keys = patterns.shape
    p = patterns.nan_to_num(0.0).permute(0, 2, 3, 1, 4)  # (layers, rows, heads, q, k)
    q, k = torch.arange(queries), torch.arange(keys)
    valid = (q[None, :] < lengths[:, None]) & (q[None, :] >= 1)  # (rows, q)
    previous = (k[None, :] == q[:, None] - 1)[None].expand(rows, -1, -1)
    bos = (k[None, :] == 0)[None].expand(rows, queries, -1)
    before = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :keys - 1]], 1)  # the token before each key
    induction = (ids[:, :queries, None] == before[:, None, :]) & ((k[None, :] >= 1) & (k[None, :] <= q[:, None]))[None]

    def score(mask: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        attended = (p * mask[None, :, None].float()).sum(-1)  # (layers, rows, heads, q)
        weight = counted[None, :, None].float()
        count = weight.sum(-1)
        return (attended * weight).sum(-1) / torch.where(count > 0, count, torch.full_like(count, float("nan")))

    return torch.stack([score(previous, valid), score(induction, induction.any(-1) & valid), score(bos, valid)], -1)


__all__ = ["Record", "Selection", "head_scores", "selection_for"]
