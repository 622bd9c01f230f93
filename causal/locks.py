"""A folder held by one run at a time: a lock file naming the host and process that holds it.

Below every other package: the checkpoint store (engine) and the run folders (app) both hold folders.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from causal.errors import CausalError

LOCK = ".causal-run.lock"  # in a run folder while a run writes there: "host pid"


RUN_FOLDER_ADVICE = "give each run its own folder (leave hydra.run.dir unset for a fresh one)"


@contextmanager
def held(folder: Path, advice: str = RUN_FOLDER_ADVICE) -> Iterator[None]:
    """Hold `folder` for one run: refused while another live run holds it; a dead run's lock is taken over."""
    lock = folder / LOCK
    mine = f"{socket.gethostname()} {os.getpid()}"
    _take(lock, mine, advice)
    try:
        yield
    finally:
        try:
            if lock.read_text() == mine:
                lock.unlink()
        except OSError:
            pass


def _take(lock: Path, mine: str, advice: str) -> None:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if _held_by_a_live_run(lock):
                raise CausalError(f"another run ({_read(lock)}) is writing into {str(lock.parent)!r}; {advice}, or "
                                  f"delete {str(lock)!r} if no run is using it") from None
            lock.unlink(missing_ok=True)  # left by a killed run
            continue
        except OSError as exc:
            raise CausalError(f"cannot write into the folder {str(lock.parent)!r}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as out:
            out.write(mine)
        return
    raise CausalError(f"cannot lock the folder {str(lock.parent)!r}: another run keeps taking it")


def _read(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _held_by_a_live_run(lock: Path) -> bool:
    """True unless the lock names a process of this host that no longer runs (or is this process)."""
    host, _, pid = _read(lock).partition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's run (a shared file system): we cannot tell, so it holds
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
