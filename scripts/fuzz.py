"""A longer hunt than the suite's: experiment files generated from the grammar, on the toy model.

    python scripts/fuzz.py --minutes 30 --seed 7

Each file goes through parse + resolve (what `causal check` does before the plan). A file that
raises anything but a CausalError, or takes longer than --slow seconds, is written to
tests/fuzz_cases/<kind>-<hash>.cx, where tests/test_fuzz.py::test_saved_fuzz_cases replays it once
the bug is fixed (each saved case must end in a CausalError with a location).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from causal.errors import CausalError  # noqa: E402
from causal.lang.parser import parse_text  # noqa: E402
from causal.models import load_model  # noqa: E402
from causal.methods import METHODS
from causal.resolve import resolve  # noqa: E402
from tests.grammar_fuzz import generate  # noqa: E402
from tests.test_fuzz import ROWS  # noqa: E402

CASES = ROOT / "tests" / "fuzz_cases"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--slow", type=float, default=5.0, help="seconds after which a file counts as a hang")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="causal-fuzz-"))
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    model = load_model("zoo:attn-only-2l", device="cpu")
    rng, outcomes, found = random.Random(args.seed), Counter(), 0
    end = time.monotonic() + 60 * args.minutes
    while time.monotonic() < end:
        text = generate(rng)
        start = time.monotonic()
        kind = None
        try:
            resolve(parse_text(text, str(folder / "fuzz.cx")), model, METHODS)
            outcomes["resolved"] += 1
        except CausalError:
            outcomes["causal error"] += 1
        except Exception as exc:  # noqa: BLE001 -- what we hunt
            kind = type(exc).__name__
        if kind is None and time.monotonic() - start > args.slow:
            kind = "slow"
        if kind:
            outcomes[kind] += 1
            found += save(text, kind)
    print(f"seed {args.seed}: {dict(outcomes)}; {found} new case(s) in {CASES}")
    return 1 if found else 0


def save(text: str, kind: str) -> int:
    CASES.mkdir(exist_ok=True)
    path = CASES / f"{kind.lower()}-{hashlib.sha256(text.encode()).hexdigest()[:10]}.cx"
    if path.exists():
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"{kind}: {path}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
