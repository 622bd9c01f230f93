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
from causal.summary import effect
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
