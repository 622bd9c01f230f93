"""One forward pass of the unmodified HF model, whole or resumed part-way.

Resuming is how sweeps skip work (see causal.engine.plan): blocks below `start_layer` are
swapped, for the duration of the call, for stand-ins that return the base run's cached
residual stream; positions below `start_pos` are not recomputed at all, their keys and
values come from the base run's cache through HF's own cache argument. Everything
else (masks, position ids, rotary embeddings, the blocks from `start_layer` on) is the
model's own forward.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from causal.models import LoadedModel
from causal.models.adapter import ActivationFn
from causal.values import Output, Resume


class _Replay(nn.Module):
    """Stands in for a skipped block: returns the residual stream the real block produced."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


class Runner:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.adapter = loaded.adapter
        self.blocks_return_tuple: bool | None = None
        self.lm_head = self.model.get_output_embeddings() if loaded.head == "lm" else None
        self.cache_argument = _cache_argument(self.model)
        self.plain_layers = _plain_cache_layers(self.model)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, hooks: dict[tuple, ActivationFn],
                resume: Resume | None = None, read: torch.Tensor | None = None, record_kv: bool = False,
                grad: bool = False) -> Output:
        """`read`: (rows, k) absolute positions whose logits to compute (lm models)."""
        resume = resume or Resume()
        device = self.loaded.device
        ids, attention_mask = ids.to(device), attention_mask.to(device)
        cache = self._prefix_cache(resume.keys_values, resume.pos, grad) if resume.pos else None
        if record_kv and cache is None:
            cache = DynamicCache(config=self.model.config)
        kwargs = {"input_ids": ids[:, resume.pos:], "attention_mask": attention_mask}
        if cache is not None:
            kwargs.update({self.cache_argument: cache, "use_cache": True})
        elif self.adapter.is_causal:
            kwargs["use_cache"] = False
        context = torch.enable_grad() if grad else torch.inference_mode()
        with context, self.adapter.hooks(hooks, start=resume.pos), self._skipping(resume), \
                self._reading(read, resume.pos), self._unembedding_in_slices(read is not None and not grad):
            out = self.model(**kwargs)
        if self.lm_head is None:
            return Output(None, out.last_hidden_state, None)
        logits = out.logits
        recorded = [(layer.keys, layer.values) for layer in out[self.cache_argument].layers] if record_kv else None
        return Output(logits, None, recorded)

    def _prefix_cache(self, keys_values, pos: int, grad: bool) -> DynamicCache:
        """The base run's keys/values of the skipped positions. Built from the data alone where every layer
        is a plain attention layer: reading the layer types from the config took 0.3 ms a forward, more
        than a tiny model's whole resumed forward saves (issue "speed to the floor", item 1). There the
        layers write the positions they compute into the job's own full-length copy (`_FilledLayer`):
        DynamicCache would copy the prefix twice, once to build and once per update (13% of a head sweep)."""
        if self.plain_layers and not grad:
            cache = DynamicCache()
            cache.layers = [_FilledLayer(keys, values, pos) for keys, values in keys_values]
            return cache
        cache = DynamicCache(config=self.model.config)
        for layer, (keys, values) in enumerate(keys_values):
            cache.update(keys[:, :, :pos], values[:, :, :pos], layer)
        return cache

    @contextmanager
    def _skipping(self, resume: Resume) -> Iterator[None]:
        if resume.layer == 0:
            yield
            return
        blocks = self.adapter.blocks
        real = [blocks[i] for i in range(resume.layer)]
        stand_in = _Replay(resume.hidden, bool(self.blocks_return_tuple))
        try:
            for i in range(resume.layer):
                blocks[i] = stand_in
            yield
        finally:
            for i, block in enumerate(real):
                blocks[i] = block

    @contextmanager
    def _reading(self, read: torch.Tensor | None, start: int) -> Iterator[None]:
        """Apply the unembedding only at the read positions (it is a large share of a small model's cost).

        The model's own forward still does whatever follows the unembedding (e.g. Gemma's soft-capping).
        """
        if read is None or self.lm_head is None:
            yield
            return
        index = (read - start).clamp(min=0).to(self.loaded.device)

        def gather(_module, args):
            hidden = args[0]
            return (hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1])), *args[1:])

        with _temporary_hook(self.lm_head, gather, pre=True):
            yield

    def _unembedding_in_slices(self, wanted: bool) -> "contextmanager":
        """On the CPU, a plain linear unembedding computed a slice of the vocabulary at a time. One matmul
        against a large vocabulary ran at half the rate of the same work in slices (GPT-2's 50257 x 768 for
        96 rows: 51 against 96 GFLOP/s on a 2-core EPYC, the largest single cost of a head sweep; issue
        "speed to the floor", item 2): each output element is the same dot product, so the logits are
        equal up to float32 rounding (bit for bit on the head sweep's results). Forwards that unembed every
        position (the reference path, optimize=False) keep the model's own call, as does a head whose forward is
        already wrapped (accelerate's offload hooks: replacing theirs would skip them, and restoring ours would
        drop them)."""
        head = self.lm_head
        if not (wanted and type(head) is nn.Linear and head.weight.device.type == "cpu"
                and head.weight.shape[0] > 2 * VOCAB_SLICE and "forward" not in vars(head)):
            return nullcontext()
        return _forward_replaced(head, partial(_sliced_linear, head.weight, head.bias))

    def note_block_output(self) -> "contextmanager":
        """During a whole forward, learn whether blocks return a tuple (stand-ins must match)."""
        if self.blocks_return_tuple is not None or not self.adapter.has_blocks:  # no blocks: no stand-ins either
            return nullcontext()

        def seen(_module, _args, output):
            self.blocks_return_tuple = isinstance(output, tuple)

        return _temporary_hook(self.adapter.blocks[0], seen)


