"""Run folders no other run can take, and paths written safely into Hydra overrides.

A default run folder (`outputs/<date>/<time>_<file stem>`) is claimed by the CLI with an
exclusive `mkdir` before Hydra starts: a second run started in the same second, of a file with the
same stem, gets `..._<stem>-2`. A folder the user names (`hydra.run.dir=...`) is held by a lock
file for the length of the run (causal.locks), so two runs can never write into it at once.

Cheap to import: the CLI uses it before torch is loaded.
"""
from __future__ import annotations

import re
import tempfile
from datetime import datetime
from pathlib import Path

from causal.errors import CausalError

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
