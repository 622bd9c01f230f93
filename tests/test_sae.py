"""SAE feature sites against hand-written hooks on the tiny GPT-2: loading, patch, ablate, steer, attribute.

An SAE's features f = relu((x - b_dec) W_enc + b_enc) at its hook point; editing features f -> f' adds
(f' - f) W_dec to the activation (the reconstruction error stays). Tolerance 1e-5 absolute (float32),
as tests/test_methods.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import causal
from causal.errors import CausalError
from causal.models.sae import hook_site, load_sae
from tests.conftest import ids_of, logprob_last, make_rows
from tests.handhooks import capture, gradients, run_with_edits

ATOL = 1e-5
D_MODEL, D_SAE, LAYER = 32, 16, 1


def write_sae(folder: Path, hook: str = f"blocks.{LAYER}.hook_resid_pre", d_in: int = D_MODEL, d_sae: int = D_SAE,
              architecture: str = "standard", drop: str | None = None, tensors: dict | None = None, **cfg) -> Path:
    """A random SAE in SAELens' folder format (seeded)."""
    gen = torch.Generator().manual_seed(3)
    weights = {"W_enc": torch.randn(d_in, d_sae, generator=gen), "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
               "W_dec": torch.randn(d_sae, d_in, generator=gen) * 0.3, "b_dec": torch.randn(d_in, generator=gen) * 0.1}
    if architecture == "jumprelu":
        weights["threshold"] = torch.rand(d_sae, generator=gen)
    weights.update(tensors or {})
    weights.pop(drop, None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, "architecture": architecture,
                                                 "hook_name": hook, "apply_b_dec_to_input": True, **cfg}))
    return folder


def sae_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(folder / "sae_weights.safetensors"))


def encode(w: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])


@pytest.fixture
def gpt2(tiny_gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval(), AutoTokenizer.from_pretrained(tiny_gpt2)


def test_loading_maps_hook_points_and_encodes_like_saelens(tmp_path):
    assert hook_site("blocks.3.hook_resid_pre") == ("resid_pre", 3)
    assert hook_site("blocks.0.attn.hook_z") == ("z", 0)
    assert hook_site("blocks.1.hook_mlp_out") == ("mlp_out", 1)
    assert hook_site("blocks.1.hook_q") is None
    x = torch.randn(2, 5, D_MODEL)
    relu = load_sae(str(write_sae(tmp_path / "relu")))
    w = sae_tensors(tmp_path / "relu")
    torch.testing.assert_close(relu.encode(x), encode(w, x), atol=1e-6, rtol=0)
    torch.testing.assert_close(relu.decode(relu.encode(x)), encode(w, x) @ w["W_dec"] + w["b_dec"], atol=1e-6, rtol=0)
    jump = load_sae(str(write_sae(tmp_path / "jump", architecture="jumprelu")))
    w = sae_tensors(tmp_path / "jump")
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(jump.encode(x), pre.relu() * (pre > w["threshold"]), atol=1e-6, rtol=0)
    topk = load_sae(str(write_sae(tmp_path / "topk", architecture="topk", k=3)))
    got = topk.encode(x)
    assert int((got > 0).sum(-1).max()) <= 3
    kept = pre.topk(3, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, kept), pre.gather(-1, kept).relu(), atol=1e-6, rtol=0)


