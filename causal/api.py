"""The whole pipeline as one call: file -> parse -> load -> resolve -> compile -> execute -> Dataset."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import xarray as xr

from causal.compile import compile_plan
from causal.execute import execute
from causal.lang.parser import parse_file
from causal.models import load_model
from causal.resolve import Experiment, resolve
from causal.results import assemble


@dataclass
class RunConfig:
    """Settings that belong to a run rather than to the experiment (Hydra overrides these)."""

    seed: int = 0
    model: str | None = None  # replaces the experiment file's model reference when set
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 128
    progress: bool = True
    overrides: list[str] = field(default_factory=list)


def prepare(path: str | Path, config: RunConfig) -> Experiment:
    """Everything that can fail on user input, before any forward pass."""
    file = parse_file(path)
    if config.model is not None:
        file = replace(file, model=replace(file.model, ref=config.model))
    model = load_model(file.model.ref, config.device, config.dtype, file.model.span, file.text)
    return resolve(file, model)


def run(path: str | Path, config: RunConfig | None = None) -> xr.Dataset:
    config = config or RunConfig()
    torch.manual_seed(config.seed)
    experiment = prepare(path, config)
    plan = compile_plan(experiment, config.batch_size)
    raw = execute(experiment, plan, progress=config.progress)
    info = {"seed": config.seed, "batch_size": config.batch_size, "overrides": config.overrides}
    return assemble(experiment, raw, info)
