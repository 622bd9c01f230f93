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

from causal.engine.caches import Caches
from causal.engine.checkpoint import ChunkStore
from causal.engine.context import RunContext
from causal.engine.forward import Runner
from causal.engine.health import NonFiniteWatch
from causal.engine.plan import Packer, RowStarts, row_starts
from causal.engine.stats import run_statistics
from causal.errors import CausalError
from causal.methods.base import JobMethod, SelfDriven
from causal.methods.edits import Masks, as_hook
from causal.metrics import chosen_slots, metric_values, read_slots
from causal.models.adapter import BLOCK_INPUT
from causal.values import Chunk, Experiment, Job, Output, Plan, Resume, Stream

log = logging.getLogger(__name__)


@dataclass
class RawResults:
    """Raw numbers before labelling: float32 tensors on the CPU, NaN where a row was not defined."""

    baselines: dict[str, torch.Tensor]  # stream -> (examples, metrics)
    variables: list = field(default_factory=list)  # methods.Variable: name, (points, examples, metrics), sweep, attrs


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


def execute(experiment: Experiment, plan: Plan, progress: bool | None = None, store: ChunkStore | None = None) -> RawResults:
    return Executor(experiment, plan, progress, store).run()


class Executor:
    """Runs a plan. Methods never see it: they get its `context` (causal.engine.context.RunContext)."""

    def __init__(self, experiment: Experiment, plan: Plan, progress: bool | None, store: ChunkStore | None):
        self.experiment, self.plan, self.store = experiment, plan, store
        self.runner = Runner(experiment.model)
        self.masks = Masks(experiment)
        self.progress = progress
        n, metrics = experiment.n_examples, len(experiment.metrics)
        self.baselines = {name: torch.full((n, metrics), float("nan")) for name in plan.streams}
        self.sums = {m.name: _Sums((len(m.sweep.points), n, metrics)) for m in experiment.interventions}
        self.states = {m.name: m.new_state(experiment) for m in experiment.interventions}
        self.backoff = BatchBackoff(plan.batch_size)
        self.caches: Caches | None = None  # the current chunk's base runs
        self.context = RunContext(self)

    def prepare_statistics(self) -> None:
        """Every method's statistics passes (means, noise scales), before any job."""
        accumulators = [a for m in self.experiment.interventions for a in m.statistics(self.experiment,
                                                                                      self.states[m.name])]
        run_statistics(accumulators, self.run_column)
        for method in self.experiment.interventions:
            method.check_statistics(self.states[method.name])

    def run(self) -> RawResults:
        self.prepare_statistics()
        done = self.store.completed() if self.store else set()
        if done:
            log.warning("resuming: %d of %d batches already done (%s)", sum(k.startswith("job-") for k in done),
                        len(self.plan.jobs), self.store.folder)
        per_chunk = [(i, m) for i, m in enumerate(self.experiment.interventions)
                     if isinstance(m, SelfDriven) and m.per_chunk]
        own = sum(chunk.in_shard for chunk in self.plan.chunks)  # another shard's chunks: baselines only
        bar = tqdm(total=len(self.plan.jobs) + len(per_chunk) * own, unit="batch",
                   desc=f"{self.experiment.name}", disable=None if self.progress is None else not self.progress)
        numbered = iter(range(len(self.plan.jobs)))
        for chunk_index, chunk in enumerate(self.plan.chunks):
            indices = [next(numbered) for _ in chunk.jobs]
            values = {k: self.saved(f"job-{k:06d}", done) for k in indices}
            pending = [(k, job) for k, job in zip(indices, chunk.jobs) if values[k] is None]
            bar.update(len(indices) - len(pending))
            mine = per_chunk if chunk.in_shard else []
            to_do = [(i, m) for i, m in mine if not self.restored(i, m, chunk_index, chunk, done)]
            bar.update(len(mine) - len(to_do))
            caches = self.base_runs(chunk_index, chunk, done, need=bool(pending) or bool(to_do))
            for k, job in pending:
                values[k] = self.backoff.run(lambda j: self.run_job(j, caches), job)
                if self.store:
                    self.store.save(f"job-{k:06d}", values[k])
                bar.update(1)
            for k, job in zip(indices, chunk.jobs):  # in job order, resumed or not: the sums add up alike
                self.collect(job, values[k])
            for index, method in to_do:
                self.caches = caches
                saved = method.chunk_pass(self.context, chunk, self.states[method.name])
                if self.store and saved is not None:
                    self.store.save_tensors(_chunk_key(index, chunk_index), saved)
                bar.update(1)
        for method in self.experiment.interventions:
            if isinstance(method, SelfDriven):
                method.finish(self.context, self.states[method.name])
        bar.close()
        variables = [v for m in self.experiment.interventions
                     for v in m.variables(self.sums[m.name].mean(), self.states[m.name])]
        return RawResults(self.baselines, variables)

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

    def restored(self, index: int, method, chunk_index: int, chunk: Chunk, done: set[str]) -> bool:
        """Whether a method's own work on the chunk came back from a checkpoint."""
        saved = self.saved_tensors(_chunk_key(index, chunk_index), done)
        if saved is not None:
            method.restore_chunk(chunk, saved, self.states[method.name])
        return saved is not None

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
        if stream.owner is not None:  # e.g. the noise of a traced stream
            writes = stream.owner.stream_writes(stream, examples, samples, self.states[stream.owner.name])
            hooks = {key: [as_hook(ws)] for key, ws in writes.items()}
        for key in sorted(plan.records[stream.name], key=str):
            hooks.setdefault(key, []).append(_recorder(caches.tensors, (stream.name, key), rows, chunk_rows))
        for layer in plan.resume_layers[stream.name]:
            key = (BLOCK_INPUT, layer)
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
            chosen = None if metric.kind.reads_whole_prompt else chosen_slots(metric, stream.column, examples, slots)
            value = metric.kind.reference(output, chosen, mask)
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

    def run_points(self, method: JobMethod, points: torch.Tensor) -> torch.Tensor:
        """Exact values of some points of a job method's sweep, (points, examples, metrics), NaN at the others:
        their rows planned and packed as jobs are, each from layer 0 (attribution's check of its top sites). The
        method need not be one of the file's statements; it gets a fresh state, so it must need no statistics."""
        experiment = self.experiment
        state = method.new_state(experiment)
        if method.statistics(experiment, state):
            raise CausalError(f"'{method.statement}': exact values of a method with statistics passes")
        out = torch.full((len(method.sweep.points), experiment.n_examples, len(experiment.metrics)), float("nan"))
        packer = Packer(experiment, self.plan.batch_size, "auto", experiment.model.device.type)
        for chunk_index, chunk in enumerate(self.plan.chunks):
            caches = self.base_runs(chunk_index, chunk, set(), need=True)
            rows = _only_points(row_starts(experiment, method, chunk.examples), points)
            self.caches = caches
            for job in packer.pack(-1, rows):
                out[job.points, job.examples] = method.run_job(job, self.context, state).float().cpu()
        return out

    # jobs
    def run_job(self, job: Job, caches: Caches) -> torch.Tensor:
        self.caches = caches
        method = self.experiment.interventions[job.intervention]
        return method.run_job(job, self.context, self.states[method.name])

    def forward_job(self, method: JobMethod, job: Job, hooks: dict, start_layer: int | None = None, start_pos: int | None = None,
                recorders: dict | None = None) -> torch.Tensor:
        """(rows, metrics): one forward of a job's rows with `hooks`, resumed from the base run's cache."""
        experiment, caches = self.experiment, self.caches
        prompts = experiment.prompts[method.base]
        resume = self.resume(method.stream, job, caches, job.start_layer if start_layer is None else start_layer,
                             job.start_pos if start_pos is None else start_pos)
        slots = read_slots(experiment, method.base, job.examples)
        watch = NonFiniteWatch(experiment.model.adapter)
        mask = prompts.attention_mask[job.examples]
        with watch.watching():
            output = self.runner.forward(prompts.ids[job.examples], mask, _merge(hooks, recorders or {}), resume,
                                         read=self.read(slots))
        output = self.at_slots(output, slots)
        values = metric_values(experiment, output, method.base, job.examples, slots,
                               self.references_for(job.examples), mask)
        watch.check(values, torch.ones(len(job.examples), dtype=torch.bool), [m.name for m in experiment.metrics],
                    lambda row: f"example {int(job.examples[row])} while running '{method.statement}' at "
                                f"{method.sweep.describe(int(job.points[row]))}")
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
            keys_values = [_prefix(k, v, rows, pos, computed=index >= layer,
                                   buffers=(caches.prefix_buffers, (stream, index)))
                           for index, (k, v) in enumerate(caches.keys_values[stream])]
        return Resume(layer, pos, hidden, keys_values)

    def guarded(self, compute: Callable[[], Output], what: str) -> Output:
        try:
            return compute()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if "out of memory" not in str(exc).lower():
                raise
            raise CausalError(f"out of memory running {what} at once; lower batch_size "
                              f"(now {self.plan.batch_size})") from None


