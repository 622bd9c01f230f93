"""Numeric health: find where NaN or inf first appears, instead of returning NaN effects silently.

Each forward records, per layer, which rows' residual stream is non-finite (a tensor
op, no device sync per layer); after the forward, one check names the first layer and
row, and the caller turns the row into an example and site for the message.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from causal.errors import CausalError
from causal.models import ModelAdapter

WATCHED_SITE = "resid_post"


class NonFiniteWatch:
    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.flags: dict[int, torch.Tensor] = {}

    @contextmanager
    def watching(self) -> Iterator["NonFiniteWatch"]:
        """Register after any intervention hooks, so the watch sees the values the model goes on with."""
        self.flags = {}
        layers = range(self.adapter.n_layers) if self.adapter.has_blocks else ()  # else: the metric check alone
        hooks = {(WATCHED_SITE, layer): self._flagger(layer) for layer in layers}
        with self.adapter.hooks(hooks):
            yield self

    def _flagger(self, layer: int) -> Callable:
        def flag(act: torch.Tensor, start: int) -> None:
            self.flags[layer] = (~torch.isfinite(act)).flatten(1).any(1)
        return flag

    def check(self, values: torch.Tensor, valid: torch.Tensor, metric_names: list[str],
              describe_row: Callable[[int], str]) -> None:
        """Raise on the first layer (then metric) where a valid row is not finite."""
        valid = valid.to(values.device)
        if self.flags:
            layers = sorted(self.flags)
            flagged = torch.stack([self.flags[layer].to(valid.device) for layer in layers]) & valid  # (layers, rows)
            if flagged.any():  # one device sync for all layers, not one per layer
                first_layer, row = (int(i) for i in flagged.nonzero()[0])
                raise CausalError(f"NaN or inf first appears in {WATCHED_SITE} of layer {layers[first_layer]} "
                                  f"for {describe_row(row)}", hint="with float16, try dtype=bfloat16 or float32")
        bad = (~torch.isfinite(values)) & valid[:, None]
        if bad.any():
            row, metric = (int(i) for i in bad.nonzero()[0])
            raise CausalError(f"metric {metric_names[metric]} is NaN or inf for {describe_row(row)} "
                              f"although every layer's output is finite (logits overflow?)")
