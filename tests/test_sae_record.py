"""Recording SAE features (issue 15, item 3) against features encoded by hand from a hooked HF forward.

Dense recordings, `top K` per token, firing frequency and max-activating tokens must equal what is
computed from the hand-encoded features (1e-5 absolute, float32); batched, unbatched and resumed runs
give bit-identical summaries (a max and a count do not depend on the order they are merged in).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import causal
from causal import CausalError, RunConfig
from causal.results.inside_plots import feature_activations, feature_figure
from tests.conftest import ids_of, make_rows
from tests.handhooks import capture
from tests.test_sae import D_SAE, LAYER, encode, sae_tensors, write_sae

ATOL = 1e-5
BODY = 'metric logprob(io)\nrecord sae("sae") as dense\nrecord sae("sae")[pos=1..4] top 3 as sparse\n'


def config(**settings) -> RunConfig:
    return RunConfig(**{"device": "cpu", "progress": False, "batch_size": 4, **settings})


@pytest.fixture
def by_hand(tmp_path, tiny_gpt2):
    """(rows, per example the hand-encoded features (length, d_sae)) on ragged prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval(), AutoTokenizer.from_pretrained(tiny_gpt2)
    write_sae(tmp_path / "sae")
    w = sae_tensors(tmp_path / "sae")
    rows = make_rows(n=7, ragged=True)
    features = [encode(w, capture(model, ids_of(tok, r["clean"]), "resid_pre", LAYER))[0] for r in rows]
    return rows, features


def test_recorded_features_equal_hand_encoded_ones(write_experiment, by_hand):
    rows, features = by_hand
    ds = causal.run(write_experiment(BODY, rows), config())
    for i, f in enumerate(features):
        dense = ds["dense"].sel(example=i).transpose("pos", "feature").values
        np.testing.assert_allclose(dense[:len(f)], f.numpy(), atol=ATOL, rtol=0)
        assert np.isnan(dense[len(f):]).all()  # past the prompt's end
        for pos in range(1, 5):
            top = f[pos].topk(3)
            fired = top.values > 0
            assert ds["sparse_top"].sel(example=i, pos=pos).values.tolist() == \
                torch.where(fired, top.indices, -1).tolist()
            np.testing.assert_allclose(ds["sparse_top_activation"].sel(example=i, pos=pos).values,
                                       torch.where(fired, top.values, float("nan")).numpy(), atol=ATOL, rtol=0)
    assert ds["sparse_top"].sizes["top"] == 3 and "sparse" not in ds  # no dense copy under `top K`


def test_frequency_and_max_activating_tokens_equal_hand_counts(write_experiment, by_hand):
    rows, features = by_hand
    ds = causal.run(write_experiment(BODY, rows), config())
    tokens = torch.cat(features)  # (all present tokens, d_sae)
    np.testing.assert_allclose(ds["dense_frequency"].values, (tokens > 0).float().mean(0).numpy(), atol=1e-7)
    where = [(i, p) for i, f in enumerate(features) for p in range(len(f))]
    for feature in range(D_SAE):
        values = tokens[:, feature]
        order = sorted(range(len(values)), key=lambda t: (-float(values[t]), where[t]))
        expected = [t for t in order if values[t] > 0][:ds.sizes["rank"]]
        got = ds["dense_max_activation"].sel(feature=feature).values
        np.testing.assert_allclose(got[:len(expected)], values[expected].numpy(), atol=ATOL, rtol=0)
        assert np.isnan(got[len(expected):]).all()
        located = list(zip(ds["dense_max_example"].sel(feature=feature).values.tolist(),
                           ds["dense_max_pos"].sel(feature=feature).values.tolist()))
        assert located[:len(expected)] == [where[t] for t in expected]
        if expected:  # the text ends with the max-activating token in brackets
            i, p = where[expected[0]]
            assert str(ds["dense_max_text"].sel(feature=feature, rank=0).values).endswith(
                f"[{rows[i]['clean'].split()[p]}]")
    # the summaries of the top-K recording cover its positions only
    present = torch.cat([f[1:5] for f in features])
    np.testing.assert_allclose(ds["sparse_frequency"].values, (present > 0).float().mean(0).numpy(), atol=1e-7)


