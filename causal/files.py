"""Opening the files a user names (experiment files, data files): checked by `stat` before reading;
and writing outputs atomically.

Only regular files are read, so a FIFO cannot hang a run and /dev/zero cannot fill memory, and
only up to a size stated here (docs/reliability.md, "Limits"), so a mistaken path fails at once
with its size rather than after minutes of reading.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Callable

from causal.errors import CausalError, Span
from causal.limits import MAX_DATA_BYTES, MAX_EXPERIMENT_BYTES

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_problem(path: Path, limit: int) -> str | None:
    """Why `path` cannot be read as a user file (missing, not a regular file, too large), or None."""
    try:
        info = os.stat(path)
    except ValueError:  # the OS takes no NUL in a path
        return "the path contains a NUL byte"
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return exc.strerror or str(exc)
    for test, kind in _KINDS:
        if test(info.st_mode):
            return f"it is {kind}, not a regular file"
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    if info.st_size > limit:
        return f"it is {readable_size(info.st_size)}, over the {readable_size(limit)} limit for this kind of file"
    return None


def check_experiment_file(path: Path) -> None:
    problem = file_problem(path, MAX_EXPERIMENT_BYTES)
    if problem:
        raise CausalError(f"cannot read experiment file {str(path)!r}: {problem}")


def check_data_file(path: Path, span: Span | None) -> None:
    problem = file_problem(path, MAX_DATA_BYTES)
    if problem:
        raise CausalError(f"cannot read data file {str(path)!r}: {problem}", span)


def readable_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}".replace(".0 ", " ")
    return f"{int(n)} bytes"


def write_atomically(path: Path, write: Callable[[Path], None], what: str) -> Path:
    """`write` into a file beside `path`, then rename: a full disk or a kill leaves no half-written `what`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise CausalError(f"cannot write the {what} {str(path)!r}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fingerprint(parts: dict) -> str:
    """A short content hash of `parts` (JSON, keys sorted): names what a stored thing was computed from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
