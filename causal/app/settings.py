"""Run settings, declared once.

`RunConfig` is what a run takes from Python (`causal.run(path, RunConfig(device="cpu"))`). Each
field carries its help text and whether (and with which default) `causal run` offers it.
`RunSettings`, the config `causal run` composes with Hydra, is built from those fields plus the
keys only the command line has (`file`, `plots`, `resume`). It is registered in Hydra's
ConfigStore as a structured config, so Hydra checks each value's type, and the CLI's usage
text, its list of setting names and the conversion back to a `RunConfig` all read it.

Cheap to import: no torch, and omegaconf / hydra only inside the functions that need them.
"""
# No `from __future__ import annotations`: OmegaConf reads the field types, which must be real types.
import dataclasses
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

REQUIRED = "???"  # omegaconf.MISSING: a value the command line must give (Hydra reports it if it does not)
SCHEMA = "run_settings"  # the structured config's name in Hydra's ConfigStore (run.yaml's defaults list)
_UNSET = dataclasses.MISSING


def setting(default: Any = _UNSET, *, help: str, default_factory: Any = _UNSET, command_line: bool = True,
            command_line_default: Any = _UNSET) -> Any:
    """A dataclass field with its help text.

    `command_line=False`: a Python-only setting, not a `causal run` key. `command_line_default`:
    the default `causal run` uses where it differs from the Python default.
    """
    metadata = {"help": help, "command_line": command_line}
    if command_line_default is not _UNSET:
        metadata["command_line_default"] = command_line_default
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class RunConfig:
    """Settings that belong to a run rather than to the experiment (`causal run FILE key=value` sets them)."""

    seed: int = setting(0, help="seed of everything random in the run (torch's generator, resampled donors, noise)")
    model: str | None = setting(None, help="replaces the file's `model` (model=gpt2,zoo:attn-only-2l in a sweep)")
    device: str = setting("auto", help="auto (CUDA, else Apple MPS, else CPU) | cpu | cuda | cuda:N | mps")
    dtype: str = setting("float32", help="float32 | float16 | bfloat16")
    device_map: str | None = setting(None, help="spread a model too large for one device with accelerate: auto | "
                                                "balanced | sequential | a JSON file of module -> device (cpu, disk, "
                                                "0, cuda:1) (null: all of it on `device`)")
    offload_folder: str | None = setting(None, help="where device_map puts weights mapped to disk (null: a "
                                                    "temporary folder)")
    batch_size: int = setting(128, help="rows (site x example) per forward pass")
    pack: str = setting("auto", help="how rows share forward passes: auto (cost model) | sites (fill every batch) "
                                     "| exact (never merge rows that start differently)")
    params: dict = setting(default_factory=dict, help="values for the file's `param` declarations: "
                                                      "`causal run FILE n=50` lands here as params.n")
    optimize: bool = setting(True, command_line=False,
                             help="False: every row runs the whole model (the reference the fast path is tested "
                                  "against)")
    cache_gb: float | None = setting(None, help="memory for cached activations per chunk of examples (null: a "
                                                "quarter of RAM, or half the free GPU memory)")
    progress: bool | None = setting(None, command_line_default=True,
                                    help="show progress bars (None: where someone watches, a terminal or a "
                                         "notebook, not a pipe or a log; `causal run` shows them)")
    checkpoints: str | None = setting(None, command_line_default="outputs/.checkpoints",
                                      help="folder for finished batches, so that a re-run resumes (null / None: no "
                                           "checkpoints; `causal run` uses it while resume=true)")
    shard: str | None = setting(None, help="i/N: run the i-th (from 0) of N parts of the examples; `causal run -m "
                                           "FILE shard=0/4,1/4,2/4,3/4` runs them as jobs and causal.load of the "
                                           "sweep merges them (null: every example)")
    record_memory_gb: float = setting(2.0, help="largest recording (record statements) kept in memory; a larger "
                                                "one needs record_store")
    record_store: str | None = setting(None, help="folder for recordings over record_memory_gb: one netCDF file "
                                                  "each, written per batch (a re-run resumes), opened lazily by "
                                                  "causal.load (null: refuse them)")
    trust_remote_code: bool = setting(False, help="run code shipped with a model (never, unless you opt in)")
    overrides: list[str] = setting(default_factory=list, command_line=False,
                              help="the command line's overrides, recorded in the results")


@dataclass
class _CommandLineOnly:
    """Keys only `causal run` has: a Python caller holds the Dataset, and saves or plots it itself."""

    file: str = setting(REQUIRED, help="the experiment file (FILE on the command line)")
    plots: bool = setting(True, help="draw the plots into plots/ next to results.nc")
    resume: bool = setting(True, help="checkpoint finished batches under `checkpoints`; the same command, run "
                                      "again, resumes")


def _command_line_field(f: dataclasses.Field) -> tuple[str, Any, dataclasses.Field]:
    default = f.metadata.get("command_line_default", f.default)
    return f.name, f.type, field(default=default, default_factory=f.default_factory, metadata=f.metadata)


_ONLY = {f.name: f for f in fields(_CommandLineOnly)}
RunSettings = dataclasses.make_dataclass("RunSettings", [_command_line_field(f) for f in (
    _ONLY["file"], *(f for f in fields(RunConfig) if f.metadata["command_line"]), _ONLY["plots"], _ONLY["resume"])])
