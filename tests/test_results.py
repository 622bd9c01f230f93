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
    assert json.loads(ds.attrs["versions"])["torch"]


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
