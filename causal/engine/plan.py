"""Experiment -> Plan: which runs to record, and the batched jobs that apply each intervention.

Where the speed comes from, decided here (the executor just follows the plan):
- rows of one forward pass carry different (site, example) pairs, so a sweep over k sites
  needs about k * examples / batch_size forward passes instead of k * examples;
- a row that only changes layer l and later starts its forward at layer l, from the base
  run's cached residual stream;
- a row that only changes position p and later (causal models) reuses the base run's
  keys and values of positions < p and computes positions >= p only;
- each prompt column is run once and its activations shared by every statement that reads
  them; logits are computed only at the positions the metrics read.
Rows are grouped by where they start (layer, position); neighbouring groups are merged
when the extra work costs less than the overhead of another forward pass (`pack`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from causal.methods.base import JobMethod
from causal.methods.edits import target_first_position
from causal.values import Chunk, Experiment, Job, Plan, Stream

PACKING = ("auto", "sites", "exact")


def make_streams(experiment: Experiment) -> dict[str, Stream]:
    streams = {column: Stream(column, column) for column in experiment.runs or experiment.prompts}
    for method in experiment.interventions:
        streams.update({stream.name: stream for stream in method.streams()})
    return streams


def compile_plan(experiment: Experiment, batch_size: int, pack: str = "auto", device_type: str = "cpu",
                 cache_bytes: float | None = None, optimize: bool = True, shard=None) -> Plan:
    """`optimize=False` is the reference path: every row runs the whole model and all logits.

    `cache_bytes` bounds what the base runs of one chunk of examples keep in memory. `shard`
    (causal.results.shards.Shard): jobs only for its examples; chunks end at every shard's boundary, so each
    chunk of a shard is the chunk an unsharded run with those boundaries has.
    """
    streams = make_streams(experiment)
    plan = Plan(batch_size, optimize, streams, {s: set() for s in streams}, {s: set() for s in streams}, set(), [],
                shard, cache_bytes)
    n_layers = experiment.model.adapter.n_layers
    for method in experiment.interventions:
        for stream, keys in method.records(n_layers).items():
            plan.records[stream] |= keys
    n = experiment.n_examples
    size = n if cache_bytes is None else max(1, min(n, int(cache_bytes // bytes_per_example(experiment, plan))))
    bounds = shard.boundaries(n) if shard else [0, n]
    own = shard.examples(n) if shard else range(n)
    for low, high in zip(bounds, bounds[1:]):
        for start in range(low, high, size):
            plan.chunks.append(Chunk(torch.arange(start, min(start + size, high)), in_shard=start in own))
    packer = Packer(experiment, batch_size, pack, device_type)
    for index, method in enumerate(experiment.interventions):
        if not isinstance(method, JobMethod):
            continue  # it makes its own passes (attribution's gradient runs)
        for chunk in (c for c in plan.chunks if c.in_shard):
            rows = row_starts(experiment, method, chunk.examples)
            if not optimize:
                rows.layer.zero_()
                rows.pos.zero_()
            jobs = packer.pack(index, rows)
            _note_skips(method, jobs, plan)
            chunk.jobs.extend(jobs)
    return plan


def bytes_per_example(experiment: Experiment, plan: Plan) -> float:
    """An upper bound on the cache one example costs: recorded sites, block inputs and keys/values."""
    adapter = experiment.model.adapter
    element = torch.finfo(experiment.model.dtype).bits // 8
    width = max(int(p.ids.shape[1]) for p in experiment.prompts.values())
    kv_width = (adapter.n_kv_heads or 1) * (adapter.d_head or adapter.d_model)
    per_row = adapter.n_layers * adapter.d_model + (2 * adapter.n_layers * kv_width if adapter.is_causal else 0)
    total = 0.0
    for name, stream in plan.streams.items():
        recorded = sum(adapter.site_width(site, width) for site, _ in plan.records[name])
        total += stream.samples * width * (per_row + recorded) * element
    return max(total, 1.0)


def _note_skips(method, jobs: list[Job], plan: Plan) -> None:
    """Which cached block inputs and keys/values the jobs resume from."""
    for job in jobs:
        if job.start_layer > 0:
            plan.resume_layers[method.stream].add(job.start_layer)
        if job.start_pos > 0:
            plan.kv_streams.add(method.stream)
    if plan.optimize:
        plan.resume_layers[method.stream] |= {layer for layer in method.resume_layers(True) if layer > 0}


@dataclass
class RowStarts:
    """Every (point, example[, sample]) row of an intervention, with where its forward may start."""

    examples: torch.Tensor
    points: torch.Tensor
    samples: torch.Tensor
    layer: torch.Tensor
    pos: torch.Tensor


def row_starts(experiment: Experiment, method, examples: torch.Tensor) -> RowStarts:
    """Rows whose positions exist in their prompt; a row starts at its first changed layer and position."""
    adapter = experiment.model.adapter
    prompts = experiment.prompts[method.base]
    lengths = prompts.lengths[examples]
    read_from = first_read_position(experiment, method.base)[examples]
    causal = (adapter.is_causal and adapter.supports_kv_prefix(int(prompts.ids.shape[1])) and method.reuses_prefix)
    per_point = []
    for index, point in enumerate(method.sweep.points):
        valid = torch.ones(len(examples), dtype=torch.bool)
        first = read_from.clone()
        for target in point:
            where, ok = target_first_position(experiment, target, examples, lengths)
            valid &= ok
            first = torch.minimum(first, where)
        layer = method.start_layer(point) if adapter.has_blocks else 0
        pos = first if causal else torch.zeros_like(first)
        keep = valid.nonzero()[:, 0]
        per_point.append((torch.full((len(keep),), index), examples[keep], torch.full((len(keep),), layer),
                          pos[keep]))
    points, rows_examples, layers, positions = (torch.cat(parts) for parts in zip(*per_point))
    samples = method.samples
    sample_ids = torch.arange(samples).repeat(len(points))
    expand = lambda t: t.repeat_interleave(samples)  # noqa: E731
    return RowStarts(expand(rows_examples), expand(points), sample_ids, expand(layers), expand(positions))


def first_read_position(experiment: Experiment, column: str) -> torch.Tensor:
    """(examples,) the first position any metric reads in each prompt of `column`."""
    masks = [m.positions[column] for m in experiment.metrics if column in m.positions]
    if not masks or any(m.kind.reads_whole_prompt for m in experiment.metrics):
        return torch.zeros(experiment.n_examples, dtype=torch.long)
    union = torch.stack(masks).any(0)
    return union.float().argmax(1)  # first True


class Packer:
    """Groups rows into jobs: same start (layer, position), merged while that is cheaper than a forward.

    Cost of a job, in token-layers: rows * (layers computed) * (positions computed), plus
    the fixed overhead of one forward pass, estimated from the model size and the device.
    """

    def __init__(self, experiment: Experiment, batch_size: int, pack: str, device_type: str):
        self.batch_size, self.mode = batch_size, pack
        adapter = experiment.model.adapter
        self.n_layers = adapter.n_layers
        self.width = max(int(p.ids.shape[1]) for p in experiment.prompts.values())
        if pack == "auto":
            self.overhead = call_overhead(adapter.d_model, unembedding_bytes(experiment), device_type)
            self.resume_cost = resume_overhead(adapter.d_model, device_type)
        else:
            self.overhead = float("inf") if pack == "sites" else 0.0
            self.resume_cost = 0.0

    def cost(self, rows: int, layer: int, pos: int) -> float:
        return rows * (self.n_layers - layer) * (self.width - pos)

    def job_cost(self, rows: int, layer: int, pos: int) -> float:
        """A job's block work from where `_start` has it start: resumed (plus resuming's setup) or whole."""
        start = self._start(rows, layer, pos)
        return self.cost(rows, *start) + (self.resume_cost if start != (0, 0) else 0.0)

    def pack(self, intervention: int, rows: RowStarts) -> list[Job]:
        """Rows sorted by start, packed greedily; under `auto` the plan that fills every batch instead is
        taken where it costs less (greedy merging is local, and must never lose to the reference's batches)."""
        jobs = self._packed(intervention, rows, fill=self.mode == "sites")
        if self.mode == "auto":
            filled = self._packed(intervention, rows, fill=True)
            if self.plan_cost(filled) < self.plan_cost(jobs):
                return filled
        return jobs

    def plan_cost(self, jobs: list[Job]) -> float:
        return sum(self.job_cost(len(job.examples), job.start_layer, job.start_pos) + self.overhead for job in jobs)

    def _packed(self, intervention: int, rows: RowStarts, fill: bool) -> list[Job]:
        """The job being filled is always a contiguous slice [begin, end) of the rows sorted by start."""
        order = torch.argsort(rows.layer * (self.width + 1) + rows.pos, stable=True)
        keys = torch.stack([rows.layer[order], rows.pos[order]], 1)
        counts = torch.unique_consecutive(keys, dim=0, return_counts=True)[1].tolist()
        layers, positions = keys[:, 0].tolist(), keys[:, 1].tolist()
        jobs: list[Job] = []
        begin = end = 0  # the job being filled
        for count in counts:
            if end > begin and (fill or self._merge_pays(keys, begin, end, count)):
                end += count
            else:
                jobs += self._cut(intervention, rows, order, layers, positions, begin, end)
                begin, end = end, end + count
            while end - begin >= self.batch_size:  # full batches go; the rest keeps filling
                jobs += self._cut(intervention, rows, order, layers, positions, begin, begin + self.batch_size)
                begin += self.batch_size
        jobs += self._cut(intervention, rows, order, layers, positions, begin, end)
        return jobs

    def _merge_pays(self, keys: torch.Tensor, begin: int, end: int, count: int) -> bool:
        """Whether one pass over the job [begin, end) and the next `count` rows costs less than two passes."""
        layer_a, pos_a = int(keys[begin:end, 0].min()), int(keys[begin:end, 1].min())
        layer_b, pos_b = int(keys[end, 0]), int(keys[end, 1])
        rows = end - begin + count
        merged = self.job_cost(rows, min(layer_a, layer_b), min(pos_a, pos_b))
        separate = self.job_cost(end - begin, layer_a, pos_a) + self.job_cost(count, layer_b, pos_b) + self.overhead
        return rows <= self.batch_size and merged <= separate

    def _cut(self, intervention: int, rows: RowStarts, order: torch.Tensor, layers: list[int], positions: list[int],
             begin: int, end: int) -> list[Job]:
        jobs = []
        for start in range(begin, end, self.batch_size):
            stop = min(start + self.batch_size, end)
            index = order[start:stop]
            layer, pos = self._start(stop - start, min(layers[start:stop]), min(positions[start:stop]))
            jobs.append(Job(intervention, rows.examples[index], rows.points[index], rows.samples[index], layer, pos))
        return jobs

    def _start(self, rows: int, layer: int, pos: int) -> tuple[int, int]:
        """Where the job's forward starts: resumed, unless a whole forward costs no more than resuming's setup
        (a tiny model's few rows: the fast path must never be slower than the reference)."""
        if (layer or pos) and self.cost(rows, 0, 0) <= self.cost(rows, layer, pos) + self.resume_cost:
            return 0, 0
        return layer, pos


def call_overhead(d_model: int, unembedding_bytes: int, device_type: str) -> float:
    """The fixed cost of one more forward pass, in token-layers of this model.

    Two parts: about 3 ms of Python and kernel launches, and one read of the unembedding
    matrix, whatever the number of rows (with the few rows of a small job that read, not the
    arithmetic, is its cost: on GPT-2-small on a 2-core CPU it is ~15 ms a call, the work of
    ~150 token-layers). A token-layer costs ~24 d^2 FLOPs; a CPU does ~5e10 FLOP/s per thread
    and reads ~1e10 B/s, a GPU ~1e14 FLOP/s and ~2e12 B/s.
    """
    flops_per_token_layer = 24 * d_model ** 2
    if device_type == "cuda":
        throughput, bandwidth = 1e14, 2e12
    else:
        throughput, bandwidth = 5e10 * torch.get_num_threads(), 1e10
    return (3e-3 + unembedding_bytes / bandwidth) * throughput / flops_per_token_layer


def resume_overhead(d_model: int, device_type: str) -> float:
    """The fixed cost of resuming a forward (the KV prefix cache, the stand-in blocks, gathering the cached
    rows), in token-layers: ~0.3 ms of Python on a CPU (measured on a 3-layer d-64 Llama, where it was as
    much as the whole forward it saved), ~0.1 ms of launches on a GPU."""
    flops_per_token_layer = 24 * d_model ** 2
    seconds, throughput = (1e-4, 1e14) if device_type == "cuda" else (3e-4, 5e10 * torch.get_num_threads())
    return seconds * throughput / flops_per_token_layer


def unembedding_bytes(experiment: Experiment) -> int:
    """Bytes of the output embedding a forward pass reads (0 for an encoder without an LM head)."""
    if experiment.model.head != "lm":
        return 0
    weight = experiment.model.model.get_output_embeddings().weight
    return weight.numel() * weight.element_size()