def _only_points(rows: RowStarts, chosen: torch.Tensor) -> RowStarts:
    keep = torch.isin(rows.points, chosen)
    zeros = torch.zeros(int(keep.sum()), dtype=torch.long)
    return RowStarts(rows.examples[keep], rows.points[keep], rows.samples[keep], zeros, zeros)


def _chunk_key(method_index: int, chunk_index: int) -> str:
    return f"method-{method_index:03d}-{chunk_index:04d}"


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


def _prefix(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, pos: int, computed: bool,
            buffers: tuple[dict, tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's cached keys/values for the job's rows: all positions, a copy the forward writes its own
    positions >= pos into. A layer the job skips (its block stands in with the cached output) never attends,
    so it gets a stand-in one number wide of length pos: the cache's length is all the model reads of it
    (HF counts an empty cache as length 0). Gathering every layer's prefix was a quarter of a head sweep's
    time on GPT-2-small (issue "speed to the floor", item 2); the copies go into buffers kept for the chunk
    and reused by every job (a job's forward is done with them before the next gathers: nothing returns
    them), as fresh tensors of that size cost 6x the gather itself in page faults on the CPU."""
    if not computed:
        stand_in = keys.new_zeros((len(rows), keys.shape[1], pos, 1))
        return stand_in, stand_in
    index = rows.to(keys.device)
    pool, slot = buffers
    return (_gathered(keys, index, pool, (*slot, "keys")), _gathered(values, index, pool, (*slot, "values")))


def _gathered(tensor: torch.Tensor, index: torch.Tensor, pool: dict, slot: tuple) -> torch.Tensor:
    """tensor[index] written into the pool's buffer for `slot` (grown when too small)."""
    buffer = pool.get(slot)
    if buffer is None or buffer.shape[0] < len(index) or buffer.shape[1:] != tensor.shape[1:] \
            or buffer.dtype != tensor.dtype or buffer.device != tensor.device:
        buffer = pool[slot] = tensor.new_empty((len(index), *tensor.shape[1:]))
    out = buffer[: len(index)]
    return torch.index_select(tensor, 0, index, out=out)


def _store_keys_values(caches: Caches, stream: str, keys_values, rows: torch.Tensor, total_rows: int) -> None:
    if stream not in caches.keys_values:
        caches.keys_values[stream] = [(k.new_zeros((total_rows, *k.shape[1:])), v.new_zeros((total_rows, *v.shape[1:])))
                                      for k, v in keys_values]
    for (keys, values), (k, v) in zip(caches.keys_values[stream], keys_values):
        keys[rows.to(k.device)] = k
        values[rows.to(v.device)] = v


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
