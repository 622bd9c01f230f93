"""Models, data and experiment bodies for tests/test_fastpath.py (fast path == reference path).

Each architecture is a tiny random HF model saved as an ordinary folder with the word-level
toy tokenizer (`t0 .. t63`), plus the zoo's trained attention-only model. Initialised with
std 0.2 so that every intervention moves the metrics by far more than the tolerance: an
optimisation that silently dropped a write would then show up as a difference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as T

from causal.zoo import word_tokenizer

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64, initializer_range=0.2,
             bos_token_id=0, eos_token_id=0)


@dataclass(frozen=True)
class Arch:
    """What the experiment bodies need to know about a model: which sites it has and a module path."""

    name: str
    module: str  # a per-layer submodule path for the module("...{layer}...") site
    resid_mid: bool = True
    mlp: bool = True  # has MLP neurons (the attention-only toy has none)
    config: object = None  # builds the HF config; None: a zoo model
    ref: str | None = None  # the model reference when not built here


ARCHS = {
    "gpt2": Arch("gpt2", "transformer.h.{layer}.mlp.c_fc", config=lambda: T.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=4, initializer_range=0.2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
    "llama_gqa": Arch("llama_gqa", "model.layers.{layer}.mlp.up_proj", config=lambda: T.LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2)),
    "phi_parallel": Arch("phi_parallel", "model.layers.{layer}.mlp.fc1", resid_mid=False, config=lambda: T.PhiConfig(
        **SMALL, num_attention_heads=4)),  # attention and MLP in parallel, partial rotary
    "attn_only_2l": Arch("attn_only_2l", "gpt_neox.layers.{layer}.attention.dense", mlp=False,
                         ref="zoo:attn-only-2l"),
}


def save_model(arch: Arch, folder: Path) -> str:
    """The model reference for an experiment file: a saved tiny random model, or the zoo name."""
    if arch.ref:
        return arch.ref
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(arch.config()).save_pretrained(folder)
    word_tokenizer(VOCAB).save_pretrained(folder)
    return str(folder)


def make_rows(n: int = 4, seed: int = 0, ragged: bool = True) -> list[dict]:
    """clean/corrupt prompts (right-padded when `ragged`: 5, 6, 7 tokens); the `s` token sits at 1 + i % 3.

    The corrupt prompt differs at position 0 and at the s token, so patching either end of a
    prompt changes the metrics. All tokens of a prompt are distinct, so first(s) is unambiguous.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + i % 3 if ragged else 6
        tokens = (torch.randperm(VOCAB - 1, generator=gen) + 1).tolist()
        clean, spare = tokens[:length], tokens[length:]
        s_at = 1 + i % 3
        corrupt = list(clean)
        corrupt[0], corrupt[s_at] = spare[0], spare[1]
        rows.append({"clean": words(clean), "corrupt": words(corrupt), "s": f"t{clean[s_at]}",
                     "io": f"t{spare[2]}"})
    return rows


def words(tokens: list[int]) -> str:
    return " ".join(f"t{t}" for t in tokens)


