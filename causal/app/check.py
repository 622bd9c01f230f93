"""`causal check`: what a run would do, without a forward pass.

Researchers size a sweep before paying for it. The check goes through every validation a
run makes (the same errors, before any compute) and reports the model's sites, each
statement's sweep, and the forward passes the compiler plans with the work they skip.
"""
from __future__ import annotations

import math

import torch

from causal.engine.plan import Packer, bytes_per_example
from causal.files import readable_size
from causal.values import Experiment, Plan

# Rough sustained rates for the estimate: a few CPU cores, one data-centre GPU. The figure is there to
# tell a minute from a day, not to plan a cluster.
FLOP_RATES = {"cpu": 2e10, "cuda": 2e13}
WARN_SECONDS = 3600.0
WARN_BYTES = 2 * 2 ** 30
OFFLOADED = "offloaded to disk or CPU by accelerate"


def describe(experiment: Experiment, plan: Plan) -> str:
    work = block_work(experiment, plan)  # one walk over the jobs, for the plan and the estimate
    return "\n".join([f"{experiment.file.path}: ok, nothing run", *_model_lines(experiment),
                      *_data_lines(experiment), *_statement_lines(experiment, plan),
                      *_plan_lines(experiment, plan, work), *_shard_lines(experiment, plan),
                      *_estimate_lines(experiment, plan, work[0]), *_memory_lines(experiment, plan)])


def _model_lines(experiment: Experiment) -> list[str]:
    model, adapter = experiment.model, experiment.model.adapter
    sizes = ", ".join(f"{label} {value}" for label, value in
                      (("layers", adapter.n_layers), ("heads", adapter.n_heads), ("d_model", adapter.d_model))
                      if value is not None)
    sites = ", ".join([*adapter.site_names, "module:<path>"])
    if not adapter.site_names:
        sites += f" only ({adapter.arch} has no architecture adapter)"
    dtype = str(model.dtype).removeprefix("torch.")
    return [f"model    {model.ref} ({adapter.arch}, {sizes}) on {model.device}, {dtype}",
            f"sites    {sites}"]


def _data_lines(experiment: Experiment) -> list[str]:
    widths = ", ".join(f"{name} {int(p.lengths.min())}-{int(p.lengths.max())}"
                       for name, p in experiment.prompts.items())
    lines = [f"data     {experiment.n_examples} examples; prompt tokens {widths}",
             f"metrics  {'; '.join(m.name for m in experiment.metrics)}"]
    if experiment.file.params:
        lines.insert(0, f"params   {', '.join(f'{p.name}={p.value!r}' for p in experiment.file.params)}")
    return lines


def _statement_lines(experiment: Experiment, plan: Plan) -> list[str]:
    lines = []
    for index, intervention in enumerate(experiment.interventions):
        sweep = intervention.sweep
        shape = " x ".join(f"{dim} {size}" for dim, size in zip(sweep.dims, sweep.shape))
        points = f"{shape} = {len(sweep.points)} points; " if shape else ""
        runs = intervention.describe_runs(plan, index)
        lines.append(f"{intervention.name:<16} {intervention.statement}\n{'':<17}{points}{runs}")
    return lines


def _plan_lines(experiment: Experiment, plan: Plan, work: tuple[float, float]) -> list[str]:
    base_rows = sum(stream.samples for stream in plan.streams.values()) * experiment.n_examples
    base_passes = sum(math.ceil(len(chunk.examples) * stream.samples / plan.batch_size)
                      for chunk in plan.chunks for stream in plan.streams.values())
    planned, full = work
    job_passes = sum(len(experiment.interventions[job.intervention].passes(job, plan.optimize)) for job in plan.jobs)
    lines = [f"plan     {job_passes + base_passes} forward passes of up to {plan.batch_size} rows: "
             f"{base_rows} base rows ({', '.join(plan.streams)}) and {plan.rows} intervention rows, "
             f"in {len(plan.chunks)} chunk(s) of examples"]
    if plan.rows:
        skipped = "layer" + (" and position" if experiment.model.adapter.is_causal else "")
        lines.append(f"work     the intervention passes compute {planned / full:.0%} of the token-layers of full "
                     f"forwards (each starts at the first {skipped} it edits, from the base run's cache)")
    return lines


