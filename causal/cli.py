"""`causal` command line: `causal run FILE [key=value ...]`, `causal run -m FILE k=a,b`, `causal check FILE`,
`causal plot DIR`.

Runs go through Hydra so every run gets its own directory under outputs/ with the
resolved config, and sweeps (`-m`) use Hydra's launchers.
"""
from __future__ import annotations

import sys
from pathlib import Path

from causal.errors import CausalError

USAGE = """usage:
  causal run FILE [key=value ...]        run one experiment (keys: the file's params, or seed, device, dtype,
                                         batch_size, pack, progress, plots, model, resume, checkpoints)
  causal run -m FILE key=a,b [...]       a Hydra multirun sweep
  causal check FILE [key=value ...]      validate against the model and data and show the plan, running nothing
  causal plot RUN_DIR                    re-make the plots of a finished run
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["run"]:
            return _run(argv[1:])
        if argv[:1] == ["check"]:
            return _check(argv[1:])
        if argv[:1] == ["plot"] and len(argv) == 2:
            return _plot(Path(argv[1]))
    except CausalError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(USAGE, file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


def _run(args: list[str]) -> int:
    multirun = [a for a in args if a in ("-m", "--multirun")]
    path, given = file_and_overrides([a for a in args if a not in multirun])
    for argument in given:
        key, value = argument.split("=", 1)
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            check_folder(Path(value))
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in given):
        check_folder(Path("outputs"))
    overrides = [as_hydra_override(a) for a in given]
    hydra_argv = [*multirun, f"file={path}", f"hydra.job.name={path.stem}", *overrides]
    from causal.hydra_app import launch
    return launch(hydra_argv)


def _check(args: list[str]) -> int:
    from causal.api import plan_run, prepare
    from causal.check import describe
    from causal.hydra_app import compose_config
    path, given = file_and_overrides(args)
    config = compose_config(path, [as_hydra_override(a) for a in given if not a.startswith("hydra")])
    experiment = prepare(path, config)
    print(describe(experiment, plan_run(experiment, config)))
    return 0


def file_and_overrides(args: list[str]) -> tuple[Path, list[str]]:
    """The one experiment file and its `key=value` arguments, each key known."""
    files = [a for a in args if "=" not in a]
    if len(files) != 1:
        raise CausalError(f"expected one experiment file, got {files or 'none'}\n{USAGE}")
    path = Path(files[0])
    if not path.is_file():
        raise CausalError(f"no experiment file {str(path)!r}")
    given = [a for a in args if "=" in a]
    check_keys(path, given)
    return path, given


def run_settings() -> set[str]:
    """The keys of causal/conf/run.yaml: everything else on the command line is an experiment parameter."""
    from omegaconf import OmegaConf
    return set(OmegaConf.load(Path(__file__).parent / "conf" / "run.yaml"))


def as_hydra_override(argument: str) -> str:
    """`n=50` -> `+params.n=50` when `n` is not a run setting (`seed=1`, `hydra.*`, `+x=...` pass through)."""
    key = argument.split("=", 1)[0]
    if key.startswith(("+", "~", "hydra.", "hydra/", "params.")) or key.split(".")[0] in run_settings():
        return argument
    return f"+params.{argument}"


def check_keys(path: Path, arguments: list[str]) -> None:
    """Every key is a run setting, a Hydra key, or a parameter the file declares."""
    from causal.errors import did_you_mean
    from causal.lang.parser import parse_file
    settings = run_settings() - {"file", "hydra", "params"}
    declared = None
    for argument in arguments:
        key = argument.split("=", 1)[0].lstrip("+~")
        if key.startswith(("hydra.", "hydra/", "params.")) or key.split(".")[0] in settings:
            continue
        if declared is None:
            declared = [p.name for p in parse_file(path).params]
        if key not in declared:
            raise CausalError(f"unknown parameter {key!r} on the command line; {path} declares: "
                              f"{', '.join(declared) or 'none'}; run settings: {', '.join(sorted(settings))} "
                              f"(got {argument})",
                              hint=did_you_mean(key, [*declared, *settings]))


def check_folder(folder: Path) -> None:
    """Hydra creates the run folder before the run: a file in its way would be a raw traceback there."""
    for ancestor in [folder, *folder.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise CausalError(f"cannot write results under {str(folder)!r}: {str(ancestor)!r} is a file "
                                  "(Not a directory)")
            return


def _plot(run_dir: Path) -> int:
    from causal.plot import plot_all
    from causal.results import load
    for png in plot_all(load(run_dir), run_dir / "plots"):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