def write_case(folder: Path, model: str, body: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "exp.cx"
    path.write_text(f'experiment fastpath\nmodel "{model}"\ndata "data.jsonl"\n{body}\n')
    return path


HEADER = "positions { S = first(s), END = -1 }\n"
LAST_METRICS = ("metric logprob(io)\nmetric logit_diff(io, s)\nmetric kl(clean)\nmetric rank(io)\n"
                "metric accuracy(io)\n")
PATCH = "from corrupt into clean"


def sites_body(arch: Arch) -> str:
    """Every site kind, swept so that rows start at many different layers and positions."""
    lines = [
        f"patch embed[pos=[0, S, END]] {PATCH}",
        f"patch resid_pre[layer=*, pos=*] {PATCH}",
        f"patch resid_post[layer=*, pos=[0, -2]] {PATCH}",
        f"patch attn_out[layer=*, pos=[S, END]] {PATCH}",
        f"patch mlp_out[layer=*, pos=[S, END]] {PATCH}",
        f"patch z[layer=*, head=*, pos=END] {PATCH}",
        f"patch q[layer=*, head=[0, -1], pos=END] {PATCH}",
        f"patch k[layer=*, kv_head=[0, -1], pos=S] {PATCH}",
        f"patch v[layer=*, kv_head=[0, -1], pos=1] {PATCH}",
        f"patch pattern[layer=*, head=[1, 2], pos=END] {PATCH}",
        f"patch pattern[layer=-1, pos=END, key_pos=*] {PATCH}",
        f'patch module("{arch.module}")[layer=*, pos=[S, END]] {PATCH}',
    ]
    if arch.resid_mid:
        lines.append(f"patch resid_mid[layer=*, pos=[1, END]] {PATCH}")
    if arch.mlp:
        lines.append(f"patch neuron[layer=*, neuron=[0, 7], pos=S] {PATCH}")
    return HEADER + LAST_METRICS + "\n".join(lines)


def interventions_body(arch: Arch) -> str:
    """Every intervention kind but path patching (its own case), '+'-joined sites and layer windows."""
    lines = [
        f"patch resid_pre[layer=*, pos=S] + attn_out[layer=*, pos=END] {PATCH}",
        f"patch z[layer=0, head=1] + z[layer=-1, head=2] {PATCH}",
        f"patch resid_post[layer=* window 2, pos=[1, S, -2]] {PATCH}",
        "patch resid_pre[layer=*, pos=[0, S, END]] from clean into corrupt",
        "ablate attn_out[layer=*, pos=[S, END]] with zero",
        "ablate z[layer=*, head=[0, 2], pos=END] with mean",
        "ablate resid_pre[layer=-1, pos=[0, END]] with mean over clean on corrupt",
        "steer resid_post[layer=*, pos=[S, END]] by 2 * (mean(clean) - mean(corrupt at 0))",
        "steer attn_out[layer=*, pos=S] by -1 * mean(clean at END) on corrupt",
        "trace noise(3 sigma, samples=2) on S restore resid_post[layer=*, pos=[S, END]]",
        "trace noise(3 sigma, samples=2) on [0, S] restore attn_out[layer=* window 2, pos=END] severing mlp",
        f"patch z[layer=*, head=*] {PATCH} as patch_heads",
        f"attribute z[layer=*, head=*] {PATCH} verify top 3 as atp_heads",
        f"attribute k[layer=*, kv_head=*, pos=S] {PATCH} verify top 2",
        f"attribute q[layer=*, head=*, pos=END] {PATCH}",
    ]
    return HEADER + LAST_METRICS + "\n".join(lines)


def paths_body(arch: Arch) -> str:
    """Path patching alone: its second phase starts at the first receiver layer, which no other statement records."""
    lines = [
        f"path z[layer=0, head=*] -> q[layer=-1] {PATCH}",
        f"path z[layer=0, head=[0, 2]] -> k[layer=-1, pos=S] + v[layer=-1, kv_head=0] {PATCH}",
        f"path attn_out[layer=0] -> v[layer=-1] {PATCH}",
        f"path z[layer=*, head=*] -> logits {PATCH}" + (" freezing mlp" if arch.mlp else ""),
    ]
    return HEADER + "metric logprob(io)\nmetric kl(clean)\n" + "\n".join(lines)


def ranges_body(arch: Arch) -> str:
    """Metrics at a range of positions (next token) and at named positions: rows must start early enough."""
    metrics = "metric logprob(next) at 1..3\nmetric prob(io) at [S, END]\nmetric logit_diff(io, s) at S\n"
    lines = [
        f"patch resid_pre[layer=*, pos=*] {PATCH}",
        "ablate mlp_out[layer=*, pos=*] with zero" if arch.mlp else "ablate attn_out[layer=*, pos=[S, END]] with zero",
    ]
    return HEADER + metrics + "\n".join(lines)


def resample_body(arch: Arch) -> str:
    """Resample ablation needs prompts of one length."""
    lines = [
        "ablate resid_post[layer=*, pos=[0, S, END]] with resample",
        "ablate z[layer=*, head=*, pos=END] with resample over corrupt",
        f"patch k[layer=*, kv_head=*, pos=S] {PATCH}",
    ]
    return HEADER + LAST_METRICS + "\n".join(lines)


CASES = {  # name -> (body, ragged prompts)
    "sites": (sites_body, True),
    "interventions": (interventions_body, True),
    "paths": (paths_body, True),
    "ranges": (ranges_body, True),
    "resample": (resample_body, False),
}
