"""record and lens against hand-written hooks on the HF modules, the on-disk store, and their errors.

Tolerances: recorded activations 1e-6 absolute (the same float32 forward); the logit lens at the
last layer against the model's own log-probs 1e-5; batched against unbatched recordings 1e-5
(padding changes the matmul shapes, hence the summation order).
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM

import causal
from causal import CausalError, RunConfig
from causal.app.api import plan_run, prepare
from causal.app.check import describe
from causal.methods.record import head_scores
from causal.zoo import zoo_path
from tests.conftest import ids_of, make_rows
from tests.handhooks import _hook, capture

ATOL = 1e-6


def config(**settings) -> RunConfig:
    return RunConfig(**{"device": "cpu", "progress": False, "batch_size": 4, **settings})


def test_recorded_sites_equal_hand_hooks(arch, write_experiment):
    """Every layer's residual, attention and MLP outputs and per-head z, ragged prompts (NaN past the end)."""
    _, folder, model, tok = arch
    rows = make_rows(ragged=True)
    path = write_experiment("metric logprob(io)\nrecord resid_post as post\nrecord resid_pre[layer=0..1, pos=-1] as "
                            "pre\nrecord attn_out[layer=2, pos=[0, 2]] as attn\nrecord mlp_out[layer=1] as mlp\n"
                            "record z[layer=*, head=2] as z", rows, folder)
    ds = causal.run(path, config())
    assert ds["post"].dims == ("layer", "pos", "example", "d_model")
    assert ds["z"].dims == ("layer", "pos", "head", "example", "d_head")
    for i, row in enumerate(rows):
        ids = ids_of(tok, row["clean"])
        n = ids.shape[1]
        for layer in range(3):
            want = capture(model, ids, "resid_post", layer)[0]
            got = ds["post"].sel(layer=layer, example=i).values  # over the union of positions, -1 first
            np.testing.assert_allclose(ds["post"].sel(layer=layer, example=i, pos=list(range(n))).values, want,
                                       atol=ATOL)
            assert np.isnan(ds["post"].sel(layer=layer, example=i, pos=list(range(n, 7))).values).all()
            assert got.shape[0] == ds.sizes["pos"]
            z = capture(model, ids, "z", layer)[0].view(n, 4, 8)[:, 2]
            np.testing.assert_allclose(ds["z"].sel(layer=layer, example=i, head=2, pos=list(range(n))).values, z,
                                       atol=ATOL)
        for layer in range(2):
            np.testing.assert_allclose(ds["pre"].sel(layer=layer, example=i, pos=-1).values,
                                       capture(model, ids, "resid_pre", layer)[0, -1], atol=ATOL)
        np.testing.assert_allclose(ds["attn"].sel(layer=2, example=i, pos=[0, 2]).values,
                                   capture(model, ids, "attn_out", 2)[0, [0, 2]], atol=ATOL)
        np.testing.assert_allclose(ds["mlp"].sel(layer=1, example=i, pos=list(range(n))).values,
                                   capture(model, ids, "mlp_out", 1)[0], atol=ATOL)
    assert ds["post"].attrs["kind"] == "recording" and "metric" not in ds["post"].attrs


def test_patterns_equal_the_models_attentions_and_neurons_their_hook(write_experiment, tiny_gpt2):
    rows = make_rows(ragged=True)
    ds = causal.run(write_experiment("metric logprob(io)\nrecord pattern[layer=*] as pat\n"
                                     "record neuron[layer=1, pos=-1, neuron=0..9] as neurons", rows), config())
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, attn_implementation="eager").eval()
    tok = causal.prepare(write_experiment("metric logprob(io)\nrecord pattern as p", rows), config()).model.tokenizer
    for i, row in enumerate(rows):
        ids = ids_of(tok, row["clean"])
        n = ids.shape[1]
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions
        for layer in range(3):
            got = ds["pat"].sel(layer=layer, example=i, pos=list(range(7))).transpose("head", "pos", "key_pos").values
            np.testing.assert_allclose(got[:, :n, :n], attentions[layer][0], atol=ATOL)
            assert np.isnan(got[:, n:]).all() and np.isnan(got[:, :, n:]).all()
        hidden = capture_input(model, ids, model.transformer.h[1].mlp.c_proj)
        np.testing.assert_allclose(ds["neurons"].sel(example=i, layer=1, pos=-1).values, hidden[0, -1, :10], atol=ATOL)
    assert ds["neurons"].dims == ("layer", "pos", "neuron", "example")


