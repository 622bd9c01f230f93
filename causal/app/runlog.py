"""The run's log file holds what the run printed, not only what went through `logging`.

Hydra writes `<job name>.log` in the run folder with the records of `logging` (our warnings among
them), but the summary, an error and the progress bar are printed. While a run computes, its
stdout and stderr also go, line by line, to the log's file handlers; a progress bar's redraws
(`\\r`) collapse to the state it ended in. The terminal sees everything as before.
"""
from __future__ import annotations

import io
import logging
import sys
from contextlib import contextmanager
from typing import Iterator


class _Copy(io.TextIOBase):
    """A stream passed through, whose finished lines also become log records."""

    def __init__(self, stream, name: str, handlers: list[logging.Handler]):
        self.stream, self.name, self.handlers, self.partial = stream, name, handlers, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self._record(line)
        return len(text)

    def finish(self) -> None:
        self._record(self.partial)
        self.partial = ""

    def _record(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1].rstrip()  # a bar's last redraw
        if line:
            record = logging.makeLogRecord({"name": self.name, "levelno": logging.INFO, "levelname": "INFO",
                                            "msg": line})
            for handler in self.handlers:
                handler.handle(record)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


@contextmanager
def copied_to_log() -> Iterator[None]:
    """Inside, what is printed also goes to the root logger's file handlers (Hydra's run log), if any."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not handlers:
        yield
        return
    saved = sys.stdout, sys.stderr
    copies = _Copy(saved[0], "causal.stdout", handlers), _Copy(saved[1], "causal.stderr", handlers)
    sys.stdout, sys.stderr = copies
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for copy in copies:
            copy.finish()