def test_batched_unbatched_and_resumed_recordings_are_bit_identical(write_experiment, by_hand, tmp_path):
    from causal.app.api import run_keeping_checkpoints
    rows, _ = by_hand
    path = write_experiment(BODY, rows)
    one = causal.run(path, config(batch_size=1))
    packed = causal.run(path, config(batch_size=5))
    chunked = config(batch_size=2, cache_gb=1e-6, checkpoints=str(tmp_path / "ck"))
    whole, store = run_keeping_checkpoints(path, chunked)
    saved = sorted(store.folder.glob("*.safetensors"))
    assert len(saved) > 2
    for file in saved[1::2]:  # every other chunk is run again, the rest restored
        file.unlink()
    resumed = causal.run(path, chunked)
    for name in [v for v in one.data_vars if v.startswith(("dense", "sparse"))]:
        for other in (packed, whole, resumed):
            if one[name].dtype == object:  # the max-activating texts
                assert (one[name].values == other[name].values).all(), name
            else:  # padding changes matmul shapes: 1e-5
                np.testing.assert_allclose(one[name].values, other[name].values, atol=ATOL, rtol=0, err_msg=name)
    for other in (whole, resumed):  # same batches: identical to the bit
        for name in ("dense_max_activation", "dense_max_example", "dense_frequency", "sparse_top"):
            assert whole[name].values.tobytes() == other[name].values.tobytes(), name


def test_the_feature_figure_draws_the_recorded_activations(write_experiment, by_hand):
    rows, features = by_hand
    ds = causal.run(write_experiment(BODY, rows), config())
    for name in ("dense", "sparse"):
        acts = feature_activations(ds, name, example=2)
        shown = feature_figure(ds, name, example=2)
        heat = shown.axes[0].collections[0].get_array().reshape(-1, acts.sizes["pos"])
        chosen = [int(t.get_text().split()[0]) for t in shown.axes[0].get_yticklabels()]
        np.testing.assert_allclose(heat, acts.sel(feature=chosen).values, atol=ATOL)
        strongest = acts.max("pos")
        assert float(strongest.sel(feature=chosen[0])) == pytest.approx(float(strongest.max()))
        labels = [t.get_text() for t in shown.axes[0].get_xticklabels()]
        assert labels[0] == f"{int(acts['pos'][0])} {rows[2]['clean'].split()[int(acts['pos'][0])]}"
    # from the top K alone, a token's cell holds its activation where the feature is among its top 3
    sparse = feature_activations(ds, "sparse", example=2)
    top = ds["sparse_top"].sel(example=2, pos=3).values.astype(int)
    assert sparse.sel(pos=3, feature=top[0]).item() == pytest.approx(features[2][3, top[0]].item(), abs=ATOL)


@pytest.mark.parametrize("body, message, where", [
    ('record resid_post top 3', "top 3 keeps each token's largest SAE features; 'resid_post' is not", "5:19"),
    ('record sae("sae") top 17', "top 17: choose 1..16 features", "5:19"),
    ('record sae("sae")[feature=[1, 2]] top 3', "top 3: choose 1..2 features", "5:35"),
    ('record sae("sae")[layer=0]', "has no dimension 'layer'", "5:19"),
])
def test_feature_recording_mistakes_are_refused_before_compute(write_experiment, no_forward, tmp_path, body,
                                                               message, where):
    write_sae(tmp_path / "sae")
    path = write_experiment("metric logprob(io)\n" + body)
    with pytest.raises(CausalError) as info:
        causal.run(path, config())
    assert message in str(info.value) and f"exp.cx:{where}" in str(info.value)
    assert not no_forward


def test_a_dense_recording_too_large_is_pointed_at_top_k(write_experiment, no_forward, tmp_path):
    write_sae(tmp_path / "sae")
    path = write_experiment('metric logprob(io)\nrecord sae("sae") as f')
    with pytest.raises(CausalError) as info:
        causal.run(path, config(record_memory_gb=1e-6))
    assert "`top K`" in str(info.value) and "record_store=<folder>" in str(info.value)
    path = write_experiment('metric logprob(io)\nrecord sae("sae") top 2 as f')
    with pytest.raises(CausalError) as info:  # top K is kept in memory: no store to fall back on
        causal.run(path, config(record_memory_gb=1e-7, record_store=str(tmp_path / "store")))
    assert "(1008 bytes)" in str(info.value) and "record_store" not in str(info.value)
    assert not no_forward
