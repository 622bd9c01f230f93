"""Regression guard: the block work causal does, counted, against the work its plan says it does.

    python benchmarks/work_guard.py [--margin 0.02]

Counts, never times: every forward pass of a run is logged (rows x layers computed x positions
computed, "token-layers"), and the total must not exceed the plan's (`causal.app.check.block_work` for the
intervention passes, one whole pass per example for each base run) by more than --margin. A change
that silently stops skipping layers or positions, or runs a job twice, fails it on any machine in a
few seconds. It also prints the plan's work against running every row whole (`optimize=False`), the
ratio the speed comes from. The suite runs it (tests/test_work_guard.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

if not __package__:  # run as a script: make `causal` (this checkout's) and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import causal  # noqa: E402
from benchmarks.references import build_gpt2, save_model_folder, write_causal_experiment  # noqa: E402
from benchmarks.sweep import STATEMENTS, TINY, data_rows, make_inputs  # noqa: E402
from causal.app.api import plan_run, run_prepared  # noqa: E402
from causal.app.check import block_work  # noqa: E402
from causal.engine.forward import Runner  # noqa: E402
from causal.values import Resume

MARGIN = 0.02  # counted work may exceed the plan's by 2% (nothing should: the executor follows the plan)


@contextmanager
def counted_work():
    """Token-layers of every Runner.forward while the block runs, appended to the list it yields."""
    counts: list[float] = []
    original = Runner.forward

    def forward(runner, ids, attention_mask, hooks, resume=None, read=None, record_kv=False, grad=False):
        start = resume or Resume()
        counts.append(ids.shape[0] * (runner.adapter.n_layers - start.layer) * (ids.shape[1] - start.pos))
        return original(runner, ids, attention_mask, hooks, resume, read, record_kv, grad)
    with mock.patch.object(Runner, "forward", forward):
        yield counts


def guard(path: Path, config: causal.RunConfig) -> dict[str, float]:
    """Counted and planned token-layers of one run of `path`, and the whole-rows work for comparison."""
    experiment = causal.prepare(path, config)
    plan = plan_run(experiment, config)
    planned, whole = block_work(experiment, plan)
    width = max(int(p.ids.shape[1]) for p in experiment.prompts.values())
    base = sum(s.samples for s in plan.streams.values()) * experiment.n_examples * width * experiment.model.adapter.n_layers
    with counted_work() as counts:
        run_prepared(experiment, config)
    return {"counted": float(sum(counts)), "planned": planned + base, "whole": whole + base}


def sweeps(folder: Path, examples: int = 8, tokens: int = 16) -> dict[str, Path]:
    """The benchmark's two sweeps (benchmarks/sweep.py) on its tiny model."""
    model = save_model_folder(build_gpt2(**TINY), folder / "model")
    inputs = make_inputs(examples, tokens, TINY["vocab"], seed=0)
    paths = {}
    for name, statement in STATEMENTS.items():
        (folder / name).mkdir()
        paths[name] = write_causal_experiment(folder / name, model, data_rows(inputs),
                                              f"metric logprob(io)\n{statement}")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--margin", type=float, default=MARGIN)
    args = parser.parse_args(argv)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in sweeps(Path(tmp)).items():
            work = guard(path, causal.RunConfig(device="cpu", progress=False))
            over = work["counted"] / work["planned"] - 1
            print(f"{name:10s} counted {work['counted']:>9.0f} token-layers, planned {work['planned']:>9.0f} "
                  f"({over:+.1%}); every row whole {work['whole']:>9.0f} ({work['whole'] / work['planned']:.2f}x)")
            if over > args.margin:
                failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)} did more block work than planned (margin {args.margin:.0%})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
