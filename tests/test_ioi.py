"""The shipped IOI experiments find the toy model's IOI circuit.

The zoo's `ioi-2l` (scripts/train_ioi_toy.py) must first have learned the task. Which
heads are name movers and which are S-inhibition heads is then decided here from the
model's attention patterns alone (plain HF forward, eager attention, names located by
their tokens), and the tests check that the patching experiments single out those heads:

- name movers: heads that, at the final position, attend to the IO name and not to its
  first-clause partner S1 (they copy IO into the logits);
- S-inhibition heads: heads that, at the final position, attend to S2 (the repeated name),
  so the name movers know which name to avoid.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import causal
from causal.results.summary import normalized_effect
from causal.tasks import ioi
from causal.tasks.ioi import NAMES, single_token_names
from causal.zoo import zoo_path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
MODEL = zoo_path("ioi-2l")
N = 40  # examples per experiment run: enough for stable means, small enough for a fast test


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


def final_logits(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Next-token logits at each prompt's last token (right padding: a causal model's real tokens never see it)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    last = batch.attention_mask.sum(1) - 1
    with torch.no_grad():
        logits = model(batch.input_ids).logits
    return logits[torch.arange(len(prompts)), last]


def answer_id(tokenizer, name: str) -> int:
    (token,) = tokenizer(name, add_special_tokens=False)["input_ids"]
    return token


def test_tokenizer_keeps_every_ioi_name_one_token(tokenizer):
    """The word-level vocabulary covers the generator's whole name list, as single ' Name' tokens."""
    assert single_token_names(tokenizer) == NAMES
    text = "Then, Mary and John went to the store. John gave a drink to"
    tokens = tokenizer.tokenize(text)
    assert tokenizer.unk_token not in tokens and tokenizer.convert_tokens_to_string(tokens) == text
    assert tokens[2] == "ĠMary" and tokens.count("ĠJohn") == 2


def test_model_learned_the_task(model, tokenizer):
    """Held-out prompts (a seed training never drew: training seeds start at 1000).

    A model that cannot tell which name is repeated can at best copy both first-clause
    names: about 50% accuracy and a mean logit difference near 0, in each template family.
    We ask for near-perfect accuracy in both families (a positional shortcut would fail one
    of them) and a mean logit difference of at least 3.5, GPT-2 small's (Wang et al. 2022).
    """
    data = ioi(tokenizer, n=200, seed=7).columns
    logits = final_logits(model, tokenizer, data["clean"])
    io = torch.tensor([answer_id(tokenizer, name) for name in data["io"]])
    s = torch.tensor([answer_id(tokenizer, name) for name in data["s"]])
    rows = torch.arange(len(io))
    correct = (logits.argmax(-1) == io).numpy()
    families = np.array(data["template"])
    for family in ("ABBA", "BABA"):
        assert correct[families == family].mean() >= 0.95, family
    assert float((logits[rows, io] - logits[rows, s]).mean()) >= 3.5


def test_training_record_matches_the_shipped_weights(model, tokenizer):
    """training.json's held-out numbers are reproducible from the weights it ships with."""
    record = json.loads((MODEL / "training.json").read_text())["heldout"]
    data = ioi(tokenizer, n=record["n"], seed=record["seed"]).columns
    logits = final_logits(model, tokenizer, data["clean"])
    io = torch.tensor([answer_id(tokenizer, name) for name in data["io"]])
    s = torch.tensor([answer_id(tokenizer, name) for name in data["s"]])
    rows = torch.arange(len(io))
    assert float((logits.argmax(-1) == io).float().mean()) == pytest.approx(record["accuracy"], abs=1e-3)
    assert float((logits[rows, io] - logits[rows, s]).mean()) == pytest.approx(record["logit_diff_mean"], abs=1e-2)


def run_experiment(name: str):
    config = causal.RunConfig(device="cpu", progress=False, params={"n": N})
    experiment = causal.prepare(EXPERIMENTS / name, config)
    return experiment, causal.run_prepared(experiment, config)


@pytest.fixture(scope="module")
def patching():
    return run_experiment("ioi.cx")


