"""The Hydra task: one experiment run into the Hydra run directory (results.nc + plots/).

The config is causal/conf/run.yaml over the structured config `RunSettings` (causal/app/settings.py),
so Hydra checks the settings' types. Torch and the rest of the pipeline are imported when a run
starts, not when this module is.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from causal.app import launchers
from causal.app.folders import check_folder, hydra_quoted
from causal.app.internal import EXIT_STATUS, InternalError, boundary
from causal.app.launchers import JobOutcome
from causal.app.runlog import copied_to_log
from causal.app.settings import RunConfig, from_command_line, register
from causal.locks import LOCK, held

register()  # also done by importing causal.conf; here too, so the task never runs without its schemas
launchers.register()
_exit_code = 0


@hydra.main(version_base="1.3", config_path="pkg://causal.conf", config_name="run")
def _task(cfg: DictConfig) -> JobOutcome:
    """One run; its outcome for a sweep's report (errors are printed here, never raised to Hydra, so a
    sweep runs every job)."""
    global _exit_code
    hydra = HydraConfig.get()
    out_dir = Path(hydra.runtime.output_dir)
    with copied_to_log():
        outcome = _outcome(out_dir, cfg, hydra)
    if outcome.status == 2:  # refused: a run that wrote nothing leaves no folder, in a sweep too
        _remove_if_empty(out_dir)
    _exit_code = max(_exit_code, outcome.status)
    return outcome


def _outcome(out_dir: Path, cfg: DictConfig, hydra) -> JobOutcome:
    from causal.errors import CausalError
    try:
        with boundary(out_dir):
            message = _run_into(out_dir, cfg, run_config(cfg, list(hydra.overrides.task)), hydra)
    except InternalError as exc:
        print(exc, file=sys.stderr)
        return JobOutcome(EXIT_STATUS, str(exc))
    except CausalError as exc:
        print(exc, file=sys.stderr)
        return JobOutcome(2, str(exc))
    print(message)
    return JobOutcome(0)


def _remove_if_empty(folder: Path) -> None:
    """A run refused before it computed anything leaves no folder behind (Hydra's own files aside)."""
    if not folder.is_dir():
        return
    left = [p for p in folder.iterdir() if p.name not in (".hydra", LOCK) and not p.name.endswith(".log")
            and not (p.name == "plots" and p.is_dir() and not any(p.iterdir()))]
    if left == []:
        shutil.rmtree(folder, ignore_errors=True)


def _run_into(out_dir: Path, cfg: DictConfig, config: RunConfig, hydra) -> str:
    """One run into its folder (held for the run's length); the summary to print."""
    if cfg.plots:  # a file where plots/ goes would fail only after the compute
        check_folder(out_dir / "plots")
    with held(out_dir):
        dataset, checkpoints = run_keeping_checkpoints(_from_start(cfg.file), config)
        if hydra.mode == RunMode.MULTIRUN:  # which sweep the run belongs to: causal.load merges only one
            dataset.attrs["sweep_dir"] = str(_from_start(hydra.sweep.dir).resolve())
        results = save(dataset, out_dir / "results.nc")
        save_bases(dataset, out_dir)
        if checkpoints:  # only once the results are safely on disk
            checkpoints.clear()
        plots = plot_all(dataset, out_dir / "plots") if cfg.plots else []
        report = write_report(dataset, out_dir / "report.html") if cfg.plots else None
    message = summary(dataset, results, plots)
    return f"{message}\nreport:  {report}" if report else message


def run_config(cfg: DictConfig, overrides: list[str]) -> RunConfig:
    """RunConfig from the Hydra config (whose types Hydra checked against RunSettings)."""
    config = from_command_line(cfg, overrides)
    if config.checkpoints:
        config.checkpoints = str(_from_start(config.checkpoints))
    return config


def _from_start(path: str) -> Path:
    """A relative path as meant where `causal run` started (Hydra may have changed into the run folder)."""
    start = HydraConfig.get().runtime.cwd if HydraConfig.initialized() else None
    return Path(start) / path if start and not Path(path).is_absolute() else Path(path)


# The pipeline, imported when a run starts (each a module attribute, so tests can replace it).

def run_keeping_checkpoints(path, config: RunConfig):
    from causal.app.api import run_keeping_checkpoints as run
    return run(path, config)


def save(dataset, path: Path) -> Path:
    from causal.results import save as save_results
    return save_results(dataset, path)


def save_bases(dataset, folder: Path) -> list[Path]:
    from causal.results.bases import save_bases as save_all
    return save_all(dataset, folder)


def plot_all(dataset, folder: Path) -> list[Path]:
    from causal.results.plot import plot_all as plot
    return plot(dataset, folder)


def write_report(dataset, path: Path) -> Path:
    from causal.results.report import write_report as write
    return write(dataset, path)


def compose_config(path: Path, overrides: list[str]) -> RunConfig:
    """The RunConfig `causal run` would use, composed by Hydra without starting a run."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    from causal.errors import CausalError
    try:
        with initialize_config_module("causal.conf", version_base="1.3"):
            cfg = compose("run", overrides=[f"file={hydra_quoted(str(path))}", *overrides])
    except HydraException as exc:  # a malformed override, or a sweep (a,b) where one value is needed
        raise CausalError(f"bad setting on the command line: {exc}") from None
    return run_config(cfg, overrides)


def summary(dataset, results: Path, plots: list[Path]) -> str:
    from causal.methods.kinds import kind_of
    from causal.results.bases import trained_statements
    from causal.results.summary import effect
    lines = [f"results: {results}"]
    if plots:
        lines.append(f"plots:   {plots[0].parent}/ ({len(plots)} file(s))")
    for name, variable in dataset.data_vars.items():
        kind = kind_of(variable.attrs)
        if kind.text and variable.dtype.kind in "UO":  # texts, not token ids
            lines.append(_generated(name, variable))
        if not kind.effect:
            continue
        means = effect(dataset, name).mean("example")
        metrics = list(means["metric"].values) if "metric" in means.dims else [variable.attrs.get("metric")]
        for metric in metrics:
            mean = means.sel(metric=metric, drop=True) if "metric" in means.dims else means
            lines.append(f"{name} ({variable.attrs['statement']}), Δ {metric}: {_largest(mean)}")
    lines += [_trained(stem, score, label, results.parent) for stem, score, label in trained_statements(dataset)]
    return "\n".join(lines)


def _trained(stem: str, score, label: str, folder: Path) -> str:
    """The best candidate's held-out score (align: IIA, reft: accuracy), and where the learned files went."""
    best = score.where(score == score.max(), drop=True)
    at = " ".join(f"{d}={best[d].values.flat[0]}" for d in score.dims)
    bases = folder / "bases"
    files = len(list(bases.glob(f"{stem}-*.safetensors"))) if bases.is_dir() else 0
    return (f"{stem} ({score.attrs['statement']}): best {label} {float(score.max()):.2f} at {at}; "
            f"learned: {bases}/ ({files} file(s))")


def _generated(name: str, texts) -> str:
    """A generation's text for example 0 (at the first point of a sweep), cut short."""
    first = texts.isel({d: 0 for d in texts.dims})
    where = " ".join(f"{d}={first[d].item()}" for d in texts.dims if d != "example" and d in first.coords)
    under = f"under {texts.attrs['under']}" if texts.attrs.get("under") else "no intervention"
    text = str(first.item())
    text = text if len(text) <= 70 else text[:67] + "..."
    more = texts.size // texts.sizes["example"] - 1
    return (f"{name} ({under}{', ' + where if where else ''}), example 0: {text!r}"
            + (f" (and {more} more point(s))" if more else ""))


def _largest(mean) -> str:
    if not mean.dims:  # nothing swept: one number
        return f"mean effect {float(mean):+.3f}"
    series = mean.to_series()
    flat = series.dropna().abs().sort_values(ascending=False).head(3)
    return "largest mean effects " + ", ".join(f"{_where(k, mean.dims)}: {series[k]:+.3f}" for k in flat.index)


def _where(key, dims) -> str:
    key = key if isinstance(key, tuple) else (key,)
    return " ".join(f"{d}={k}" for d, k in zip(dims, key)) or "all"


def launch(argv: list[str]) -> int:
    """Run Hydra's command line (`argv`: Hydra flags and overrides) in this process; the exit status."""
    global _exit_code
    _exit_code = 0
    saved = sys.argv
    sys.argv = ["causal", *argv]
    launchers.finished_jobs()  # none left from an earlier sweep in this process
    try:
        _task()
    except SystemExit as exc:  # Hydra's own errors (a bad override) print their message and exit
        return 2 if exc.code else _exit_code
    finally:
        sys.argv = saved
    jobs = launchers.finished_jobs()
    return launchers.report(jobs) if jobs else _exit_code
