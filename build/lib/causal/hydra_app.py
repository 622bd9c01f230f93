"""The Hydra task: one experiment run into the Hydra run directory (results.nc + plots/)."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from causal.api import RunConfig, run
from causal.errors import CausalError
from causal.plot import plot_all
from causal.results import save
from causal.summary import effect

_exit_code = 0


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def _task(cfg: DictConfig) -> None:
    global _exit_code
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    config = RunConfig(seed=cfg.seed, model=cfg.model, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                       pack=cfg.pack, params=dict(cfg.params), progress=cfg.progress,
                       checkpoints=cfg.checkpoints if cfg.resume else None,
                       trust_remote_code=cfg.trust_remote_code, overrides=overrides)
    try:
        dataset = run(cfg.file, config)
        results = save(dataset, out_dir / "results.nc")
        plots = plot_all(dataset, out_dir / "plots") if cfg.plots else []
    except CausalError as exc:
        print(exc, file=sys.stderr)
        _exit_code = 2
        return
    print(summary(dataset, results, plots))


def summary(dataset, results: Path, plots: list[Path]) -> str:
    lines = [f"results: {results}"]
    if plots:
        lines.append(f"plots:   {plots[0].parent}/ ({len(plots)} file(s))")
    for name, variable in dataset.data_vars.items():
        if variable.attrs.get("kind") != "intervention":
            continue
        mean = effect(dataset, name).mean("example")
        if "metric" in mean.dims:
            mean = mean.isel(metric=0)
        flat = mean.to_series().dropna().abs().sort_values(ascending=False).head(3)
        top = ", ".join(f"{_where(k, mean.dims)}: {mean.to_series()[k]:+.3f}" for k in flat.index)
        lines.append(f"{name} ({variable.attrs['statement']}): largest mean effects {top}")
    return "\n".join(lines)


def _where(key, dims) -> str:
    key = key if isinstance(key, tuple) else (key,)
    return " ".join(f"{d}={k}" for d, k in zip(dims, key)) or "all"


def launch(argv: list[str]) -> int:
    global _exit_code
    _exit_code = 0
    saved = sys.argv
    sys.argv = ["causal", *argv]
    try:
        _task()
    finally:
        sys.argv = saved
    return _exit_code