RunSettings.__module__ = __name__  # importable by name: launchers pickle the config (and its type)
RunSettings.__doc__ = ("`causal run`'s config, Hydra's structured config: RunConfig's command-line settings, "
                       "and file, plots, resume.")


def command_line_settings() -> tuple[dataclasses.Field, ...]:
    """The settings `causal run` takes as `key=value`, in order (with `file`, which FILE sets)."""
    return fields(RunSettings)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not _UNSET else f.default


def show(value: Any) -> str:
    """A value as one writes it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def kind(annotation: Any) -> str:
    """What a value of this type is, for an error message: `int`, `true or false`, `float or null`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{kind(rest[0]) if len(rest) == 1 else ' or '.join(map(kind, rest))} or null"
    if annotation is bool:
        return "true or false"
    if annotation in (dict, list) or typing.get_origin(annotation) in (dict, list):
        return "a mapping {name: value}" if dict in (annotation, typing.get_origin(annotation)) else "a list"
    return getattr(annotation, "__name__", str(annotation))


def settings_help(width: int = 100, skip: tuple[str, ...] = ("file",)) -> str:
    """`key=default  help` for each command-line setting: the run settings of `causal run --help`."""
    rows = [(f"{f.name}={show(default_of(f))}", f.metadata["help"]) for f in command_line_settings()
            if f.name not in skip]
    left = min(26, max(len(key) for key, _ in rows) + 2)
    lines = []
    for key, text in rows:
        wrapped = textwrap.wrap(text, max(30, width - 2 - left), break_on_hyphens=False)
        if len(key) + 2 > left:  # a long default: the text starts on the next line
            lines.append(f"  {key}")
        else:
            lines.append(f"  {key.ljust(left)}{wrapped.pop(0)}")
        lines.extend(" " * (2 + left) + more for more in wrapped)
    return "\n".join(lines)


def check_value(name: str, value: Any) -> str | None:
    """Why `name=value` is not a valid setting (Hydra's own type check on the structured config), or None."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    schema = OmegaConf.structured(RunSettings)
    try:
        schema[name] = value
    except OmegaConfBaseException:
        f = next(f for f in command_line_settings() if f.name == name)
        return f"setting {name}={value!r} must be {kind(f.type)}"
    return None


def config_problem(config: "RunConfig") -> str | None:
    """Why a RunConfig cannot run (a value outside its range), or None: the checks Hydra's types do not make."""
    import math

    from causal.limits import MAX_BATCH, MAX_SEED
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed <= MAX_SEED:
        return f"setting seed={config.seed!r} must be a whole number in 0..{MAX_SEED}"
    if isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int) or \
            not 1 <= config.batch_size <= MAX_BATCH:
        return f"setting batch_size={config.batch_size!r} must be a whole number in 1..{MAX_BATCH}"
    if config.cache_gb is not None and (isinstance(config.cache_gb, bool) or not isinstance(config.cache_gb, (int, float))
                                        or not math.isfinite(config.cache_gb) or config.cache_gb <= 0):
        return f"setting cache_gb={config.cache_gb!r} must be a positive, finite number of GB (or null for the default)"
    memory = config.record_memory_gb
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not math.isfinite(memory) or memory < 0:
        return f"setting record_memory_gb={memory!r} must be a finite number of GB, 0 or more"
    from causal.results.shards import problem as shard_problem
    if shard_problem(config.shard):
        return shard_problem(config.shard)
    for name in ("model", "checkpoints", "device", "dtype", "pack", "record_store", "device_map", "offload_folder"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, str):
            return f"setting {name}={value!r} must be text" + (" or null" if name in ("model", "checkpoints") else "")
        if value == "":
            return f"setting {name} is empty; give it a value" + (" or null" if name in ("model", "checkpoints") else "")
    return None


def check_config(config: "RunConfig") -> None:
    from causal.errors import CausalError
    problem = config_problem(config)
    if problem:
        raise CausalError(problem)


# A value Hydra would turn into text without a word: `model=3`, `checkpoints=true` are typos, not names.
_TEXT_SETTINGS = {"model": "a model reference such as gpt2 or zoo:attn-only-2l (quote a name that looks like a "
                           "number: model='3')",
                  "checkpoints": "a folder such as outputs/.checkpoints, or null (resume=false turns checkpoints off)"}


def text_problem(name: str, value: Any) -> str | None:
    """`model=3`, `checkpoints=true`: a number or boolean where a text is meant, or None."""
    if name in _TEXT_SETTINGS and value is not None and not isinstance(value, str):
        return f"setting {name}={show(value)} must be {_TEXT_SETTINGS[name]}"
    return None


def register() -> None:
    """Put RunSettings in Hydra's ConfigStore, where causal/conf/run.yaml's defaults list finds it."""
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name=SCHEMA, node=RunSettings)


def from_command_line(cfg: Any, overrides: list[str]) -> RunConfig:
    """The RunConfig of a composed `causal run` config (types already checked by Hydra against RunSettings)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True)
    config = RunConfig(**{f.name: values[f.name] for f in fields(RunConfig) if f.name in values},
                       overrides=list(overrides))
    if not values["resume"]:
        config.checkpoints = None
    check_config(config)
    return config
