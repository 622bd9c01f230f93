"""generate: tokens equal HF `generate` with no intervention; under steer, ablate and patch statements they
equal a hand-written hook loop that recomputes the whole sequence each step (no KV cache, so it also checks
the cache path); batched equals unbatched; seeded sampling draws again what it drew; the Dataset, the saved
file and the run summary hold the texts; bad input is refused before any forward. Token ids compare exactly.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import causal
from causal.errors import CausalError
from causal.app.hydra_app import summary
from causal.results.plot import plot_all
from tests.conftest import ids_of, make_rows
from tests.handhooks import capture, run_with_edits

ROOT = Path(__file__).resolve().parents[1]
N = 6
D_HEAD = 8
STEER = "steer resid_pre[layer=1] by 12 * (mean(clean) - mean(corrupt at -1))"


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """HF's own greedy generate, exactly n tokens (the end-of-text token does not stop it)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.pad_token_id = None, 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, max_new_tokens=n,
                         do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def hand_loop(model, ids: torch.Tensor, n: int, edits_at, temperature=None, generator=None) -> list[int]:
    """Greedy (or sampled) tokens where every step reruns the whole sequence with `edits_at(length)`."""
    sequence = ids
    for _ in range(n):
        logits = run_with_edits(model, sequence, edits_at(sequence.shape[1]))[0, -1]
        if temperature is None:
            token = logits.argmax()
        else:
            token = torch.multinomial((logits.double() / temperature).softmax(-1), 1, generator=generator)[0]
        sequence = torch.cat([sequence, token.view(1, 1)], 1)
    return sequence[0, ids.shape[1]:].tolist()


