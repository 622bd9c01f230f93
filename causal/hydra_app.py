"""The Hydra task: one experiment run into the Hydra run directory (results.nc + plots/)."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from causal.api import RunConfig, run_keeping_checkpoints
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
    try:
        config = run_config(cfg, overrides)
        dataset, checkpoints = run_keeping_checkpoints(cfg.file, config)
        results = save(dataset, out_dir / "results.nc")
        if checkpoints:  # only once the results are safely on disk
            checkpoints.clear()
        plots = plot_all(dataset, out_dir / "plots") if cfg.plots else []
    except CausalError as exc:
        print(exc, file=sys.stderr)
        _exit_code = 2
        return
    print(summary(dataset, results, plots))


SETTING_TYPES = {"seed": int, "batch_size": int, "progress": bool, "plots": bool, "resume": bool,
                 "trust_remote_code": bool, "cache_gb": float}


def run_config(cfg: DictConfig, overrides: list[str]) -> RunConfig:
    """RunConfig from the Hydra config, each setting checked: Hydra would pass `batch_size=abc` through."""
    values = {}
    for key, kind in SETTING_TYPES.items():
        value = cfg.get(key)
        if value is None and key == "cache_gb":
            values[key] = None
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise CausalError(f"setting {key}={value!r} must be {'true or false' if kind is bool else kind.__name__}")
        values[key] = value
    if values["cache_gb"] is not None and values["cache_gb"] <= 0:
        raise CausalError(f"setting cache_gb={values['cache_gb']} must be positive (or null for the default)")
    return RunConfig(seed=values["seed"], model=cfg.model, device=str(cfg.device), dtype=str(cfg.dtype),
                     batch_size=values["batch_size"], pack=str(cfg.pack), params=dict(cfg.params),
                     progress=values["progress"], checkpoints=cfg.checkpoints if values["resume"] else None,
                     cache_gb=values["cache_gb"], trust_remote_code=values["trust_remote_code"], overrides=overrides)


def compose_config(path: Path, overrides: list[str]) -> RunConfig:
    """The RunConfig `causal run` would use, composed by Hydra without starting a run."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    try:
        with initialize_config_module("causal.conf", version_base="1.3"):
            cfg = compose("run", overrides=[f"file={path}", *overrides])
    except HydraException as exc:  # a malformed override, or a sweep (a,b) where one value is needed
        raise CausalError(f"bad setting on the command line: {exc}") from None
    return run_config(cfg, overrides)


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
        if not mean.dims:  # nothing swept: one number
            lines.append(f"{name} ({variable.attrs['statement']}): mean effect {float(mean):+.3f}")
            continue
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
    except SystemExit as exc:  # Hydra's own errors (a bad override) print their message and exit
        return 2 if exc.code else _exit_code
    finally:
        sys.argv = saved
    return _exit_code