def test_feature_patch_ablate_and_steer_match_hand_hooks(tmp_path, write_experiment, cpu_config, gpt2, tiny_gpt2):
    model, tok = gpt2
    write_sae(tmp_path / "sae")
    w = sae_tensors(tmp_path / "sae")
    rows = make_rows()
    body = ('metric logprob(io)\n'
            'patch sae("sae")[feature=[2, 5, 11]] from corrupt into clean as patched\n'
            'ablate sae("sae")[feature=0..3, pos=-1] with zero as zeroed\n'
            'ablate sae("sae")[feature=*] with mean over corrupt as meaned\n'
            'steer sae("sae")[feature=[4, 9]] by 3 as steered\n')
    ds = causal.run(write_experiment(body, rows), cpu_config)
    mean = torch.stack([encode(w, capture(model, ids_of(tok, r["corrupt"]), "resid_pre", LAYER))[0] for r in rows]
                       ).mean(0)  # (pos, d_sae): prompts of one length
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        io = tok.convert_tokens_to_ids(row["io"])
        f_clean = encode(w, capture(model, clean, "resid_pre", LAYER))
        f_corrupt = encode(w, capture(model, corrupt, "resid_pre", LAYER))

        def value(change) -> float:
            def edit(act):
                delta = torch.zeros_like(f_clean)
                change(delta)
                act += delta @ w["W_dec"]
            return logprob_last(run_with_edits(model, clean, [("resid_pre", LAYER, edit)]), io)

        for f in (2, 5, 11):
            assert float(ds["patched"].sel(feature=f, example=i)) == pytest.approx(
                value(lambda d: d[..., f].copy_(f_corrupt[..., f] - f_clean[..., f])), abs=ATOL)
        for f in range(4):
            assert float(ds["zeroed"].sel(feature=f, example=i).squeeze("pos")) == pytest.approx(
                value(lambda d: d[:, -1, f].copy_(-f_clean[:, -1, f])), abs=ATOL)
        for f in (0, 7, 15):
            assert float(ds["meaned"].sel(feature=f, example=i)) == pytest.approx(
                value(lambda d: d[0, :, f].copy_(mean[:, f] - f_clean[0, :, f])), abs=ATOL)
        for f in (4, 9):
            assert float(ds["steered"].sel(feature=f, example=i)) == pytest.approx(
                value(lambda d: d[..., f].fill_(3.0)), abs=ATOL)


def test_editing_no_feature_changes_nothing(tmp_path, write_experiment, cpu_config, gpt2):
    """Patching clean into clean, and steering by 0, leave the outputs as they were: the SAE's reconstruction
    error is never written. Bit-exact through the adapter's hook; within 1e-5 through a run (resumed forwards)."""
    model, tok = gpt2
    write_sae(tmp_path / "sae", hook="blocks.0.hook_resid_post")
    body = ('metric logprob(io)\nmetric logit_diff(io, s)\n'
            'patch sae("sae")[feature=*, pos=*] from clean into clean as same\n'
            'steer sae("sae")[feature=[0, 1]] by 0 as zero_steer\n')
    ds = causal.run(write_experiment(body), cpu_config)
    for name, chosen in (("same", range(D_SAE)), ("zero_steer", [0, 1])):
        values = ds[name].sel(feature=list(chosen))
        np.testing.assert_allclose(values.values, ds["clean"].broadcast_like(values).values, atol=ATOL, rtol=0)
    from causal.models import adapter_for
    adapter = adapter_for(model)
    adapter.attach_sae("f", load_sae(str(tmp_path / "sae")))
    ids = ids_of(tok, make_rows()[0]["clean"])
    with torch.no_grad():
        plain = model(ids).logits
        with adapter.hooks({("f", 0): lambda f, start: f.clone()}):
            edited = model(ids).logits
    assert torch.equal(plain, edited)


def test_batched_equals_one_row_per_forward(tmp_path, write_experiment):
    write_sae(tmp_path / "sae", hook="blocks.1.attn.hook_z")
    path = write_experiment('metric logprob(io)\npatch sae("sae")[feature=*, pos=*] from corrupt into clean',
                            make_rows(n=5, ragged=True))
    one = causal.run(path, causal.RunConfig(device="cpu", progress=False, batch_size=1))
    packed = causal.run(path, causal.RunConfig(device="cpu", progress=False, batch_size=1000))
    np.testing.assert_allclose(one["patch_sae"].values, packed["patch_sae"].values, atol=ATOL, rtol=0)
    assert np.isnan(one["patch_sae"].values).any() and np.isfinite(one["patch_sae"].values).any()


