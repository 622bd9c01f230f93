"""Hooks inside attention: q, k, v as they enter the attention computation, and the pattern.

Every supported family except GPT-Neo computes attention through
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`, called with query
(batch, heads, q_len, d_head) after rotary and key/value (batch, kv_heads, kv_len, d_head)
after the KV-cache update (so k/v include a cached prefix). While q/k/v/pattern hooks are
active, the model's implementation name is switched to `causal_<name>`: a registered
wrapper that edits those tensors and then calls the model's own function; attention
modules without hooks go straight to that function, so nothing else changes. GPT-Neo
computes attention in its own `_attn` method; hooked instances get an `_attn` that applies
the same edits.

A pattern edit is applied as a correction, output + (new - old) @ v, so the model's own
(fused) kernel still computes the output and a pattern returned unchanged leaves it
bit-identical. The pattern itself comes from the model's eager attention function (the
one in its modeling file), which is the definition the fused kernels implement.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from causal.errors import CausalError

# Called as fn(act, start): act in canonical layout, start = absolute position of act[:, 0].
ActivationFn = Callable[[torch.Tensor, int], "torch.Tensor | None"]

EDITS_KEY = "_causal_attention_edits"  # in an attention module's __dict__ while it has hooks
WRAPPED = ("sdpa", "eager")  # implementations whose masks we can turn into eager masks for the pattern


@dataclass
class AttentionEdits:
    """The q/k/v/pattern hooks of one attention module, from every active `hooks()` context."""

    fns: dict[str, list[ActivationFn]] = field(default_factory=lambda: {"q": [], "k": [], "v": [], "pattern": []})

    def empty(self) -> bool:
        return not any(self.fns.values())

    def edit_qkv(self, query, key, value):
        """(batch, heads, len, d_head) in and out; hooks see (batch, len, heads, d_head)."""
        query_start = key.shape[2] - query.shape[2]
        return (_apply(self.fns["q"], query, query_start), _apply(self.fns["k"], key, 0),
                _apply(self.fns["v"], value, 0))

    def edit_output(self, weights, value, output, heads_dim: int):
        """Correct `output` for pattern edits; `weights` (batch, heads, q, kv), output heads at `heads_dim`."""
        old = weights.transpose(1, 2)  # canonical (batch, query_pos, heads, key_pos)
        new = old
        start = weights.shape[-1] - weights.shape[-2]
        for fn in self.fns["pattern"]:
            replaced = fn(new, start)
            if replaced is not None:
                new = _checked(replaced, new, "pattern")
        if new is old:
            return output
        delta = (new - old).transpose(1, 2).to(value.dtype)
        values = repeat_heads(value, weights.shape[1] // value.shape[1])
        correction = delta @ values  # (batch, heads, q, d_head)
        return output + (correction.transpose(1, 2) if heads_dim == 2 else correction)


def _apply(fns: list[ActivationFn], tensor: torch.Tensor, start: int) -> torch.Tensor:
    for fn in fns:
        canonical = tensor.transpose(1, 2)
        replaced = fn(canonical, start)
        if replaced is not None:
            tensor = _checked(replaced, canonical, "q/k/v").transpose(1, 2)
    return tensor


def _checked(new: torch.Tensor, old: torch.Tensor, what: str) -> torch.Tensor:
    if new.shape != old.shape:
        raise CausalError(f"a {what} hook returned shape {tuple(new.shape)}; expected {tuple(old.shape)}")
    return new


def repeat_heads(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA: (batch, kv_heads, len, d) -> (batch, kv_heads * groups, len, d), as HF's repeat_kv."""
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def eager_function(module: nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file (it returns the weights)."""
    for cls in type(module).__mro__:
        found = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if found is not None:
            return found
    raise CausalError(f"cannot compute the attention pattern of {type(module).__name__}: its modeling file "
                      f"has no eager_attention_forward")


def additive_mask(mask, module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict):
    """The eager (additive float) form of the mask the model built for its own implementation."""
    minimum = torch.finfo(query.dtype).min
    if mask is not None:
        if mask.dtype != torch.bool:
            return mask
        return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~mask, minimum)
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q_len, kv_len = query.shape[2], key.shape[2]
    if not is_causal or q_len == 1:
        return None
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device=query.device)[None, :]
    allowed = cols <= rows
    if kwargs.get("sliding_window"):
        allowed &= cols > rows - kwargs["sliding_window"]
    return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~allowed, minimum)[None, None]


def _wrapper(original: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        own = ALL_ATTENTION_FUNCTIONS.get_interface(original, None) if original != "eager" else None
        own = own or eager_function(module)
        edits = module.__dict__.get(EDITS_KEY)
        if edits is None:
            return own(module, query, key, value, attention_mask, **kwargs)
        query, key, value = edits.edit_qkv(query, key, value)
        output, weights = own(module, query, key, value, attention_mask, **kwargs)
        if edits.fns["pattern"]:
            pattern = weights
            if pattern is None:
                eager_mask = additive_mask(attention_mask, module, query, key, kwargs)
                _, pattern = eager_function(module)(module, query, key, value, eager_mask, **kwargs)
            output = edits.edit_output(pattern, value, output, heads_dim=2)
        return output, weights
    return attention


def wrapper_name(original: str) -> str:
    """Register (once) the hooking wrapper around implementation `original`; return its name."""
    name = f"causal_{original}"
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _wrapper(original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _neo_attn(module: nn.Module) -> Callable:
    """GPT-Neo's `_attn(query, key, value, mask)` with the module's edits applied; heads at dim 1."""
    def _attn(query, key, value, attention_mask=None):
        edits = module.__dict__[EDITS_KEY]
        query, key, value = edits.edit_qkv(query, key, value)
        output, weights = type(module)._attn(module, query, key, value, attention_mask)
        if edits.fns["pattern"]:
            output = edits.edit_output(weights, value, output, heads_dim=1)
        return output, weights
    return _attn


@contextmanager
def attention_hooks(model: nn.Module, modules: dict[nn.Module, dict[str, ActivationFn]],
                    core: str) -> Iterator[None]:
    """Apply q/k/v/pattern fns to the given attention modules for the duration of the block."""
    if not modules:
        yield
        return
    if core == "gpt_neo" and model.config._attn_implementation != "eager":
        raise CausalError(f"q/k/v/pattern sites on GPT-Neo need eager attention (its `_attn`); this model uses "
                          f"{model.config._attn_implementation!r}", hint="load it with attn_implementation='eager'")
    switch = _implementation_switch(model) if core == "interface" else _null()
    with switch:
        for module, fns in modules.items():
            _add(module, fns, core)
        try:
            yield
        finally:
            for module, fns in modules.items():
                _remove(module, fns, core)


def _add(module: nn.Module, fns: dict[str, ActivationFn], core: str) -> None:
    edits = module.__dict__.get(EDITS_KEY)
    if edits is None:
        edits = module.__dict__[EDITS_KEY] = AttentionEdits()
        if core == "gpt_neo":
            module._attn = _neo_attn(module)
    for site, fn in fns.items():
        edits.fns[site].append(fn)


def _remove(module: nn.Module, fns: dict[str, ActivationFn], core: str) -> None:
    edits = module.__dict__[EDITS_KEY]
    for site, fn in fns.items():
        edits.fns[site].remove(fn)
    if edits.empty():
        del module.__dict__[EDITS_KEY]
        if core == "gpt_neo":
            del module._attn


@contextmanager
def _null() -> Iterator[None]:
    yield


@contextmanager
def _implementation_switch(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through the wrapper; nested uses share one switch."""
    state = model.__dict__.setdefault("_causal_attention_switch", {"depth": 0, "original": None})
    if state["depth"] == 0:
        original = model.config._attn_implementation
        if original not in WRAPPED:
            raise CausalError(f"q/k/v/pattern sites need the model's attention implementation to be 'sdpa' or "
                              f"'eager'; this model uses {original!r}",
                              hint="load it with attn_implementation='sdpa' (the default) or 'eager'")
        model.set_attn_implementation(wrapper_name(original))
        state["original"] = original
    state["depth"] += 1
    try:
        yield
    finally:
        state["depth"] -= 1
        if state["depth"] == 0:
            model.set_attn_implementation(state["original"])
