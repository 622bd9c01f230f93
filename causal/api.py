"""The whole pipeline as one call: file -> parse -> load -> resolve -> compile -> execute -> Dataset."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import xarray as xr

from causal.checkpoint import ChunkStore, fingerprint
from causal.assemble import assemble
from causal.compile import PACKING, Plan, compile_plan
from causal.errors import CausalError
from causal.execute import execute
from causal.lang.parser import parse_file
from causal.models import load_model
from causal.experiment import Experiment
from causal.resolve import resolve
from causal.results import package_versions


@dataclass
class RunConfig:
    """Settings that belong to a run rather than to the experiment (Hydra overrides these)."""

    seed: int = 0
    model: str | None = None  # replaces the experiment file's model reference when set
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 128
    pack: str = "auto"  # how jobs share forward passes: auto (cost model) | sites (fill batches) | exact (never merge)
    params: dict = field(default_factory=dict)  # values for the file's `param` declarations
    optimize: bool = True  # False: every row runs the whole model (the reference the fast path is tested against)
    cache_gb: float | None = None  # memory for cached activations per chunk of examples; None: a quarter of RAM /
    # half of the free GPU memory
    progress: bool = True
    checkpoints: str | None = None  # folder for resumable chunks; None: no checkpointing
    trust_remote_code: bool = False
    overrides: list[str] = field(default_factory=list)


def prepare(path: str | Path, config: RunConfig) -> Experiment:
    """Everything that can fail on user input, before any forward pass."""
    file = parse_file(path, config.params)
    if config.model is not None:
        file = replace(file, model=replace(file.model, ref=config.model))
    model = load_model(file.model.ref, config.device, config.dtype, file.model.span, file.text,
                       trust_remote_code=config.trust_remote_code)
    return resolve(file, model, config.seed)


def run(path: str | Path, config: RunConfig | None = None) -> xr.Dataset:
    dataset, checkpoints = run_keeping_checkpoints(path, config or RunConfig())
    if checkpoints:
        checkpoints.clear()
    return dataset


def run_keeping_checkpoints(path: str | Path, config: RunConfig) -> tuple[xr.Dataset, ChunkStore | None]:
    """`run`, leaving the checkpoints for the caller to clear once the results are saved."""
    torch.manual_seed(config.seed)
    experiment = prepare(path, config)
    return _compute(experiment, config)


def run_prepared(experiment: Experiment, config: RunConfig) -> xr.Dataset:
    """The compute half of `run`: for callers (benchmarks, notebooks) that prepare once and run many times."""
    dataset, checkpoints = _compute(experiment, config)
    if checkpoints:
        checkpoints.clear()
    return dataset


def plan_run(experiment: Experiment, config: RunConfig) -> Plan:
    """The batched forward passes a run of `experiment` under `config` makes."""
    if config.pack not in PACKING:
        raise CausalError(f"unknown pack {config.pack!r}; choose one of {', '.join(PACKING)}")
    if config.batch_size < 1:
        raise CausalError(f"batch_size must be at least 1, got {config.batch_size}")
    budget = config.cache_gb * 2 ** 30 if config.cache_gb else default_cache_bytes(experiment.model.device)
    return compile_plan(experiment, config.batch_size, config.pack, experiment.model.device.type, budget,
                        optimize=config.optimize)


def _compute(experiment: Experiment, config: RunConfig) -> tuple[xr.Dataset, ChunkStore | None]:
    plan = plan_run(experiment, config)
    store = checkpoint_store(experiment, config, plan) if config.checkpoints else None
    raw = execute(experiment, plan, progress=config.progress, store=store)
    info = {"seed": config.seed, "batch_size": config.batch_size, "overrides": config.overrides}
    return assemble(experiment, raw, info), store


def default_cache_bytes(device: torch.device) -> float:
    """Half the free memory of a GPU, a quarter of the machine's RAM otherwise."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2 ** 30


def checkpoint_store(experiment: Experiment, config: RunConfig, plan: Plan) -> ChunkStore:
    """Keyed by everything that decides the numbers and the job numbering, so nothing old is mixed in."""
    parts = {
        "experiment": experiment.file.text,
        "model": experiment.model.ref,
        "revision": experiment.model.revision,
        "data": fingerprint(experiment.examples.columns),
        "seed": config.seed,
        "dtype": config.dtype,
        "device": experiment.model.device.type,
        "batch_size": config.batch_size,
        "pack": config.pack,
        "optimize": config.optimize,
        "chunks": [len(chunk.examples) for chunk in plan.chunks],
        "jobs": len(plan.jobs),
        "params": config.params,
        "causal": package_versions()["causal"],
    }
    return ChunkStore(config.checkpoints, f"{experiment.name}-{fingerprint(parts)}",
                      {**parts, "experiment_file": experiment.file.path})
