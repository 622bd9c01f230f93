"""`causal run -m`: the launcher plugins a sweep may need, and what it reports when some of its jobs fail.

A launcher config from a plugin that is not installed would fail inside Hydra (a missing config, or
a config that includes itself); `check_launcher` names the pip package before Hydra starts. Hydra's
command line exits 0 whatever the jobs did; our sweeper (run.yaml's `hydra/sweeper`; the class is in
hydra_plugins/causal_sweeper, where Hydra looks for plugins) keeps every job's outcome, so a sweep ends
by saying which jobs failed, and exits non-zero. Imports no torch: the CLI checks launchers before a model loads.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from hydra._internal.core_plugins.basic_sweeper import BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus

from causal.errors import CausalError

# launcher config -> (the plugin's module under hydra_plugins, its pip package); ours extend the plugin's
PLUGINS = {
    "joblib": ("hydra_joblib_launcher", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_submitit_launcher", "hydra-submitit-launcher"),
    "slurm": ("hydra_submitit_launcher", "hydra-submitit-launcher"),
    "ray": ("hydra_ray_launcher", "hydra-ray-launcher"),
    "ray_aws": ("hydra_ray_launcher", "hydra-ray-launcher"),
    "ray_gpu": ("hydra_ray_launcher", "hydra-ray-launcher"),
    "rq": ("hydra_rq_launcher", "hydra-rq-launcher"),
}
_NOTES = {"hydra-ray-launcher": " (it pins cloudpickle<3, so joblib<1.6: the README's \"Sweeps and launchers\" "
                                "shows an install in a venv of its own)"}


def check_launcher(overrides: list[str]) -> None:
    """`hydra/launcher=X` where X's plugin is not installed: say which package to install."""
    for override in overrides:
        key, _, name = override.lstrip("+").partition("=")
        if key != "hydra/launcher" or name not in PLUGINS:
            continue
        module, package = PLUGINS[name]
        if importlib.util.find_spec(f"hydra_plugins.{module}") is None:
            raise CausalError(f"{override} needs Hydra's launcher plugin {package}, which is not installed here: "
                              f"pip install {package}{_NOTES.get(package, '')}")


class JobOutcome(NamedTuple):
    """What one job of a sweep returns to the sweeper: its exit status and, when it failed, its error."""

    status: int
    error: str | None = None


_finished: list = []  # the jobs (Hydra JobReturns) of the last sweep run in this process


def keep(jobs: list) -> None:
    """The sweeper (hydra_plugins/causal_sweeper) hands over the jobs of the sweep it ran."""
    _finished[:] = jobs


def finished_jobs() -> list:
    """The jobs of the sweep that just ran in this process, emptied for the next one."""
    jobs = list(_finished)
    _finished.clear()
    return jobs


@dataclass
class SweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.causal_sweeper.CausalSweeper"


def register() -> None:
    """Put our sweeper in Hydra's ConfigStore, where run.yaml's defaults list finds it."""
    ConfigStore.instance().store(group="hydra/sweeper", name="causal", node=SweeperConf, provider="causal")


def report(jobs: list) -> int:
    """Say which jobs of a sweep failed (their overrides and run folders); the sweep's exit status."""
    failed = [(job, outcome) for job in jobs if (outcome := _outcome(job)).status != 0]
    if not failed:
        return 0
    lines = [f"{len(failed)} of {len(jobs)} jobs failed:"]
    for job, outcome in failed:
        folder = Path(job.hydra_cfg.hydra.runtime.output_dir)
        where = str(folder) if folder.exists() else f"{folder} (removed: the job wrote nothing)"
        lines.append(f"  #{job.hydra_cfg.hydra.job.num} {' '.join(_shown(job.overrides))}: {where}")
        lines.append(f"      {(outcome.error or 'no error message').splitlines()[0]}")
    print("\n".join(lines), file=sys.stderr)
    if len(failed) == len(jobs):
        _remove_empty_sweep(Path(jobs[0].hydra_cfg.hydra.sweep.dir))
    return max(outcome.status for _, outcome in failed)


def _outcome(job) -> JobOutcome:
    if job.status != JobStatus.COMPLETED:  # an exception past our task's own handling (an interrupt)
        return JobOutcome(1, f"{type(job._return_value).__name__}: {job._return_value}")
    return job.return_value if isinstance(job.return_value, JobOutcome) else JobOutcome(0)


def _shown(overrides) -> list[str]:
    """A job's overrides as typed on `causal run`'s command line (less the file, the same for every job)."""
    shown = []
    for override in overrides or []:
        if not override.startswith("file="):
            override = override.replace("+params.", "", 1).replace("~params.", "~", 1)
            shown.append(re.sub(r"\\([\\()\[\]{}:=, ])", r"\1", override))  # Hydra's escapes: zoo\:x
    return shown


def _remove_empty_sweep(folder: Path) -> None:
    """A sweep whose every job failed before writing anything leaves no folder behind."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(folder, ignore_errors=True)
