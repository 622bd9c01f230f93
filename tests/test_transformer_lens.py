"""causal's patching sweeps agree with TransformerLens' `patching` module on the same GPT-2 weights.

TL runs its own copy of the tiny GPT-2 (TransformerBridge, raw HF weights) and its own hooks;
causal runs the equivalent experiment file. Direction is TL's: run the corrupt prompts, patch in
activations from the clean run; metric: log-prob of the `io` answer at the last token.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import patching
from transformers import AutoModelForCausalLM, AutoTokenizer

import causal
from benchmarks.references import answer_logprob, boot_transformer_lens, max_logit_gap, write_causal_experiment
from tests.conftest import VOCAB

TOLERANCE = 1e-4

EXPERIMENT = """metric logprob(io)
patch resid_pre[layer=*, pos=*] from clean into corrupt as resid_pre
patch attn_out[layer=*, pos=*] from clean into corrupt as attn_out
patch mlp_out[layer=*, pos=*] from clean into corrupt as mlp_out
patch z[layer=*, pos=*, head=*] from clean into corrupt as z
patch z[layer=*, head=*, pos=-1] from clean into corrupt as z_last
"""


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Text prompts of 6 tokens; corrupt differs at position 1 and at the last (read) position."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(6):
        clean = torch.randint(1, VOCAB, (6,), generator=gen)
        corrupt = clean.clone()
        shift = torch.randint(1, VOCAB - 1, (2,), generator=gen)  # never a multiple of VOCAB - 1
        corrupt[[1, -1]] = (clean[[1, -1]] - 1 + shift) % (VOCAB - 1) + 1
        answer = int(torch.randint(1, VOCAB, (1,), generator=gen))
        out.append({"clean": words(clean), "corrupt": words(corrupt), "io": f"t{answer}"})
    return out


def words(ids: torch.Tensor) -> str:
    return " ".join(f"t{int(i)}" for i in ids)


@pytest.fixture(scope="module")
def bridge(tiny_models):
    return boot_transformer_lens(tiny_models["gpt2"], "cpu")


@pytest.fixture(scope="module")
def tokens(tiny_models, rows) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    ids = {col: [tokenizer(r[col], add_special_tokens=False)["input_ids"] for r in rows]
           for col in ("clean", "corrupt", "io")}
    return {"clean": torch.tensor(ids["clean"]), "corrupt": torch.tensor(ids["corrupt"]),
            "io": torch.tensor([i[0] for i in ids["io"]])}


@pytest.fixture(scope="module")
def causal_results(tmp_path_factory, tiny_models, rows):
    path = write_causal_experiment(tmp_path_factory.mktemp("tl"), tiny_models["gpt2"], rows, EXPERIMENT)
    return causal.run(path, causal.RunConfig(device="cpu", progress=False, batch_size=64))


@pytest.fixture(scope="module")
def clean_cache(bridge, tokens):
    _, cache = bridge.run_with_cache(tokens["clean"])
    return cache


def ours(results, name: str, *dims: str, pos: int | None = None) -> np.ndarray:
    """A sweep in TL's axis order. `pos=-1` and `pos=*` sweeps share one `pos` coordinate in the
    Dataset (outer join), so pick the positions this sweep has."""
    array = results[name]
    array = array.sel(pos=pos) if pos is not None else array.sel(pos=array.pos[array.pos >= 0])
    return array.transpose(*dims).values


def test_transformer_lens_computes_the_same_function_as_hf(bridge, tiny_models, tokens):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()
    assert max_logit_gap(bridge, model, tokens["clean"]) < TOLERANCE


def test_layer_by_position_sweeps_match_transformer_lens(bridge, tokens, clean_cache, causal_results):
    metric = answer_logprob(tokens["io"])
    sweeps = {"resid_pre": patching.get_act_patch_resid_pre, "attn_out": patching.get_act_patch_attn_out,
              "mlp_out": patching.get_act_patch_mlp_out}
    for name, sweep in sweeps.items():
        theirs = sweep(bridge, tokens["corrupt"], clean_cache, metric, reduce="none").values
        assert_agree(ours(causal_results, name, "layer", "pos", "example"), theirs, causal_results, name)


def test_scalar_metric_matches_causal_mean_over_examples(bridge, tokens, clean_cache, causal_results):
    """TL's default: the metric returns one number per site (here the mean over the batch)."""
    per_example = answer_logprob(tokens["io"])
    theirs = patching.get_act_patch_resid_pre(bridge, tokens["corrupt"], clean_cache,
                                              lambda logits: per_example(logits).mean())
    mean = ours(causal_results, "resid_pre", "layer", "pos", "example").mean(-1)
    assert_agree(mean, theirs, causal_results, "resid_pre (mean over examples)")