def row_generator(seed: int, example: int) -> torch.Generator:
    """The documented draw: each example's own generator, seeded by (seed, example)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, example]).generate_state(1)[0]))


def test_no_intervention_equals_hf_generate(arch, write_experiment, cpu_config):
    _, folder, model, tok = arch
    rows = make_rows(5, ragged=True)  # prompts of 5, 6 and 7 tokens
    ds = causal.run(write_experiment(f"metric logprob(io)\ngenerate {N} as g", rows, folder), cpu_config)
    assert ds.g_tokens.dims == ("example", "new_token")
    for i, row in enumerate(rows):
        expected = hf_greedy(model, ids_of(tok, row["clean"]), N)
        assert ds.g_tokens.values[i].tolist() == expected
        assert ds.g.values[i] == tok.decode(expected)


def test_zoo_toy_equals_hf_generate_and_continues_the_repeat(tmp_path, cpu_config):
    from transformers import AutoModelForCausalLM
    from causal.zoo import zoo_path
    path = tmp_path / "toy.cx"
    path.write_text('model "zoo:attn-only-2l"\ndata induction(n=4, length=8)\nmetric logprob(next)\n'
                    "generate 8 as g\n")
    experiment = causal.prepare(path, cpu_config)
    ds = causal.run(path, cpu_config)
    model = AutoModelForCausalLM.from_pretrained(zoo_path("attn-only-2l")).eval()
    prompts = experiment.prompts["clean"]
    for i in range(4):
        ids = prompts.ids[i:i + 1, :int(prompts.lengths[i])]
        assert ds.g_tokens.values[i].tolist() == hf_greedy(model, ids, 8)
        assert ds.g_tokens.values[i].tolist() == ids[0, 1:9].tolist()  # induction: the repeat goes on


def unrelated_sources(rows: list[dict]) -> list[dict]:
    """Rows whose corrupt prompt is another random prompt of the same length: one changed token moves no greedy
    token of the tiny random model, so a patch from it would test nothing."""
    others = make_rows(len(rows), seed=7)
    return [{**row, "corrupt": other["clean"]} for row, other in zip(rows, others)]


def _steer_vector(model, tok, rows):
    clean = torch.cat([capture(model, ids_of(tok, r["clean"]), "resid_pre", 1) for r in rows]).mean((0, 1))
    corrupt = torch.cat([capture(model, ids_of(tok, r["corrupt"]), "resid_pre", 1)[:, -1] for r in rows]).mean(0)
    return 12 * (clean - corrupt)


def _cases(model, tok, rows, example):
    """(statements, generate options, the hand edits per sequence length) for each way a write can act."""
    vector = _steer_vector(model, tok, rows)
    prompt = ids_of(tok, rows[example]["clean"])
    length = prompt.shape[1]
    corrupt = capture(model, ids_of(tok, rows[example]["corrupt"]), "resid_pre", 1)

    def steer_all(act):
        act += vector

    def steer_prompt(act):
        act[:, :length] += vector

    def steer_last(act):
        act[:, length - 1] += vector

    def zero_head(act):
        act[..., 3 * D_HEAD:4 * D_HEAD] = 0  # layer 0 head 3: the one whose knockout changes a greedy text here

    def patch_prompt(act):
        act[:, :length] = corrupt[:, :length]

    def patch_last(act):
        act[:, length - 1] = corrupt[:, length - 1]

    return {
        "steer every position": (f"{STEER} as x", "", lambda n: [("resid_pre", 1, steer_all)]),
        "steer, prompt only": (f"{STEER} as x", "prompt only", lambda n: [("resid_pre", 1, steer_prompt)]),
        "steer the last prompt token": (STEER.replace("[layer=1]", "[layer=1, pos=-1]") + " as x", "",
                                        lambda n: [("resid_pre", 1, steer_last)]),
        "zero one head": ("ablate z[layer=0, head=3] with zero as x", "", lambda n: [("z", 0, zero_head)]),
        "patch the prompt": ("patch resid_pre[layer=1] from corrupt into clean as x", "prompt only",
                             lambda n: [("resid_pre", 1, patch_prompt)]),
        "patch the last prompt token": ("patch resid_pre[layer=1, pos=-1] from corrupt into clean as x", "",
                                        lambda n: [("resid_pre", 1, patch_last)]),
    }


@pytest.mark.parametrize("case", ["steer every position", "steer, prompt only", "steer the last prompt token",
                                  "zero one head", "patch the prompt",
                                  "patch the last prompt token"])
@pytest.mark.slow
def test_generation_under_an_intervention_equals_a_hand_written_hook_loop(case, tiny_models, write_experiment):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = tiny_models["gpt2"]
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    rows = unrelated_sources(make_rows(4))
    statement, options, _ = _cases(model, tok, rows, 0)[case]
    path = write_experiment(f"metric logprob(io)\n{statement}\ngenerate {N} under x {options} as g", rows, folder)
    ds = causal.run(path, causal.RunConfig(device="cpu", progress=False, batch_size=3))
    one_by_one = causal.run(path, causal.RunConfig(device="cpu", progress=False, batch_size=1))
    got = ds.g_x_tokens.values.reshape(len(rows), N)
    np.testing.assert_array_equal(got, one_by_one.g_x_tokens.values.reshape(len(rows), N))  # batched = unbatched
    for i, row in enumerate(rows):
        edits = _cases(model, tok, rows, i)[case][2]
        assert got[i].tolist() == hand_loop(model, ids_of(tok, row["clean"]), N, edits), f"example {i}"
    assert (got != ds.g_tokens.values).any(), "the intervention changed no token: the test would prove nothing"
    assert ds.g_x.attrs["writes_new_tokens"] == int(case in ("steer every position", "zero one head"))


def test_a_sweep_generates_per_point(write_experiment, cpu_config, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = tiny_models["gpt2"]
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    rows = make_rows(3)
    path = write_experiment("metric logprob(io)\nablate z[layer=1, head=*] with zero as a\ngenerate 4 under a as g",
                            rows, folder)
    ds = causal.run(path, cpu_config)
    assert ds.g_a.dims == ("layer", "head", "example") and ds.g_a_tokens.shape == (1, 4, 3, 4)
    for head in range(4):
        def zero(act, head=head):
            act[..., head * D_HEAD:(head + 1) * D_HEAD] = 0
        expected = hand_loop(model, ids_of(tok, rows[1]["clean"]), 4, lambda n: [("z", 1, zero)])
        assert ds.g_a_tokens.sel(layer=1, head=head, example=1).values.tolist() == expected


def test_seeded_sampling_draws_again_and_follows_the_temperature(arch, write_experiment):
    _, folder, model, tok = arch
    rows = make_rows(4)

    def run(seed: int, batch_size: int):
        path = write_experiment(f"metric logprob(io)\ngenerate {N} sample temperature 2.5 seed {seed} as g", rows,
                                folder)
        return causal.run(path, causal.RunConfig(device="cpu", progress=False, batch_size=batch_size))

    first, again, other = run(3, 4).g_tokens.values, run(3, 1).g_tokens.values, run(4, 4).g_tokens.values
    np.testing.assert_array_equal(first, again)  # the same draw, whatever the batch
    assert (first != other).any()
    for i, row in enumerate(rows):
        expected = hand_loop(model, ids_of(tok, row["clean"]), N, lambda n: [], 2.5, row_generator(3, i))
        assert first[i].tolist() == expected


def test_saved_results_and_the_summary_hold_the_texts(write_experiment, cpu_config, tmp_path):
    path = write_experiment(f"metric logprob(io)\n{STEER} as x\ngenerate {N} under x as g")
    ds = causal.run(path, cpu_config)
    back = causal.load(causal.save(ds, tmp_path / "results.nc"))
    assert (back.g_x == ds.g_x).all() and (back.g_x_tokens == ds.g_x_tokens).all()
    assert back.g_x.attrs["kind"] == "generation" and back.g_x.attrs["under_statement"].startswith("steer")
    text = summary(ds, tmp_path / "results.nc", [])
    assert f"g (no intervention), example 0: {str(ds.g.values[0])!r}" in text
    assert f"g_x (under x, layer=1), example 0: {str(ds.g_x.values[0, 0])!r}" in text
    assert [p.name for p in plot_all(ds, tmp_path / "plots")] == ["x.png"]  # texts are not plotted


def test_the_shipped_experiment_shows_steering_and_ablation_change_the_text(cpu_config):
    path = ROOT / "experiments" / "generate_induction.cx"
    ds = causal.run(path, cpu_config)
    prompts = causal.prepare(path, cpu_config).prompts["clean"]
    repeat = ds.continued_tokens.values
    assert (repeat == prompts.ids[:, 1:9].numpy()).all()  # unchanged, the toy continues the repeat
    knocked = ds.continued_knockout_tokens.sel(layer=1)
    changed = (knocked != repeat).sum(["example", "new_token"])
    strongest = int(ds.knockout.mean("example").sel(layer=1).argmin())  # the head whose knockout hurts most
    assert int(changed.sel(head=strongest)) >= repeat.size // 4 and int(changed.min()) < int(changed.max())
    assert (ds.continued_push_tokens.values != repeat).any()
    text = summary(ds, Path("results.nc"), [])
    assert "continued (no intervention), example 0:" in text and "continued_knockout" in text


BAD = {
    "generate 60 as g": ("needs 67 positions, more than the 64 the model was built for", "new_tokens"),
    "generate 5 sample temperature 0.8 as g": ("sampling needs a seed", "sample"),
    "generate 5 sample temperature 0 seed 1 as g": ("the temperature must be positive", "sample"),
    "generate 0 as g": ("generate needs at least 1 new token, got 0", "new_tokens"),
    "param k = -2\ngenerate k as g": ("generate needs at least 1 new token, got -2", "new_tokens"),
    f"{STEER} as s1\ngenerate 5 under s2 as g": ("no statement named 's2' to generate under", "under"),
    f"{STEER} on corrupt as x\ngenerate 5 under x as g": ("runs on the 'corrupt' prompts", "under"),
    "patch resid_pre[layer=1] from corrupt into clean as p\ngenerate 5 under p as g":
        ("exist at the prompt's positions only", "under"),
    "ablate z[layer=1] with mean as m\ngenerate 5 under m as g": ("exist at the prompt's positions only", "under"),
    "trace noise(3) on 1 restore resid_pre[layer=0] as t\ngenerate 5 under t as g":
        ("is not one set of writes in a forward pass", "under"),
    "path z[layer=0, head=0] -> logits from corrupt into clean as q\ngenerate 5 under q as g":
        ("is not one set of writes in a forward pass", "under"),
    "ablate pattern[layer=0] with zero as z0\ngenerate 5 under z0 as g": ("writes attention patterns", "under"),
    f"{STEER} as x\ngenerate 5 under x, x as g": ("'x' is named twice after 'under'", "under"),
    "generate 5 under g as g": ("no statement named 'g'", "under"),
}


@pytest.mark.parametrize("body", list(BAD), ids=lambda b: BAD[b][0][:40])
def test_bad_generation_is_refused_before_any_forward(body, write_experiment, cpu_config, no_forward):
    message, where = BAD[body]
    path = write_experiment(f"metric logprob(io)\n{body}")
    with pytest.raises(CausalError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        causal.run(path, cpu_config)
    assert error.value.span is not None and error.value.span.line == 5 + body.count("\n")
    assert not no_forward


def test_an_unknown_label_suggests_the_nearest(write_experiment, cpu_config):
    path = write_experiment(f"metric logprob(io)\n{STEER} as steer1\ngenerate 5 under steer2 as g")
    with pytest.raises(CausalError) as error:
        causal.prepare(path, cpu_config)
    assert "steer1" in str(error.value) and error.value.span.column == len("generate 5 under ") + 1


def test_shards_merge_into_the_unsharded_texts(cpu_config):
    from dataclasses import replace
    path = ROOT / "experiments" / "generate_induction.cx"
    whole = causal.run(path, cpu_config)
    parts = [causal.run(path, replace(cpu_config, shard=f"{i}/2", overrides=[f"shard={i}/2"])) for i in range(2)]
    merged = causal.merge_runs(parts)
    for name in ("continued", "continued_tokens", "continued_knockout", "continued_knockout_tokens",
                 "continued_push_tokens"):
        np.testing.assert_array_equal(merged[name].values, whole[name].values)
