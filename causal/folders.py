"""Run folders no other run can take, and paths written safely into Hydra overrides.

A default run folder (`outputs/<date>/<time>_<file stem>`) is claimed by the CLI with an
exclusive `mkdir` before Hydra starts: a second run started in the same second, of a file with the
same stem, gets `..._<stem>-2`. A folder the user names (`hydra.run.dir=...`) is held by a lock
file for the length of the run, so two runs can never write into it at once.

Cheap to import: the CLI uses it before torch is loaded.
"""
from __future__ import annotations

import os
import re
import socket
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

from causal.errors import CausalError

LOCK = ".causal-run.lock"  # in a run folder while a run writes there: "host pid"
_MAX_TRIES = 1000


def safe_name(text: str) -> str:
    """A file stem as a folder-name part: what is not a letter, digit, '.', '_' or '-' becomes '_'."""
    return re.sub(r"[^\w.-]", "_", text, flags=re.ASCII).strip(".") or "experiment"


def claim_new_folder(root: Path, stem: str, now: datetime | None = None) -> Path:
    """`root/<date>/<time>_<stem>` (or `-2`, `-3`, ...), created here so that no other run can have it."""
    now = now or datetime.now()
    parent = root / now.strftime("%Y-%m-%d")
    base = f"{now.strftime('%H-%M-%S')}_{safe_name(stem)}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, _MAX_TRIES + 1):
            folder = parent / (base if n == 1 else f"{base}-{n}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as exc:
        raise CausalError(f"cannot create a run folder under {str(root)!r}: {exc.strerror or exc}") from None
    raise CausalError(f"{_MAX_TRIES} runs named {base!r} already exist under {str(parent)!r}")


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


def check_folder(folder: Path) -> None:
    """Create `folder` now, as Hydra (or the plots) would later, so a file in its way or a folder that
    cannot be written is reported before the run instead of as a raw traceback after it."""
    for ancestor in [folder, *folder.parents]:
        if ancestor.exists() and not ancestor.is_dir():
            raise CausalError(f"cannot write results under {str(folder)!r}: {str(ancestor)!r} is a file "
                              "(Not a directory)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".causal-write-test-")
        probe.close()
    except OSError as exc:
        raise CausalError(f"cannot write results under {str(folder)!r}: {exc.strerror or exc}") from None


def hydra_quoted(text: str) -> str:
    """`text` as a quoted Hydra override value that comes back unchanged: spaces, commas, quotes, '='
    and `${...}` (which OmegaConf would otherwise interpolate) included."""
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)  # OmegaConf: \${ is a literal ${
    text = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + m.group(2), text)  # Hydra: \ doubles before a quote
    return "'" + text.replace("'", "\\'") + "'"
