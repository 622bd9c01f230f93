"""The one error type users see, with the source location it concerns.

An error holds a span (file, line, column), never the text: the text is attached once, at
the boundary where the error leaves the pipeline (`reported_against`), and only rendering
reads it. So no function passes the experiment's text along just to build a message.
"""
from __future__ import annotations

import difflib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator


@dataclass(frozen=True)
class Span:
    """Where a construct stands in an experiment file (1-based line and column)."""

    file: str
    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None

    def __str__(self) -> str:
        if self.file == COMMAND_LINE:  # its one line is the argument, quoted below the message
            return COMMAND_LINE
        return f"{self.file}:{self.line}:{self.column}"


COMMAND_LINE = "command line"  # the file of a span in a `key=value` argument of `causal run`


def argument_span(argument: str) -> Span:
    """The value of a `key=value` argument: an error there shows the argument, a caret under its value
    (errors raised inside `reported_against(argument, COMMAND_LINE)`)."""
    start = argument.index("=") + 2
    return Span(COMMAND_LINE, 1, start, 1, max(start + 1, len(argument) + 1))


class CausalError(Exception):
    """Raised for every user-facing failure: bad experiment file, data, model or environment.

    Rendered with file:line:col, the offending line and a caret under the column once
    the source text is attached, so the user can act without a traceback.
    """

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None):
        self.message = message
        self.span = span
        self.hint = hint
        self.source: str | None = None
        super().__init__(message)

    def attach(self, source: str, path: str | None = None) -> "CausalError":
        """The experiment text this error's span points into (kept if one is already attached)."""
        if self.source is None and self.span is not None and (path is None or self.span.file == path):
            self.source = source
        return self

    def __str__(self) -> str:
        return self.render()

    def _quoted_line(self) -> list[str]:
        """The span's line and a caret under its column (tabs kept, so the caret lines up)."""
        lines = source_lines(self.source)
        if not 1 <= self.span.line <= len(lines):
            return []
        text = lines[self.span.line - 1]
        width = 1
        if self.span.end_line == self.span.line and self.span.end_column:
            width = max(1, self.span.end_column - self.span.column)
        shown, column = _SHOWN_AS_SPACE.sub(" ", text), self.span.column
        if len(shown) > QUOTED_WIDTH:  # a window around the column: a 5,000-character line helps nobody
            start = max(0, column - 1 - QUOTED_WIDTH // 3)
            end = start + QUOTED_WIDTH
            shown = ("..." if start else "") + shown[start:end] + ("..." if end < len(shown) else "")
            column -= start - (3 if start else 0)
            width = min(width, QUOTED_WIDTH - (column - 1) + 3)
        indent = "".join("\t" if c == "\t" else " " for c in shown[:column - 1])
        return [f"    {shown}", f"    {indent}{'^' * width}"]

    def render(self) -> str:
        parts = [f"{self.span}: error: {self.message}" if self.span else f"error: {self.message}"]
        if self.span and self.source is not None:
            parts.extend(self._quoted_line())
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


QUOTED_WIDTH = 120  # characters of a long line shown around the error

# Characters a terminal (or str.splitlines) would break a line at, or that do not print: shown as a
# space in a quoted line, one column each, so the caret stays under its column.
_SHOWN_AS_SPACE = re.compile("[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


def source_lines(text: str) -> list[str]:
    """The lines of an experiment's text, as the lexer counts them: only "\\n" ends a line.

    (Files are read with universal newlines, so "\\r\\n" and "\\r" arrive as "\\n".) Not
    `str.splitlines`, which also breaks at U+2028, U+2029, form feed and others, and so would
    put every later line number off by one against the lexer's.
    """
    return text.split("\n")


@contextmanager
def reported_against(source: str, path: str | None = None) -> Iterator[None]:
    """Errors raised inside, whose span lies in `path`, show their line of `source`."""
    try:
        yield
    except CausalError as exc:
        exc.attach(source, path)
        raise


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """The closest valid name, phrased for a hint, or None when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else None
