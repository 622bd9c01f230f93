"""Two independent ways to compute an activation-patching sweep, to check and time causal against.

- TransformerLens: TL 4.x has no HookedTransformer; its model is `TransformerBridge`, booted here
  from a local HF folder (no hub access) with raw HF weights (no LayerNorm folding or centering,
  which is what `enable_compatibility_mode` would add), so it computes the same function as HF.
- A naive loop: one plain torch hook on the HF model and one full forward per site.

Shared by `benchmarks/sweep.py` and `tests/test_transformer_lens.py`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from causal.zoo import word_tokenizer

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits (batch, seq, vocab) -> (batch,)


def build_gpt2(n_layer: int, n_embd: int, n_head: int, vocab: int, n_positions: int,
               seed: int = 0) -> GPT2LMHeadModel:
    """A seeded random GPT-2 in eval mode; dropout off so every run of it is deterministic."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def save_model_folder(model: GPT2LMHeadModel, folder: Path) -> Path:
    """An ordinary HF folder (weights + word-level tokenizer t0..t{V-1}) that causal and TL both load."""
    model.save_pretrained(folder)
    word_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def boot_transformer_lens(folder: str | Path, device: str | torch.device = "cpu"):
    """TL's TransformerBridge over the HF model in `folder`, raw weights (no processing)."""
    from transformer_lens.model_bridge import TransformerBridge

    # The bridge loads its own copy (eager attention) and rewires its modules in place, so it
    # never shares a module with the model causal or the naive loop runs.
    bridge = TransformerBridge.boot_transformers(str(folder), device=str(device))
    bridge.eval()
    return bridge


def max_logit_gap(bridge, model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Largest |TL logits - HF logits| on the same tokens: TL must compute the same function."""
    with torch.inference_mode():
        ours = model(tokens).logits
        theirs = bridge(tokens, return_type="logits")
    return float((ours - theirs).abs().max())


def answer_logprob(answers: torch.Tensor) -> Metric:
    """Per example: log-prob of its answer token at the last position (causal's `logprob(col)`)."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1].float().log_softmax(-1)
        return last.gather(-1, answers.to(last.device)[:, None])[:, 0]
    return metric


def naive_resid_pre_sweep(model: GPT2LMHeadModel, base: torch.Tensor, source: torch.Tensor,
                          metric: Metric) -> torch.Tensor:
    """(layer, pos, example): one full forward of the base batch per (layer, pos), with the block's
    input at that position replaced by the source run's."""
    blocks = model.transformer.h
    cache = _record_inputs(model, source, blocks)
    out = torch.empty(len(blocks), base.shape[1], base.shape[0])
    for layer, block in enumerate(blocks):
        for pos in range(base.shape[1]):
            out[layer, pos] = _patched_metric(model, base, block, cache[layer], (slice(None), pos), metric)
    return out


def naive_head_sweep(model: GPT2LMHeadModel, base: torch.Tensor, source: torch.Tensor, metric: Metric,
                     pos: int = -1) -> torch.Tensor:
    """(layer, head, example): one full forward per (layer, head), replacing that head's z (the input
    of the attention output projection) at `pos` by the source run's."""
    projections = [block.attn.c_proj for block in model.transformer.h]
    cache = _record_inputs(model, source, projections)
    n_heads = model.config.n_head
    d_head = model.config.n_embd // n_heads
    out = torch.empty(len(projections), n_heads, base.shape[0])
    for layer, projection in enumerate(projections):
        for head in range(n_heads):
            columns = slice(head * d_head, (head + 1) * d_head)
            out[layer, head] = _patched_metric(model, base, projection, cache[layer],
                                               (slice(None), pos, columns), metric)
    return out


def _record_inputs(model: torch.nn.Module, tokens: torch.Tensor, modules: Sequence[torch.nn.Module]):
    """The first input of each module on one forward of `tokens`."""
    cache: list[torch.Tensor | None] = [None] * len(modules)

    def recorder(index: int):
        def hook(_module, args, kwargs):
            cache[index] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    handles = [m.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        with torch.inference_mode():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return cache


def _patched_metric(model, tokens, module, source_act, index, metric: Metric) -> torch.Tensor:
    def patch(_module, args, kwargs):
        act = (args[0] if args else kwargs["hidden_states"]).clone()
        act[index] = source_act[index]
        if args:
            return (act, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": act}

    handle = module.register_forward_pre_hook(patch, with_kwargs=True)
    try:
        with torch.inference_mode():
            return metric(model(tokens).logits).float().cpu()
    finally:
        handle.remove()


def write_causal_experiment(folder: Path, model_folder: Path, rows: list[dict], body: str) -> Path:
    """data.jsonl (token-id prompts, int answers) and exp.cx in `folder`; returns the experiment path."""
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / "exp.cx"
    path.write_text(f'experiment bench\nmodel "{model_folder}"\ndata "data.jsonl"\n{body}\n')
    return path
