"""What `record` keeps of an SAE's features: the top K per token, and per feature how often it fires and
its max-activating tokens.

A dense recording of 16k features x 1000 examples x 32 positions is 2 GB; the top K (ids and activations)
of each token is K/16k of it, and the per-feature summaries are independent of the examples' number.
Summaries are merged batch by batch and chunk by chunk (a maximum and a count are associative), so a
resumed run that restores some chunks from checkpoints ends with the same summaries as one that ran them all.
A feature "fires" where its activation is above zero; a zero is never listed as a top or max activation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_EXAMPLES = 8  # max-activating tokens kept per feature
CONTEXT = 6  # tokens before the max-activating one shown in its text


def top_features(values: torch.Tensor, k: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(points, rows, F) activations -> (points, rows, k) feature ids and activations, largest first;
    -1 and NaN where fewer than k fire (or the position is past the prompt)."""
    top = values.nan_to_num(0.0).topk(min(k, values.shape[-1]), -1)
    fired = top.values > 0
    ids = torch.where(fired, features[top.indices], torch.full_like(top.indices, -1))
    acts = torch.where(fired, top.values, torch.full_like(top.values, float("nan")))
    if k > values.shape[-1]:  # more ranks asked than features kept
        pad = (0, k - values.shape[-1])
        ids, acts = torch.nn.functional.pad(ids, pad, value=-1), torch.nn.functional.pad(acts, pad, value=float("nan"))
    return ids, acts


@dataclass
class FeatureSummary:
    """Per feature: tokens where it fired, of `tokens` present ones; its MAX_EXAMPLES largest activations
    and where they were (example, pos; -1 where it fired on fewer tokens)."""

    fired: torch.Tensor  # (F,) long
    tokens: torch.Tensor  # () long
    max_activation: torch.Tensor  # (F, MAX_EXAMPLES), -inf where unused
    max_example: torch.Tensor  # (F, MAX_EXAMPLES) long
    max_pos: torch.Tensor  # (F, MAX_EXAMPLES) long

    @classmethod
    def empty(cls, n_features: int) -> "FeatureSummary":
        shape = (n_features, MAX_EXAMPLES)
        return cls(torch.zeros(n_features, dtype=torch.long), torch.zeros((), dtype=torch.long),
                   torch.full(shape, float("-inf")), torch.full(shape, -1, dtype=torch.long),
                   torch.full(shape, -1, dtype=torch.long))

    def add(self, values: torch.Tensor, examples: torch.Tensor, positions: torch.Tensor) -> None:
        """(points, rows, F) activations at absolute `positions` (points, rows; -1: absent) of `examples`."""
        present = positions >= 0
        acts = values.nan_to_num(0.0).masked_fill(~present[..., None], 0.0)
        self.fired += (acts > 0).sum((0, 1))
        self.tokens += present.sum()
        flat = acts.flatten(0, 1).T  # (F, tokens)
        example = examples[None].expand_as(positions).reshape(-1)
        self.merge(FeatureSummary.from_tokens(flat, example, positions.reshape(-1)))

    @classmethod
    def from_tokens(cls, acts: torch.Tensor, example: torch.Tensor, pos: torch.Tensor) -> "FeatureSummary":
        """(F, tokens) activations: each feature's largest, positive ones (counts left at zero)."""
        top = acts.topk(min(MAX_EXAMPLES, acts.shape[1]), -1)
        fired = top.values > 0
        out = cls.empty(acts.shape[0])
        n = top.values.shape[1]
        out.max_activation[:, :n] = top.values.masked_fill(~fired, float("-inf"))
        out.max_example[:, :n] = torch.where(fired, example[top.indices], -1)
        out.max_pos[:, :n] = torch.where(fired, pos[top.indices], -1)
        return out

    def merge(self, other: "FeatureSummary") -> None:
        """Counts add; the max lists are merged, ties broken by (example, pos) so the order of merging is moot."""
        self.fired = self.fired + other.fired
        self.tokens = self.tokens + other.tokens
        acts = torch.cat([self.max_activation, other.max_activation], 1)
        example = torch.cat([self.max_example, other.max_example], 1)
        pos = torch.cat([self.max_pos, other.max_pos], 1)
        where = example * 2 ** 20 + pos  # smaller first among equal activations
        order = torch.argsort(where, dim=1, stable=True)
        acts, example, pos = acts.gather(1, order), example.gather(1, order), pos.gather(1, order)
        keep = torch.argsort(-acts, dim=1, stable=True)[:, :MAX_EXAMPLES]
        self.max_activation, self.max_example, self.max_pos = acts.gather(1, keep), example.gather(1, keep), pos.gather(1, keep)

    def saved(self) -> dict[str, torch.Tensor]:
        return {f"summary_{k}": getattr(self, k).clone() for k in ("fired", "tokens", "max_activation", "max_example",
                                                                     "max_pos")}

    @classmethod
    def from_saved(cls, saved: dict[str, torch.Tensor]) -> "FeatureSummary":
        return cls(*(saved[f"summary_{k}"] for k in ("fired", "tokens", "max_activation", "max_example", "max_pos")))

    def frequency(self) -> torch.Tensor:
        return self.fired.float() / max(int(self.tokens), 1)

    def texts(self, ids: torch.Tensor, decode) -> list[list[str]]:
        """Per feature and rank: the CONTEXT tokens before the max-activating one, then it in [brackets]."""
        def text(example: int, pos: int) -> str:
            if example < 0:
                return ""
            before = decode(ids[example, max(0, pos - CONTEXT):pos].tolist())
            return f"{before}[{decode(ids[example, pos:pos + 1].tolist())}]"
        return [[text(e, p) for e, p in zip(examples, positions)]
                for examples, positions in zip(self.max_example.tolist(), self.max_pos.tolist())]


__all__ = ["CONTEXT", "FeatureSummary", "MAX_EXAMPLES", "top_features"]
