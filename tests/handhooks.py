"""Reference computations written directly against the HF GPT-2 / GPT-NeoX modules, independent of causal's adapter."""
from __future__ import annotations

from contextlib import ExitStack

import torch

INPUT_SITES = ("resid_pre", "z")  # read as a module's input; the others are module outputs


def module_for(model, site: str, layer: int):
    if site == "embed":
        return model.get_input_embeddings()
    if model.config.model_type == "gpt2":
        block = model.transformer.h[layer]
        return {"resid_pre": block, "resid_post": block, "attn_out": block.attn, "mlp_out": block.mlp,
                "z": block.attn.c_proj}[site]
    block = model.gpt_neox.layers[layer]
    return {"resid_pre": block, "resid_post": block, "attn_out": block.attention, "mlp_out": block.mlp,
            "z": block.attention.dense}[site]


def _hook(model, site: str, layer: int, fn):
    """Register `fn(tensor) -> tensor | None` on a site; returns the handle."""
    module = module_for(model, site, layer)
    if site in INPUT_SITES:
        def pre(m, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(m, args, out):
        tensor = out[0] if isinstance(out, tuple) else out
        new = fn(tensor)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new
    return module.register_forward_hook(post)


def capture(model, ids: torch.Tensor, site: str, layer: int) -> torch.Tensor:
    """The activation at a site: block/c_proj inputs for resid_pre and z, module outputs otherwise."""
    store = {}
    handle = _hook(model, site, layer, lambda t: store.__setitem__("act", t.clone()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return store["act"]


def run_with_edits(model, ids: torch.Tensor, edits: list) -> torch.Tensor:
    """Logits of a forward where each `(site, layer, edit)` rewrites that site's activation in place."""
    def apply(edit):
        def fn(tensor):
            act = tensor.clone()
            edit(act)
            return act
        return fn
    with ExitStack() as stack, torch.no_grad():
        for site, layer, edit in edits:
            handle = _hook(model, site, layer, apply(edit))
            stack.callback(handle.remove)
        return model(ids).logits


def run_with_replacement(model, ids: torch.Tensor, site: str, layer: int, edit) -> torch.Tensor:
    return run_with_edits(model, ids, [(site, layer, edit)])


def gradients(model, ids: torch.Tensor, keys: list[tuple[str, int]], metric) -> tuple[dict, dict]:
    """Activations at `keys` and d metric(logits) / d activation, by plain autograd."""
    acts: dict = {}

    def keep(key):
        def fn(tensor):
            act = tensor.clone()
            act.retain_grad()
            acts[key] = act
            return act
        return fn
    with ExitStack() as stack:
        for site, layer in keys:
            handle = _hook(model, site, layer, keep((site, layer)))
            stack.callback(handle.remove)
        value = metric(model(ids).logits)
        value.backward()
    return {k: a.detach() for k, a in acts.items()}, {k: a.grad for k, a in acts.items()}
