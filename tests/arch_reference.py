"""Hand-written reference hooks per architecture, written against the HF modules directly.

Nothing here imports causal: each family is described again, by hand, from the HF
modeling files (transformers 5.x), so a wrong entry in causal's adapter table shows up
as a mismatch instead of being checked against itself.

Per-head q/k/v are edited at the projection output, before rotary. That is the same edit
as the adapter's post-rotary one when the patched value comes from another run at the same
position: rotary is a fixed linear map per position. (Qwen3 normalises each head before
rotary, so its q/k are taken at q_norm/k_norm.) A pattern edit is referenced through its
only effect, the head's output: z[p, h] = pattern[p, h, :] @ v[:, kv_head(h)].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# (projection output, head, config) -> that head's (batch, pos, d_head) view
Slicer = Callable[[torch.Tensor, int, object], torch.Tensor]


@dataclass(frozen=True)
class Family:
    blocks: str  # from the top model
    embed: str  # token embedding module, from the top model
    attn_out: str  # below the block: its output is what attention adds to the residual stream
    mlp_out: str  # likewise for the MLP
    o_proj: str  # below the block: z is its input
    down: str  # below the block: neuron is its input
    q: tuple[str, Slicer]
    k: tuple[str, Slicer]
    v: tuple[str, Slicer]
    mid: tuple[str, str] | None  # resid_mid: (module, "input" | "output") below the block
    after_mid: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None  # resid_mid -> block output
    flat_mlp: bool = False  # OPT runs its MLP on (batch * pos, d)


def d_head(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def separate(path: str) -> tuple[str, Slicer]:
    return path, lambda out, h, config: out[..., h * d_head(config):(h + 1) * d_head(config)]


def per_head_output(path: str) -> tuple[str, Slicer]:
    """Modules that already output (batch, pos, heads, d_head): Qwen3's q_norm/k_norm."""
    return path, lambda out, h, config: out[:, :, h]


def gpt2_fused(which: int) -> tuple[str, Slicer]:
    """c_attn output is [q | k | v], each (heads * d_head)."""
    def slicer(out, h, config):
        start = which * config.hidden_size + h * d_head(config)
        return out[..., start:start + d_head(config)]
    return "attn.c_attn", slicer


def neox_fused(which: int) -> tuple[str, Slicer]:
    """query_key_value output is per head [q | k | v]."""
    def slicer(out, h, config):
        start = h * 3 * d_head(config) + which * d_head(config)
        return out[..., start:start + d_head(config)]
    return "attention.query_key_value", slicer


def phi3_fused(which: int) -> tuple[str, Slicer]:
    """qkv_proj output is [q (heads) | k (kv heads) | v (kv heads)]."""
    def slicer(out, h, config):
        d, n_q, n_kv = d_head(config), config.num_attention_heads, kv_heads(config)
        start = [0, n_q * d, (n_q + n_kv) * d][which] + h * d
        return out[..., start:start + d]
    return "self_attn.qkv_proj", slicer


def llama_after_mid(block, x):
    return x + block.mlp(block.post_attention_layernorm(x))


LLAMA = Family(
    blocks="model.layers", embed="model.embed_tokens", attn_out="self_attn", mlp_out="mlp",
    o_proj="self_attn.o_proj", down="mlp.down_proj",
    q=separate("self_attn.q_proj"), k=separate("self_attn.k_proj"), v=separate("self_attn.v_proj"),
    mid=("post_attention_layernorm", "input"), after_mid=llama_after_mid)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        blocks="transformer.h", embed="transformer.wte", attn_out="attn", mlp_out="mlp", o_proj="attn.c_proj",
        down="mlp.c_proj",
        q=gpt2_fused(0), k=gpt2_fused(1), v=gpt2_fused(2), mid=("ln_2", "input"),
        after_mid=lambda block, x: x + block.mlp(block.ln_2(x))),
    "gpt_neo": Family(
        blocks="transformer.h", embed="transformer.wte", attn_out="attn", mlp_out="mlp",
        o_proj="attn.attention.out_proj", down="mlp.c_proj",
        q=separate("attn.attention.q_proj"), k=separate("attn.attention.k_proj"),
        v=separate("attn.attention.v_proj"), mid=("ln_2", "input"),
        after_mid=lambda block, x: x + block.mlp(block.ln_2(x))),
    "gpt_neox": Family(  # built with use_parallel_residual=False, so it has resid_mid
        blocks="gpt_neox.layers", embed="gpt_neox.embed_in", attn_out="attention", mlp_out="mlp",
        o_proj="attention.dense", down="mlp.dense_4h_to_h",
        q=neox_fused(0), k=neox_fused(1), v=neox_fused(2), mid=("post_attention_layernorm", "input"),
        after_mid=lambda block, x: x + block.mlp(block.post_attention_layernorm(x))),
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": Family(**{**LLAMA.__dict__, "q": per_head_output("self_attn.q_norm"),
                       "k": per_head_output("self_attn.k_norm")}),
    "gemma": LLAMA,
    "gemma2": Family(**{**LLAMA.__dict__, "attn_out": "post_attention_layernorm",
                        "mlp_out": "post_feedforward_layernorm", "mid": ("pre_feedforward_layernorm", "input"),
                        "after_mid": lambda block, x: x + block.post_feedforward_layernorm(
                            block.mlp(block.pre_feedforward_layernorm(x)))}),
    "phi3": Family(**{**LLAMA.__dict__, "q": phi3_fused(0), "k": phi3_fused(1), "v": phi3_fused(2)}),
    "opt": Family(
        blocks="model.decoder.layers", embed="model.decoder.embed_tokens", attn_out="self_attn", mlp_out="fc2",
        o_proj="self_attn.out_proj",
        down="fc2", q=separate("self_attn.q_proj"), k=separate("self_attn.k_proj"), v=separate("self_attn.v_proj"),
        mid=("final_layer_norm", "input"), flat_mlp=True,
        after_mid=lambda block, x: x + block.fc2(block.activation_fn(block.fc1(block.final_layer_norm(x))))),
    "phi": Family(
        blocks="model.layers", embed="model.embed_tokens", attn_out="self_attn", mlp_out="mlp",
        o_proj="self_attn.dense", down="mlp.fc2",
        q=separate("self_attn.q_proj"), k=separate("self_attn.k_proj"), v=separate("self_attn.v_proj"),
        mid=None, after_mid=None),
    "bert": Family(  # BertModel: no prefix
        blocks="encoder.layer", embed="embeddings.word_embeddings", attn_out="attention.output.dense",
        mlp_out="output.dense", o_proj="attention.output.dense",
        down="output.dense", q=separate("attention.self.query"), k=separate("attention.self.key"),
        v=separate("attention.self.value"), mid=("attention", "output"),
        after_mid=lambda block, x: block.output(block.intermediate(x), x)),
}


