"""The shipped induction experiment finds the toy model's induction heads.

Which heads are induction and previous-token heads is decided here independently of
the ablation, from the model's attention patterns (plain HF forward, eager attention);
the test then checks that the ablation experiment singles out those heads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import causal
from causal.data import Prompts
from causal.results.summary import effect
from causal.zoo import zoo_path

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "induction.cx"
LENGTH = 10  # the experiment's `length`: the second copy starts at 1 + LENGTH (after BOS)


@pytest.fixture(scope="module")
def run():
    experiment = causal.prepare(EXPERIMENT, causal.RunConfig(device="cpu", progress=False))
    dataset = causal.run(EXPERIMENT, causal.RunConfig(device="cpu", progress=False))
    return experiment.prompts["clean"], dataset


def attention_scores(prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
    """(layer, head) mean attention to the induction target (q-L+1) and to the previous token (q-1)."""
    model = AutoModelForCausalLM.from_pretrained(zoo_path("attn-only-2l"), attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = model(prompts.ids, output_attentions=True).attentions
    second = torch.arange(1 + LENGTH, 2 * LENGTH)  # queries whose next token repeats an earlier one
    everywhere = torch.arange(1, prompts.ids.shape[1])
    induction = np.stack([a[:, :, second, second - LENGTH + 1].mean((0, 2)).numpy() for a in attentions])
    previous = np.stack([a[:, :, everywhere, everywhere - 1].mean((0, 2)).numpy() for a in attentions])
    return induction, previous


def test_model_has_the_textbook_circuit(run):
    induction, previous = attention_scores(run[0])
    assert (induction[1] > 0.5).sum() >= 2 and (induction[0] < 0.2).all()
    assert (previous[0] > 0.5).sum() >= 1 and (previous[1] < 0.2).all()


def test_ablation_singles_out_the_circuit(run):
    prompts, dataset = run
    induction, previous = attention_scores(prompts)
    drop = -effect(dataset, "ablate_z").mean("example").transpose("layer", "head").values  # > 0: worse
    assert (drop > -0.1).all(), "ablating a head should not make induction markedly better"
    induction_heads = induction > 0.5
    previous_heads = previous > 0.5
    # The largest drops in layer 1 belong to induction heads, and they are large (> 1 nat).
    top_layer1 = np.argsort(-drop[1])[:2]
    assert induction_heads[1, top_layer1].all() and (drop[1, top_layer1] > 1.0).all()
    # Layer 0: the previous-token head the induction heads read from is essential too.
    assert drop[0][previous_heads[0]].max() > 1.0
    # Heads outside the circuit matter far less than the top induction heads.
    others = ~(induction_heads | previous_heads)
    assert drop[others].max() < 0.5 * drop[1, top_layer1].min()


def test_attribution_patching_ranks_the_circuit_first_and_agrees_with_exact_patching(run):
    """Noising with attribution patching: the heads it ranks first are the circuit, and exact patching agrees."""
    prompts, _ = run
    induction, previous = attention_scores(prompts)
    circuit = (induction > 0.5) | (previous > 0.5)
    path = EXPERIMENT.parent / "induction_attribution.cx"
    dataset = causal.run(path, causal.RunConfig(device="cpu", progress=False))
    estimate = effect(dataset, "attribute_z").mean("example").transpose("layer", "head").values
    exact = effect(dataset, "attribute_z_exact").mean("example").transpose("layer", "head").values
    top = np.argsort(estimate.reshape(-1))[:4]  # most negative: corrupting them hurts most
    assert circuit.reshape(-1)[top].all(), "the heads attribution ranks first belong to the circuit"
    checked = ~np.isnan(exact)
    assert checked.sum() == 4 and set(np.flatnonzero(checked.reshape(-1))) == set(top)
    assert (exact[checked] < -0.5).all(), "exactly patched, each of them breaks induction"
    assert dataset["attribute_z"].attrs["exact_correlation"] > 0.5


def test_path_patching_finds_k_composition(run):
    """The previous-token head reaches the induction heads through their keys, not queries or values."""
    prompts, _ = run
    _, previous = attention_scores(prompts)
    head = int(np.argmax(previous[0]))
    dataset = causal.run(EXPERIMENT.parent / "induction_path.cx", causal.RunConfig(device="cpu", progress=False))
    drop = {name: -float(effect(dataset, name).mean("example").sel(layer=0, head=head))
            for name in ("into_keys", "into_queries", "into_values")}
    assert drop["into_keys"] > 1.0
    assert drop["into_keys"] > 10 * max(abs(drop["into_queries"]), abs(drop["into_values"]))
