"""Named positions (`positions { S2 = last(s), END = -1 }`) and metric positions, per example.

An anchored position is found by locating a column's text (e.g. the subject's name)
inside the anchor column's prompt by character offsets, so it follows the prompt
wherever the template put the name: `first` is the first token of the first
occurrence, `last` the last token of the last occurrence, `span` every token of the
first occurrence.
"""
from __future__ import annotations

import torch

from causal.data import Examples, Prompts, find_span
from causal.errors import CausalError, Span, did_you_mean
from causal.lang import ast
from causal.resolve.sweeps import expand
from causal.values import NamedPositions, absolute_positions


def resolve_positions(defs: tuple[ast.PositionDef, ...], anchor: str | None, prompts: Prompts | None,
                      examples: Examples) -> NamedPositions:
    named = NamedPositions(anchor, lengths=None if prompts is None else prompts.lengths)
    for definition in defs:
        named.indices[definition.name] = _locate(definition, prompts, examples)
    return named


def _locate(definition: ast.PositionDef, prompts: Prompts | None, examples: Examples) -> list[tuple[int, ...]]:
    span = definition.span
    if prompts is None:
        raise CausalError("named positions need a prompt column to be located in, and the data has none", span)
    lengths = prompts.lengths.tolist()
    if definition.anchor is None:
        return [(_within(definition.offset + (n if definition.offset < 0 else 0), n, i, definition),)
                for i, n in enumerate(lengths)]
    column = definition.column
    if column not in examples.columns:
        raise CausalError(f"no data column {column!r}; the data has {', '.join(examples.columns)}", span,
                          did_you_mean(column, examples.columns))
    out = []
    for i, text in enumerate(examples.columns[column]):
        occurrence = "last" if definition.anchor == "last" else "first"
        if text is None:
            raise CausalError(f"column {column!r}, example {i}: the value is missing (null), so position "
                              f"{definition.name!r} cannot be located", span)
        first, last = find_span(prompts, i, str(text), occurrence, span)
        if definition.anchor == "span":
            out.append(tuple(_within(p + definition.offset, lengths[i], i, definition)
                             for p in range(first, last + 1)))
        else:
            base = first if definition.anchor == "first" else last
            out.append((_within(base + definition.offset, lengths[i], i, definition),))
    return out


def _within(position: int, length: int, example: int, definition: ast.PositionDef) -> int:
    if not 0 <= position < length:
        written = (f"{definition.anchor}({definition.column})" + (f"{definition.offset:+d}" if definition.offset else "")
                   if definition.anchor else str(definition.offset))
        raise CausalError(f"position {definition.name} = {written} is {position} in example {example}, outside its "
                          f"prompt of {length} tokens (valid: 0..{length - 1})", definition.span)
    return position


def position_masks(indices: ast.IndexSet | None, prompts: Prompts, named: NamedPositions,
                   default_last: bool = True, shift: int = 0, what: str = "position",
                   span: Span | None = None) -> torch.Tensor:
    """(examples, width) bool mask of the positions an index set names in each prompt.

    None means the last token (or every token when `default_last` is False). `shift`
    removes positions at the end (next-token metrics cannot score the last token).
    """
    n, width = prompts.ids.shape
    lengths = prompts.lengths
    usable = lengths - shift
    if (usable < 1).any():
        i = int((usable < 1).nonzero()[0])
        raise CausalError(f"example {i} has {int(lengths[i])} token(s): a next-token metric needs a token after the "
                          "position it reads", indices.span if indices is not None else span)
    mask = torch.zeros(n, width, dtype=torch.bool)
    if indices is None and default_last:
        mask[torch.arange(n), usable - 1] = True
        return mask
    if indices is None or isinstance(indices, ast.AllIndices):
        return torch.arange(width)[None, :] < usable[:, None]
    for value in expand(indices):
        if isinstance(value, ast.Name):
            if value.name not in named.indices:
                raise CausalError(f"unknown position {value.name!r}; named positions: "
                                  f"{', '.join(named.indices) or 'none'}", value.span,
                                  did_you_mean(value.name, named.indices))
            check_anchor_alignment(named, prompts, value.name, value.span)
            mask |= named.mask(value.name, width)
            continue
        absolute = absolute_positions(lengths, value)
        bad = ((absolute < 0) | (absolute >= usable)).nonzero()
        if len(bad):
            i = int(bad[0])
            limit = "the last scored position is len-2" if shift else "valid positions are 0..len-1"
            raise CausalError(f"{what} {value} is outside example {i}, which has {int(lengths[i])} tokens "
                              f"({limit})", indices.span)
        mask[torch.arange(n), absolute] = True
    if shift:
        over = mask & ~(torch.arange(width)[None, :] < usable[:, None])
        if over.any():
            i = int(over.any(1).nonzero()[0])
            raise CausalError(f"example {i}: a next-token metric cannot read the last token", indices.span)
    return mask


def check_anchor_alignment(named: NamedPositions, prompts: Prompts, name: str, span: Span) -> None:
    """Named positions were located in the anchor prompts; other prompts must line up token for token."""
    anchor_lengths = named.lengths
    if anchor_lengths is None or prompts.lengths.shape != anchor_lengths.shape:
        return
    differ = (prompts.lengths != anchor_lengths).nonzero()
    if len(differ):
        i = int(differ[0])
        raise CausalError(f"position {name!r} was located in the {named.anchor!r} prompts, but is used on prompts "
                          f"of another length (example {i}: {int(prompts.lengths[i])} vs {int(anchor_lengths[i])} "
                          "tokens)", span)