def block(model, family: Family, layer: int) -> nn.Module:
    return model.get_submodule(family.blocks)[layer]


def capture(model, module: nn.Module, where: str, run: Callable[[], object]) -> torch.Tensor:
    """A copy of the module's input (first positional or hidden_states) or output (first if a tuple)."""
    store = {}

    def keep(tensor: torch.Tensor) -> None:
        store.setdefault("act", tensor.clone())
    if where == "input":
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda m, args, out: keep(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return store["act"]


def with_edit(module: nn.Module, where: str, edit: Callable[[torch.Tensor], None], run: Callable[[], object]):
    """run() while `edit` rewrites (a clone of) the module's input or output in place."""
    if where == "input":
        def pre(m, args, kwargs):
            if args:
                act = args[0].clone()
                edit(act)
                return (act, *args[1:]), kwargs
            act = kwargs["hidden_states"].clone()
            edit(act)
            return args, {**kwargs, "hidden_states": act}
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(m, args, out):
            act = (out[0] if isinstance(out, tuple) else out).clone()
            edit(act)
            return (act, *out[1:]) if isinstance(out, tuple) else act
        handle = module.register_forward_hook(post)
    try:
        with torch.no_grad():
            return run()
    finally:
        handle.remove()


def unflat(act: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch * pos, ...) -> (batch, pos, ...) for OPT's MLP tensors."""
    return act.view(batch, -1, *act.shape[1:])


def head_edit(model, family: Family, which: str, layer: int, head: int, pos: int, source_run, base_run):
    """Output of base_run with q/k/v head `head` at `pos` taken from source_run, edited before rotary."""
    path, slicer = getattr(family, which)
    module = block(model, family, layer).get_submodule(path)
    donor = slicer(capture(model, module, "output", source_run), head, model.config)[:, pos].clone()

    def edit(out):
        slicer(out, head, model.config)[:, pos] = donor
    return with_edit(module, "output", edit, base_run)


def z_edit(model, family: Family, layer: int, head: int, pos: int, value: torch.Tensor, run):
    """run() with the o_proj input of `head` at `pos` set to `value` (batch, d_head)."""
    module = block(model, family, layer).get_submodule(family.o_proj)
    d = d_head(model.config)

    def edit(act):
        act[:, pos, head * d:(head + 1) * d] = value
    return with_edit(module, "input", edit, run)


def pattern_edit(model, family: Family, layer: int, head: int, pos: int, row: torch.Tensor, run):
    """run() with head `head`'s attention row at query `pos` replaced by `row` (batch, key_pos).

    The only effect of a pattern row is z[pos, head] = row @ v of the head's KV head.
    """
    path, slicer = family.v
    groups = model.config.num_attention_heads // kv_heads(model.config)
    v_module = block(model, family, layer).get_submodule(path)
    values = slicer(capture(model, v_module, "output", run), head // groups, model.config)  # (batch, pos, d)
    z = torch.einsum("bk,bkd->bd", row.to(values.dtype), values[:, :row.shape[1]])
    return z_edit(model, family, layer, head, pos, z, run)


def resid_mid_edit(model, family: Family, layer: int, pos: int, source_run, base_run):
    """base_run with resid_mid at `pos` taken from source_run: the block output recomputed by hand."""
    target = block(model, family, layer)
    module = target.get_submodule(family.mid[0])
    mid = capture(model, module, family.mid[1], base_run)
    donor = capture(model, module, family.mid[1], source_run)
    if family.flat_mlp:  # OPT's norm sees (batch * pos, d); recover batch from the block input
        batch = capture(model, target, "input", base_run).shape[0]
        mid, donor = unflat(mid, batch), unflat(donor, batch)
    mid[:, pos] = donor[:, pos]
    new_output = family.after_mid(target, mid)

    def edit(out):
        out.copy_(new_output.view(out.shape))
    return with_edit(target, "output", edit, base_run)
