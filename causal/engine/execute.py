"""Run a Plan: statistics, then per chunk of examples the base runs and the batched jobs.

Every forward goes through `causal.engine.forward.Runner`, i.e. the unmodified HF forward with
hooks that edit chosen activations; nothing of the model is re-implemented.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from causal import interventions as iv
from causal.methods.attribute import AttributionRun
from causal.engine.checkpoint import ChunkStore
from causal.engine.plan import Chunk, Job, Plan, Stream, stream_of
from causal.errors import CausalError
from causal.resolve.experiment import Experiment
from causal.engine.forward import Output, Resume, Runner
from causal.engine.health import NonFiniteWatch
from causal.metrics import metric_values, read_slots, reference_logprobs, sentence_embedding
from causal.engine.stats import compute_stats
from causal.engine.writes import Caches, Write, WriteBuilder, as_hook

log = logging.getLogger(__name__)


@dataclass
class RawResults:
    """Raw numbers before labelling: float32 tensors on the CPU, NaN where a row was not defined."""

    baselines: dict[str, torch.Tensor]  # stream -> (examples, metrics)
    effects: dict[str, torch.Tensor]  # variable -> (points, examples, metrics)
    notes: dict[str, dict] = field(default_factory=dict)  # variable -> extra attrs (e.g. correlations)


class _Sums:
    """Accumulates row values into (points, examples, metrics), averaging over noise samples."""

    def __init__(self, shape: tuple[int, int, int]):
        self.total = torch.zeros(shape)
        self.count = torch.zeros(shape[:2])

    def add(self, points: torch.Tensor, examples: torch.Tensor, values: torch.Tensor) -> None:
        self.total.index_put_((points, examples), values.float().cpu(), accumulate=True)
        self.count.index_put_((points, examples), torch.ones(len(points)), accumulate=True)

    def mean(self) -> torch.Tensor:
        out = self.total / self.count[..., None]
        out[self.count == 0] = float("nan")
        return out


def execute(experiment: Experiment, plan: Plan, progress: bool = True, store: ChunkStore | None = None) -> RawResults:
    return Executor(experiment, plan, progress, store).run()


class Executor:
    def __init__(self, experiment: Experiment, plan: Plan, progress: bool, store: ChunkStore | None):
        self.experiment, self.plan, self.store = experiment, plan, store
        self.runner = Runner(experiment.model)
        self.progress = progress
        n, metrics = experiment.n_examples, len(experiment.metrics)
        self.baselines = {name: torch.full((n, metrics), float("nan")) for name in plan.streams}
        self.sums = {i.name: _Sums((len(i.sweep.points), n, metrics)) for i in experiment.interventions}
        self.notes: dict[str, dict] = {}
        self.backoff = BatchBackoff(plan.batch_size)

    def run(self) -> RawResults:
        self.stats = compute_stats(self.experiment, self.run_column)
        done = self.store.completed() if self.store else set()
        if done:
            log.warning("resuming: %d of %d batches already done (%s)", sum(k.startswith("job-") for k in done),
                        len(self.plan.jobs), self.store.folder)
        attributions = [(i, x) for i, x in enumerate(self.experiment.interventions) if isinstance(x, iv.Attribute)]
        bar = tqdm(total=len(self.plan.jobs) + len(attributions) * len(self.plan.chunks), unit="batch",
                   desc=f"{self.experiment.name}", disable=not self.progress)
        numbered = iter(range(len(self.plan.jobs)))
        attribution_runs = [AttributionRun(self.experiment, x) for _, x in attributions]
        for chunk_index, chunk in enumerate(self.plan.chunks):
            indices = [next(numbered) for _ in chunk.jobs]
            pending = []
            for k, job in zip(indices, chunk.jobs):
                saved = self.saved(f"job-{k:06d}", done)
                if saved is None:
                    pending.append((k, job))
                else:
                    self.collect(job, saved)
                    bar.update(1)
            to_attribute = [run for run in attribution_runs if not self.restored(run, chunk_index, chunk, done)]
            bar.update(len(attribution_runs) - len(to_attribute))
            caches = self.base_runs(chunk_index, chunk, done, need=bool(pending) or bool(to_attribute))
            for k, job in pending:
                values = self.backoff.run(lambda j: self.run_job(j, caches), job)
                if self.store:
                    self.store.save(f"job-{k:06d}", values)
                self.collect(job, values)
                bar.update(1)
            for run in to_attribute:
                run.chunk(self, chunk, caches)
                if self.store:
                    self.store.save_tensors(_attribution_key(run, chunk_index), run.chunk_state(chunk))
                bar.update(1)
        for run in attribution_runs:
            run.finish(self)
        bar.close()
        effects = {name: sums.mean() for name, sums in self.sums.items()}
        for run in attribution_runs:
            effects.update(run.arrays())
            self.notes.update(run.notes())
        return RawResults(self.baselines, effects, self.notes)

    def saved(self, key: str, done: set[str]) -> torch.Tensor | None:
        state = self.saved_tensors(key, done)
        return None if state is None else state["values"]

    def saved_tensors(self, key: str, done: set[str]) -> dict[str, torch.Tensor] | None:
        """A finished piece from the checkpoint store; a damaged one is recomputed, not trusted."""
        if key not in done:
            return None
        try:
            return self.store.load_tensors(key)
        except Exception as exc:  # noqa: BLE001 -- any unreadable file: compute it again
            log.warning("checkpoint %s is damaged (%s); recomputing it", self.store.folder / key, exc)
            return None

    def restored(self, run: AttributionRun, chunk_index: int, chunk: Chunk, done: set[str]) -> bool:
        """Whether the chunk's attribution estimates came back from a checkpoint."""
        state = self.saved_tensors(_attribution_key(run, chunk_index), done)
        if state is not None:
            run.restore_chunk(chunk, state)
        return state is not None

    def collect(self, job: Job, values: torch.Tensor) -> None:
        intervention = self.experiment.interventions[job.intervention]
        self.sums[intervention.name].add(job.points, job.examples, values)

    # base runs
    def base_runs(self, chunk_index: int, chunk: Chunk, done: set[str], need: bool) -> Caches:
        """Each stream once over the chunk: metric baselines, and what later jobs read from it."""
        plan = self.plan
        caches = Caches(int(chunk.examples[0]), {name: s.samples for name, s in plan.streams.items()})
        self.references: dict[int, dict[int, torch.Tensor]] = {}  # metric -> example -> what it compares with
        for stream in self.stream_order():
            key = f"base-{chunk_index:04d}-{stream.name}"
            saved = None if need or self.is_reference(stream) else self.saved(key, done)
            if saved is not None:
                self.baselines[stream.name][chunk.examples] = saved
                continue
            values = self.base_run(stream, chunk.examples, caches)
            if self.store:
                self.store.save(key, values)
            self.baselines[stream.name][chunk.examples] = values
        return caches

    def stream_order(self) -> list[Stream]:
        """References (kl, similarity) first: other streams' metrics compare against them."""
        streams = list(self.plan.streams.values())
        return sorted(streams, key=lambda s: not self.is_reference(s))

    def is_reference(self, stream: Stream) -> bool:
        return stream.samples == 1 and any(m.reference == stream.column for m in self.experiment.metrics)

    def base_run(self, stream: Stream, examples: torch.Tensor, caches: Caches) -> torch.Tensor:
        """Runs the stream's rows in batches; returns (examples, metrics), averaged over noise samples."""
        k = stream.samples
        rows_examples = examples.repeat_interleave(k)
        rows_samples = torch.arange(k).repeat(len(examples))
        out = []
        for start in range(0, len(rows_examples), self.plan.batch_size):
            batch = slice(start, start + self.plan.batch_size)
            out.append(self.base_batch(stream, rows_examples[batch], rows_samples[batch], caches, len(rows_examples)))
        values = torch.cat(out)
        return values.view(len(examples), k, -1).mean(1)

    def base_batch(self, stream: Stream, examples: torch.Tensor, samples: torch.Tensor, caches: Caches,
                   chunk_rows: int) -> torch.Tensor:
        experiment, plan = self.experiment, self.plan
        prompts = experiment.prompts[stream.column]
        rows = caches.rows(stream.name, examples, samples)
        hooks: dict = {}
        if stream.trace is not None:
            key, write = self.stats.noise_write(stream.trace, examples, samples)
            hooks[key] = [as_hook([write])]
        for key in sorted(plan.records[stream.name], key=str):
            hooks.setdefault(key, []).append(_recorder(caches.tensors, (stream.name, key), rows, chunk_rows))
        for layer in plan.resume_layers[stream.name]:
            key = ("resid_pre", layer)
            hooks.setdefault(key, []).append(_recorder(caches.resume, (stream.name, layer), rows, chunk_rows))
        slots = read_slots(experiment, stream.column, examples)
        watch = NonFiniteWatch(experiment.model.adapter)
        with self.runner.note_block_output(), watch.watching():
            output = self.guarded(lambda: self.runner.forward(
                prompts.ids[examples], prompts.attention_mask[examples], _chain(hooks), read=self.read(slots),
                record_kv=stream.name in plan.kv_streams), f"{len(examples)} unpatched '{stream.name}' prompts")
        output = self.at_slots(output, slots)
        if output.keys_values is not None:
            _store_keys_values(caches, stream.name, output.keys_values, rows, chunk_rows)
        self.note_references(stream, output, examples, prompts.attention_mask[examples], slots)
        values = metric_values(experiment, output, stream.column, examples, slots, self.references_for(examples),
                               prompts.attention_mask[examples])
        watch.check(values, torch.ones(len(examples), dtype=torch.bool), [m.name for m in experiment.metrics],
                    lambda row: f"example {int(examples[row])} of the unpatched '{stream.name}' prompts")
        return values.cpu()

    def read(self, slots) -> torch.Tensor | None:
        """Positions to unembed; the reference path (optimize=False) unembeds every position."""
        return slots[0] if self.plan.optimize else None

    def at_slots(self, output: Output, slots) -> Output:
        if self.plan.optimize or output.logits is None:
            return output
        index = slots[0].to(output.logits.device)
        logits = output.logits.gather(1, index[..., None].expand(-1, -1, output.logits.shape[-1]))
        return replace(output, logits=logits)

    def note_references(self, stream: Stream, output: Output, examples: torch.Tensor, mask: torch.Tensor,
                        slots) -> None:
        if not self.is_reference(stream):
            return
        for index, metric in enumerate(self.experiment.metrics):
            if metric.reference != stream.column:
                continue
            if metric.kind == "similarity":
                value = sentence_embedding(output.hidden, mask).cpu()
            else:
                chosen = metric.positions[stream.column][examples].gather(1, slots[0]) & slots[1]
                value = reference_logprobs(output, chosen)
            table = self.references.setdefault(index, {})
            for row, example in enumerate(examples.tolist()):
                table[example] = value[row]

    def references_for(self, examples: torch.Tensor) -> dict[int, torch.Tensor]:
        out = {}
        for index, table in self.references.items():
            rows = [table[int(e)] for e in examples]
            width = max(r.shape[0] for r in rows) if rows[0].dim() > 1 else None
            if width is not None:
                rows = [torch.cat([r, r.new_zeros((width - r.shape[0], *r.shape[1:]))]) for r in rows]
            out[index] = torch.stack(rows)
        return out

    def run_column(self, column: str, hooks: dict[tuple, Callable]) -> None:
        """Statistics pass: every example of a column once, hooks called with the batch's examples."""
        prompts = self.experiment.prompts[column]
        n = self.experiment.n_examples
        for start in range(0, n, self.plan.batch_size):
            examples = torch.arange(start, min(start + self.plan.batch_size, n))
            bound = {key: _bind(fn, examples) for key, fn in hooks.items()}
            last = (prompts.lengths[examples] - 1)[:, None]  # statistics need no logits: unembed one position
            self.guarded(lambda: self.runner.forward(prompts.ids[examples], prompts.attention_mask[examples], bound,
                                                     read=last),
                         f"{len(examples)} '{column}' prompts for statistics")

    # jobs
    def run_job(self, job: Job, caches: Caches) -> torch.Tensor:
        intervention = self.experiment.interventions[job.intervention]
        if isinstance(intervention, iv.PathPatch):
            return self.run_path_job(intervention, job, caches)
        builder = WriteBuilder(self.experiment, caches, self.stats)
        hooks = {key: as_hook(writes) for key, writes in builder.for_job(job).items()}
        return self.forward_job(intervention, job, caches, hooks)

    def forward_job(self, intervention: iv.Intervention, job: Job, caches: Caches, hooks: dict,
                    start_layer: int | None = None, start_pos: int | None = None,
                    recorders: dict | None = None) -> torch.Tensor:
        experiment = self.experiment
        prompts = experiment.prompts[intervention.base]
        stream = stream_of(intervention)
        resume = self.resume(stream, job, caches, job.start_layer if start_layer is None else start_layer,
                             job.start_pos if start_pos is None else start_pos)
        slots = read_slots(experiment, intervention.base, job.examples)
        watch = NonFiniteWatch(experiment.model.adapter)
        mask = prompts.attention_mask[job.examples]
        with watch.watching():
            output = self.runner.forward(prompts.ids[job.examples], mask, _merge(hooks, recorders or {}), resume,
                                         read=self.read(slots))
        output = self.at_slots(output, slots)
        values = metric_values(experiment, output, intervention.base, job.examples, slots,
                               self.references_for(job.examples), mask)
        watch.check(values, torch.ones(len(job.examples), dtype=torch.bool), [m.name for m in experiment.metrics],
                    lambda row: f"example {int(job.examples[row])} while running '{intervention.statement}' at "
                                f"{describe_point(intervention, int(job.points[row]))}")
        return values

    def resume(self, stream: str, job: Job, caches: Caches, layer: int, pos: int) -> Resume:
        if not self.plan.optimize:
            return Resume()
        rows = caches.rows(stream, job.examples, job.samples)
        hidden = None
        if layer > 0:
            cached = caches.resume[(stream, layer)]
            hidden = cached[rows.to(cached.device)][:, pos:]
        keys_values = None
        if pos > 0:
            keys_values = [(k[rows.to(k.device)][:, :, :pos], v[rows.to(v.device)][:, :, :pos])
                           for k, v in caches.keys_values[stream]]
        return Resume(layer, pos, hidden, keys_values)

    def run_path_job(self, intervention: iv.PathPatch, job: Job, caches: Caches) -> torch.Tensor:
        """Phase A: senders patched, the rest frozen, receiver inputs recorded; phase B: only those patched."""
        builder = WriteBuilder(self.experiment, caches, self.stats)
        hooks = {key: as_hook(writes) for key, writes in builder.path_phase_a(intervention, job).items()}
        if intervention.receivers is None:
            return self.forward_job(intervention, job, caches, hooks, start_pos=0)
        receivers = builder.path_receivers(intervention, job)
        recorded: dict = {}
        recorders = {key: _keeper(recorded, key) for key in receivers}
        self.forward_job(intervention, job, caches, hooks, start_pos=0, recorders=recorders)
        second = {key: as_hook([Write(where, recorded[key])]) for key, where in receivers.items()}
        return self.forward_job(intervention, job, caches, second, start_layer=intervention.first_receiver_layer,
                                start_pos=0)

    def guarded(self, compute: Callable[[], Output], what: str) -> Output:
        try:
            return compute()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if "out of memory" not in str(exc).lower():
                raise
            raise CausalError(f"out of memory running {what} at once; lower batch_size "
                              f"(now {self.plan.batch_size})") from None


