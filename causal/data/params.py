"""Typed generator parameters: a generator's signature is its argument schema.

A generator declares each parameter with an annotation and a default, e.g.
`n: Count = 64`, `templates: Literal["mixed", "ABBA", "BABA"] = "mixed"`, `path: Path`.
`bind_arguments` checks the experiment file's `name(key=value, ...)` against that schema,
so every generator gets the same checks and the same error messages for free:

- `int`, `float`, `str`: the literal's type (an int is accepted where a float is asked);
- `Annotated[int | float, Range(low, high)]`: inclusive bounds, either may be open;
- `Literal[...]`: one of the listed values (strings may be written bare: `templates=ABBA`);
- `Path`: a file path, resolved against the experiment file's folder and required to exist;
- `X | None` with default None: optional, the generator decides what "not given" means;
- no default: required.
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

from causal.errors import CausalError, Span, did_you_mean
from causal.files import file_problem
from causal.limits import MAX_COUNT, MAX_DATA_BYTES, MAX_SEED


@dataclass(frozen=True)
class Range:
    """Inclusive bounds for a numeric parameter; None leaves that side open."""

    low: float | None = None
    high: float | None = None

    def contains(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {self.low}..{self.high}"
        return f">= {self.low}" if self.low is not None else f"<= {self.high}"


Count = Annotated[int, Range(1, MAX_COUNT)]  # how many examples, tokens, ...
Seed = Annotated[int, Range(0, MAX_SEED)]


@dataclass(frozen=True)
class Param:
    """One generator parameter: its base type, constraints and default."""

    name: str
    kind: type  # int, float, str or Path
    choices: tuple | None = None
    bounds: Range | None = None
    required: bool = False
    default: object = None

    def signature(self) -> str:
        """`name (what it takes; its default)` for messages listing a generator's parameters."""
        given = "required" if self.required else "optional" if self.default is None else f"default {self.default!r}"
        return f"{self.name} ({self.describe()}; {given})"

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = {int: "an integer", float: "a number", str: "text",
                Path: "a file path (relative to the experiment file)"}[self.kind]
        return f"{what} {self.bounds.describe()}" if self.bounds else what


def parameters(generator: Callable) -> dict[str, Param]:
    """The generator's parameters after `tokenizer`, read from its annotations and defaults."""
    hints = typing.get_type_hints(generator, include_extras=True)
    params = {}
    for name, p in list(inspect.signature(generator).parameters.items())[1:]:
        params[name] = _param(name, hints[name], p.default)
    return params


def _param(name: str, hint, default) -> Param:
    required = default is inspect.Parameter.empty
    default = None if required else default
    if typing.get_origin(hint) in (Union, types.UnionType):  # `X | None`: None only as the default
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"parameter {name!r}: only `X | None` unions are supported")
        hint = args[0]
    bounds = None
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        bounds = next((e for e in extras if isinstance(e, Range)), None)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return Param(name, type(choices[0]), choices, None, required, default)
    if hint not in (int, float, str, Path):
        raise TypeError(f"parameter {name!r}: unsupported annotation {hint!r}")
    return Param(name, hint, None, bounds, required, default)


def bind_arguments(generator_name: str, params: dict[str, Param],
                   kwargs: tuple[tuple[str, object, Span], ...], base_dir: Path,
                   span: Span) -> dict[str, object]:
    """Checked keyword arguments for the generator; paths come back resolved against `base_dir`."""
    bound: dict[str, object] = {}
    for key, value, arg_span in kwargs:
        if key not in params:
            accepted = ", ".join(p.signature() for p in params.values())
            raise CausalError(f"generator {generator_name!r} takes no argument {key!r}; it takes {accepted}",
                              arg_span, hint=did_you_mean(key, params))
        if key in bound:
            raise CausalError(f"argument {key!r} is given twice", arg_span)
        bound[key] = _check(generator_name, params[key], value, base_dir, arg_span)
    missing = [p for p in params.values() if p.required and p.name not in bound]
    if missing:
        needs = ", ".join(p.signature() for p in missing)
        raise CausalError(f"generator {generator_name!r} needs argument(s) {needs}", span)
    return bound


def _check(generator_name: str, param: Param, value, base_dir: Path, span: Span):
    def bad(reason: str = "") -> CausalError:
        return CausalError(f"argument {param.name!r} of {generator_name!r} must be {param.describe()}, "
                           f"got {value!r}{reason}", span,
                           hint=did_you_mean(str(value), [str(c) for c in param.choices])
                           if param.choices else None)

    if param.choices is not None:
        if value not in param.choices or type(value) is not type(param.choices[0]):
            raise bad()
        return value
    if param.kind in (int, float):
        numeric = isinstance(value, int) and not isinstance(value, bool)
        if param.kind is float:
            numeric = numeric or isinstance(value, float)
        if not numeric:
            raise bad()
        if param.bounds and not param.bounds.contains(value):
            raise bad()
        return param.kind(value)
    if not isinstance(value, str):
        raise bad()
    if param.kind is Path:
        if "\0" in value:
            raise bad("; a path cannot contain a NUL byte")
        path = (base_dir / value).resolve()
        problem = file_problem(path, MAX_DATA_BYTES)
        if problem:
            raise bad(f"; there is no file {str(path)!r}" if problem == "no such file" else f"; {str(path)!r}: {problem}")
        return path
    return value
