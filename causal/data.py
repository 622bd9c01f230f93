"""Examples for an experiment: JSONL files or built-in generators, then tokenization.

A column holds either text (tokenized with the model's tokenizer, no special tokens
added, so runs match a plain HF forward on the same ids) or token ids (generators use
ids directly, so they work with any vocabulary).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from causal.errors import CausalError, Span, did_you_mean
from causal.lang import ast


@dataclass
class Examples:
    """Columns of equal length; values are str or list[int]."""

    columns: dict[str, list]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


@dataclass
class Prompts:
    """One tokenized prompt column, right-padded: real tokens never see padding in a causal model."""

    ids: torch.Tensor  # (examples, max_len)
    lengths: torch.Tensor  # (examples,)
    tokens: list[list[str]]

    @property
    def attention_mask(self) -> torch.Tensor:
        return (torch.arange(self.ids.shape[1])[None, :] < self.lengths[:, None]).long()


def induction(tokenizer, n: int = 64, length: int = 10, seed: int = 0) -> Examples:
    """BOS + random tokens repeated once (`clean`); BOS + the same first half + fresh tokens (`corrupt`).

    Tokens are drawn from the vocabulary minus special tokens; BOS is prepended when the
    tokenizer has one, as induction models are trained with it.
    """
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in set(special.tolist())])
    first = ordinary[torch.randint(0, len(ordinary), (n, length), generator=gen)]
    other = ordinary[torch.randint(0, len(ordinary), (n, length), generator=gen)]
    prefix = [[tokenizer.bos_token_id]] * n if tokenizer.bos_token_id is not None else [[]] * n
    prefix = torch.tensor(prefix, dtype=torch.long).view(n, -1)
    return Examples({
        "clean": torch.cat([prefix, first, first], 1).tolist(),
        "corrupt": torch.cat([prefix, first, other], 1).tolist(),
    })


GENERATORS: dict[str, Callable[..., Examples]] = {"induction": induction}


def load_examples(decl: ast.DataFile | ast.DataGenerator, base_dir: Path, tokenizer,
                  source: str) -> Examples:
    if isinstance(decl, ast.DataGenerator):
        examples = _generate(decl, tokenizer, source)
    else:
        examples = read_jsonl(base_dir / decl.path, decl.span, source)
    if decl.limit is not None:
        examples = Examples({k: v[: decl.limit] for k, v in examples.columns.items()})
    if len(examples) == 0:
        raise CausalError("the data has no examples", decl.span, source)
    return examples


def _generate(decl: ast.DataGenerator, tokenizer, source: str) -> Examples:
    if decl.name not in GENERATORS:
        raise CausalError(f"unknown data generator {decl.name!r}; available: {', '.join(GENERATORS)}",
                          decl.span, source, hint=did_you_mean(decl.name, GENERATORS))
    generator = GENERATORS[decl.name]
    accepted = [p for p in generator.__code__.co_varnames[: generator.__code__.co_argcount] if p != "tokenizer"]
    kwargs = {}
    for key, value, span in decl.kwargs:
        if key not in accepted:
            raise CausalError(f"generator {decl.name!r} takes no argument {key!r}; it takes {', '.join(accepted)}",
                              span, source, hint=did_you_mean(key, accepted))
        if not isinstance(value, int) or value < 0 or (key in ("n", "length") and value < 1):
            raise CausalError(f"argument {key!r} must be a positive integer, got {value!r}", span, source)
        kwargs[key] = value
    return generator(tokenizer, **kwargs)


def read_jsonl(path: Path, span: Span, source: str) -> Examples:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise CausalError(f"cannot read data file {str(path)!r}: {exc.strerror}", span, source) from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CausalError(f"{path}:{number}:{exc.colno}: invalid JSON: {exc.msg}", span, source) from None
        if not isinstance(row, dict):
            raise CausalError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}",
                              span, source)
        rows.append((number, row))
    if not rows:
        return Examples({})
    names = list(rows[0][1])
    for number, row in rows:
        if list(row) != names and set(row) != set(names):
            raise CausalError(f"{path}:{number}: columns {sorted(row)} differ from the first line's {sorted(names)}",
                              span, source)
    return Examples({name: [row[name] for _, row in rows] for name in names})


def tokenize_column(values: list, tokenizer, name: str, span: Span, source: str) -> Prompts:
    ids = []
    for index, value in enumerate(values):
        if isinstance(value, str):
            row = tokenizer(value, add_special_tokens=False)["input_ids"]
        elif isinstance(value, list) and all(isinstance(v, int) for v in value):
            row = value
        else:
            raise CausalError(f"column {name!r}, example {index}: expected text or a list of token ids, "
                              f"got {value!r}", span, source)
        if not row:
            raise CausalError(f"column {name!r}, example {index}: the prompt is empty", span, source)
        if max(row) >= len(tokenizer) or min(row) < 0:
            raise CausalError(f"column {name!r}, example {index}: token id outside the vocabulary "
                              f"(0..{len(tokenizer) - 1})", span, source)
        ids.append(row)
    lengths = torch.tensor([len(r) for r in ids])
    padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(ids):
        padded[i, : len(row)] = torch.tensor(row)
    return Prompts(padded, lengths, [tokenizer.convert_ids_to_tokens(r) for r in ids])


def answer_ids(values: list, tokenizer, name: str, span: Span, source: str) -> torch.Tensor:
    """One token id per example; an answer that is not exactly one token is an error."""
    out = []
    for index, value in enumerate(values):
        if isinstance(value, int):
            out.append(value)
            continue
        ids = tokenizer(str(value), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise CausalError(f"column {name!r}, example {index}: answer {value!r} is {len(ids)} tokens "
                              f"{pieces}, not one", span, source,
                              hint="answers are compared as single tokens; GPT-2 style tokenizers "
                                   "usually need a leading space (' Mary')")
        out.append(ids[0])
    return torch.tensor(out)