def _attribution_key(run: AttributionRun, chunk_index: int) -> str:
    return f"attribution-{run.index:03d}-{chunk_index:04d}"


def describe_point(intervention: iv.Intervention, point: int) -> str:
    sweep = intervention.sweep
    if not sweep.dims:
        return "every site"
    index = torch.unravel_index(torch.tensor(point), sweep.shape)
    return " ".join(f"{d}={sweep.coords[d][int(i)]}" for d, i in zip(sweep.dims, index))


class BatchBackoff:
    """Splits jobs that exhaust device memory in halves, and keeps the smaller size for later jobs."""

    def __init__(self, rows: int):
        self.rows = rows

    def run(self, compute: Callable[[Job], torch.Tensor], job: Job) -> torch.Tensor:
        pieces = [_slice(job, start, start + self.rows) for start in range(0, len(job.examples), self.rows)]
        return torch.cat([self._attempt(compute, piece) for piece in pieces])

    def _attempt(self, compute: Callable[[Job], torch.Tensor], job: Job) -> torch.Tensor:
        try:
            return compute(job).float().cpu()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if "out of memory" not in str(exc).lower():
                raise
        rows = len(job.examples)
        if rows == 1:
            raise CausalError("out of memory with a single row per forward pass; use a smaller dtype "
                              "(dtype=bfloat16), shorter prompts, or a larger device")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.rows = min(self.rows, rows // 2)
        log.warning("out of memory with %d rows per forward pass; retrying with %d", rows, self.rows)
        return self.run(compute, job)


def _slice(job: Job, start: int, stop: int) -> Job:
    return replace(job, examples=job.examples[start:stop], points=job.points[start:stop],
                   samples=job.samples[start:stop])


def _recorder(store: dict, key, rows: torch.Tensor, total_rows: int) -> Callable:
    """Keeps a stream's activation for its rows in `store[key]` (chunk rows, width, ...)."""
    def record(act: torch.Tensor, start: int) -> None:
        if key not in store:
            store[key] = act.new_zeros((total_rows, *act.shape[1:]))
        store[key][rows.to(act.device), start:start + act.shape[1]] = act.detach()
    return record


def _store_keys_values(caches: Caches, stream: str, keys_values, rows: torch.Tensor, total_rows: int) -> None:
    if stream not in caches.keys_values:
        caches.keys_values[stream] = [(k.new_zeros((total_rows, *k.shape[1:])), v.new_zeros((total_rows, *v.shape[1:])))
                                      for k, v in keys_values]
    for (keys, values), (k, v) in zip(caches.keys_values[stream], keys_values):
        keys[rows.to(k.device)] = k
        values[rows.to(v.device)] = v


def _keeper(store: dict, key) -> Callable:
    def keep(act: torch.Tensor, start: int) -> None:
        store[key] = act.detach().clone()
    return keep


def _bind(fn: Callable, examples: torch.Tensor) -> Callable:
    return lambda act, start: fn(act, start, examples)


def _chain(hooks: dict[tuple, list[Callable]]) -> dict[tuple, Callable]:
    """Several functions on one site: each sees the previous one's result."""
    def compose(fns):
        if len(fns) == 1:
            return fns[0]

        def apply(act, start):
            changed = False
            for fn in fns:
                new = fn(act, start)
                if new is not None:
                    act, changed = new, True
            return act if changed else None
        return apply
    return {key: compose(fns) for key, fns in hooks.items()}


def _merge(hooks: dict, recorders: dict) -> dict:
    keys = set(hooks) | set(recorders)
    return _chain({key: [f for f in (hooks.get(key), recorders.get(key)) if f] for key in keys})
