"""`causal` command line: `causal run FILE [key=value ...]`, `causal run -m FILE k=a,b`, `causal check FILE`,
`causal plot DIR`, `causal report DIR`, `causal --version`; `python -m causal` is the same.

Runs go through Hydra so every run gets its own directory under outputs/ with the resolved
config, and sweeps (`-m`) use Hydra's launchers; Hydra's own flags (`--cfg job`, `--info`,
`--config-dir`, ...) pass through. Before Hydra starts or a model loads, the experiment file is
parsed and every `key=value` checked, so mistakes are reported at once. The run settings are
declared in causal/app/settings.py; this module only reads them. Torch, transformers and xarray are
imported inside the commands that run an experiment, never for `--help`, `--version` or an
error found before the run.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

from causal.app.folders import check_folder, claim_new_folder, hydra_quoted, safe_name
from causal.app.settings import command_line_settings, settings_help

COMMANDS = {
    "run": "run one experiment (or, with -m, a Hydra sweep), each run in its own folder under outputs/",
    "check": "validate against the model and data and show the plan, running nothing",
    "plot": "re-make the plots of a finished run",
    "report": "write a finished run's interactive HTML report (RUN_DIR/report.html, opens offline)",
}
_HYDRA_MODES = ("run", "multirun", "cfg", "info", "shell_completion")  # Hydra takes one of these at a time
_NEEDS_NO_FILE = ("cfg", "info", "hydra_help", "shell_completion", "experimental_rerun")  # Hydra's reports


def run_settings() -> list[str]:
    """The run settings' names (causal/app/settings.py): any other `key=value` is an experiment parameter."""
    return [f.name for f in command_line_settings() if f.name not in ("file", "params")]


def usage() -> str:
    """The overview `causal` prints without a command, or with one it does not know."""
    keys = textwrap.wrap(f"(keys: the file's params, or {', '.join(run_settings())})", 60)
    pad = " " * 41
    rows = [f"  {'causal run FILE [key=value ...]':<39}{COMMANDS['run'].split(' (')[0]}",
            *(pad + line for line in keys),
            f"  {'causal run -m FILE key=a,b [...]':<39}a Hydra multirun sweep, one run per combination",
            f"  {'causal check FILE [key=value ...]':<39}{COMMANDS['check']}",
            f"  {'causal plot RUN_DIR':<39}{COMMANDS['plot']}",
            f"  {'causal report RUN_DIR':<39}{COMMANDS['report'].split(' (')[0]}",
            f"  {'causal COMMAND --help':<39}the command's options, and the run settings with their defaults",
            f"  {'causal --version':<39}the version of causal"]
    return "usage:\n" + "\n".join(rows) + "\n"


USAGE = usage()


def main(argv: list[str] | None = None) -> int:
    from causal.app.internal import EXIT_STATUS, InternalError, boundary
    from causal.errors import CausalError
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-sc"], ["--shell-completion"]):  # Hydra's completion script calls `causal -sc query=...`
        argv = ["run", *argv]
    try:
        with boundary():
            return _command(argv)
    except _Exit as done:
        return done.status
    except InternalError as exc:
        print(exc, file=sys.stderr)
        return EXIT_STATUS
    except CausalError as exc:
        print(exc, file=sys.stderr)
        return 2


def _command(argv: list[str]) -> int:
    if argv[:1] and argv[0] in COMMANDS:
        parser = command_parser(argv[0])
        args = parser.parse_intermixed_args(argv[1:])
        return {"run": _run, "check": _check, "plot": _plot, "report": _report}[argv[0]](parser, args)
    parsers()[0].parse_args(argv)  # --help, --version or a mistake: each ends in _Exit
    print(USAGE, file=sys.stderr, end="")  # no command at all
    return 2


# --------------------------------------------------------------------------------- the parsers

class _Exit(SystemExit):  # passes the internal-error boundary, as an exit does
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that reports instead of exiting, so `main` returns the status."""

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, file=sys.stderr, end="")
        raise _Exit(status)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Our own text as it is written; `usage:` then the overview on the lines below it."""

    def add_usage(self, usage, actions, groups, prefix=None):
        super().add_usage(usage, actions, groups, "usage:" if usage and usage.startswith("\n") else prefix)


class _Version(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"causal {package_version()}")
        parser.exit()


