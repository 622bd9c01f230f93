"""Each intervention kind against a hand-written hook computation on the HF modules.

Steering, resample and reference-mean ablation, '+'-joined patches, layer windows,
normalization, kl/rank/accuracy, path patching and attribution patching. Tolerance: 1e-5
absolute on log-probs and logit differences (float32).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import causal
from causal.methods.statistics import derangement, standard_noise
from causal.resolve.sweeps import rome_window
from tests.conftest import ids_of, logprob_last, make_rows
from tests.handhooks import capture, gradients, run_with_edits

ATOL = 1e-5
D_HEAD = 8


def head_slice(head: int) -> slice:
    return slice(head * D_HEAD, (head + 1) * D_HEAD)


def answer(tok, text: str) -> int:
    return tok.convert_tokens_to_ids(text)


def test_steering_adds_a_difference_of_means(arch, write_experiment, cpu_config):
    _, folder, model, tok = arch
    rows = make_rows()
    path = write_experiment("metric logprob(io)\n"
                            "steer resid_pre[layer=1] by 2 * (mean(clean) - mean(corrupt at -1))", rows, folder)
    got = causal.run(path, cpu_config)["steer_resid_pre"].values.reshape(-1)
    clean_acts = torch.cat([capture(model, ids_of(tok, r["clean"]), "resid_pre", 1) for r in rows])
    corrupt_last = torch.cat([capture(model, ids_of(tok, r["corrupt"]), "resid_pre", 1)[:, -1] for r in rows])
    vector = 2 * (clean_acts.mean((0, 1)) - corrupt_last.mean(0))
    for i, row in enumerate(rows):
        def edit(act):
            act += vector
        logits = run_with_edits(model, ids_of(tok, row["clean"]), [("resid_pre", 1, edit)])
        assert got[i] == pytest.approx(logprob_last(logits, answer(tok, row["io"])), abs=ATOL)


def test_resample_ablation_takes_a_deranged_example(arch, write_experiment):
    _, folder, model, tok = arch
    rows = make_rows()
    path = write_experiment("metric logprob(io)\nablate z[layer=2, head=1] with resample", rows, folder)
    got = causal.run(path, causal.RunConfig(device="cpu", progress=False, seed=5))["ablate_z"].values.reshape(-1)
    donors = derangement(len(rows), 5)
    assert not (donors == torch.arange(len(rows))).any()
    for i, row in enumerate(rows):
        donor = capture(model, ids_of(tok, rows[int(donors[i])]["clean"]), "z", 2)

        def edit(act):
            act[..., head_slice(1)] = donor[..., head_slice(1)]
        logits = run_with_edits(model, ids_of(tok, row["clean"]), [("z", 2, edit)])
        assert got[i] == pytest.approx(logprob_last(logits, answer(tok, row["io"])), abs=ATOL)


def test_mean_ablation_over_a_reference_column(arch, write_experiment, cpu_config):
    _, folder, model, tok = arch
    rows = make_rows()
    path = write_experiment("metric logprob(io)\nablate attn_out[layer=1, pos=-1] with mean over corrupt",
                            rows, folder)
    got = causal.run(path, cpu_config)["ablate_attn_out"].values.reshape(-1)
    mean = torch.cat([capture(model, ids_of(tok, r["corrupt"]), "attn_out", 1) for r in rows]).mean(0)
    for i, row in enumerate(rows):
        def edit(act):
            act[:, -1] = mean[-1]
        logits = run_with_edits(model, ids_of(tok, row["clean"]), [("attn_out", 1, edit)])
        assert got[i] == pytest.approx(logprob_last(logits, answer(tok, row["io"])), abs=ATOL)


def test_joined_sites_are_patched_in_the_same_pass(arch, write_experiment, cpu_config):
    _, folder, model, tok = arch
    rows = make_rows()
    path = write_experiment("metric logprob(io)\n"
                            "patch z[layer=1, head=0] + mlp_out[layer=2, pos=2] from corrupt into clean as pair",
                            rows, folder)
    ds = causal.run(path, cpu_config)
    assert ds["pair"].dims == ("head", "pos", "example")  # single values stay as length-1 axes; layer differs
    pair = ds["pair"].squeeze(["head", "pos"])
    for i, row in enumerate(rows):
        corrupt = ids_of(tok, row["corrupt"])
        z, mlp = capture(model, corrupt, "z", 1), capture(model, corrupt, "mlp_out", 2)

        def edit_z(act):
            act[..., head_slice(0)] = z[..., head_slice(0)]

        def edit_mlp(act):
            act[:, 2] = mlp[:, 2]
        logits = run_with_edits(model, ids_of(tok, row["clean"]), [("z", 1, edit_z), ("mlp_out", 2, edit_mlp)])
        assert float(pair[i]) == pytest.approx(logprob_last(logits, answer(tok, row["io"])), abs=ATOL)


def test_layer_window_patches_the_rome_window(arch, write_experiment, cpu_config):
    _, folder, model, tok = arch
    rows = make_rows(n=3)
    path = write_experiment("metric logprob(io)\npatch mlp_out[layer=* window 2] from corrupt into clean", rows, folder)
    got = causal.run(path, cpu_config)["patch_mlp_out"]
    assert [rome_window(layer, 2, 3) for layer in range(3)] == [(0,), (0, 1), (1, 2)]
    for layer in range(3):
        for i, row in enumerate(rows):
            corrupt = ids_of(tok, row["corrupt"])
            edits = []
            for l in rome_window(layer, 2, 3):
                source = capture(model, corrupt, "mlp_out", l)
                edits.append(("mlp_out", l, lambda act, s=source: act.copy_(s)))
            logits = run_with_edits(model, ids_of(tok, row["clean"]), edits)
            expected = logprob_last(logits, answer(tok, row["io"]))
            assert float(got.sel(layer=layer, example=i)) == pytest.approx(expected, abs=ATOL)


def test_kl_rank_accuracy_and_normalized_logit_diff(arch, write_experiment, cpu_config):
    _, folder, model, tok = arch
    rows = make_rows()
    body = ("metric kl(clean)\nmetric rank(io)\nmetric accuracy(io)\nmetric logit_diff(io, s)\n"
            "metric logit_diff(io, s) normalized\npatch resid_pre[layer=1, pos=1] from corrupt into clean")
    ds = causal.run(write_experiment(body, rows, folder), cpu_config)
    patched = ds["patch_resid_pre"].squeeze(["layer", "pos"])
    raw = "logit_diff(io, s)"
    gap = float((ds["clean"].sel(metric=raw) - ds["corrupt"].sel(metric=raw)).mean())
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        source = capture(model, corrupt, "resid_pre", 1)
        logits = run_with_edits(model, clean, [("resid_pre", 1, lambda act: act[:, 1].copy_(source[:, 1]))])[0, -1]
        with torch.no_grad():
            reference = model(clean).logits[0, -1]
        kl = (reference.softmax(-1) * (reference.log_softmax(-1) - logits.log_softmax(-1))).sum()
        io, s = answer(tok, row["io"]), answer(tok, row["s"])
        value = patched.sel(example=i)
        assert float(value.sel(metric="kl(clean)")) == pytest.approx(float(kl), abs=ATOL)
        assert float(value.sel(metric="rank(io)")) == int((logits > logits[io]).sum())
        assert float(value.sel(metric="accuracy(io)")) == float(logits.argmax() == io)
        diff = float(logits[io] - logits[s])
        assert float(value.sel(metric=raw)) == pytest.approx(diff, abs=ATOL)
        corrupt_diff = float(ds["corrupt"].sel(metric=raw, example=i))
        assert float(value.sel(metric=raw + " normalized")) == pytest.approx((diff - corrupt_diff) / gap, rel=1e-4)
    normalized = ds["clean"].sel(metric=raw + " normalized")
    assert float(normalized.mean()) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(ds["corrupt"].sel(metric=raw + " normalized"), 0.0)


@pytest.mark.parametrize("freezing", ["", " freezing mlp"])
def test_path_patching_to_logits(arch, write_experiment, cpu_config, freezing):
    """Sender head from corrupt; every other head frozen at its clean value (and the MLPs, if asked)."""
    _, folder, model, tok = arch
    rows = make_rows(n=4)
    path = write_experiment(f"metric logprob(io)\npath z[layer=0, head=1] -> logits from corrupt into clean{freezing}",
                            rows, folder)
    got = causal.run(path, cpu_config)["path_z"].values.reshape(-1)
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        frozen = {l: capture(model, clean, "z", l) for l in range(3)}
        sender = capture(model, corrupt, "z", 0)
        edits = [("z", l, lambda act, v=frozen[l]: act.copy_(v)) for l in range(1, 3)]
        edits.append(("z", 0, lambda act: act[..., head_slice(1)].copy_(sender[..., head_slice(1)])))
        if freezing:
            mlps = {l: capture(model, clean, "mlp_out", l) for l in range(3)}
            edits += [("mlp_out", l, lambda act, v=mlps[l]: act.copy_(v)) for l in range(3)]
        logits = run_with_edits(model, clean, edits)
        assert got[i] == pytest.approx(logprob_last(logits, answer(tok, row["io"])), abs=ATOL)


def test_path_patching_direct_path_only_differs_from_plain_patching(write_experiment, cpu_config, tiny_gpt2):
    """With the MLPs frozen too, only the sender's direct contribution to the logits remains."""
    body = ("metric logprob(io)\npath z[layer=0, head=*] -> logits from corrupt into clean freezing mlp\n"
            "patch z[layer=0, head=*] from corrupt into clean")
    ds = causal.run(write_experiment(body), cpu_config)
    assert not np.allclose(ds["path_z"].values, ds["patch_z"].values, atol=1e-4)


