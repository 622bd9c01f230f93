"""The result Dataset's schema, its netCDF round trip, and the plots made from it."""
from __future__ import annotations

import json

import numpy as np
import xarray as xr

import causal
from causal.results.plot import plot_all


def test_schema_dims_coords_and_provenance(write_experiment, cpu_config, tiny_gpt2):
    path = write_experiment("metric logprob(io)\npatch resid_pre[layer=*, pos=*] from corrupt into clean\n"
                            "ablate z[layer=1, head=*] with zero as heads")
    ds = causal.run(path, cpu_config)
    assert ds["patch_resid_pre"].dims == ("layer", "pos", "example")
    assert ds["heads"].dims == ("layer", "head", "example")
    assert set(ds.data_vars) == {"patch_resid_pre", "heads", "clean", "corrupt"}
    assert list(ds["layer"].values) == [0, 1, 2] and list(ds["head"].values) == [0, 1, 2, 3]
    assert ds["token_clean"].dims == ("example", "pos")
    first = open(path.parent / "data.jsonl").readline()
    assert list(ds["token_clean"].isel(example=0).values) == json.loads(first)["clean"].split()
    assert ds["heads"].attrs["statement"] == "ablate z[layer=1, head=*] with zero as heads"
    assert ds["heads"].attrs["metric"] == "logprob(io)"
    assert ds.attrs["model"] == str(tiny_gpt2) and ds.attrs["model_revision"].startswith("sha256:")
    for key in ("experiment_text", "model_revision", "dtype", "device", "seed", "versions", "created"):
        assert key in ds.attrs
    assert ds.attrs["experiment_text"] == path.read_text()
    assert ds.attrs["versions"]["torch"]


def test_save_load_round_trip_is_exact(write_experiment, cpu_config, tmp_path):
    ds = causal.run(write_experiment("metric logprob(io)\nmetric logit_diff(io, s)\n"
                                     "patch attn_out[layer=*, pos=*] from corrupt into clean"), cpu_config)
    assert ds["patch_attn_out"].dims == ("layer", "pos", "example", "metric")
    target = causal.save(ds, tmp_path / "run" / "results.nc")
    assert not list(target.parent.glob("*.tmp"))
    back = causal.load(target.parent)
    xr.testing.assert_identical(back, ds)


def test_save_failure_leaves_no_partial_file(write_experiment, cpu_config, tmp_path, monkeypatch):
    ds = causal.run(write_experiment("metric logprob(io)\nablate mlp_out[layer=0] with zero"), cpu_config)

    def broken(self, path, *a, **k):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(xr.Dataset, "to_netcdf", broken)
    target = tmp_path / "out" / "results.nc"
    try:
        causal.save(ds, target)
    except causal.CausalError as exc:
        assert "No space left on device" in str(exc)
    else:
        raise AssertionError("save should fail")
    assert list((tmp_path / "out").iterdir()) == []