def package_version() -> str:
    """The installed package's version, or pyproject.toml's in a source tree that is not installed."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("causal")
    except PackageNotFoundError:
        pass
    try:
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    try:
        import tomllib
        return tomllib.loads(text)["project"]["version"]
    except (ImportError, KeyError, ValueError):  # Python 3.10 (no tomllib), or a pyproject without it
        found = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
        return found.group(1) if found else "unknown"


def parsers() -> tuple[_Parser, dict[str, _Parser]]:
    """`causal`'s parser, and its commands' without their arguments (`command_parser` adds them)."""
    parser = _Parser(prog="causal", usage="\n" + USAGE.split("\n", 1)[1].rstrip("\n"), allow_abbrev=False,
                     formatter_class=_Formatter,
                     description="Declarative causal-intervention experiments (patching, ablation, ...) on "
                                 "Hugging Face language models.")
    parser.add_argument("--version", action=_Version, help="show the version of causal and exit")
    group = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", prog="causal")
    commands = {name: group.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                                       allow_abbrev=False, formatter_class=_Formatter)
                for name, text in COMMANDS.items()}
    return parser, commands


def command_parser(name: str) -> _Parser:
    parser = parsers()[1][name]
    if name in ("plot", "report"):
        parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                            help="a run directory (or a multirun directory) of `causal run`")
        if name == "report":
            parser.add_argument("-o", "--output", metavar="FILE", type=Path,
                                help="where to write the page (default: RUN_DIR/report.html)")
        return parser
    parser.add_argument("file", nargs="?", metavar="FILE", help="the experiment file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="a `param` the file declares (n=50), a run setting (below), or a Hydra key "
                             "(hydra.run.dir=DIR, hydra/launcher=joblib)")
    width = min(100, shutil.get_terminal_size().columns)
    parser.epilog = ("run settings (key=value, shown with the default):\n"
                     + settings_help(width, skip=("file",) if name == "run" else ("file", "plots", "resume",
                                                                                  "checkpoints")))
    parser.usage = "%(prog)s [-h] FILE [key=value ...]"
    if name == "run":
        parser.usage = "%(prog)s [-h] [-m] [HYDRA OPTION ...] FILE [key=value ...]"
        parser.epilog += ("\n\nexamples:\n  causal run exp.cx n=200 seed=1 device=cuda\n"
                          "  causal run -m exp.cx model=gpt2,zoo:attn-only-2l seed=0,1,2 hydra/launcher=joblib\n"
                          "  causal run exp.cx --cfg job           the composed config, running nothing")
        group = parser.add_argument_group("Hydra options", "passed through to Hydra (`--hydra-help` for more)")
        for action in _hydra_actions():
            _copy(action, group)
    return parser


@functools.lru_cache(maxsize=None)
def _hydra_actions() -> tuple[argparse.Action, ...]:
    """The flags of Hydra's own command line, less the ones `causal` answers itself (--help, --version)."""
    from hydra._internal.utils import get_args_parser
    return tuple(a for a in get_args_parser()._actions if a.option_strings and a.dest not in ("help", "version"))


_HELP = {"shell_completion": "install or uninstall shell completion: eval \"$(causal -sc install=bash)\" "
                            "(uninstall=bash; fish, and zsh as bash: see Hydra's tab-completion docs)"}


def _copy(action: argparse.Action, group) -> None:
    if action.nargs == 0:
        group.add_argument(*action.option_strings, dest=action.dest, action="store_true",
                           help=_HELP.get(action.dest, str(action.help)))
    else:
        group.add_argument(*action.option_strings, dest=action.dest, nargs=action.nargs, const=action.const,
                           default=action.default, choices=action.choices, metavar=action.metavar,
                           help=str(action.help))


def _hydra_flags(args: argparse.Namespace) -> list[str]:
    """The Hydra flags given, written again for Hydra's own parser."""
    flags = []
    for action in _hydra_actions():
        value = getattr(args, action.dest)
        if value in (None, False):
            continue
        flag = next(s for s in action.option_strings if s.startswith("--"))
        flags += [flag] if action.nargs == 0 else [flag, value]
    return flags


# --------------------------------------------------------------------------------- the commands

