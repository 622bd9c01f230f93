"""Sharded runs (`shard=i/N`): shards merge into exactly the unsharded Dataset, statistics and baselines are the
whole data's in every shard, each shard resumes on its own, a missing shard is named, `causal check` shows a
shard's jobs and memory, and a shard sweep composes with the Slurm launcher without submitting anything."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import xarray as xr

import causal
from causal import RunConfig
from causal.app.cli import main
from causal.engine.plan import bytes_per_example, compile_plan
from causal.errors import CausalError
from causal.results.shards import Shard
from conftest import make_rows

N = 8
BODY = """positions { SUBJ = span(subject) }
metric logit_diff(io, s) normalized
patch resid_pre[layer=*, pos=*] from corrupt into clean
ablate z[layer=*, head=*] with mean
trace noise(3 sigma, samples=2) on SUBJ restore resid_post[layer=*, pos=*]"""
PROVENANCE = {"created", "shards", "overrides", "sweep_dir"}  # where and when a run was made


def rows() -> list[dict]:
    out = make_rows(n=N, ragged=True)  # ragged: positions past a prompt's end are NaN
    for row in out:
        row["subject"] = " ".join(row["clean"].split()[1:3])
    return out


@pytest.fixture
def sharded(write_experiment):
    """The experiment file and a config whose chunks hold 2 examples, so an unsharded run ends its chunks
    where 4 shards end theirs (float results depend on which rows share a forward pass)."""
    path = write_experiment(BODY, rows())
    config = RunConfig(device="cpu", progress=False, batch_size=7)
    experiment = causal.prepare(path, config)
    per_example = bytes_per_example(experiment, compile_plan(experiment, 7))
    return path, replace(config, cache_gb=2.5 * per_example / 2 ** 30)


def shard_config(config: RunConfig, index: int, count: int) -> RunConfig:
    return replace(config, shard=f"{index}/{count}", overrides=[f"shard={index}/{count}"])


def assert_same_dataset(merged: xr.Dataset, whole: xr.Dataset) -> None:
    xr.testing.assert_identical(merged.drop_attrs(deep=False), whole.drop_attrs(deep=False))  # values, NaNs, coords
    for name in whole.data_vars:
        assert merged[name].dtype == np.float32
        assert np.array_equal(merged[name].values, whole[name].values, equal_nan=True), name
    assert {k: str(v) for k, v in merged.attrs.items() if k not in PROVENANCE} == \
        {k: str(v) for k, v in whole.attrs.items() if k not in PROVENANCE}


def test_shards_split_examples_by_count_alone():
    parts = [Shard(i, 3).examples(8) for i in range(3)]
    assert [list(p) for p in parts] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert Shard(0, 3).boundaries(8) == [0, 2, 5, 8]


def test_merged_shards_are_the_unsharded_dataset_bit_for_bit(sharded):
    path, config = sharded
    whole = causal.run(path, config)
    parts = [causal.run(path, shard_config(config, i, 4)) for i in range(4)]
    assert [list(p["example"].values) for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(p.attrs["shard"] == f"{i}/4" for i, p in enumerate(parts))
    assert np.isnan(whole["patch_resid_pre"].values).any() and not np.isnan(whole["patch_resid_pre"].values).all()
    merged = causal.merge_runs(parts[::-1])  # in any order
    assert_same_dataset(merged, whole)
    assert merged.attrs["shards"] == 4 and "shard" not in merged.attrs


def test_each_shard_computes_statistics_over_every_example_and_each_baseline_once(sharded, monkeypatch):
    from causal.engine.execute import Executor
    from causal.methods.statistics import PositionMean
    path, config = sharded
    means: list[dict] = []
    base_runs: list[tuple] = []
    real_finish, real_base_run = PositionMean.finish, Executor.base_run

    def finish(self):
        real_finish(self)
        means[-1][self.key] = self.into[self.key]

    def base_run(self, stream, examples, caches):
        base_runs[-1].append((stream.name, tuple(examples.tolist())))
        return real_base_run(self, stream, examples, caches)

    monkeypatch.setattr(PositionMean, "finish", finish)
    monkeypatch.setattr(Executor, "base_run", base_run)
    for index in range(3):
        means.append({})
        base_runs.append([])
        ds = causal.run(path, shard_config(config, index, 3))
        assert not np.isnan(ds["clean"].values).any()
    assert means[0] and all(means[i].keys() == means[0].keys() for i in range(3))
    for key in means[0]:  # the mean ablation's means: identical in every shard
        assert all(np.array_equal(means[i][key].numpy(), means[0][key].numpy()) for i in range(3))
    for calls in base_runs:  # every chunk's base run of every stream once, whatever the shard
        assert len(calls) == len(set(calls))
        covered = sorted(e for name, examples in calls if name == "clean" for e in examples)
        assert covered == list(range(N))


@pytest.mark.slow
def test_a_shard_sweep_through_hydra_loads_as_the_unsharded_run(sharded, tmp_path, capsys):
    path, config = sharded
    whole = causal.run(path, config)
    sweep = tmp_path / "sweep"
    status = main(["run", "-m", str(path), "shard=0/2,1/2", "device=cpu", "batch_size=7", f"cache_gb={config.cache_gb}",
                   "plots=false", "resume=false", f"hydra.sweep.dir={sweep}"])
    assert status == 0, capsys.readouterr().err
    assert_same_dataset(causal.load(sweep), whole)
    (sweep / "1" / "results.nc").unlink()
    with pytest.raises(CausalError, match=r"1 of 2 shards missing: shard=1/2"):
        causal.load(sweep)


@pytest.mark.slow
def test_a_missing_or_doubled_shard_is_refused_by_name(sharded):
    path, config = sharded
    parts = [causal.run(path, shard_config(config, i, 3)) for i in range(3)]
    with pytest.raises(CausalError, match=r"1 of 3 shards missing: shard=1/3"):
        causal.merge_runs([parts[0], parts[2]])
    with pytest.raises(CausalError, match=r"shard=2/3 is there twice"):
        causal.merge_runs([parts[0], parts[1], parts[2], parts[2]])
    other = replace(config, shard="0/2", overrides=["shard=0/2"])
    with pytest.raises(CausalError, match=r"split the examples differently \(N=2 and N=3\)"):
        causal.merge_runs([causal.run(path, other), *parts])


@pytest.mark.slow
def test_shards_of_a_seed_sweep_merge_per_seed(sharded):
    path, config = sharded
    runs = [causal.run(path, replace(config, seed=seed, shard=f"{i}/2", overrides=[f"seed={seed}", f"shard={i}/2"]))
            for seed in (1, 2) for i in range(2)]
    merged = causal.merge_runs(runs)
    assert merged.attrs["swept"] == ["seed"] and merged.sizes["example"] == N
    whole = causal.run(path, replace(config, seed=2, overrides=["seed=2"]))
    assert np.array_equal(merged["trace_resid_post"].sel(seed=2).values, whole["trace_resid_post"].values,
                          equal_nan=True)


def test_each_shard_resumes_from_its_own_checkpoints(sharded, tmp_path, monkeypatch):
    from causal.engine.execute import Executor
    path, config = sharded
    config = replace(config, checkpoints=str(tmp_path / "ck"))
    first, store = causal.app.api.run_keeping_checkpoints(path, shard_config(config, 1, 2))
    other, other_store = causal.app.api.run_keeping_checkpoints(path, shard_config(config, 0, 2))
    assert store.folder != other_store.folder  # each shard's checkpoints are its own
    jobs: list = []
    real = Executor.run_job
    monkeypatch.setattr(Executor, "run_job", lambda self, job, caches: jobs.append(job) or real(self, job, caches))
    again, _ = causal.app.api.run_keeping_checkpoints(path, shard_config(config, 1, 2))
    assert jobs == []  # every job of shard 1 came back from its checkpoints
    xr.testing.assert_identical(again.drop_attrs(deep=False), first.drop_attrs(deep=False))


@pytest.mark.parametrize("shard, message", [
    ("4/4", r"shard=4/4: shards are numbered 0..3"),
    ("1", r"setting shard='1' must be i/N"),
    ("0/0", r"the number of shards must be in 1..100000"),
    ("8/9", r"the experiment has 8 examples, too few for 9 shards \(some would have none\); use at most 8 shards"),
])
def test_bad_shards_are_refused_before_compute(sharded, no_forward, shard, message):
    path, config = sharded
    with pytest.raises(CausalError, match=message):
        causal.run(path, replace(config, shard=shard))


def test_bad_shard_on_the_command_line_is_refused_before_hydra(sharded, no_forward, capsys):
    path, _ = sharded
    assert main(["run", "-m", str(path), "shard=0/2,2/2"]) == 2
    assert "setting shard=2/2: shards are numbered 0..1" in capsys.readouterr().err


def test_attribution_verified_over_every_example_is_not_sharded(write_experiment, no_forward):
    path = write_experiment("metric logprob(io)\nattribute resid_pre[layer=*] from corrupt into clean verify top 2",
                            make_rows(n=4))
    with pytest.raises(CausalError, match=r"verifies the top 2 sites by their mean over every example"):
        causal.run(path, RunConfig(device="cpu", progress=False, shard="0/2"))


def test_check_shows_a_shards_jobs_and_memory_per_device(sharded, capsys):
    path, config = sharded
    assert main(["check", str(path), "shard=1/4", "device=cpu", "batch_size=7", f"cache_gb={config.cache_gb}"]) == 0
    out = capsys.readouterr().out
    shard_line = next(line for line in out.splitlines() if line.startswith("shard"))
    assert "1/4: examples 2..3 (2 of 8) in 1 chunk(s)" in shard_line
    plan = causal.app.api.plan_run(causal.prepare(path, config), shard_config(config, 1, 4))
    assert f"{len(plan.jobs)} jobs" in shard_line and len(plan.jobs) > 0
    assert "statistics and base runs over all 8 examples" in shard_line
    assert "memory   per device (weights + cached activations of the largest chunk): cpu " in out


def test_a_shard_sweep_composes_with_slurm_and_submits_nothing(sharded, tmp_path, monkeypatch, no_forward):
    """submitit's executor is replaced by one that records what it was given: no sbatch runs."""
    import submitit
    from hydra.core.utils import JobReturn, JobStatus
    path, _ = sharded
    given: dict = {}

    class Recorder:
        def __init__(self, cluster, folder, **kwargs):
            given.update(cluster=cluster, folder=folder)

        def update_parameters(self, **params):
            given["params"] = params

        def map_array(self, launcher, overrides, *rest):
            given["overrides"] = [list(o) for o in overrides]
            done = JobReturn(status=JobStatus.COMPLETED, _return_value=None)
            return [type("Job", (), {"results": lambda self: [done]})() for _ in overrides]

    monkeypatch.setattr(submitit, "AutoExecutor", Recorder)
    status = main(["run", "-m", str(path), "shard=0/4,1/4,2/4,3/4", "hydra/launcher=slurm",
                   "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert status == 0 and given["cluster"] == "slurm"
    assert [next(o for o in job if o.startswith("shard=")) for job in given["overrides"]] == \
        [f"shard={i}/4" for i in range(4)]
    assert given["params"]["slurm_partition"] == "gpu" and given["params"]["gpus_per_node"] == 1
