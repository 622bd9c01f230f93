"""The `data` statement: read a user file or call a registered generator, then apply `limit`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from causal.data.examples import Examples, read_table
from causal.data.params import bind_arguments, parameters
from causal.errors import CausalError, did_you_mean
from causal.lang import ast

# name -> generator(tokenizer, **kwargs) -> Examples; the built-in ones live in causal/tasks.
GENERATORS: dict[str, Callable[..., Examples]] = {}


def register_generator(generator: Callable[..., Examples]) -> Callable[..., Examples]:
    """Make `generator` callable from experiment files as `data <its name>(...)`.

    Its parameters after `tokenizer` are checked against their annotations (see
    causal.data.params) before it runs, so a bad argument is caught in one place.
    """
    parameters(generator)  # an unsupported annotation fails here, at import, not in a user's run
    GENERATORS[generator.__name__] = generator
    return generator


def load_examples(decl: ast.DataFile | ast.DataGenerator, base_dir: Path, tokenizer) -> Examples:
    if isinstance(decl, ast.DataGenerator):
        examples = _generate(decl, base_dir, tokenizer)
    else:
        examples = read_table(base_dir / decl.path, decl.span)
    if decl.limit is not None:
        examples = Examples({k: v[: decl.limit] for k, v in examples.columns.items()})
    if len(examples) == 0:
        raise CausalError("the data has no examples", decl.span)
    return examples


def _generate(decl: ast.DataGenerator, base_dir: Path, tokenizer) -> Examples:
    if decl.name not in GENERATORS:
        raise CausalError(f"unknown data generator {decl.name!r}; available: {', '.join(sorted(GENERATORS))}",
                          decl.span, hint=did_you_mean(decl.name, GENERATORS))
    generator = GENERATORS[decl.name]
    kwargs = bind_arguments(decl.name, parameters(generator), decl.kwargs, base_dir, decl.span)
    try:
        return generator(tokenizer, **kwargs)
    except CausalError as exc:
        if exc.span is not None:
            raise
        # Generators know the data, not the file: point their errors at the data statement.
        raise CausalError(f"{decl.name}: {exc.message}", decl.span, exc.hint) from None
