"""Run a Plan on the model with torch hooks and return metric values per row.

Every forward goes through `ModelAdapter.hooks`, so a patched run is an ordinary HF
forward plus hooks that replace chosen activations: nothing is re-implemented.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from causal.checkpoint import ChunkStore
from causal.compile import Plan, Run
from causal.data import Prompts
from causal.errors import CausalError
from causal.health import NonFiniteWatch
from causal.resolve import Experiment, Intervention, Metric

log = logging.getLogger(__name__)

CacheKey = tuple[str, str, int]  # (prompt column, site, layer)


@dataclass
class RawResults:
    """Raw numbers before labelling: float32 tensors on the CPU."""

    baselines: dict[str, torch.Tensor]  # column -> (examples, metrics)
    effects: list[torch.Tensor]  # per intervention -> (points, examples, metrics), NaN where not defined


def execute(experiment: Experiment, plan: Plan, progress: bool = True,
            store: ChunkStore | None = None) -> RawResults:
    """Baselines, then every run of the plan; runs already in `store` are read back, not recomputed."""
    baselines, caches = record_baselines(experiment, plan)
    means = ablation_means(experiment, caches)
    n_examples, n_metrics = len(experiment.examples), len(experiment.metrics)
    effects = [torch.full((len(i.sweep.points), n_examples, n_metrics), float("nan"))
               for i in experiment.interventions]
    done = store.completed() if store else set()
    if done:
        log.warning("resuming: %d of %d batches already done (%s)", len(done), len(plan.runs), store.folder)
    backoff = BatchBackoff(plan.batch_size)
    for index, run in enumerate(tqdm(plan.runs, desc=f"{experiment.name}: patched runs", unit="batch",
                                     disable=not progress)):
        if index in done:
            values = store.load(index)
        else:
            values = backoff.run(lambda r: run_intervention(experiment, r, caches, means), run)
            if store:
                store.save(index, values)
        effects[run.intervention][run.points, run.examples] = values
    return RawResults(baselines, effects)


class BatchBackoff:
    """Splits runs that exhaust device memory in halves, and keeps the smaller size for later runs."""

    def __init__(self, rows: int):
        self.rows = rows

    def run(self, compute: Callable[[Run], torch.Tensor], run: Run) -> torch.Tensor:
        pieces = [_slice(run, start, start + self.rows) for start in range(0, len(run.examples), self.rows)]
        return torch.cat([self._attempt(compute, piece) for piece in pieces])

    def _attempt(self, compute: Callable[[Run], torch.Tensor], run: Run) -> torch.Tensor:
        try:
            return compute(run).float().cpu()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if "out of memory" not in str(exc).lower():
                raise
        rows = len(run.examples)
        if rows == 1:
            raise CausalError("out of memory with a single row per forward pass; use a smaller dtype "
                              "(dtype=bfloat16), shorter prompts, or a larger device")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.rows = min(self.rows, rows // 2)
        log.warning("out of memory with %d rows per forward pass; retrying with %d", rows, self.rows)
        return self.run(compute, run)


def _slice(run: Run, start: int, stop: int) -> Run:
    return replace(run, examples=run.examples[start:stop], points=run.points[start:stop])


def forward_logits(experiment: Experiment, prompts: Prompts, examples: torch.Tensor) -> torch.Tensor:
    device = experiment.model.device
    with torch.inference_mode():
        out = experiment.model.model(input_ids=prompts.ids[examples].to(device),
                                     attention_mask=prompts.attention_mask[examples].to(device))
    return out.logits


def record_baselines(experiment: Experiment, plan: Plan):
    """One unpatched forward per prompt column: its metrics, and the activations later runs read."""
    adapter = experiment.model.adapter
    n = len(experiment.examples)
    baselines: dict[str, torch.Tensor] = {}
    caches: dict[CacheKey, torch.Tensor] = {}
    for column, prompts in experiment.prompts.items():
        values = []
        for start in range(0, n, plan.batch_size):
            examples = torch.arange(start, min(start + plan.batch_size, n))
            recorders = {key: _recorder(caches, (column, *key), examples, n)
                         for key in sorted(plan.caches.get(column, ()))}
            watch = NonFiniteWatch(adapter)
            try:
                with adapter.hooks(recorders), watch.watching():
                    logits = forward_logits(experiment, prompts, examples)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if "out of memory" not in str(exc).lower():
                    raise
                raise CausalError(f"out of memory running {len(examples)} unpatched '{column}' prompts at once; "
                                  f"lower batch_size (now {plan.batch_size})") from None
            batch_values = metric_values(experiment.metrics, logits, column, prompts, examples)
            watch.check(batch_values, torch.ones(len(examples), dtype=torch.bool), [m.name for m in experiment.metrics],
                        lambda row: f"example {int(examples[row])} of the unpatched '{column}' prompts")
            values.append(batch_values)
        baselines[column] = torch.cat(values).cpu()
    return baselines, caches


def _recorder(caches: dict, key: CacheKey, examples: torch.Tensor, n: int) -> Callable:
    def record(act: torch.Tensor, start: int = 0) -> None:
        if key not in caches:
            caches[key] = act.new_zeros((n, *act.shape[1:]))
        caches[key][examples.to(act.device)] = act.detach()
    return record


def ablation_means(experiment: Experiment, caches: dict[CacheKey, torch.Tensor]) -> dict[CacheKey, torch.Tensor]:
    """Mean over examples at each position, counting only examples long enough to have it."""
    means = {}
    for intervention in experiment.interventions:
        if intervention.method != "mean":
            continue
        valid = experiment.prompts[intervention.base].attention_mask
        for layer in {l for p in intervention.sweep.points for l in p.layers}:
            key = (intervention.base, intervention.sweep.component, layer)
            act = caches[key]
            weights = valid.to(act.device, act.dtype).view(*valid.shape, *([1] * (act.dim() - 2)))
            means[key] = (act * weights).sum(0) / weights.sum(0).clamp(min=1)
    return means


def run_intervention(experiment: Experiment, run: Run, caches: dict, means: dict) -> torch.Tensor:
    intervention = experiment.interventions[run.intervention]
    prompts = experiment.prompts[intervention.base]
    device = experiment.model.device
    points = [intervention.sweep.points[int(p)] for p in run.points]
    lengths = prompts.lengths[run.examples]
    pos_mask, valid_rows = _position_mask(points, lengths, prompts.ids.shape[1])
    hooks = {}
    for layer in sorted({l for p in points for l in p.layers}):
        rows = torch.tensor([layer in p.layers for p in points])
        mask = (pos_mask & rows[:, None]).to(device)
        if experiment.model.adapter.is_per_head(intervention.sweep.component):
            mask = mask[:, :, None] & _head_mask(points, experiment.model.adapter.n_heads).to(device)[:, None, :]
        value = _replacement(intervention, layer, run.examples, caches, means)
        hooks[(intervention.sweep.component, layer)] = _replace(mask, value)
    watch = NonFiniteWatch(experiment.model.adapter)
    with experiment.model.adapter.hooks(hooks), watch.watching():
        logits = forward_logits(experiment, prompts, run.examples)
    values = metric_values(experiment.metrics, logits, intervention.base, prompts, run.examples)
    watch.check(values, valid_rows, [m.name for m in experiment.metrics],
                lambda row: f"example {int(run.examples[row])} while running "
                            f"'{intervention.statement}' at {describe_point(intervention, points[row])}")
    values[~valid_rows.to(values.device)] = float("nan")
    return values


def describe_point(intervention: Intervention, point) -> str:
    parts = []
    if len(point.layers) == 1:
        parts.append(f"layer={point.layers[0]}")
    if point.pos is not None:
        parts.append(f"pos={point.pos}")
    if point.heads is not None and len(point.heads) == 1:
        parts.append(f"head={point.heads[0]}")
    return " ".join(parts) or "every site"


def _position_mask(points, lengths: torch.Tensor, width: int):
    """(rows, seq) positions to replace, and which rows name a position their prompt has."""
    positions = torch.arange(width)[None, :]
    wanted = torch.tensor([-1 if p.pos is None else p.pos for p in points])
    every = torch.tensor([p.pos is None for p in points])
    absolute = torch.where(wanted < 0, lengths + wanted, wanted)
    valid = every | ((absolute >= 0) & (absolute < lengths))
    mask = torch.where(every[:, None], positions < lengths[:, None], positions == absolute[:, None])
    return mask, valid


def _head_mask(points, n_heads: int) -> torch.Tensor:
    mask = torch.zeros(len(points), n_heads, dtype=torch.bool)
    for row, point in enumerate(points):
        mask[row, list(point.heads) if point.heads is not None else slice(None)] = True
    return mask


def _replacement(intervention: Intervention, layer: int, examples: torch.Tensor, caches, means):
    key_site = (intervention.sweep.component, layer)
    if intervention.method == "patch":
        cache = caches[(intervention.source, *key_site)]
        return cache[examples.to(cache.device)]
    if intervention.method == "mean":
        return means[(intervention.base, *key_site)][None]
    return None  # zero


def _replace(mask: torch.Tensor, value: torch.Tensor | None) -> Callable:
    def replace(act: torch.Tensor, start: int = 0) -> torch.Tensor:
        m = mask[..., None]
        if value is None:
            return act.masked_fill(m, 0.0)
        return torch.where(m, value.to(act.dtype), act)
    return replace


def metric_values(metrics: list[Metric], logits: torch.Tensor, column: str, prompts: Prompts,
                  examples: torch.Tensor) -> torch.Tensor:
    """(rows, metrics): each metric averaged over the positions it reads in each row's prompt."""
    logits = logits.float()
    logprobs = logits.log_softmax(-1)
    ids = prompts.ids[examples].to(logits.device)
    out = []
    for metric in metrics:
        per_position = _per_position(metric, logits, logprobs, ids, examples)
        mask = metric.positions[column][examples].to(logits.device)
        out.append((per_position * mask).sum(1) / mask.sum(1))
    return torch.stack(out, 1)


def _per_position(metric: Metric, logits, logprobs, ids, examples) -> torch.Tensor:
    def gather(table: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return table.gather(-1, token.expand(table.shape[0], table.shape[1])[..., None])[..., 0]

    if metric.next_token:
        following = torch.cat([ids[:, 1:], ids[:, -1:]], 1)
        chosen = gather(logprobs, following)
    else:
        answers = [a[examples].to(logits.device)[:, None] for a in metric.answers]
        if metric.kind == "logit_diff":
            return gather(logits, answers[0]) - gather(logits, answers[1])
        chosen = gather(logprobs, answers[0])
    return chosen.exp() if metric.kind == "prob" else chosen
