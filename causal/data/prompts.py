"""Tokenized prompt columns, single-token answers, and spans of text located inside prompts.

A column holds either text or token ids (generators use ids directly, so they work with
any vocabulary). Text is tokenized as the model's tokenizer does by default, special
tokens included (Llama's BOS, BERT's [CLS] ... [SEP]; GPT-2 adds none), so a run sees
exactly the ids a plain `model(**tokenizer(text))` would.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from causal.errors import CausalError, Span

log = logging.getLogger(__name__)

OCCURRENCES = ("first", "last")


@dataclass
class Prompts:
    """One tokenized prompt column, right-padded: real tokens never see padding in a causal model.

    `texts[i]` is example i's prompt text (None where the column gave token ids) and
    `offsets[i]` its tokens' (start, end) character offsets into that text (None where there
    is no text, or the tokenizer cannot report offsets); they locate named spans.
    """

    ids: torch.Tensor  # (examples, max_len)
    lengths: torch.Tensor  # (examples,)
    tokens: list[list[str]]
    texts: list[str | None] | None = None
    offsets: list[list[tuple[int, int]] | None] | None = None

    @property
    def attention_mask(self) -> torch.Tensor:
        return (torch.arange(self.ids.shape[1])[None, :] < self.lengths[:, None]).long()


def tokenize_column(values: list, tokenizer, name: str, span: Span | None = None) -> Prompts:
    ids, texts, offsets = [], [], []
    for index, value in enumerate(values):
        if isinstance(value, str):
            row, row_offsets = _encode(value, tokenizer)
        elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            row, row_offsets = value, None
        else:
            raise CausalError(f"column {name!r}, example {index}: expected text or a list of token ids, "
                              f"got {value!r}", span)
        if not row:
            raise CausalError(f"column {name!r}, example {index}: the prompt is empty", span)
        if max(row) >= len(tokenizer) or min(row) < 0:
            raise CausalError(f"column {name!r}, example {index}: token id outside the vocabulary "
                              f"(0..{len(tokenizer) - 1})", span)
        if isinstance(value, str):
            _check_known_words(value, row, row_offsets, tokenizer, f"column {name!r}, example {index}", span)
        ids.append(row)
        texts.append(value if isinstance(value, str) else None)
        offsets.append(row_offsets)
    lengths = torch.tensor([len(r) for r in ids])
    padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(ids):
        padded[i, : len(row)] = torch.tensor(row)
    return Prompts(padded, lengths, [tokenizer.convert_ids_to_tokens(r) for r in ids], texts, offsets)


def _check_known_words(text: str, row: list[int], offsets, tokenizer, where: str, span: Span | None) -> None:
    """A word the tokenizer reads as its unknown token: an error for a word-level tokenizer (there it is a
    typo or a word outside the vocabulary), a warning for others (a rare character, say)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None or unknown not in row or (tokenizer.unk_token and tokenizer.unk_token in text):
        return
    words = [text[a:b] for t, (a, b) in zip(row, offsets or []) if t == unknown and a < b]
    shown = ", ".join(repr(w) for w in dict.fromkeys(words)) or f"{row.count(unknown)} token(s)"
    message = f"{where}: {shown} not in the vocabulary (the tokenizer reads it as its unknown token " \
              f"{tokenizer.unk_token!r}) in the prompt {text[:60]!r}"
    if _word_level(tokenizer):
        raise CausalError(message, span, hint="check the spelling; a word-level tokenizer knows only its "
                                              "vocabulary's words")
    log.warning("%s", message)


def _word_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "model", None)).__name__ == "WordLevel"


