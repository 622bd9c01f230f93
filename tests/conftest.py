"""Shared fixtures: a tiny random GPT-2 saved as an ordinary HF folder, and prompt data for it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                          GPTNeoXForCausalLM)

from causal import RunConfig
from causal.zoo import word_tokenizer

VOCAB = 64


TINY_CONFIGS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=64, rotary_pct=0.5, bos_token_id=0, eos_token_id=0)),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """3 layers, 4 heads, d_model 32 per architecture; seeded random weights so every site carries signal."""
    folders = {}
    for name, build in TINY_CONFIGS.items():
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        torch.manual_seed(0)
        build().save_pretrained(folder)
        word_tokenizer(VOCAB).save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_models) -> Path:
    return tiny_models["gpt2"]


@pytest.fixture(params=["gpt2", "gpt_neox"])
def arch(request, tiny_models):
    """(architecture name, folder, HF model, tokenizer) for each tiny architecture."""
    folder = tiny_models[request.param]
    return (request.param, folder, AutoModelForCausalLM.from_pretrained(folder).eval(),
            AutoTokenizer.from_pretrained(folder))


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def logprob_last(logits: torch.Tensor, token: int) -> float:
    return logits[0, -1].log_softmax(-1)[token].item()


def make_rows(n: int = 6, seed: int = 1, ragged: bool = False) -> list[dict]:
    """clean/corrupt prompts of equal length per example; `ragged` varies length across examples."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + (i % 3 if ragged else 2)
        clean = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        corrupt = list(clean)
        corrupt[1] = (clean[1] + 7) % (VOCAB - 1) + 1
        answers = torch.randint(1, VOCAB, (2,), generator=gen).tolist()
        rows.append({"clean": " ".join(f"t{t}" for t in clean), "corrupt": " ".join(f"t{t}" for t in corrupt),
                     "io": f"t{answers[0]}", "s": f"t{answers[1]}"})
    return rows


@pytest.fixture
def write_experiment(tmp_path, tiny_gpt2):
    """Write data + an experiment body (statements after model/data) and return the file path."""
    def write(body: str, rows: list[dict] | None = None, model: str | Path | None = None) -> Path:
        data = tmp_path / "data.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in (rows or make_rows())) + "\n")
        path = tmp_path / "exp.cx"
        path.write_text(f'experiment test\nmodel "{model or tiny_gpt2}"\ndata "data.jsonl"\n{body}\n')
        return path
    return write


TEST_DEVICE = os.environ.get("CAUSAL_TEST_DEVICE", "cpu")  # scripts/gpu_check.sh sets cuda on a GPU machine


@pytest.fixture
def cpu_config() -> RunConfig:
    """The run settings most tests use: the CPU, unless CAUSAL_TEST_DEVICE names another device."""
    return RunConfig(device=TEST_DEVICE, progress=False, batch_size=7)


@pytest.fixture
def no_forward(monkeypatch) -> list:
    """Fails the test if a forward pass runs before the error it expects is raised."""
    calls: list = []

    def forward(self, *args, **kwargs):
        calls.append(args)
        raise AssertionError("a forward pass ran before the error was reported")

    monkeypatch.setattr("causal.engine.forward.Runner.forward", forward)
    return calls


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny matrices: a second intra-op thread only adds synchronisation (10-100x slower on a busy machine).
    Subprocesses the tests start (the CLI) keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Keep Hydra run dirs and checkpoints that default to ./outputs out of the repository."""
    monkeypatch.chdir(tmp_path)
