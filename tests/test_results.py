"""The result Dataset's schema, its netCDF round trip, and the plots made from it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
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


# --------------------------------------------------------------------------------- plots a reader can trust
# Issue "a researcher's first week", items 7 and 8.

def _subject_rows(n: int = 4) -> list[dict]:
    from conftest import make_rows
    return [dict(r, subject=" ".join(r["clean"].split()[1:3])) for r in make_rows(n=n)]


def _heatmaps(fig) -> list:
    """The heatmap meshes of a figure (its colour bars and scatter points left out)."""
    return [m for ax in fig.axes for m in ax.collections if hasattr(m, "get_clim") and ax.get_label() != "<colorbar>"
            and m.get_array() is not None and m.get_array().ndim >= 1 and m.get_array().size > 3]


@pytest.mark.slow
def test_plot_returns_figures_for_a_notebook_without_touching_its_backend(write_experiment, cpu_config):
    import subprocess
    import sys
    from matplotlib.figure import Figure
    ds = causal.run(write_experiment("metric logprob(io)\nablate z[layer=*, head=*] with zero"), cpu_config)
    figures = causal.plot(ds)
    assert len(figures) == 1 and isinstance(figures[0], Figure)
    assert figures._repr_html_().count('<img src="data:image/png;base64,') == 1  # shown inline by Jupyter
    assert len(causal.plot(ds, "ablate_z")) == 1
    with pytest.raises(causal.CausalError, match="no variable 'nope' to plot"):
        causal.plot(ds, "nope")
    code = "import matplotlib; matplotlib.use('svg'); import causal.results.plot; print(matplotlib.get_backend())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "svg"


def test_python_api_shows_progress_only_where_someone_watches(write_experiment, capsys):
    """From Python the default draws no bar into a pipe (pytest's captured stderr is one); True still draws it."""
    path = write_experiment("metric logprob(io)\nablate z[layer=*, head=*] with zero")
    assert causal.RunConfig().progress is None
    causal.run(path, causal.RunConfig(device="cpu"))
    assert "batch" not in capsys.readouterr().err
    causal.run(path, causal.RunConfig(device="cpu", progress=True))
    assert "100%" in capsys.readouterr().err


def test_one_signed_values_get_a_sequential_map():
    """Tracing showed values >= 0 on a map diverging around 0; -0.00 from noise must not change that."""
    from causal.results.plot import _Scale
    assert (_Scale.of(np.array([0.0, 0.3, 0.7, -0.001])).cmap, _Scale.of(np.array([0.0, 0.7])).vmin) == ("Purples", 0)
    assert _Scale.of(np.array([-0.5, -0.1])).cmap == "Blues_r"
    assert (_Scale.of(np.array([-0.5, 0.4])).cmap, _Scale.of(np.array([-0.5, 0.4])).vmin) == ("RdBu_r", -0.5)


def test_a_trace_names_its_window_and_the_levels_it_lies_between(write_experiment, cpu_config):
    body = ("positions { SUBJ = span(subject) }\nmetric prob(io)\n"
            "trace noise(3 sigma, samples=3, seed=7) on SUBJ restore resid_post[layer=* window 2, pos=*]")
    ds = causal.run(write_experiment(body, _subject_rows()), cpu_config)
    (fig,) = causal.plot(ds)
    text = " ".join([*(t.get_text() for t in fig.texts), *(ax.get_title() for ax in fig.axes)]).replace("\n", " ")
    noised, clean = float(ds["trace_resid_post_noised"].mean()), float(ds["clean"].mean())
    assert f"trace_resid_post_noised {noised:.3g}" in text and f"clean {clean:.3g}" in text
    assert "window 2" in text and "mean over 4 examples" in text


def test_attribution_and_its_exact_check_share_grid_and_scale_with_a_scatter(write_experiment, cpu_config):
    ds = causal.run(write_experiment("metric logprob(io)\nattribute z[layer=*, head=*] from corrupt into clean "
                                     "verify top 3"), cpu_config)
    figures = causal.plot(ds)
    assert len(figures) == 1  # the exact check is drawn with its estimate, not on a grid of its own
    estimate, exact = _heatmaps(figures[0])
    assert estimate.get_array().shape == exact.get_array().shape  # head 0 and layer 0 kept, blank where unverified
    assert estimate.get_clim() == exact.get_clim()
    titles = [ax.get_title() for ax in figures[0].axes]
    assert f"3 verified sites: r = {ds['attribute_z'].attrs['exact_correlation']:.3f}" in titles


def test_path_receivers_are_compared_on_one_scale(write_experiment, cpu_config, tmp_path):
    body = ("metric logprob(io)\npath z[layer=0, head=*] -> q[layer=1] from corrupt into clean as into_q\n"
            "path z[layer=0, head=*] -> k[layer=1] from corrupt into clean as into_k\n"
            "path z[layer=0, head=*] -> v[layer=1] from corrupt into clean as into_v")
    ds = causal.run(write_experiment(body), cpu_config)
    written = plot_all(ds, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["into_k.png", "into_q.png", "into_v.png", "path_compared.png"]
    limits = {ax.get_ylim() for fig in causal.plot(ds)[:3] for ax in fig.axes}
    assert len(limits) == 1  # the three bar plots share one value scale


def test_position_labels_name_a_token_only_where_every_example_has_it(write_experiment, cpu_config):
    from causal.results.plot import _labels
    ds = causal.run(write_experiment("metric logprob(io)\npatch resid_pre[layer=0, pos=*] from corrupt into clean"),
                    cpu_config)
    labels = _labels(ds, "pos", ds["pos"].values)
    tokens = ds["token_clean"].values
    for position, label in zip(ds["pos"].values, labels):
        shared = (tokens[:, position] == tokens[0, position]).all()
        assert label == (f"{position} {tokens[0, position]}" if shared else f"{position}")


def test_run_summary_names_every_metric(write_experiment, cpu_config, tmp_path):
    from causal.app.hydra_app import summary
    ds = causal.run(write_experiment("metric logprob(io)\nmetric prob(io)\nablate z[layer=*, head=*] with zero"),
                    cpu_config)
    lines = summary(ds, tmp_path / "results.nc", []).splitlines()[1:]
    assert [line.split(": largest")[0].split(", Δ ")[1] for line in lines] == ["logprob(io)", "prob(io)"]


def test_a_variable_with_its_own_dims_is_labelled_kept_raw_and_round_trips(write_experiment, cpu_config,
                                                                          tmp_path, monkeypatch):
    """Methods that report more than a metric value (recordings, top tokens, training curves) give
    their own trailing dims; those values are not normalised, and strings survive netCDF."""
    from causal.methods.base import Variable
    from causal.methods.patch import Patch

    reported = Patch.variables

    def with_extras(self, effects, state):
        n = effects.shape[1]
        vectors = torch.arange(len(self.sweep.points) * n * 3, dtype=torch.float32).view(-1, n, 3)
        words = np.array([[["a", "bc"][(p + e) % 2] for e in range(n)] for p in range(len(self.sweep.points))],
                         dtype=object)
        return [*reported(self, effects, state),
                Variable("vectors", vectors, self.sweep, {"kind": "recording", "long_name": "vectors",
                                                          "units": "1"}, dims=("example", "d")),
                Variable("words", words, self.sweep, {"kind": "top_tokens"}, dims=("example",))]

    monkeypatch.setattr(Patch, "variables", with_extras)
    ds = causal.run(write_experiment("metric logprob(io) normalized by clean, corrupt\n"
                                     "patch resid_pre[layer=*] from corrupt into clean"), cpu_config)
    assert ds["vectors"].dims == ("layer", "example", "d") and ds["words"].dims == ("layer", "example")
    n = ds.sizes["example"]
    assert ds["vectors"].values[1, 0].tolist() == [3.0 * n, 3.0 * n + 1, 3.0 * n + 2]  # not normalised
    assert ds["words"].values[0, 1] == "bc" and ds["vectors"].attrs["kind"] == "recording"
    assert "metric" not in ds["vectors"].attrs and ds["words"].attrs["units"] == "1"
    back = causal.load(causal.save(ds, tmp_path / "run" / "results.nc").parent)
    xr.testing.assert_identical(back["vectors"], ds["vectors"])
    assert back["words"].values.tolist() == ds["words"].values.tolist()