def test_plots_are_written_for_every_intervention(write_experiment, cpu_config, tmp_path):
    ds = causal.run(write_experiment("metric logprob(io)\nmetric prob(io)\n"
                                     "patch resid_pre[layer=*, pos=*] from corrupt into clean\n"
                                     "ablate mlp_out[layer=*] with mean\nablate z[layer=0] with zero"), cpu_config)
    written = plot_all(ds, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == sorted(f"{v}_{m}.png" for v in ("patch_resid_pre", "ablate_mlp_out", "ablate_z")
                           for m in ("logprob_io_", "prob_io_"))
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert np.isfinite(ds["ablate_mlp_out"].values).all()


# --------------------------------------------------------------------------------- a schema that reads itself
# Issue "a researcher's first week", item 6.

def _named_position_run(write_experiment, cpu_config):
    from conftest import make_rows
    rows = [dict(r, w=r["clean"].split()[1]) for r in make_rows(n=4)]
    body = ("positions { W = first(w) }\nmetric logprob(io)\nmetric logit_diff(io, s)\n"
            "patch resid_pre[layer=*, pos=[W, -1]] from corrupt into clean")
    return causal.run(write_experiment(body, rows), cpu_config), rows


def test_provenance_attrs_are_values_not_json_text(write_experiment, cpu_config, tmp_path):
    ds, _ = _named_position_run(write_experiment, cpu_config)
    for held in (ds, causal.load(causal.save(ds, tmp_path / "r" / "results.nc"))):
        assert held.attrs["metrics"] == ["logprob(io)", "logit_diff(io, s)"]
        assert isinstance(held.attrs["params"], dict) and isinstance(held.attrs["versions"], dict)
        assert isinstance(held.attrs["overrides"], list)
    on_disk = xr.open_dataset(tmp_path / "r" / "results.nc")  # what a tool that knows nothing of causal sees
    assert json.loads(on_disk.attrs["metrics"]) == ds.attrs["metrics"]
    assert set(on_disk.attrs["causal_json"].split()) >= {"metrics", "params", "versions", "overrides"}
    on_disk.close()


def test_every_variable_and_coordinate_has_a_long_name_and_units(write_experiment, cpu_config):
    ds, _ = _named_position_run(write_experiment, cpu_config)
    assert ds.attrs["Conventions"].startswith("CF-") and ds.attrs["title"]
    for name in ds.data_vars:
        assert ds[name].attrs["long_name"] and ds[name].attrs["units"] == "see metric_units", name
    assert "patch resid_pre[layer=*, pos=[W, -1]] from corrupt into clean" in ds["patch_resid_pre"].attrs["long_name"]
    assert list(ds["metric_units"].values) == ["nat", "logit"]
    for name in ds.coords:
        assert ds[name].attrs["long_name"], name


def test_prompt_texts_are_stored(write_experiment, cpu_config):
    ds, rows = _named_position_run(write_experiment, cpu_config)
    assert list(ds["prompt_clean"].values) == [r["clean"] for r in rows]
    assert list(ds["prompt_corrupt"].values) == [r["corrupt"] for r in rows]
    assert ds["prompt_clean"].dims == ("example",)


def test_named_positions_keep_numbers_as_numbers(write_experiment, cpu_config, tmp_path):
    """`sel(pos=-1)` failed beside a named position: every label was text."""
    ds, _ = _named_position_run(write_experiment, cpu_config)
    back = causal.load(causal.save(ds, tmp_path / "r" / "results.nc"))
    for held in (ds, back):
        assert list(held["pos"].values) == ["W", -1]
        assert held["patch_resid_pre"].sel(pos=-1).dims == ("layer", "example", "metric")
        assert held["patch_resid_pre"].sel(pos="W").dims == ("layer", "example", "metric")
    xr.testing.assert_identical(back, ds)


def test_a_merged_sweep_keeps_each_runs_provenance_and_tokens(write_experiment, cpu_config, tmp_path):
    import warnings
    path = write_experiment("metric logprob(io)\npatch resid_pre[layer=*, pos=*] from corrupt into clean")
    for seed in (0, 1):
        ds = causal.run(path, cpu_config)
        ds.attrs.update(seed=seed, overrides=[f"seed={seed}"], created=f"2026-12-02T00:00:0{seed}+00:00")
        causal.save(ds, tmp_path / "sweep" / str(seed) / "results.nc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # xarray's FutureWarnings printed on every load of a sweep
        merged = causal.load(tmp_path / "sweep")
    assert list(merged["run_created"].values) == ["2026-12-02T00:00:00+00:00", "2026-12-02T00:00:01+00:00"]
    assert merged["run_created"].dims == ("seed",)
    assert [json.loads(o) for o in merged["run_overrides"].values] == [["seed=0"], ["seed=1"]]
    assert merged["token_clean"].dims == merged["token_corrupt"].dims == ("seed", "example", "pos")
    assert merged["prompt_clean"].dims == ("seed", "example")
    assert "created" not in merged.attrs and merged.attrs["swept"] == ["seed"]


def test_results_are_readable_by_collaborators(write_experiment, cpu_config, tmp_path):
    """results.nc was written 0600 (mkstemp's mode): now what the umask allows, as any file the user writes."""
    import os
    ds = causal.run(write_experiment("metric logprob(io)\nablate mlp_out[layer=0] with zero"), cpu_config)
    previous = os.umask(0o022)
    try:
        target = causal.save(ds, tmp_path / "r" / "results.nc")
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o644
