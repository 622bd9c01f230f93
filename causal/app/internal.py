"""The one boundary where the command line and `causal.run` meet an exception nobody foresaw.

Bad input is a `CausalError`, raised on purpose with a message. Anything else that escapes is a
bug in causal (or in a library under it): the user gets a short report that says so, names the
run folder, and points to a log file holding the whole traceback, instead of a wall of frames;
the command line exits with status 3 (2 is bad input). Python callers get an `InternalError`
chained to the original exception, so a notebook still shows the cause.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
import tempfile
import traceback
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from causal.errors import CausalError

EXIT_STATUS = 3
LOG_NAME = "causal-internal-error.log"
F = TypeVar("F", bound=Callable)


class InternalError(RuntimeError):
    """An unexpected failure inside causal; `log` holds the traceback. Not a CausalError: that one means
    bad input, and code (or a test) that expects bad input must not take a bug for it."""

    def __init__(self, message: str, log: Path | None):
        super().__init__(message)
        self.log = log


@contextmanager
def boundary(run_folder: Path | None = None) -> Iterator[None]:
    """Unexpected exceptions inside become an InternalError whose log lies in `run_folder` (else a temp folder)."""
    try:
        yield
    except (CausalError, InternalError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 -- the point of a boundary
        raise report(exc, run_folder) from exc


def guarded(function: F) -> F:
    """`function` behind the boundary (for the public Python API)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with boundary():
            return function(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def report(exc: BaseException, run_folder: Path | None) -> InternalError:
    log = write_log(exc, run_folder)
    what = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    where = f"run folder: {run_folder}\n" if run_folder else ""
    saved = f"the traceback is in {log}" if log else "the traceback could not be written to a log file"
    return InternalError(f"internal error (a bug in causal, not in your input): {what}\n{where}{saved}\n"
                         "please report it with that file", log)


def write_log(exc: BaseException, run_folder: Path | None) -> Path | None:
    text = "".join([f"causal internal error, {datetime.now().isoformat(timespec='seconds')}\n",
                    f"python {platform.python_version()} on {platform.platform()}\n",
                    f"command: {' '.join(sys.argv)}\n\n",
                    *traceback.format_exception(type(exc), exc, exc.__traceback__)])
    for folder in ([run_folder] if run_folder else []) + [Path(tempfile.gettempdir())]:
        path = folder / (LOG_NAME if folder == run_folder else f"causal-internal-error-{os.getpid()}.log")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", errors="replace")
            return path
        except OSError:
            continue
    return None
