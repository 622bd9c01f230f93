"""The zoo's facts-gpt2 knows its facts, and ROME's causal tracing (experiments/factual_tracing.cx)
shows where it recalls them.

Three kinds of checks: the model stores facts by subject (held-out paraphrases, plain HF
forward); the tracing results have the structure they must have for any causal model; and
what tracing finds about this model, stated as relations between effects, not as numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import causal
from causal.zoo import zoo_path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "factual_tracing.cx"
FACTS = ROOT / "experiments" / "data" / "facts_counterfact.json"
WORLD = ROOT / "experiments" / "data" / "facts_toy_world.jsonl"
SAMPLES = 3  # noise samples per example (the file's default is 10); 21 examples x 3 draws average enough


def config(**params) -> causal.RunConfig:
    return causal.RunConfig(device="cpu", progress=False, params=params)


@pytest.fixture(scope="module")
def traced():
    """(the prepared experiment, its results), run as shipped but with fewer noise samples."""
    return causal.prepare(EXPERIMENT, config(samples=SAMPLES)), causal.run(EXPERIMENT, config(samples=SAMPLES))


@pytest.fixture(scope="module")
def hf():
    folder = zoo_path("facts-gpt2")
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def top1_accuracy(model, tokenizer, prompts: list[str], answers: list[str]) -> float:
    """Share of prompts whose most likely next token is the answer (right padding, read at each last token)."""
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[torch.arange(len(rows)), lengths - 1]
    targets = torch.tensor([tokenizer(" " + a, add_special_tokens=False)["input_ids"][0] for a in answers])
    return float((logits.argmax(-1) == targets).float().mean())


def test_tokenizer_keeps_subjects_whole_words_and_answers_single_tokens(hf):
    _, tokenizer = hf
    assert tokenizer("Danielle Darrieux")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.tokenize("The mother tongue of Danielle Darrieux is") == [
        "The", "mother", "tongue", "of", "Danielle", "Darrieux", "is"]
    for record in json.loads(FACTS.read_text()):
        assert len(tokenizer(" " + record["requested_rewrite"]["target_true"]["str"],
                             add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.unk_token_id not in tokenizer(" ".join(
        json.loads(line)["paraphrase_prompts"][0] for line in WORLD.read_text().splitlines()))["input_ids"]


def test_model_stores_facts_by_subject(hf):
    """Right on the prompts it was trained on, and on paraphrases held out for every fact."""
    model, tokenizer = hf
    world = [json.loads(line) for line in WORLD.read_text().splitlines()]
    assert len(world) > 500 and len({r["requested_rewrite"]["subject"] for r in world}) > 250
    answers = [r["requested_rewrite"]["target_true"]["str"] for r in world]
    heldout = [r["paraphrase_prompts"][0] for r in world]
    assert all(h not in r["train_prompts"] for h, r in zip(heldout, world))
    real = json.loads(FACTS.read_text())
    real_prompts = [r["requested_rewrite"]["prompt"].replace("{}", r["requested_rewrite"]["subject"]) for r in real]
    assert top1_accuracy(model, tokenizer, real_prompts, answers[: len(real)]) == 1.0
    assert top1_accuracy(model, tokenizer, heldout, answers) > 0.85
    # Chance is far lower: the most common answer of each relation, guessed for all its facts.
    by_relation: dict[str, list[str]] = {}
    for record, answer in zip(world, answers):
        by_relation.setdefault(record["requested_rewrite"]["relation_id"], []).append(answer)
    majority = sum(max(a.count(x) for x in set(a)) for a in by_relation.values()) / len(world)
    assert majority < 0.4


@pytest.mark.slow
def test_model_knows_the_traced_facts_and_noise_hides_them(traced):
    _, ds = traced
    clean, noised = ds["clean"].values, ds["states_noised"].values
    assert (clean > 0.8).all()
    assert noised.mean() < 0.5 * clean.mean()
    assert (noised < clean).mean() > 0.9


def test_tracing_has_the_structure_it_must_have(tmp_path, traced):
    """True of any causal model: restoring the whole clean input, or the state the metric reads,
    gives the clean probability; restoring a token before the subject (never noised, and unable
    to see the subject) changes nothing."""
    experiment, ds = traced
    head = (f'model "zoo:facts-gpt2"\ndata counterfact(path="{FACTS}")\n'
            "positions { SUBJ = span(subject) }\nmetric prob(target) at -1\ntrace noise(3 sigma, samples=2) on SUBJ ")
    whole = run_text(tmp_path / "whole.cx", head + "restore resid_pre[layer=0, pos=SUBJ]")
    every = run_text(tmp_path / "every.cx", head + "restore resid_post[layer=*, pos=*] as states")
    clean = every["clean"].values
    np.testing.assert_allclose(whole["trace_resid_pre"].squeeze().values, clean, atol=1e-5)
    lengths = experiment.prompts["clean"].lengths.numpy()
    last_layer = every["states"].isel(layer=-1)
    np.testing.assert_allclose([float(last_layer.sel(pos=n - 1, example=i)) for i, n in enumerate(lengths)],
                               clean, atol=1e-5)
    np.testing.assert_allclose(ds["states"].isel(layer=-1).sel(pos="END").values, ds["clean"].values, atol=1e-5)
    noised = every["states_noised"].values
    first_subject = [s[0] for s in experiment.positions.indices["SUBJ"]]
    assert max(first_subject) > 1, "some prompt has words before its subject"
    for i, first in enumerate(first_subject):
        before = every["states"].sel(example=i).isel(pos=slice(0, first)).values  # (layer, pos)
        np.testing.assert_allclose(before, noised[i], atol=1e-6)


def run_text(path: Path, text: str):
    path.write_text(text + "\n")
    return causal.run(path, config())


def role_means(ds, name: str, examples=None):
    """(role, layer) table of the mean restored probability over `examples` (all by default)."""
    values = ds[name] if examples is None else ds[name].isel(example=examples)
    return values.mean("example").transpose("pos", "layer").to_pandas()


def test_the_last_subject_token_early_and_the_last_token_late(traced):
    """ROME's two sites, in this 6-layer toy: restoring the subject's states helps most in the first
    layer and then fades (the subject has been read by then), the last subject token more than the
    first; the last token's state helps more the later the layer."""
    experiment, ds = traced
    states, noised = role_means(ds, "states"), float(ds["states_noised"].mean())
    last = states.columns[-1]
    assert states.loc["LAST_SUBJ", 0] - noised > 0.25
    assert states.loc["LAST_SUBJ", 0] > states.loc["LAST_SUBJ", 2] > states.loc["LAST_SUBJ", last]
    assert states.loc["LAST_SUBJ", last] - noised < 0.05
    assert states.loc["END", 0] < states.loc["END", 2] < states.loc["END", 4] < states.loc["END", last]
    assert states.loc["END", 4] > states.loc["LAST_SUBJ", 0]
    two_words = np.flatnonzero([len(s) > 1 for s in experiment.positions.indices["SUBJ"]])
    assert len(two_words) >= 8
    multi = role_means(ds, "states", two_words)
    assert multi.loc["LAST_SUBJ", 0] - multi.loc["FIRST_SUBJ", 0] > 0.1


