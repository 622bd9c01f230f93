"""Every shipped experiment file parses and validates against its model and data."""
from __future__ import annotations

from pathlib import Path

import pytest

from causal import RunConfig, prepare

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.cx"))


def test_there_are_examples():
    assert EXPERIMENTS, "experiments/ holds no .cx files"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_example_parses_and_validates(path):
    experiment = prepare(path, RunConfig(device="cpu", progress=False))
    assert experiment.interventions and experiment.metrics
    assert all(i.sweep.points for i in experiment.interventions)