@pytest.fixture(scope="module")
def paths():
    return run_experiment("ioi_path.cx")[1]


@pytest.fixture(scope="module")
def roles(patching, model, tokenizer):
    """(layer, head) mean attention from the final position to IO, S1 and S2, on the experiment's prompts."""
    columns = patching[0].examples.columns
    scores = {"IO": [], "S1": [], "S2": []}
    for prompt, io, s in zip(columns["clean"], columns["io"], columns["s"]):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        tokens = tokenizer.convert_ids_to_tokens(ids[0])
        io_token, s_token = tokenizer.tokenize(io)[0], tokenizer.tokenize(s)[0]
        where = {"IO": tokens.index(io_token), "S1": tokens.index(s_token),
                 "S2": len(tokens) - 1 - tokens[::-1].index(s_token)}
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions
        final = torch.stack([a[0, :, -1] for a in attentions])  # (layer, head, key)
        for key, position in where.items():
            scores[key].append(final[..., position].numpy())
    mean = {key: np.mean(values, axis=0) for key, values in scores.items()}
    movers = mean["IO"] - mean["S1"] > 0.05
    inhibitors = mean["S2"] > 0.3
    return {"movers": movers, "inhibitors": inhibitors, "others": ~(movers | inhibitors), **mean}


def test_model_has_name_movers_and_s_inhibition_heads(roles):
    """Name movers read IO in the last layer; S-inhibition heads find S2 in the first."""
    movers, inhibitors = roles["movers"], roles["inhibitors"]
    assert movers[-1].sum() >= 2 and not movers[0].any()
    assert inhibitors[0].sum() >= 2 and not inhibitors[-1].any()
    assert (roles["IO"][movers] > 3 * roles["S1"][movers]).all()
    assert roles["others"].any(), "the test compares circuit heads with the rest"


def test_head_patching_at_end_singles_out_the_name_movers(patching, roles):
    """Clean z at END into the corrupt run: the name movers restore most of the logit difference."""
    dataset = patching[1]
    restored = normalized_effect(dataset, "patch_z").sel(pos="END").transpose("layer", "head").values
    movers = roles["movers"]
    assert restored[movers].min() > restored[~movers].max()
    assert restored[movers].sum() > 0.5
    assert restored[movers].min() > 0.1 and np.abs(restored[roles["others"]]).max() < 0.05


def test_residual_patching_follows_the_names(patching):
    """Layer 0 holds token identities: a clean IO name in its slot pushes the answer towards IO,
    a clean S at S1 pushes towards S (it now looks like the name to copy), a clean S at S2
    pushes towards IO (it marks S as the name to avoid); END is the same token in both runs."""
    values = normalized_effect(patching[1], "patch_resid_pre").sel(layer=0)
    assert float(values.sel(pos="IO")) > 0.3 and float(values.sel(pos="S1")) < -0.3
    assert float(values.sel(pos="S2")) > 0.1
    assert float(values.sel(pos="END")) == pytest.approx(0.0, abs=1e-6)


def test_path_patching_finds_s_inhibition_into_mover_queries(paths, roles):
    """Corrupting a head's output only where the name movers' queries read it: the S-inhibition
    head that attends to S2 most strongly does the most damage; heads outside the circuit none."""
    damage = normalized_effect(paths, "to_mover_queries").sel(layer=0).values  # share of the diff lost
    first_layer = {key: roles[key][0] for key in ("S2", "inhibitors", "others")}
    assert int(np.argmax(damage)) == int(np.argmax(first_layer["S2"]))
    assert damage[first_layer["inhibitors"]].min() > 0.02
    assert np.abs(damage[first_layer["others"]]).max() < 0.02


def test_path_patching_to_logits_finds_direct_writers(paths, roles):
    """Every name mover writes to the logits directly; heads outside the circuit do not.

    One mover's share is modest: the movers are redundant and the final layer norm rescales
    what the others still write when one of them is corrupted.
    """
    damage = normalized_effect(paths, "direct").transpose("layer", "head").values
    others = np.abs(damage[roles["others"]]).max()
    assert damage[roles["movers"]].min() > max(0.01, 5 * others)
