"""The regression guard of issue "speed to the floor" (item 4): block work counted against the plan's.

Counting, not timing, so it holds on any machine: benchmarks/work_guard.py on the benchmark's tiny model.
"""
from __future__ import annotations

import pytest

import causal
from benchmarks.work_guard import MARGIN, guard, sweeps
from causal.engine.execute import Executor
from causal.values import Resume


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    return sweeps(tmp_path_factory.mktemp("guard"))


@pytest.mark.parametrize("name", ["resid_pre", "head"])
def test_the_run_does_the_work_its_plan_says(sweep_files, name):
    work = guard(sweep_files[name], causal.RunConfig(device="cpu", progress=False))
    assert work["counted"] <= work["planned"] * (1 + MARGIN)
    assert work["counted"] == work["planned"]  # the executor follows the plan exactly
    assert work["planned"] < work["whole"]  # and the plan skips work


def test_the_guard_catches_a_run_that_stops_skipping(sweep_files, monkeypatch):
    """A regression the guard exists for: jobs planned to resume run whole (the numbers stay right)."""
    monkeypatch.setattr(Executor, "resume", lambda self, stream, job, caches, layer, pos: Resume())
    work = guard(sweep_files["head"], causal.RunConfig(device="cpu", progress=False))
    assert work["counted"] > work["planned"] * (1 + MARGIN)
