"""Examples as named columns, and the readers for user data files (JSONL, JSON, CSV, TSV)."""
from __future__ import annotations

import csv
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

from causal.errors import CausalError, Span
from causal.files import check_data_file


@dataclass
class Examples:
    """Columns of equal length; values are str or list[int]."""

    columns: dict[str, list]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


Record = tuple[str, dict]  # (where it stands, for messages: "file:line" or "file: record i"; the object)


def read_table(path: Path, span: Span | None = None) -> Examples:
    """A user data file as columns; the reader is chosen by the file's extension."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise CausalError(f"cannot read data file {str(path)!r}: unsupported extension {path.suffix!r}; "
                          f"supported: {', '.join(sorted(READERS))}", span)
    return reader(path, span)


def read_jsonl(path: Path, span: Span | None = None) -> Examples:
    """One JSON object per line; blank lines are skipped."""
    return columns_of(read_records(path, span, lines=True), span)


def read_json(path: Path, span: Span | None = None) -> Examples:
    """A JSON list of objects, one per example."""
    return columns_of(read_records(path, span, lines=False), span)


def read_csv(path: Path, span: Span | None = None,
             delimiter: str = ",") -> Examples:
    """Header row = column names (surrounding spaces stripped); every value is text, kept verbatim,
    so an answer written as `" Mary"` keeps its leading space. Read row by row into the columns."""
    with _opened(path, span, encoding="utf-8-sig") as lines:  # tolerate the BOM spreadsheets write
        reader = csv.reader(lines, delimiter=delimiter)
        try:
            header = next((row for row in reader if row), None)
            if header is None:
                return Examples({})
            names = _header(path, reader.line_num, header, span)
            columns: list[list[str]] = [[] for _ in names]
            for row in reader:
                if not row:
                    continue
                if len(row) != len(names):
                    raise CausalError(f"{path}:{reader.line_num}: {len(row)} field(s), but the header has "
                                      f"{len(names)} columns ({', '.join(names)})", span)
                for column, value in zip(columns, row):
                    column.append(_text(value, f"{path}:{reader.line_num}", span))
        except csv.Error as exc:
            raise CausalError(f"{path}:{reader.line_num}: malformed CSV: {exc}", span) from None
    return Examples(dict(zip(names, columns)))


def _header(path: Path, line: int, header: list[str], span: Span | None) -> list[str]:
    names = [name.strip() for name in header]
    for name in names:
        if not name:
            raise CausalError(f"{path}:{line}: the header row has an empty column name", span)
        if names.count(name) > 1:
            raise CausalError(f"{path}:{line}: column {name!r} appears twice in the header", span)
    return names


def read_tsv(path: Path, span: Span | None = None) -> Examples:
    return read_csv(path, span, delimiter="\t")


READERS: dict[str, Callable[..., Examples]] = {
    ".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".tsv": read_tsv}


def read_records(path: Path, span: Span | None = None,
                 lines: bool | None = None) -> list[Record]:
    """JSON objects, one per line (`lines`) or as one JSON list; by default .jsonl files hold lines.

    Lines are read one at a time and end only at "\\n", so U+2028 inside a JSON string is text."""
    with _opened(path, span) as stream:
        if lines if lines is not None else path.suffix.lower() == ".jsonl":
            return [(f"{path}:{number}", _parse(line, f"{path}:{number}", span))
                    for number, line in enumerate(stream, 1) if line.strip()]
        records = _parse(stream.read(), str(path), span, want=list)
    return [(f"{path}: record {index}", _object(record, f"{path}: record {index}", span))
            for index, record in enumerate(records)]


def columns_of(records: list[Record], span: Span | None) -> Examples:
    """Columns from objects that all have the first object's keys."""
    if not records:
        return Examples({})
    names = list(records[0][1])
    for where, record in records:
        if set(record) != set(names):
            raise CausalError(f"{where}: columns {sorted(record)} differ from the first record's {sorted(names)}",
                              span)
    return Examples({name: [record[name] for _, record in records] for name in names})


@contextmanager
def _opened(path: Path, span: Span | None, encoding: str = "utf-8") -> Iterator[TextIO]:
    """The data file as text lines (checked first: a regular file within the size limit)."""
    check_data_file(path, span)
    try:
        with open(path, encoding=encoding, newline="" if encoding == "utf-8-sig" else None) as stream:
            yield stream
    except OSError as exc:
        raise CausalError(f"cannot read data file {str(path)!r}: {exc.strerror}", span) from None
    except UnicodeDecodeError as exc:
        raise CausalError(f"cannot read data file {str(path)!r}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})", span) from None


def _parse(text: str, where: str, span: Span | None, want: type = dict):
    try:
        value = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, where, span))
    except json.JSONDecodeError as exc:
        location = f"{where}:{exc.colno}" if want is dict else f"{where}:{exc.lineno}:{exc.colno}"
        raise CausalError(f"{location}: invalid JSON: {exc.msg}", span) from None
    except RecursionError:
        raise CausalError(f"{where}: JSON nested too deeply (the limit is Python's recursion limit, "
                          f"{sys.getrecursionlimit()} levels)", span) from None
    if want is list and not isinstance(value, list):
        raise CausalError(f"{where}: expected a JSON list of objects (one per example), got "
                          f"{type(value).__name__}", span,
                          hint="use .jsonl for one object per line")
    return _object(value, where, span) if want is dict else value


def _object(value, where: str, span: Span | None) -> dict:
    if not isinstance(value, dict):
        raise CausalError(f"{where}: each example must be a JSON object, got {type(value).__name__}",
                          span)
    return value


def _unique_keys(pairs: list[tuple[str, object]], where: str, span: Span | None) -> dict:
    """A JSON object, refused when a key appears twice (json.loads would keep the last silently)."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise CausalError(f"{where}: key {key!r} appears twice in one object (values {seen[key]!r} and "
                              f"{value!r})", span)
        seen[key] = _text(value, where, span) if isinstance(value, str) else value
    return seen


_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def _text(value: str, where: str, span: Span | None) -> str:
    """A text value, refused if it holds what no tokenizer or results file takes (NUL, a lone surrogate)."""
    found = _NOT_TEXT.search(value)
    if found:
        what = "a NUL character" if found.group() == "\x00" else f"a lone UTF-16 surrogate {found.group()!a}"
        raise CausalError(f"{where}: the text {value[:40]!a} holds {what}, which is not text", span)
    return value