def test_attribution_matches_autograd_and_exact_check_matches_patching(arch, write_experiment, cpu_config):
    _, folder, model, tok = arch
    rows = make_rows()
    body = ("metric logprob(io)\nattribute resid_pre[layer=*, pos=*] from corrupt into clean verify top 3\n"
            "patch resid_pre[layer=*, pos=*] from corrupt into clean")
    ds = causal.run(write_experiment(body, rows, folder), cpu_config)
    estimate = ds["attribute_resid_pre"].transpose("layer", "pos", "example").values
    keys = [("resid_pre", l) for l in range(3)]
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        io = answer(tok, row["io"])
        acts, grads = gradients(model, clean, keys, lambda logits: logits[0, -1].log_softmax(-1)[io])
        base = float(ds["clean"][i])
        for layer in range(3):
            source = capture(model, corrupt, "resid_pre", layer)
            first_order = ((source - acts[("resid_pre", layer)]) * grads[("resid_pre", layer)]).sum(-1)[0]
            np.testing.assert_allclose(estimate[layer, :, i], base + first_order.numpy(), atol=ATOL)
    exact = ds["attribute_resid_pre_exact"]
    checked = exact.notnull().all("example")
    assert int(checked.sum()) == 3
    effect = (ds["attribute_resid_pre"] - ds["clean"]).mean("example")
    top = np.argsort(-np.abs(effect.values.reshape(-1)))[:3]
    assert sorted(np.flatnonzero(checked.values.reshape(-1))) == sorted(top)
    np.testing.assert_allclose(exact.where(checked).values, ds["patch_resid_pre"].where(checked).values,
                               atol=ATOL, equal_nan=True)
    assert -1 <= ds["attribute_resid_pre"].attrs["exact_correlation"] <= 1


