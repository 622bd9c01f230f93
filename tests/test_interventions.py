"""Every intervention path against a hand-written hook computation on a tiny random GPT-2.

Tolerance: 1e-5 absolute on log-probs (float32; batch composition changes summation order).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import causal
from tests.conftest import ids_of, logprob_last, make_rows
from tests.handhooks import capture, run_with_replacement

ATOL = 1e-5
SITES = ["resid_pre", "attn_out", "mlp_out", "z"]
D_HEAD = 8



def select(site: str, pos: int, head: int | None):
    """An in-place editor that writes `src` into the (pos, head) slice of a site's activation."""
    def slicer(act):
        if site == "z":
            return act[:, pos, head * D_HEAD:(head + 1) * D_HEAD]
        return act[:, pos]
    return slicer


@pytest.mark.parametrize("site", SITES)
def test_patch_matches_hand_hooks(site, arch, write_experiment, cpu_config):
    _, folder, model, tok = arch
    rows = make_rows()
    selector = "layer=1, pos=1, head=2" if site == "z" else "layer=1, pos=1"
    path = write_experiment(f"metric logprob(io)\npatch {site}[{selector}] from corrupt into clean", rows, folder)
    ds = causal.run(path, cpu_config)
    got = ds[f"patch_{site}"].squeeze(["layer", "pos"] + (["head"] if site == "z" else [])).values
    slicer = select(site, 1, 2)
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        source = capture(model, corrupt, site, 1)

        def edit(act):
            slicer(act)[...] = slicer(source)
        logits = run_with_replacement(model, clean, site, 1, edit)
        assert got[i] == pytest.approx(logprob_last(logits, tok.convert_tokens_to_ids(row["io"])), abs=ATOL)


@pytest.mark.parametrize("method", ["zero", "mean"])
@pytest.mark.parametrize("site", ["attn_out", "z"])
def test_ablation_matches_hand_hooks(site, method, arch, write_experiment, cpu_config):
    _, folder, model, tok = arch
    rows = make_rows()  # equal lengths, so the positional mean is over every example
    selector = "layer=2, pos=-1, head=1" if site == "z" else "layer=2, pos=-1"
    path = write_experiment(f"metric logprob(io)\nablate {site}[{selector}] with {method}", rows, folder)
    got = causal.run(path, cpu_config)[f"ablate_{site}"].values.reshape(-1)
    slicer = select(site, -1, 1)
    acts = torch.cat([capture(model, ids_of(tok, r["clean"]), site, 2) for r in rows])
    mean = acts.mean(0, keepdim=True)
    for i, row in enumerate(rows):
        def edit(act):
            slicer(act)[...] = 0.0 if method == "zero" else slicer(mean)
        logits = run_with_replacement(model, ids_of(tok, row["clean"]), site, 2, edit)
        assert got[i] == pytest.approx(logprob_last(logits, tok.convert_tokens_to_ids(row["io"])), abs=ATOL)


def test_logit_diff_and_baselines_match_plain_forward(arch, write_experiment, cpu_config):
    _, folder, model, tok = arch
    rows = make_rows()
    path = write_experiment("metric logit_diff(io, s)\nmetric prob(io) at -1\n"
                            "patch mlp_out[layer=0] from corrupt into clean", rows, folder)
    ds = causal.run(path, cpu_config)
    for i, row in enumerate(rows):
        with torch.no_grad():
            last = model(ids_of(tok, row["corrupt"])).logits[0, -1]
        io, s = tok.convert_tokens_to_ids(row["io"]), tok.convert_tokens_to_ids(row["s"])
        assert ds["corrupt"].sel(example=i, metric="logit_diff(io, s)") == pytest.approx((last[io] - last[s]).item(), abs=ATOL)
        assert ds["corrupt"].sel(example=i, metric="prob(io)") == pytest.approx(last.softmax(-1)[io].item(), abs=ATOL)


@pytest.mark.parametrize("site", SITES)
def test_patch_clean_into_clean_changes_nothing(site, arch, write_experiment, cpu_config):
    dims = "layer=*, pos=*, head=*" if site == "z" else "layer=*, pos=*"
    path = write_experiment(f"metric logprob(io)\nmetric logit_diff(io, s)\npatch {site}[{dims}] from clean into clean",
                            model=arch[1])
    ds = causal.run(path, cpu_config)
    patched = ds[f"patch_{site}"]
    baseline = ds["clean"].broadcast_like(patched)
    np.testing.assert_allclose(patched.values, baseline.values, atol=ATOL, rtol=0)


def test_batched_plan_equals_one_row_per_forward(arch, write_experiment):
    """Ragged prompts, a full layer x position sweep: NaN exactly where a prompt has no such position."""
    path = write_experiment("metric logprob(io)\npatch resid_pre[layer=*, pos=*] from corrupt into clean\n"
                            "ablate z[layer=0..1, head=[0, 3]] with mean",
                            make_rows(n=7, ragged=True), arch[1])
    one = causal.run(path, causal.RunConfig(device="cpu", progress=False, batch_size=1))
    packed = causal.run(path, causal.RunConfig(device="cpu", progress=False, batch_size=1000))
    for name in ("patch_resid_pre", "ablate_z", "clean", "corrupt"):
        np.testing.assert_allclose(one[name].values, packed[name].values, atol=ATOL, rtol=0)
    lengths = np.array([len(r["clean"].split()) for r in make_rows(n=7, ragged=True)])
    missing = np.isnan(packed["patch_resid_pre"].isel(layer=0).values)  # (pos, example)
    np.testing.assert_array_equal(missing, np.arange(missing.shape[0])[:, None] >= lengths[None, :])


def test_patching_every_position_of_resid_pre_at_layer0_recovers_source(arch, write_experiment, cpu_config):
    """Patching all positions of the first residual stream must reproduce the source run exactly."""
    path = write_experiment("metric logprob(io)\npatch resid_pre[layer=0] from corrupt into clean", model=arch[1])
    ds = causal.run(path, cpu_config)
    np.testing.assert_allclose(ds["patch_resid_pre"].squeeze("layer").values, ds["corrupt"].values, atol=ATOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_follow_float32(dtype, write_experiment):
    """Asked-for half precision: the same sweep, every value finite and near the float32 one."""
    path = write_experiment("metric logprob(io)\npatch resid_pre[layer=*, pos=*] from corrupt into clean\n"
                            "ablate z[layer=*, head=*] with mean\nattribute mlp_out[layer=*] from corrupt into clean")
    full = causal.run(path, causal.RunConfig(device="cpu", progress=False))
    half = causal.run(path, causal.RunConfig(device="cpu", progress=False, dtype=dtype))
    assert half.attrs["dtype"] == dtype
    for name in ("patch_resid_pre", "ablate_z", "attribute_mlp_out", "clean"):
        assert np.isfinite(half[name].values).all()
        np.testing.assert_allclose(half[name].values, full[name].values, atol=0.1)