def _run(parser: _Parser, args: argparse.Namespace) -> int:
    modes = [f"--{m.replace('_', '-')}" for m in _HYDRA_MODES if getattr(args, m) not in (None, False)]
    if len(modes) > 1:
        parser.error(f"{' and '.join(modes)}: Hydra takes only one of --run, --multirun, --cfg, --info and "
                     "--shell-completion")
    if args.resolve and args.cfg is None:
        parser.error("--resolve goes with --cfg (it resolves the interpolations of the config shown)")
    flags = _hydra_flags(args)
    tokens = [t for t in (args.file, *args.overrides) if t is not None]
    if args.shell_completion:  # `install=bash`, `query=bash` are Hydra's, not overrides
        _completion_line()
        return _launch([*flags, *tokens])
    if args.hydra_help:  # Hydra's help composes no config: overrides of it would fail there
        return _launch(["--hydra-help"])
    report = any(getattr(args, d) not in (None, False) for d in _NEEDS_NO_FILE)
    path, given = file_and_overrides(parser, tokens, optional=report)
    overrides = check_command_line(path, given, multirun=args.multirun)
    from causal.app.launchers import check_launcher
    check_launcher(given)  # a plugin's launcher without the plugin: name the package, before Hydra fails raw
    named = [f"file={hydra_quoted(str(path))}", f"hydra.job.name={safe_name(path.stem)}"] if path else []
    if not report:  # a run: Hydra creates the run folder first, so check it can
        named += run_folder(given, path, multirun=bool(args.multirun))
    return _launch([*flags, *named, *overrides])


def run_folder(given: list[str], path: Path, *, multirun: bool) -> list[str]:
    """The `hydra.run.dir` (or `hydra.sweep.dir`) override for a folder claimed now, unless one is given;
    a given folder is checked (Hydra would fail raw on a file in its way)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    named = [Path(o.split("=", 1)[1]) for o in given if o.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    for folder in named or [Path("outputs")]:
        check_folder(folder)
    if any(o.startswith(f"{key}=") for o in given):
        return []
    claimed = claim_new_folder(Path("outputs/multirun" if multirun else "outputs"), path.stem)
    return [f"{key}={hydra_quoted(str(claimed))}"]


def _launch(hydra_argv: list[str]) -> int:
    from causal.app.hydra_app import launch
    return launch(hydra_argv)


def _check(parser: _Parser, args: argparse.Namespace) -> int:
    path, given = file_and_overrides(parser, [t for t in (args.file, *args.overrides) if t is not None])
    overrides = check_command_line(path, given)
    from causal.app.api import plan_run, prepare
    from causal.app.check import describe
    from causal.app.hydra_app import compose_config
    config = compose_config(path, [o for o in overrides if not o.startswith("hydra")])
    experiment = prepare(path, config)
    print(describe(experiment, plan_run(experiment, config)))
    return 0


def _plot(parser: _Parser, args: argparse.Namespace) -> int:
    from causal.errors import CausalError
    from causal.results import load
    from causal.results.plot import plot_all
    written = plot_all(load(args.run_dir), args.run_dir / "plots")
    if not written:
        raise CausalError(f"nothing to plot in {str(args.run_dir)!r}: it has no intervention variables")
    for png in written:
        print(png)
    return 0


def _report(parser: _Parser, args: argparse.Namespace) -> int:
    from causal.errors import CausalError
    from causal.results import load
    from causal.results.report import write_report
    dataset = load(args.run_dir)
    from causal.methods.kinds import kind_of
    if not any(kind_of(v.attrs).effect for v in dataset.data_vars.values()):
        raise CausalError(f"nothing to report in {str(args.run_dir)!r}: it has no intervention variables")
    folder = args.run_dir if args.run_dir.is_dir() else args.run_dir.parent  # RUN_DIR may name results.nc
    print(write_report(dataset, args.output or folder / "report.html"))
    return 0


def _completion_line() -> None:
    """Hydra completes `causal run FILE k=v ...` as if it were `causal k=v ...`: drop `run` and FILE."""
    line = os.environ.get("COMP_LINE")
    if line:
        words = line.split(" ")
        os.environ["COMP_LINE"] = " ".join(w for i, w in enumerate(words)
                                           if i in (0, len(words) - 1) or "=" in w or w.startswith("-"))


# --------------------------------------------------------------------------------- checks before Hydra

def file_and_overrides(parser: _Parser, args: list[str], optional: bool = False) -> tuple[Path | None, list[str]]:
    """The one experiment file (None only when `optional`) and the `key=value` arguments."""
    from causal.errors import CausalError
    files = [a for a in args if ("=" not in a and not a.startswith("~")) or os.path.isfile(a)]  # a.cx, or a=b.cx
    if len(files) > 1 or not (files or optional):
        raise CausalError(f"expected one experiment file, got {files or 'none'}\n{parser.format_usage().rstrip()}")
    path = Path(files[0]) if files else None
    if path is not None:
        from causal.files import check_experiment_file
        check_experiment_file(path)
    return path, [a for a in args if a not in files]


def check_command_line(path: Path | None, arguments: list[str], *, multirun: bool = False) -> list[str]:
    """Parse the file (syntax errors), then check each `key=value` against it and the run settings,
    as Hydra and the run would, but before either starts. Returns the arguments as Hydra overrides."""
    from causal.app.settings import check_value, default_of, show, text_problem
    from causal.errors import CausalError, did_you_mean
    from causal.lang.parser import parse_file
    parsed = _parse_overrides(arguments)
    file = parse_file(path) if path is not None else None  # a syntax error stops here, in a fraction of a second
    if file is not None:
        from causal.errors import reported_against
        from causal.resolve.names import check_names
        with reported_against(file.text, file.path):
            check_names(file)  # so does a misspelt metric
    settings = run_settings()
    declared = [p.name for p in file.params] if file is not None else []
    params: dict[str, list] = {}
    for argument, override in zip(arguments, parsed):
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if override.is_delete() and key in settings:
            raise CausalError(f"bad setting on the command line: {argument} would remove a run setting; give it "
                              f"a value instead ({key}={show(default_of(_setting(key)))} is the default)")
        values = _values(override)
        if values is None:  # a deletion (~n: the file's default), or a sweep only a sweeper plugin expands
            continue
        if override.is_sweep_override() and not multirun:
            raise CausalError(f"bad setting on the command line: {argument} is a sweep ({len(values)} values); "
                              "add -m for one run per value, or quote a text with commas: key='a,b'")
        values = [v for v in values if not (isinstance(v, str) and "${" in v)]  # interpolations: Hydra's
        if key.split(".")[0] in settings:  # a run setting (a key below one, seed.x=1, is Hydra's to refuse)
            for value in values if key in settings else []:
                problem = text_problem(key, value) or check_value(key, value) or _range_problem(key, value)
                if problem:
                    raise CausalError(problem)
            continue
        name = key[len("params."):] if key.startswith("params.") else key
        if key != "params" and name not in declared:
            where = f"{path} declares: {', '.join(declared) or 'none'}" if path else "no experiment file given"
            raise CausalError(f"unknown parameter {name!r} on the command line; {where}; run settings: "
                              f"{', '.join(sorted(settings))} (got {argument})",
                              hint=did_you_mean(name, [*declared, *settings]))
        if key != "params" and values:
            params[name] = values
    if params:  # each value as the run's parse will see it (its declared type, its range)
        first = {name: values[0] for name, values in params.items()}
        parse_file(path, first)
        for name, values in params.items():
            for value in values[1:]:
                parse_file(path, {**first, name: value})
    return [as_hydra_override(a) for a in arguments]


def _range_problem(key: str, value) -> str | None:
    """A setting's range (settings.config_problem), checked on this one value before Hydra starts."""
    import dataclasses

    from causal.app.settings import RunConfig, config_problem
    if key not in {f.name for f in dataclasses.fields(RunConfig)} or isinstance(value, (dict, list)):
        return None
    try:
        return config_problem(dataclasses.replace(RunConfig(), **{key: value}))
    except TypeError:
        return None