def test_attribution_over_features_matches_autograd_and_exact_patching(tmp_path, write_experiment, cpu_config, gpt2):
    model, tok = gpt2
    write_sae(tmp_path / "sae")
    w = sae_tensors(tmp_path / "sae")
    rows = make_rows()
    body = ('metric logprob(io)\nattribute sae("sae")[feature=*] from corrupt into clean verify top 4\n'
            'patch sae("sae")[feature=*] from corrupt into clean')
    ds = causal.run(write_experiment(body, rows), cpu_config)
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        io = tok.convert_tokens_to_ids(row["io"])
        acts, grads = gradients(model, clean, [("resid_pre", LAYER)], lambda lg: lg[0, -1].log_softmax(-1)[io])
        grad = grads[("resid_pre", LAYER)][0] @ w["W_dec"].T  # d metric / d feature, through the decoder
        change = encode(w, capture(model, corrupt, "resid_pre", LAYER))[0] - encode(w, acts[("resid_pre", LAYER)])[0]
        expected = float(ds["clean"][i]) + (change * grad).sum(0)  # per feature, summed over positions
        np.testing.assert_allclose(ds["attribute_sae"].sel(example=i).values, expected.numpy(), atol=ATOL)
    exact = ds["attribute_sae_exact"]
    checked = exact.notnull().all("example")
    assert int(checked.sum()) == 4
    np.testing.assert_allclose(exact.where(checked).values, ds["patch_sae"].where(checked).values, atol=ATOL,
                               equal_nan=True)


@pytest.mark.parametrize("change, message", [
    (dict(d_in=24, tensors={}), "encodes d_in = 24 numbers at blocks.1.hook_resid_pre, but this gpt2 model's "
                                "resid_pre has 32 (d_model): it was trained on another model"),
    (dict(hook="blocks.7.hook_resid_pre"), "reads blocks.7.hook_resid_pre, layer 7, but this gpt2 model has 3 layers"),
    (dict(hook="blocks.1.hook_q"), "was trained on hook point 'blocks.1.hook_q', which causal has no site for"),
    (dict(drop="b_dec"), "sae_weights.safetensors lacks b_dec"),
    (dict(tensors={"W_dec": torch.zeros(D_SAE, D_MODEL + 1)}), "W_dec has shape (16, 33), expected (16, 32)"),
    (dict(architecture="jumprelu", drop="threshold"), "sae_weights.safetensors lacks threshold"),
    (dict(architecture="gated"), "architecture 'gated' with activation 'relu' is not supported"),
    (dict(d_sae=16, tensors={"W_enc": torch.zeros(D_MODEL, 20)}), "cfg.json says d_sae = 16 but W_enc has shape"),
])
def test_bad_saes_are_refused_before_any_forward(tmp_path, write_experiment, no_forward, change, message):
    write_sae(tmp_path / "sae", **change)
    path = write_experiment('metric logprob(io)\npatch sae("sae")[feature=0] from corrupt into clean')
    with pytest.raises(CausalError) as info:
        causal.run(path, causal.RunConfig(device="cpu", progress=False))
    assert message in str(info.value)
    assert f"{path}:5:7" in str(info.value)  # the sae(...) site's span
    assert no_forward == []


def test_bad_feature_references_are_refused(tmp_path, write_experiment, no_forward):
    write_sae(tmp_path / "sae")
    cases = {'patch sae("sae")[feature=16] from corrupt into clean': "feature 16 is out of range: the SAE has 16 "
                                                                       "features (valid: 0..15",
             'patch sae("sae")[layer=1, feature=0] from corrupt into clean': "has no dimension 'layer'",
             'patch sae("nowhere")[feature=0] from corrupt into clean': "SAE folder 'nowhere' not found",
             'patch sae("zoo:nope")[feature=0] from corrupt into clean': "no SAE 'nope' in the zoo",
             'patch sae("tiny")[feature=0] from corrupt into clean': "cfg.json is missing",
             'steer resid_pre[layer=0] by 3': "a steering vector needs at least one mean(column) term"}
    (tmp_path / "tiny").mkdir()
    for statement, message in cases.items():
        path = write_experiment(f"metric logprob(io)\n{statement}")
        with pytest.raises(CausalError) as info:
            causal.run(path, causal.RunConfig(device="cpu", progress=False))
        assert message in str(info.value), statement
    assert no_forward == []
