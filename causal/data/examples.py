"""Examples as named columns, and the readers for user data files (JSONL, JSON, CSV, TSV)."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from causal.errors import CausalError, Span


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
    so an answer written as `" Mary"` keeps its leading space."""
    text = _read_text(path, span, encoding="utf-8-sig")  # tolerate the BOM spreadsheets write
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as exc:
        raise CausalError(f"{path}:{reader.line_num}: malformed CSV: {exc}", span) from None
    if not rows:
        return Examples({})
    header_line, header = rows[0]
    names = [name.strip() for name in header]
    for name in names:
        if not name:
            raise CausalError(f"{path}:{header_line}: the header row has an empty column name", span)
        if names.count(name) > 1:
            raise CausalError(f"{path}:{header_line}: column {name!r} appears twice in the header", span)
    for line, row in rows[1:]:
        if len(row) != len(names):
            raise CausalError(f"{path}:{line}: {len(row)} field(s), but the header has {len(names)} "
                              f"columns ({', '.join(names)})", span)
    return Examples({name: [row[i] for _, row in rows[1:]] for i, name in enumerate(names)})


def read_tsv(path: Path, span: Span | None = None) -> Examples:
    return read_csv(path, span, delimiter="\t")


READERS: dict[str, Callable[..., Examples]] = {
    ".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".tsv": read_tsv}


def read_records(path: Path, span: Span | None = None,
                 lines: bool | None = None) -> list[Record]:
    """JSON objects, one per line (`lines`) or as one JSON list; by default .jsonl files hold lines."""
    text = _read_text(path, span)
    if lines if lines is not None else path.suffix.lower() == ".jsonl":
        return [(f"{path}:{number}", _parse(line, f"{path}:{number}", span))
                for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = _parse(text, str(path), span, want=list)
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


def _read_text(path: Path, span: Span | None, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except OSError as exc:
        raise CausalError(f"cannot read data file {str(path)!r}: {exc.strerror}", span) from None
    except UnicodeDecodeError as exc:
        raise CausalError(f"cannot read data file {str(path)!r}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})", span) from None
    except ValueError as exc:  # a path the OS cannot take, e.g. with a null byte
        raise CausalError(f"cannot read data file {str(path)!r}: {exc}", span) from None


def _parse(text: str, where: str, span: Span | None, want: type = dict):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        location = f"{where}:{exc.colno}" if want is dict else f"{where}:{exc.lineno}:{exc.colno}"
        raise CausalError(f"{location}: invalid JSON: {exc.msg}", span) from None
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
