"""Summaries over examples, and merging a Hydra multirun into one Dataset."""
from __future__ import annotations


import numpy as np
import pytest
import xarray as xr

import causal
from causal.app.cli import main
from causal.results import merge_runs
from causal.results.summary import bootstrap_ci, effect, mean, normalized_effect, standard_error


def toy_dataset() -> xr.Dataset:
    rng = np.random.default_rng(0)
    patched = rng.normal(size=(3, 40))
    patched[1, 5] = np.nan
    return xr.Dataset(
        {"patch_x": (("layer", "example"), patched, {"prompts": "corrupt", "source": "clean"}),
         "clean": (("example",), np.full(40, 2.0)), "corrupt": (("example",), np.zeros(40))},
        coords={"layer": [0, 1, 2], "example": np.arange(40)})


def test_mean_sem_and_bootstrap_agree_with_numpy():
    ds = toy_dataset()
    values = ds["patch_x"]
    row = values.values[1][~np.isnan(values.values[1])]
    assert mean(values).sel(layer=1) == pytest.approx(row.mean())
    assert standard_error(values).sel(layer=1) == pytest.approx(row.std(ddof=1) / np.sqrt(len(row)))
    ci = bootstrap_ci(values, samples=4000)
    for layer in range(3):
        m, se = float(mean(values).sel(layer=layer)), float(standard_error(values).sel(layer=layer))
        low, high = float(ci["low"].sel(layer=layer)), float(ci["high"].sel(layer=layer))
        assert low < m < high
        assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.15)  # normal approximation


def test_effect_and_normalized_effect():
    ds = toy_dataset()
    np.testing.assert_allclose(effect(ds, "patch_x").values, ds["patch_x"].values)  # base (corrupt) is 0
    expected = np.nanmean(ds["patch_x"].values, axis=1) / 2.0  # (patched - corrupt) / (clean - corrupt)
    np.testing.assert_allclose(normalized_effect(ds, "patch_x").values, expected)


def with_overrides(ds: xr.Dataset, *overrides: str) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs["overrides"] = list(overrides)
    return ds


def test_merge_adds_a_dimension_per_swept_parameter_and_aligns_sizes():
    base = toy_dataset()
    runs = [with_overrides(base * s, f"seed={s}", f"model={m}", "device=cpu")
            for s in (1, 2) for m in ("a", "b")]
    runs[3] = runs[3].isel(layer=slice(0, 2))  # a model with fewer layers
    merged = merge_runs(runs)
    assert set(merged["patch_x"].dims) == {"seed", "model", "layer", "example"}
    assert list(merged["seed"].values) == [1, 2] and list(merged["model"].values) == ["a", "b"]
    assert merged.attrs["swept"] == ["model", "seed"]
    np.testing.assert_allclose(merged["patch_x"].sel(seed=2, model="a").values, (base * 2)["patch_x"].values)
    assert np.isnan(merged["patch_x"].sel(seed=2, model="b", layer=2).values).all()


def test_merge_of_identical_runs_is_refused():
    with pytest.raises(causal.CausalError, match="do not differ"):
        merge_runs([with_overrides(toy_dataset(), "seed=1")] * 2)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_multirun_directory_loads_as_one_dataset(write_experiment, tmp_path, launcher):
    path = write_experiment("metric logprob(io)\nablate mlp_out[layer=*] with zero")
    sweep = tmp_path / "sweep"
    args = ["run", "-m", str(path), f"hydra.sweep.dir={sweep}", "batch_size=1,64", "dtype=float32,bfloat16",
            "progress=false", "plots=false", "device=cpu"]
    if launcher == "joblib":
        args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    if launcher == "submitit_local":  # the Slurm launcher's code path, with local processes for jobs
        args += ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    assert main(args) == 0
    merged = causal.load(sweep)
    assert merged["ablate_mlp_out"].sizes == {"batch_size": 2, "dtype": 2, "layer": 3, "example": 6}
    fp32 = merged["ablate_mlp_out"].sel(dtype="float32")
    np.testing.assert_allclose(fp32.sel(batch_size=1), fp32.sel(batch_size=64), atol=1e-5)
    bf16 = merged["ablate_mlp_out"].sel(dtype="bfloat16", batch_size=64)
    assert float(abs(bf16 - fp32.sel(batch_size=64)).max()) < 0.5  # same experiment, coarser arithmetic


@pytest.mark.parametrize("launcher, target", [("slurm", "SlurmLauncher")])
def test_shipped_cluster_launcher_config_composes(launcher, target):
    from hydra import compose, initialize_config_module
    with initialize_config_module(config_module="causal.conf", version_base="1.3"):
        cfg = compose("run", overrides=["file=x.cx", f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.partition == "gpu"


def test_model_sweep_merges_models_of_different_depth(write_experiment, tmp_path, tiny_gpt2):
    """`model=a,b` replaces the file's model; a 2-layer and a 3-layer model align on `layer`."""
    path = write_experiment("metric logprob(io)\nablate attn_out[layer=*] with zero", model="zoo:attn-only-2l")
    sweep = tmp_path / "sweep"
    assert main(["run", "-m", str(path), f"hydra.sweep.dir={sweep}", f"model=zoo:attn-only-2l,{tiny_gpt2}",
                 "progress=false", "plots=false", "device=cpu"]) == 0
    merged = causal.load(sweep)
    assert sorted(merged["model"].values) == sorted(["zoo:attn-only-2l", str(tiny_gpt2)])
    values = merged["ablate_attn_out"]
    assert values.sizes["layer"] == 3
    assert np.isnan(values.sel(model="zoo:attn-only-2l", layer=2)).all()
    assert np.isfinite(values.sel(model=str(tiny_gpt2))).all()


def test_normalized_effect_of_an_ablation_says_it_has_no_source():
    """An ablation has no source run to normalize by: a CausalError pointing to `effect`, not KeyError ''."""
    ds = toy_dataset()
    ds["ablate_x"] = ds["patch_x"].assign_attrs(source="", method="mean", statement="ablate x with mean")
    with pytest.raises(causal.CausalError, match="'ablate_x' .ablate x with mean. has no source run") as info:
        normalized_effect(ds, "ablate_x")
    assert "effect(ds, 'ablate_x')" in info.value.hint
    with pytest.raises(causal.CausalError, match="'clean' .a baseline."):
        normalized_effect(ds, "clean")
