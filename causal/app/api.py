"""The whole pipeline as one call: file -> parse -> load -> resolve -> compile -> execute -> Dataset."""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import xarray as xr

from causal.app.internal import guarded
from causal.app.settings import RunConfig, check_config  # the run settings, declared once there
from causal.engine.checkpoint import ChunkStore
from causal.engine.execute import execute
from causal.engine.plan import PACKING, compile_plan
from causal.errors import COMMAND_LINE, CausalError, Span, argument_span, reported_against
from causal.files import fingerprint
from causal.lang import ast
from causal.lang.parser import parse_file, parse_text
from causal.methods import METHODS
from causal.models import LoadedModel, load_model, wrap_model
from causal.resolve import resolve
from causal.results import shards
from causal.results.assemble import assemble
from causal.results.io import package_versions
from causal.values import Experiment, Plan


@guarded
def prepare(path: str | Path, config: RunConfig, *, model=None, tokenizer=None) -> Experiment:
    """Everything that can fail on user input, before any forward pass.

    `model`, `tokenizer`: an HF model object the caller holds (e.g. in a notebook), run in place of
    the file's `model` line, on its own device and dtype.
    """
    check_config(config)
    file = parse_file(path, config.params, model_given=model is not None or tokenizer is not None)
    return _resolve(file, config, model, tokenizer)


@guarded
def prepare_text(text: str, config: RunConfig, *, model=None, tokenizer=None) -> Experiment:
    """`prepare` for an experiment written inline; data paths are relative to the working directory."""
    check_config(config)
    file = parse_text(text, "<experiment>", config.params, model_given=model is not None or tokenizer is not None)
    return _resolve(file, config, model, tokenizer)


def _resolve(file: ast.ExperimentFile, config: RunConfig, model, tokenizer) -> Experiment:
    with reported_against(file.text, file.path):
        return _load_and_resolve(file, config, model, tokenizer)


def _load_and_resolve(file: ast.ExperimentFile, config: RunConfig, model, tokenizer) -> Experiment:
    if model is None and tokenizer is None:
        argument = f"model={config.model}"
        if config.model is not None:  # a bad model is the setting's fault, not the file's `model` line's
            file = replace(file, model=ast.ModelDecl(config.model, _setting_span(config, "model", argument)))
        with reported_against(argument, COMMAND_LINE):
            loaded = load_model(file.model.ref, config.device, config.dtype, file.model.span,
                                trust_remote_code=config.trust_remote_code, device_map=config.device_map,
                                offload_folder=config.offload_folder)
    else:
        loaded = _given_model(model, tokenizer, config)
        file = replace(file, model=ast.ModelDecl(loaded.ref, file.model.span if file.model else file.span))
    return resolve(file, loaded, METHODS, config.seed)


def _setting_span(config: RunConfig, key: str, argument: str) -> Span | None:
    """Where a setting's value stands: in its argument when the command line gave it, else nowhere."""
    given = any(o.lstrip("+").split("=", 1)[0] == key for o in config.overrides)
    return argument_span(argument) if given else None


def _given_model(model, tokenizer, config: RunConfig) -> LoadedModel:
    if model is None:
        raise CausalError("a tokenizer was passed without its model; pass both (model=..., tokenizer=...)")
    if config.model is not None:
        raise CausalError(f"RunConfig.model={config.model!r} and a model object were both given; keep one")
    # float32 is RunConfig's default, not a request: a bfloat16 model passed in runs in bfloat16.
    return wrap_model(model, tokenizer, config.device, None if config.dtype == "float32" else config.dtype)


@guarded
def run(path: str | Path, config: RunConfig | None = None, *, model=None, tokenizer=None) -> xr.Dataset:
    config = config or RunConfig()
    torch.manual_seed(config.seed)
    return run_prepared(prepare(path, config, model=model, tokenizer=tokenizer), config)


@guarded
def run_text(text: str, config: RunConfig | None = None, *, model=None, tokenizer=None) -> xr.Dataset:
    """`run` for an experiment written inline (a notebook cell)."""
    config = config or RunConfig()
    torch.manual_seed(config.seed)
    return run_prepared(prepare_text(text, config, model=model, tokenizer=tokenizer), config)


@guarded
def run_keeping_checkpoints(path: str | Path, config: RunConfig) -> tuple[xr.Dataset, ChunkStore | None]:
    """`run`, leaving the checkpoints for the caller to clear once the results are saved."""
    torch.manual_seed(config.seed)
    experiment = prepare(path, config)
    return _compute(experiment, config)


@guarded
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
    check_config(config)
    with reported_against(experiment.file.text, experiment.file.path):
        for method in experiment.interventions:
            method.check_run(experiment, config)
    shard = shards.parse(config.shard)
    if shard:
        shards.check_examples(shard, experiment.n_examples)
        for method in experiment.interventions:
            if method.shard_problem():
                raise CausalError(f"setting shard={shard}: {method.shard_problem()}")
    budget = config.cache_gb * 2 ** 30 if config.cache_gb else default_cache_bytes(experiment.model.device)
    return compile_plan(experiment, config.batch_size, config.pack, experiment.model.device.type, budget,
                        optimize=config.optimize, shard=shard)


def _compute(experiment: Experiment, config: RunConfig) -> tuple[xr.Dataset, ChunkStore | None]:
    plan = plan_run(experiment, config)
    store = checkpoint_store(experiment, config, plan) if config.checkpoints else None
    info = {"seed": config.seed, "batch_size": config.batch_size, "overrides": config.overrides}
    with reported_against(experiment.file.text, experiment.file.path):  # run-time errors quote their line too
        with store.held() if store else nullcontext():
            raw = execute(experiment, plan, progress=config.progress, store=store)
        return shards.own_part(assemble(experiment, raw, info), plan.shard), store


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
        "dtype": str(experiment.model.dtype),
        "device": experiment.model.device.type,
        "batch_size": config.batch_size,
        "pack": config.pack,
        "optimize": config.optimize,
        "chunks": [len(chunk.examples) for chunk in plan.chunks],
        "jobs": len(plan.jobs),
        "params": config.params,
        "causal": package_versions()["causal"],
        **({"shard": str(plan.shard)} if plan.shard else {}),  # a shard's checkpoints are its own
    }
    return ChunkStore(config.checkpoints, f"{experiment.name}-{fingerprint(parts)}",
                      {**parts, "experiment_file": experiment.file.path})
