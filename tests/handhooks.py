"""Reference computations written directly against the HF GPT-2 modules, independent of causal's adapter."""
from __future__ import annotations

import torch


def module_for(model, site: str, layer: int):
    if model.config.model_type == "gpt2":
        block = model.transformer.h[layer]
        return {"resid_pre": block, "attn_out": block.attn, "mlp_out": block.mlp, "z": block.attn.c_proj}[site]
    block = model.gpt_neox.layers[layer]
    return {"resid_pre": block, "attn_out": block.attention, "mlp_out": block.mlp, "z": block.attention.dense}[site]


def capture(model, ids: torch.Tensor, site: str, layer: int) -> torch.Tensor:
    """The activation at a site: block/c_proj inputs for resid_pre and z, module outputs otherwise."""
    store = {}
    module = module_for(model, site, layer)

    def keep(tensor) -> None:
        store["act"] = tensor.clone()

    if site in ("resid_pre", "z"):
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda m, args, out: keep(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return store["act"]


def run_with_replacement(model, ids: torch.Tensor, site: str, layer: int, edit) -> torch.Tensor:
    """Logits of a forward where `edit(act)` rewrites the site's activation in place."""
    module = module_for(model, site, layer)
    if site in ("resid_pre", "z"):
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
    with torch.no_grad():
        logits = model(ids).logits
    handle.remove()
    return logits