def test_subject_mlps_in_the_first_layers_and_attention_at_the_last_token(traced):
    """MLP outputs matter at the subject's tokens in the first layers, not at the last token; the
    attention that matters is the last token's (reading the subject), not the subject tokens'."""
    _, ds = traced
    mlp, attn, noised = role_means(ds, "mlp"), role_means(ds, "attn"), float(ds["mlp_noised"].mean())
    early_subject_mlp = mlp.loc["LAST_SUBJ", [0, 1]].max()
    assert early_subject_mlp - noised > 0.2
    assert early_subject_mlp > 2 * (mlp.loc[["END", "AFTER_SUBJ"]].values.max() - noised) + noised
    assert (mlp.loc[["FIRST_SUBJ", "LAST_SUBJ"], 3:].values - noised < 0.05).all(), "later subject MLPs do little"
    end_attention = attn.loc["END"].max()
    assert end_attention - noised > 0.2
    assert end_attention > 2 * (attn.loc[["FIRST_SUBJ", "LAST_SUBJ"]].values.max() - noised) + noised


def test_severing_the_subject_mlps_removes_the_early_effect(traced):
    """ROME's severed traces: a subject embedding restored with that token's MLPs kept noised
    loses most of its effect, so its own MLPs (the first, from the MLP traces) do the recall;
    once past layer 0 severing barely matters. Severing attention costs less than severing MLPs."""
    _, ds = traced
    noised = float(ds["inputs_noised"].mean())
    gain = {name: role_means(ds, name).loc["LAST_SUBJ"] - noised for name in ("inputs", "severed_mlp", "severed_attn")}
    assert gain["inputs"][0] > 0.3
    assert gain["severed_mlp"][0] < 0.6 * gain["inputs"][0]
    assert gain["severed_mlp"][1] > 0.8 * gain["inputs"][1]
    assert gain["severed_attn"][0] > gain["severed_mlp"][0]