def _shard_lines(experiment: Experiment, plan: Plan) -> list[str]:
    """What a shard's job runs: its examples' jobs, and the base runs and statistics every shard shares."""
    if plan.shard is None:
        return []
    n = experiment.n_examples
    own = plan.shard.examples(n)
    chunks = [chunk for chunk in plan.chunks if chunk.in_shard]
    passes = sum(len(experiment.interventions[job.intervention].passes(job, plan.optimize)) for job in plan.jobs)
    return [f"shard    {plan.shard}: examples {own.start}..{own.stop - 1} ({len(own)} of {n}) in {len(chunks)} "
            f"chunk(s): {len(plan.jobs)} jobs, {passes} intervention forward passes; statistics and base runs over "
            f"all {n} examples (each shard the same)"]


def _memory_lines(experiment: Experiment, plan: Plan) -> list[str]:
    """Weights and the largest chunk's cached activations on each device the model's layers are on."""
    model, adapter = experiment.model.model, experiment.model.adapter
    weights: dict[str, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        where = OFFLOADED if tensor.device.type == "meta" else str(tensor.device)
        weights[where] = weights.get(where, 0) + tensor.numel() * tensor.element_size()
    cache = bytes_per_example(experiment, plan) * max(len(chunk.examples) for chunk in plan.chunks)
    layers = [_runs_on(block) for block in adapter.blocks] if adapter.has_blocks else []
    share = {device: layers.count(device) / len(layers) for device in set(layers)} if layers else \
        {str(experiment.model.device): 1.0}
    devices = sorted(set(weights) | set(share))
    parts = [f"{device} {readable_size(weights.get(device, 0) + cache * share.get(device, 0.0))}" for device in devices]
    return [f"memory   per device (weights + cached activations of the largest chunk): {', '.join(parts)}"]


def _runs_on(block: torch.nn.Module) -> str:
    """Where a block computes: accelerate's execution device for an offloaded one, else its weights' device."""
    hook = getattr(block, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return str(torch.device(hook.execution_device))
    return str(next(block.parameters(), torch.empty(0)).device)


def block_work(experiment: Experiment, plan: Plan) -> tuple[float, float]:
    """(token-layers the plan's forward passes compute, token-layers if each of those passes ran the whole model)."""
    packer = Packer(experiment, plan.batch_size, "exact", experiment.model.device.type)
    planned = full = 0.0
    for job in plan.jobs:
        rows = len(job.examples)
        for layer, pos in experiment.interventions[job.intervention].passes(job, plan.optimize):
            planned += packer.cost(rows, layer, pos)
            full += packer.cost(rows, 0, 0)
    return planned, full


def _estimate_lines(experiment: Experiment, plan: Plan, planned: float) -> list[str]:
    """Time (from the planned token-layers) and result size, with a warning for a plan of hours or GBs."""
    adapter = experiment.model.adapter
    width = max(int(p.lengths.max()) for p in experiment.prompts.values())
    base = sum(stream.samples for stream in plan.streams.values()) * experiment.n_examples * width * adapter.n_layers
    flops = (planned + base) * flops_per_token_layer(experiment)
    rate = FLOP_RATES.get(experiment.model.device.type, FLOP_RATES["cpu"])
    seconds = flops / rate
    results = result_bytes(experiment)
    cache = bytes_per_example(experiment, plan) * max(len(chunk.examples) for chunk in plan.chunks)
    lines = [f"estimate {flops:.1e} FLOPs in the layers: about {_duration(seconds)} at {rate:.0e} FLOP/s (a rough "
             f"{experiment.model.device.type} figure); results {readable_size(results)}; cached activations up to "
             f"{readable_size(cache)} per chunk (bounded by cache_gb)"]
    if seconds > WARN_SECONDS or results > WARN_BYTES:
        lines.append(f"warning  a large plan ({_duration(seconds)}, {readable_size(results)} of results): check the sweep, "
                     "or start with `limit` on the data; runs resume from checkpoints if stopped")
    return lines


def flops_per_token_layer(experiment: Experiment) -> float:
    """2 FLOPs per weight of one layer (the embeddings and head excluded): a forward's work per token."""
    model = experiment.model.model
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                     if m is not None and getattr(m, "weight", None) is not None)
    return 2.0 * max(total - embeddings, 1) / max(experiment.model.adapter.n_layers, 1)


def result_bytes(experiment: Experiment) -> int:
    """float32 values: each statement's points x examples x metrics, and one baseline per run."""
    metrics = len(experiment.metrics)
    points = sum(len(m.sweep.points) for m in experiment.interventions) + len(experiment.runs or experiment.prompts)
    return 4 * points * experiment.n_examples * metrics


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
