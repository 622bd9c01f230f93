"""Site names -> hook points on a HF model.

An architecture is described by a table, not code: where its blocks live and, for
each site, which module to hook, whether the activation is that module's input or
output, and whether it splits into heads. Everything else (registering hooks,
reshaping heads, reading and replacing values) is shared.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from causal.errors import CausalError

SITE_DOCS = {
    "resid_pre": "residual stream entering the block",
    "resid_post": "residual stream leaving the block",
    "attn_out": "attention sub-layer output, after its output projection",
    "mlp_out": "MLP sub-layer output",
    "z": "per-head attention output, before the output projection (dims: pos, head)",
}


@dataclass(frozen=True)
class HookPoint:
    """`module` is a path below the block ('' for the block itself)."""

    module: str
    where: str  # "input" or "output"
    per_head: bool = False


@dataclass(frozen=True)
class ArchSpec:
    name: str
    blocks: str
    sites: dict[str, HookPoint]


GPT2_SPEC = ArchSpec(
    name="gpt2",
    blocks="transformer.h",
    sites={
        "resid_pre": HookPoint("", "input"),
        "resid_post": HookPoint("", "output"),
        "attn_out": HookPoint("attn", "output"),
        "mlp_out": HookPoint("mlp", "output"),
        "z": HookPoint("attn.c_proj", "input", per_head=True),
    },
)

GPT_NEOX_SPEC = ArchSpec(
    name="gpt_neox",
    blocks="gpt_neox.layers",
    sites={
        "resid_pre": HookPoint("", "input"),
        "resid_post": HookPoint("", "output"),
        "attn_out": HookPoint("attention", "output"),
        "mlp_out": HookPoint("mlp", "output"),
        "z": HookPoint("attention.dense", "input", per_head=True),
    },
)

ARCHITECTURES = {"gpt2": GPT2_SPEC, "gpt_neox": GPT_NEOX_SPEC, "attn-only-neox": GPT_NEOX_SPEC}

# Replaces an activation (canonical shape) with a new one, or returns None to leave it.
ActivationFn = Callable[[torch.Tensor], torch.Tensor | None]


class ModelAdapter:
    """Uniform view of one loaded model: sizes, site names, and hooks on sites."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.model = model
        self.spec = spec
        config = model.config
        self.n_layers: int = config.num_hidden_layers
        self.n_heads: int = config.num_attention_heads
        self.d_model: int = config.hidden_size
        self.d_head: int = self.d_model // self.n_heads
        self.n_kv_heads: int = self.n_heads
        self.arch = spec.name
        self.is_causal = True
        self._blocks = model.get_submodule(spec.blocks)
        self.blocks = self._blocks

    def site_info(self, site: str, span=None, source=None):
        from types import SimpleNamespace
        extra = (("head", self.n_heads),) if self.is_per_head(site) else ()
        return SimpleNamespace(name=site, per_layer=True, extra_dims=extra, doc="")

    def supports_kv_prefix(self, seq_len: int) -> bool:
        return True

    @property
    def site_names(self) -> list[str]:
        return list(self.spec.sites)

    def is_per_head(self, site: str) -> bool:
        return self.spec.sites[site].per_head

    def module(self, site: str, layer: int) -> nn.Module:
        point = self.spec.sites[site]
        block = self._blocks[layer]
        return block.get_submodule(point.module) if point.module else block

    @contextmanager
    def hooks(self, fns: dict[tuple[str, int], ActivationFn], start: int = 0) -> Iterator[None]:
        """Apply `fns[(site, layer)]` to each site's activation for the duration of the block."""
        handles = [self._attach(site, layer, (lambda act, fn=fn: fn(act, start))) for (site, layer), fn in fns.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _attach(self, site: str, layer: int, fn: ActivationFn):
        point = self.spec.sites[site]
        module = self.module(site, layer)
        to_canon, from_canon = self._reshapers(point)

        def apply(act: torch.Tensor) -> torch.Tensor | None:
            new = fn(to_canon(act))
            return None if new is None else from_canon(new, act)

        if point.where == "output":
            def post_hook(_module, _args, output):
                tensor = output[0] if isinstance(output, tuple) else output
                new = apply(tensor)
                if new is None:
                    return None
                return (new, *output[1:]) if isinstance(output, tuple) else new
            return module.register_forward_hook(post_hook)

        def pre_hook(_module, args, kwargs):
            if args:
                new = apply(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = apply(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def _reshapers(self, point: HookPoint):
        if not point.per_head:
            return (lambda act: act), (lambda new, act: new)
        heads, d_head = self.n_heads, self.d_head
        return (lambda act: act.view(*act.shape[:-1], heads, d_head),
                lambda new, act: new.reshape(act.shape))


def adapter_for(model: nn.Module) -> ModelAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise CausalError(f"architecture {model_type!r} is not supported yet; supported: {supported}")
    return ModelAdapter(model, ARCHITECTURES[model_type])