def subject_rows(n: int = 4) -> list[dict]:
    rows = make_rows(n=n)
    for row in rows:
        row["subject"] = " ".join(row["clean"].split()[1:3])  # two tokens, positions 1 and 2
    return rows


@pytest.mark.parametrize("severing", ["", " severing mlp"])
def test_causal_tracing_matches_rome_by_hand(arch, write_experiment, cpu_config, severing):
    """Noise 3 x std(subject embeddings) on the subject, restore one clean state, average over samples."""
    _, folder, model, tok = arch
    rows, samples = subject_rows(), 3
    body = ("positions { SUBJ = span(subject) }\nmetric prob(io)\n"
            f"trace noise(3 sigma, samples={samples}, seed=7) on SUBJ restore resid_post[layer=*, pos=*]{severing}")
    ds = causal.run(write_experiment(body, rows, folder), cpu_config)
    embeds = [capture(model, ids_of(tok, r["clean"]), "embed", 0)[0] for r in rows]
    sigma = 3 * float(torch.cat([e[1:3] for e in embeds]).std())
    for i, row in enumerate(rows):
        clean = ids_of(tok, row["clean"])
        io = answer(tok, row["io"])
        noise = standard_noise(7, i, (samples, clean.shape[1], embeds[0].shape[-1])) * sigma

        def noised(s):
            return ("embed", 0, lambda act: act[:, 1:3].add_(noise[s, 1:3]))
        base = np.mean([run_with_edits(model, clean, [noised(s)])[0, -1].softmax(-1)[io].item() for s in range(samples)])
        assert float(ds["trace_resid_post_noised"][i]) == pytest.approx(base, abs=ATOL)
        for layer, pos in [(0, 1), (1, 2), (2, 0), (2, clean.shape[1] - 1)]:
            restored = capture(model, clean, "resid_post", layer)
            probs = []
            for s in range(samples):
                edits = [noised(s), ("resid_post", layer, lambda act: act[:, pos].copy_(restored[:, pos]))]
                if severing:
                    frozen = {l: _capture_with(model, clean, "mlp_out", l, [noised(s)]) for l in range(3)}
                    edits += [("mlp_out", l, lambda act, v=frozen[l]: act[:, pos].copy_(v[:, pos])) for l in range(3)]
                probs.append(run_with_edits(model, clean, edits)[0, -1].softmax(-1)[io].item())
            got = float(ds["trace_resid_post"].sel(layer=layer, pos=pos, example=i))
            assert got == pytest.approx(np.mean(probs), abs=ATOL)


