"""The shipped record / lens / attention-pattern experiments run and show what they are for: the pattern
scores find the induction toy's previous-token head (layer 0) and induction heads (layer 1); the lens at the
last layer is the model's own output and loses the repeat when layer 1's heads are knocked out; a recording
under a steer differs from the plain one by exactly the steering vector at the steered layer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import causal

pytestmark = pytest.mark.slow  # every figure drawn

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def config():
    return causal.RunConfig(device="cpu", progress=False)


def test_pattern_scores_find_the_previous_token_and_induction_heads(config):
    scores = causal.run(EXPERIMENTS / "attention_heads.cx", config).patterns_scores.mean("example")
    previous, induction = scores.sel(score="previous_token"), scores.sel(score="induction")
    assert int(previous.sel(layer=0).argmax()) == 1 and float(previous.sel(layer=0, head=1)) > 0.9
    assert float(previous.sel(layer=0).drop_sel(head=1).max()) < 0.3
    assert (induction.sel(layer=1) > 0.6).all() and float(induction.sel(layer=0).max()) < 0.2


def test_the_lens_at_the_last_layer_is_the_model_and_the_knockout_erases_the_repeat(config):
    ds = causal.run(EXPERIMENTS / "logit_lens.cx", config)
    last = ds.lens.sel(layer=1, answer="next", pos=slice(11, 19))
    np.testing.assert_allclose(last.mean("pos").values, ds.clean.values, atol=1e-5)  # the metric's own number
    repeated = last.mean(["pos", "example"])
    knocked = ds.lens_knockout.sel(layer=1, answer="next", pos=slice(11, 19)).mean(["pos", "example"])
    assert float(repeated) > -0.5 and float(knocked) < -3.0
    prompts = causal.prepare(EXPERIMENTS / "logit_lens.cx", config).prompts["clean"]
    tokenizer = causal.prepare(EXPERIMENTS / "logit_lens.cx", config).model.tokenizer
    top = ds.lens_top.sel(layer=1, top=0, pos=slice(11, 19)).isel(example=0).values
    following = [tokenizer.decode([int(t)]) for t in prompts.ids[0, 12:21]]
    assert list(top) == following  # the top token is the repeat's next token


def test_a_recording_under_a_steer_is_the_plain_one_plus_the_vector(config):
    ds = causal.run(EXPERIMENTS / "record_resid.cx", config)
    assert ds.resid.dims == ("layer", "pos", "example", "d_model") and ds.resid.sizes["layer"] == 2
    shift = (ds.resid_pushed.sel(layer=1) - ds.resid.sel(layer=1)).values  # (pos, example, d_model)
    assert np.abs(shift).max() > 0.03
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:1, :1], shift.shape), atol=1e-5)  # one vector


def test_lens_and_pattern_figures_show_the_dataset(config, tmp_path):
    from causal.results.plot import plot, plot_all
    lens = causal.run(EXPERIMENTS / "logit_lens.cx", config)
    names = [p.name for p in plot_all(lens, tmp_path / "lens")]
    assert names == ["knockout.png", "lens.png", "lens_knockout.png"]
    figure = plot(lens, "lens")[0]
    written = [t.get_text() for t in figure.axes[0].texts]
    drawn = lens.lens.isel(example=0, answer=0).dropna("pos", how="all")["pos"]  # the last has no next token
    top = lens.lens_top.isel(example=0).sel(top=0, pos=drawn).transpose("layer", "pos")
    assert written == [str(w) for w in top.values.ravel()]  # the top token in each (layer, pos) cell, in order
    assert figure.axes[0].get_xticklabels()[12].get_text() == f"12 {lens.token_clean.isel(example=0).sel(pos=12).item()}"
    patterns = causal.run(EXPERIMENTS / "attention_heads.cx", config)
    assert [p.name for p in plot_all(patterns, tmp_path / "heads")] == ["patterns.png", "patterns_scores.png"]
    panels = plot(patterns, "patterns")[0].axes
    assert [a.get_title() for a in panels if a.get_visible()][:5] == [
        "layer 0 head 0", "layer 0 head 1", "layer 0 head 2", "layer 0 head 3", "layer 1 head 0"]
    scores = [t.get_text() for t in plot(patterns, "patterns_scores")[0].axes[0].texts]
    assert scores[3] == f"{float(patterns.patterns_scores.mean('example').sel(layer=0, head=1, score='previous_token')):.2f}"