def _setting(name: str):
    return next(f for f in command_line_settings() if f.name == name)


def _parse_overrides(arguments: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from causal.errors import CausalError
    parser = OverridesParser.create()
    parsed = []
    for argument in arguments:
        try:
            parsed += parser.parse_overrides([argument])
        except HydraException as exc:
            raise CausalError(f"bad setting on the command line: {argument}: {exc}") from None
    return parsed


def _values(override) -> list | None:
    """The values an override gives: one, or a sweep's; None for a deletion or an unexpandable sweep."""
    if override.is_delete():
        return None
    if not override.is_sweep_override():
        return [override.value()]
    try:
        return list(override.sweep_iterator())
    except Exception:  # noqa: BLE001 -- interval(), tag(): for a sweeper plugin to expand
        return None


def as_hydra_override(argument: str) -> str:
    """`n=50` (or `+n=50`, `params.n=50`) -> `+params.n=50`, `~n` -> `~params.n`; run settings (`seed=1`) and
    Hydra keys (`hydra.run.dir=DIR`, `hydra/launcher=joblib`) pass through."""
    prefix = argument[:len(argument) - len(argument.lstrip("+~"))]
    bare = argument[len(prefix):]
    key = bare.split("=", 1)[0]
    if key == "hydra" or key.startswith(("hydra.", "hydra/")) or key.split(".")[0] in (*run_settings(), "params"):
        return f"+{bare}" if key.startswith("params.") and not prefix else argument  # params is {} until set
    return f"~params.{bare}" if prefix == "~" else f"+params.{bare}"


if __name__ == "__main__":
    sys.exit(main())