def capture_input(model, ids, module) -> torch.Tensor:
    kept = {}
    handle = module.register_forward_pre_hook(lambda m, args: kept.__setitem__("x", args[0].clone()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return kept["x"]


def test_batched_equals_unbatched_and_recording_changes_nothing(write_experiment):
    rows = make_rows(n=7, ragged=True)
    body = "metric logprob(io)\npatch resid_pre[layer=1] from corrupt into clean"
    plain = causal.run(write_experiment(body, rows), config(batch_size=1))
    recorded = causal.run(write_experiment(body + "\nrecord resid_mid as mid\nrecord q[layer=2] as q", rows),
                          config(batch_size=1))
    batched = causal.run(write_experiment(body + "\nrecord resid_mid as mid\nrecord q[layer=2] as q", rows),
                         config(batch_size=7))
    for name in ("clean", "corrupt", "patch_resid_pre"):  # the other numbers are exactly those of a run without it
        same = recorded[name].sel({d: plain[name][d] for d in plain[name].dims if d in plain[name].coords})
        np.testing.assert_array_equal(same.values, plain[name].values)
    for name in ("mid", "q"):
        np.testing.assert_allclose(recorded[name].values, batched[name].values, atol=1e-5, equal_nan=True)


def test_a_recording_under_a_patch_equals_the_patched_forward(arch, write_experiment):
    _, folder, model, tok = arch
    rows = make_rows()
    path = write_experiment("metric logprob(io)\npatch resid_pre[layer=1, pos=1] from corrupt into clean as p\n"
                            "record resid_post[layer=*] under p as patched\nrecord resid_post[layer=*] as plain",
                            rows, folder)
    ds = causal.run(path, config())
    for i, row in enumerate(rows):
        clean, corrupt = ids_of(tok, row["clean"]), ids_of(tok, row["corrupt"])
        source = capture(model, corrupt, "resid_pre", 1)
        kept = {}

        def patch(act):
            act = act.clone()
            act[:, 1] = source[:, 1]
            return act
        with ExitStack() as stack, torch.no_grad():
            stack.callback(_hook(model, "resid_pre", 1, patch).remove)
            for layer in range(3):
                stack.callback(_hook(model, "resid_post", layer,
                                     lambda t, layer=layer: kept.__setitem__(layer, t.clone())).remove)
            model(clean)
        for layer in range(3):
            np.testing.assert_allclose(ds["patched"].sel(layer=layer, example=i, pos=list(range(clean.shape[1]))).values,
                                       kept[layer][0], atol=ATOL)
        assert not np.allclose(ds["patched"].sel(layer=2, example=i).values, ds["plain"].sel(layer=2, example=i).values)
    assert ds["patched"].attrs["under"] == "p"


def test_logit_lens_at_the_last_layer_is_the_models_output(arch, write_experiment):
    _, folder, model, tok = arch
    rows = make_rows()
    path = write_experiment("metric logprob(io)\nmetric logprob(next) at 1..3\nlens resid_post[layer=-1, pos=*] top 4 "
                            "as lens\nlens resid_pre[layer=0, pos=-1] as early", rows, folder)
    ds = causal.run(path, config())
    assert list(ds["answer"].values) == ["io", "next"] and ds["lens_top"].dims == ("layer", "pos", "example", "top")
    for i, row in enumerate(rows):
        ids = ids_of(tok, row["clean"])
        with torch.no_grad():
            logprobs = model(ids).logits[0].log_softmax(-1)
        n = ids.shape[1]
        io = tok.convert_tokens_to_ids(row["io"])
        got = ds["lens"].sel(layer=2, example=i)
        np.testing.assert_allclose(got.sel(answer="io", pos=list(range(n))).values, logprobs[:, io], atol=1e-5)
        following = logprobs[torch.arange(n - 1), ids[0, 1:]]
        np.testing.assert_allclose(got.sel(answer="next", pos=list(range(n - 1))).values, following, atol=1e-5)
        assert np.isnan(got.sel(answer="next", pos=n - 1).values)
        top = logprobs.topk(4, -1)
        np.testing.assert_allclose(ds["lens_top_logprob"].sel(layer=2, example=i, pos=list(range(n)), top=[0, 1, 2, 3]).values,
                                   top.values, atol=1e-5)
        assert ds["lens_top"].sel(layer=2, example=i, pos=0, top=0).item() == tok.decode([int(top.indices[0, 0])])
        rank = (logprobs[:, None, :] > logprobs[:, io, None, None]).sum(-1)[:, 0]
        np.testing.assert_array_equal(ds["lens_rank"].sel(layer=2, example=i, answer="io", pos=list(range(n))).values,
                                      rank.numpy())
    assert ds["lens"].attrs["kind"] == "logit_lens" and ds["early"].dims == ("layer", "pos", "example", "answer")


def test_attention_scores_find_the_toy_models_circuit(tmp_path):
    """zoo:attn-only-2l: head 0.1 attends to the previous token, heads 1.2 and 1.3 do induction."""
    path = tmp_path / "heads.cx"
    path.write_text('experiment heads\nmodel "zoo:attn-only-2l"\ndata induction(n=16, length=10, seed=0)\n'
                    'metric logprob(next) at 11..19\nrecord pattern[layer=*] as pattern\n')
    ds = causal.run(path, config(batch_size=16))
    scores = ds["pattern_scores"].mean("example")
    previous, induction = scores.sel(score="previous_token"), scores.sel(score="induction")
    assert int(previous.sel(layer=0).values.argmax()) == 1 and float(previous.sel(layer=0, head=1)) > 0.9
    assert (induction.sel(layer=1, head=[2, 3]) > 0.8).all() and (induction.sel(layer=0) < 0.2).all()
    # the recorded pattern is the model's own, and the scores follow their definition, checked by loops
    model = AutoModelForCausalLM.from_pretrained(zoo_path("attn-only-2l"), attn_implementation="eager").eval()
    ids = torch.tensor([[int(t[1:]) for t in ds["prompt_clean"].values[0].split()]])
    with torch.no_grad():
        attention = model(ids, output_attentions=True).attentions[1][0]  # (head, q, k)
    np.testing.assert_allclose(ds["pattern"].sel(layer=1, example=0).transpose("head", "pos", "key_pos").values,
                               attention, atol=ATOL)
    tokens = ids[0].tolist()
    for head in range(4):
        targets = [(i, [k for k in range(1, i + 1) if tokens[k - 1] == tokens[i]]) for i in range(1, len(tokens))]
        by_loop = np.mean([float(attention[head, i, ks].sum()) for i, ks in targets if ks])
        assert float(ds["pattern_scores"].sel(layer=1, example=0, head=head, score="induction")) == \
            pytest.approx(by_loop, abs=1e-6)
        assert float(ds["pattern_scores"].sel(layer=1, example=0, head=head, score="bos")) == \
            pytest.approx(float(attention[head, 1:, 0].mean()), abs=1e-6)


def test_head_scores_of_a_textbook_pattern():
    """One head that attends to the previous token, one to the token after an earlier copy, one to BOS."""
    ids = torch.tensor([[0, 5, 6, 7, 5, 6, 7]])
    n = ids.shape[1]
    pattern = torch.zeros(1, n, 1, 3, n)
    for i in range(n):
        pattern[0, i, 0, 0, max(i - 1, 0)] = 1
        pattern[0, i, 0, 1, i - 2 if i >= 4 else 0] = 1  # token i repeats i - 3; the token after it is i - 2
        pattern[0, i, 0, 2, 0] = 1
    scores = head_scores(pattern, ids, torch.tensor([n]))[0, 0]
    # query 1's previous token is BOS, and the induction head looks at BOS before the copy starts (queries 1-3)
    np.testing.assert_allclose(scores[:, 0], [1, 1 / 6, 1 / 6], atol=1e-6)  # previous_token, per head
    np.testing.assert_allclose(scores[:, 1], [0, 1, 0], atol=1e-6)  # induction, over queries 4-6
    np.testing.assert_allclose(scores[:, 2], [1 / 6, 3 / 6, 1], atol=1e-6)  # bos


# ------------------------------------------------------------------------------ the on-disk store

def test_a_large_recording_goes_to_a_store_that_loads_lazily_and_resumes(write_experiment, tmp_path, monkeypatch):
    rows = make_rows(n=9, ragged=True)
    path = write_experiment("metric logprob(io)\nrecord resid_post[layer=*, pos=*] as acts", rows)
    memory = causal.run(path, config())
    store = tmp_path / "store"
    stored = causal.run(path, config(record_memory_gb=0, record_store=str(store)))
    assert stored["acts"].attrs["kind"] == "recording_store" and stored["acts"].values.tolist() == [1.0] * 9
    saved = causal.save(stored, tmp_path / "run" / "results.nc")
    loaded = causal.load(saved.parent)
    assert loaded["acts"].attrs["kind"] == "recording" and loaded["acts"].variable._in_memory is False
    xr.testing.assert_allclose(loaded["acts"].load().transpose(*memory["acts"].dims),
                               memory["acts"].drop_vars("token_clean"))
    # a run that stopped half-way: only the examples not yet written are run again
    import netCDF4
    file = next(store.glob("*.nc"))
    with netCDF4.Dataset(file, "a") as nc:
        nc["recorded"][4:] = 0
        nc["acts"][:, :, 4:] = 0.0
    from causal.engine.forward import Runner
    rows_run = []
    forward = Runner.forward
    monkeypatch.setattr(Runner, "forward", lambda self, ids, *a, **k: rows_run.append(len(ids)) or forward(self, ids, *a, **k))
    causal.run(path, config(record_memory_gb=0, record_store=str(store)))
    assert rows_run == [4, 4, 1, 4, 1]  # the clean baseline, then the batches with examples not yet written
    loaded = causal.load(saved.parent)
    xr.testing.assert_allclose(loaded["acts"].load().transpose(*memory["acts"].dims),
                               memory["acts"].drop_vars("token_clean"))


def test_check_says_how_many_bytes_a_recording_takes(write_experiment):
    path = write_experiment("metric logprob(io)\nrecord resid_post[layer=*, pos=-1] as acts")
    experiment = prepare(path, config())
    text = describe(experiment, plan_run(experiment, config()))
    assert "records 2.2 KiB (2304 bytes; 3 points x 6 examples x d_model 32, float32) in memory" in text


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("body, message, where", [  # the body starts on line 5 of the file
    ("record resid_post[layer=*, pos=*] as acts", "records 15.8 KiB (16128 bytes), more than record_memory_gb=1e-05",
     "5:1"),
    ("record resid_post[layer=*, pos=9]", "position 9 is outside the prompt", "5:32"),
    ("record resid_psot[layer=0]", "unknown site 'resid_psot'", "5:8"),
    ("record resid_post[layer=3]", "layer 3 is out of range", "5:25"),
    ("record resid_post[layer=0 window 2]", "record takes no layer window", "5:19"),
    ("record resid_post + attn_out", "record takes one site", "5:21"),
    ("record resid_post under p", "no statement is labelled 'p'", "5:25"),
    ("patch resid_pre[layer=*] from corrupt into clean as p\nrecord resid_post under p",
     "'record resid_post under p' under 'p': it sweeps 3 points", "6:1"),
    ("record resid_post on corrupt under p\nablate mlp_out[layer=0] with zero as p",
     "runs on that statement's 'clean' prompts, not 'corrupt'", "5:22"),
    ("path z[layer=0, head=0] -> logits from corrupt into clean as p\nlens resid_post under p",
     "its forwards are not one plain pass with writes", "6:1"),
    ("lens z[layer=0]", "site 'z' cannot be used here", "5:6"),
    ("lens resid_post top 0", "top 0: choose 1..64 tokens", "5:17"),
])
def test_mistakes_are_refused_before_compute(write_experiment, no_forward, body, message, where):
    path = write_experiment("metric logprob(io)\n" + body)
    with pytest.raises(CausalError) as info:
        causal.run(path, config(record_memory_gb=1e-5))
    assert message in str(info.value) and f"exp.cx:{where}" in str(info.value)
    assert not no_forward


def test_the_memory_refusal_names_the_store_setting(write_experiment, no_forward):
    path = write_experiment("metric logprob(io)\nrecord resid_post as acts")
    with pytest.raises(CausalError) as info:
        causal.run(path, config(record_memory_gb=0))
    assert "record_store=<folder>" in str(info.value)
    with pytest.raises(CausalError, match="record_memory_gb=-1 must be a finite number"):
        causal.run(path, config(record_memory_gb=-1))


def test_named_positions_must_be_one_token(write_experiment, no_forward):
    rows = [dict(r, subject=" ".join(r["clean"].split()[1:3])) for r in make_rows()]
    path = write_experiment("positions { SUBJ = span(subject) }\nmetric logprob(io)\nrecord resid_post[pos=SUBJ]",
                            rows)
    with pytest.raises(CausalError, match="'SUBJ' covers 2 tokens in example 0"):
        causal.run(path, config())