VOCAB_SLICE = 1024  # rows of the unembedding per matmul; 512..2048 were equally fast for d 768 and 2048
ROW_BLOCK = 128  # hidden rows unembedded per transposed block: its copy stays small (GPT-2: 26 MB)


def _sliced_linear(weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """The logits computed transposed, (vocab, rows) for a block of rows, so each slice's matmul writes one
    contiguous piece, then copied into (rows, vocab); written straight into (rows, vocab), each slice's rows lay
    200 KB apart for GPT-2 and the unembedding plus the metric's log_softmax took 130 ms a call against 96 (median
    of 40, 96 rows, 2-core EPYC). Blocks of rows bound the extra memory whatever the number of positions read."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = hidden.new_empty((flat.shape[0], weight.shape[0]))
    for first in range(0, flat.shape[0], ROW_BLOCK):
        rows = flat[first:first + ROW_BLOCK]
        block = hidden.new_empty((weight.shape[0], rows.shape[0]))
        for start in range(0, weight.shape[0], VOCAB_SLICE):
            end = start + VOCAB_SLICE
            if bias is None:
                torch.mm(weight[start:end], rows.T, out=block[start:end])
            else:
                torch.addmm(bias[start:end, None], weight[start:end], rows.T, out=block[start:end])
        out[first:first + rows.shape[0]] = block.T
    return out.view(*hidden.shape[:-1], weight.shape[0])


@contextmanager
def _forward_replaced(module: nn.Module, forward) -> Iterator[None]:
    """`module` computes with `forward` for the duration; its hooks still run around it."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


class _FilledLayer(DynamicLayer):
    """A layer's cache holding `filled` positions of `keys`/`values` (rows, heads, seq, d_head); an update writes
    the new positions after them in place while they fit, and concatenates as DynamicLayer does once they
    do not (generation, whose cache grows by a token a step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int):
        super().__init__()
        self.keys, self.values, self.filled = keys, values, filled
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.filled + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            self.keys = torch.cat([self.keys[..., :self.filled, :], key_states], dim=-2)
            self.values = torch.cat([self.values[..., :self.filled, :], value_states], dim=-2)
        else:
            self.keys[..., self.filled:end, :] = key_states
            self.values[..., self.filled:end, :] = value_states
            self.keys, self.values = self.keys[..., :end, :], self.values[..., :end, :]
        self.filled = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.filled


def _plain_cache_layers(model: nn.Module) -> bool:
    """Whether every layer's cache is a plain (full or sliding-window) one, so a DynamicCache built from the
    keys/values alone behaves as the config's would: the prefix path runs only where a window, if any, is
    longer than the prompts (ModelAdapter.supports_kv_prefix)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    except (ImportError, AttributeError, TypeError):
        return False
    return set(types) <= {"full_attention", "sliding_attention"}


def _cache_argument(model: nn.Module) -> str:
    """`cache` where the model's forward takes it (transformers >= 5.2x; `past_key_values`, the older name,
    is deprecated there and goes in 5.40), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextmanager
def _temporary_hook(module: nn.Module, fn, pre: bool = False) -> Iterator[None]:
    handle = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()