def test_per_head_by_position_sweep_matches_transformer_lens(bridge, tokens, clean_cache, causal_results):
    theirs = patching.get_act_patch_attn_head_out_by_pos(
        bridge, tokens["corrupt"], clean_cache, answer_logprob(tokens["io"]), reduce="none").values
    assert_agree(ours(causal_results, "z", "layer", "pos", "head", "example"), theirs, causal_results, "z")


def test_per_head_last_position_matches_generic_patch_on_an_index_df(bridge, tokens, clean_cache,
                                                                     causal_results):
    """The benchmark's per-head sweep: TL's generic machinery restricted to (layer, head) at the last token."""
    n_layers, n_heads, last = bridge.cfg.n_layers, bridge.cfg.n_heads, tokens["corrupt"].shape[1] - 1
    index = pd.DataFrame([(layer, last, head) for layer in range(n_layers) for head in range(n_heads)],
                         columns=["layer", "pos", "head"])
    theirs = patching.generic_activation_patch(
        bridge, tokens["corrupt"], clean_cache, answer_logprob(tokens["io"]),
        patch_setter=patching.layer_pos_head_vector_patch_setter, activation_name="z",
        index_df=index, reduce="none").values.reshape(n_layers, n_heads, -1)
    assert_agree(ours(causal_results, "z_last", "layer", "head", "example", pos=-1), theirs, causal_results,
                 "z at pos -1")


def assert_agree(ours: np.ndarray, theirs: torch.Tensor, results, what: str) -> None:
    """Equal shapes and values within TOLERANCE, on a sweep whose patches move the metric by far more."""
    theirs = theirs.cpu().numpy()
    assert ours.shape == theirs.shape, f"{what}: causal {ours.shape} vs TransformerLens {theirs.shape}"
    gap = np.abs(ours - theirs).max()
    assert gap <= TOLERANCE, f"{what}: causal and TransformerLens differ by {gap:.2e}"
    baseline = results["corrupt"].values
    moved = np.abs(ours - (baseline if ours.shape[-1] == baseline.shape[0] else baseline.mean())).max()
    assert moved > 10 * TOLERANCE, f"{what}: no patch moves the metric (largest change {moved:.2e})"


def test_benchmark_smoke_run_agrees_and_fails_on_disagreement(capsys):
    """benchmarks/sweep.py --quick: all three methods agree; a zero tolerance makes it exit non-zero."""
    from benchmarks import sweep

    small = ["--quick", "--repeats", "1", "--examples", "2", "--tokens", "5", "--device", "cpu"]
    assert sweep.main(small) == 0
    out = capsys.readouterr().out
    assert out.count("agreement") == 6 and "TOO LARGE" not in out and "floor ratio" in out
    assert sweep.main([*small, "--sweeps", "head", "--tolerance", "0"]) == 1


def test_flop_floor_counts_only_the_work_a_patch_changes():
    from benchmarks.sweep import block_flops, flop_ratio, full_forward_flops, site_floor_flops

    layers, heads, d, vocab, tokens = 3, 2, 8, 10, 4
    full = full_forward_flops(layers, d, vocab, tokens)
    one_logit_row = 2 * d * vocab
    shape = (layers, d, vocab, tokens)
    # patching the first position of the first layer redoes the whole trunk, but needs one logit row
    assert site_floor_flops("resid_pre", 0, 0, *shape) == full - (tokens - 1) * one_logit_row
    # the last layer at the last position: one block at one position
    assert site_floor_flops("resid_pre", layers - 1, tokens - 1, *shape) == block_flops(d, tokens - 1) + one_logit_row
    # a head in the last layer: that layer's output projection (2d^2) and MLP (16d^2) at one position
    assert site_floor_flops("head", layers - 1, tokens - 1, *shape) == 18 * d * d + one_logit_row
    naive, floor, ratio = flop_ratio("resid_pre", layers, heads, d, vocab, tokens)
    assert naive == (1 + layers * tokens) * full and 1 < ratio == naive / floor