def _capture_with(model, ids, site, layer, edits):
    """A site's activation in a forward that already carries `edits`."""
    store = {}
    run_with_edits(model, ids, [*edits, (site, layer, lambda act: store.__setitem__("act", act.clone()))])
    return store["act"]


def test_path_patching_into_receiver_queries(write_experiment, cpu_config, tiny_gpt2):
    """Phase A: sender from corrupt, other heads frozen, record receiver queries; phase B: patch only them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval(), AutoTokenizer.from_pretrained(tiny_gpt2)
    rows = make_rows(n=4)
    body = "metric logprob(io)\npath z[layer=0, head=2] -> q[layer=2, head=[1, 3]] from corrupt into clean"
    got = causal.run(write_experiment(body, rows), cpu_config)["path_z"].values.reshape(-1)
    d_model = 32
    queries = model.transformer.h[2].attn.c_attn  # output: [q | k | v], each d_model wide, heads of 8
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        frozen = {l: capture(model, clean, "z", l) for l in range(3)}
        sender = capture(model, corrupt, "z", 0)
        edits = [("z", l, lambda act, v=frozen[l]: act.copy_(v)) for l in (1, 2)]
        edits.append(("z", 0, lambda act: act[..., head_slice(2)].copy_(sender[..., head_slice(2)])))
        recorded = {}
        handle = queries.register_forward_hook(lambda m, a, out: recorded.__setitem__("q", out[..., :d_model].clone()))
        run_with_edits(model, clean, edits)
        handle.remove()

        def patch_queries(m, a, out):
            out = out.clone()
            for head in (1, 3):
                out[..., head_slice(head)] = recorded["q"][..., head_slice(head)]
            return out
        handle = queries.register_forward_hook(patch_queries)
        with torch.no_grad():
            logits = model(clean).logits
        handle.remove()
        assert got[i] == pytest.approx(logprob_last(logits, answer(tok, row["io"])), abs=ATOL)


@pytest.mark.parametrize("site", ["q", "k"])
def test_atp_star_query_key_fix_uses_the_exact_pattern_change(write_experiment, cpu_config, tiny_models, site):
    """AtP*: estimate = base + sum (pattern after the real q/k patch - pattern) * dM/dpattern."""
    from causal.models import load_model
    rows = make_rows(n=3)
    layer, pos = 1, 2
    head_dim = "kv_head" if site == "k" else "head"
    body = f"metric logprob(io)\nattribute {site}[layer={layer}, {head_dim}=*, pos={pos}] from corrupt into clean"
    ds = causal.run(write_experiment(body, rows, tiny_models["gpt2"]), cpu_config)
    assert ds[f"attribute_{site}"].attrs["qk_fix_layers"] == [layer]
    loaded = load_model(str(tiny_models["gpt2"]), device="cpu")
    adapter, tok = loaded.adapter, loaded.tokenizer
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        io = answer(tok, row["io"])
        source = _adapter_read(loaded, corrupt, (site, layer))
        kept = {}

        def keep(act, start):
            act = act.clone()
            act.retain_grad()
            kept["p"] = act
            return act
        loaded.model.requires_grad_(False)
        embed = loaded.model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.detach().requires_grad_())
        with adapter.hooks({("pattern", layer): keep}):
            loaded.model(clean).logits[0, -1].log_softmax(-1)[io].backward()
        embed.remove()
        pattern, grad = kept["p"].detach(), kept["p"].grad
        for head in range(4):
            def patched(act, start, head=head):
                act = act.clone()
                act[:, pos, head] = source[:, pos, head]
                return act
            new = _adapter_read(loaded, clean, ("pattern", layer), {(site, layer): patched})
            expected = float(ds["clean"][i]) + float(((new - pattern) * grad).sum())
            got = float(ds[f"attribute_{site}"].sel({head_dim: head, "example": i}).squeeze())
            assert got == pytest.approx(expected, abs=ATOL)


def _adapter_read(loaded, ids, key, edits=None):
    store = {}
    hooks = dict(edits or {})
    previous = hooks.get(key)

    def read(act, start):
        act = previous(act, start) if previous else act
        store["act"] = act.detach().clone()
        return act
    hooks[key] = read
    with torch.no_grad(), loaded.adapter.hooks(hooks):
        loaded.model(ids)
    return store["act"]