def _encode(text: str, tokenizer) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids, and character offsets when the tokenizer is a fast (Rust) one that tracks them."""
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer(text)["input_ids"], None
    encoded = tokenizer(text, return_offsets_mapping=True)
    return encoded["input_ids"], [(int(a), int(b)) for a, b in encoded["offset_mapping"]]


def answer_ids(values: list, tokenizer, name: str, span: Span | None = None) -> torch.Tensor:
    """One token id per example; an answer that is not exactly one token is an error."""
    out = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise CausalError(f"column {name!r}, example {index}: an answer is text or a token id, got {value!r}",
                              span)
        if isinstance(value, int):
            if not 0 <= value < len(tokenizer):
                raise CausalError(f"column {name!r}, example {index}: token id {value} is outside the vocabulary "
                                  f"(0..{len(tokenizer) - 1})", span)
            out.append(value)
            continue
        ids = tokenizer(str(value), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise CausalError(f"column {name!r}, example {index}: answer {value!r} is {len(ids)} tokens "
                              f"{pieces}, not one", span,
                              hint="answers are compared as single tokens; GPT-2 style tokenizers "
                                   "usually need a leading space (' Mary')")
        unknown = getattr(tokenizer, "unk_token_id", None)
        if unknown is not None and ids[0] == unknown and value.strip() != tokenizer.unk_token:
            raise CausalError(f"column {name!r}, example {index}: answer {value!r} is not in the vocabulary (the "
                              f"tokenizer reads it as its unknown token {tokenizer.unk_token!r})", span)
        out.append(ids[0])
    return torch.tensor(out)


def find_span(prompts: Prompts, example: int, text: str, occurrence: str = "first",
              span: Span | None = None) -> tuple[int, int]:
    """(first_token, last_token), inclusive: the tokens of example's prompt that cover `text`.

    Matching rule: `text` is looked for without its surrounding whitespace (" Mary" is
    matched as "Mary"), so an answer column written with the leading space GPT-2 needs also
    finds the name at the very start of a prompt or after punctuation, and `first` really is
    the first mention. A match must stand at word boundaries: it may not be preceded or
    followed by a letter or digit that continues a word ("Sara" does not match inside
    "Sarah", nor "Ann" in "Joanna"). The covering tokens are those whose character offsets
    overlap the match; zero-width tokens (special tokens) never count, and a token that
    holds only the whitespace before the name is not part of the span.
    """
    if occurrence not in OCCURRENCES:
        raise CausalError(f"occurrence must be one of {', '.join(OCCURRENCES)}, got {occurrence!r}", span)
    if not 0 <= example < len(prompts.tokens):
        raise CausalError(f"example {example} does not exist; there are {len(prompts.tokens)}", span)
    prompt = prompts.texts[example] if prompts.texts else None
    offsets = prompts.offsets[example] if prompts.offsets else None
    if prompt is None or offsets is None:
        given = "token ids" if prompt is None else "text, but the tokenizer reports no character offsets"
        raise CausalError(f"example {example}: cannot locate {text!r}: the prompt was given as {given} "
                          f"({prompts.tokens[example]})", span,
                          hint="named spans need text prompts and a fast (Rust) tokenizer")
    needle = text.strip()
    matches = word_matches(prompt, needle) if needle else []
    if not matches:
        raise CausalError(f"example {example}: {text!r} does not occur in the prompt {prompt!r}", span)
    start = matches[0] if occurrence == "first" else matches[-1]
    end = start + len(needle)
    covering = [t for t, (a, b) in enumerate(offsets) if a < b and a < end and b > start]
    if not covering:
        raise CausalError(f"example {example}: no token of the prompt {prompt!r} covers {text!r} "
                          f"(characters {start}..{end})", span)
    return covering[0], covering[-1]


def find_spans(prompts: Prompts, texts: list[str], occurrence: str = "first",
               span: Span | None = None) -> torch.Tensor:
    """(examples, 2) inclusive token spans of `texts[i]` in example i, e.g. the IO name of each IOI prompt."""
    if len(texts) != len(prompts.tokens):
        raise CausalError(f"{len(texts)} span texts for {len(prompts.tokens)} prompts", span)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise CausalError(f"example {i}: the text to locate is {'missing (null)' if t is None else repr(t)}; "
                              "a named position needs text", span)
    return torch.tensor([find_span(prompts, i, t, occurrence, span) for i, t in enumerate(texts)],
                        dtype=torch.long).view(len(texts), 2)


def word_matches(haystack: str, needle: str) -> list[int]:
    """Start offsets of `needle` in `haystack` that are not glued to a surrounding word."""
    starts, at = [], haystack.find(needle)
    while at != -1:
        before = haystack[at - 1] if at > 0 else ""
        after = haystack[at + len(needle): at + len(needle) + 1]
        glued_before = needle[0].isalnum() and before.isalnum()
        glued_after = needle[-1].isalnum() and after.isalnum()
        if not (glued_before or glued_after):
            starts.append(at)
        at = haystack.find(needle, at + 1)
    return starts
