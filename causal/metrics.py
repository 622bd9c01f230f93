"""Metric values from a forward pass's output, one per (row, metric).

Each metric is averaged over the positions it reads in the row's prompt. Logits are
only computed at the union of those positions (`read_slots`); each metric then picks its
own slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from causal.resolve.experiment import Experiment, Metric
from causal.engine.forward import Output


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, width) bool -> (rows, k) indices of the set positions in increasing order, and which are real."""
    k = max(int(mask.sum(1).max()), 1)
    order = torch.where(mask, torch.arange(mask.shape[1]), mask.shape[1] + torch.arange(mask.shape[1]))
    index = order.argsort(1)[:, :k]
    return index, mask.gather(1, index)


def read_slots(experiment: Experiment, column: str, examples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits any metric reads, per row: (rows, k) positions and validity."""
    union = torch.stack([m.positions[column][examples] for m in experiment.metrics]).any(0)
    return compact(union)


def metric_values(experiment: Experiment, output: Output, column: str, examples: torch.Tensor,
                  slots: tuple[torch.Tensor, torch.Tensor], references: dict[int, torch.Tensor],
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, metrics) float32. `references[i]`: what metric i compares against, for these rows."""
    values = []
    logits = output.logits.float() if output.logits is not None else None  # once, not per metric
    for index, metric in enumerate(experiment.metrics):
        if metric.kind == "similarity":
            values.append(_similarity(output.hidden, attention_mask, references[index]))
            continue
        positions, valid = slots
        chosen = metric.positions[column][examples].to(positions.device).gather(1, positions) & valid
        per_slot = _per_slot(experiment, metric, logits, column, examples, positions, chosen,
                             references.get(index))
        chosen = chosen.to(per_slot.device)
        values.append((per_slot * chosen).sum(1) / chosen.sum(1).clamp(min=1))
    return torch.stack(values, 1).float()


def _per_slot(experiment: Experiment, metric: Metric, logits: torch.Tensor, column: str, examples: torch.Tensor,
              positions: torch.Tensor, chosen: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    device = logits.device
    if metric.kind == "kl":
        return _kl(logits, chosen, reference)
    if metric.next_token:
        ids = experiment.prompts[column].ids[examples]
        following = ids.gather(1, (positions + 1).clamp(max=ids.shape[1] - 1)).to(device)
        answers = [following]
    else:
        answers = [a[examples].to(device)[:, None].expand(-1, logits.shape[1]) for a in metric.answers]

    def at(table: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return table.gather(-1, token[..., None])[..., 0]

    if metric.kind == "logit_diff":
        return at(logits, answers[0]) - at(logits, answers[1])
    if metric.kind == "rank":
        return (logits > at(logits, answers[0])[..., None]).sum(-1).float()
    if metric.kind == "accuracy":
        return (logits.argmax(-1) == answers[0]).float()
    logprob = at(logits.log_softmax(-1), answers[0])
    return logprob.exp() if metric.kind == "prob" else logprob


def _kl(logits: torch.Tensor, chosen: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(reference || run) per slot; `reference` holds log-probs at the metric's positions in order."""
    index, valid = compact(chosen.cpu())
    run = logits.log_softmax(-1).gather(1, index.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1]))
    ref = reference[:, : index.shape[1]].to(logits.device)
    kl = (ref.exp() * (ref - run)).sum(-1) * valid.to(logits.device)
    out = torch.zeros(chosen.shape, device=logits.device)
    return out.scatter(1, index.to(logits.device), kl)


def reference_logprobs(output: Output, chosen: torch.Tensor) -> torch.Tensor:
    """Log-probs at a kl metric's positions (in order), to compare later runs against."""
    index, _ = compact(chosen.cpu())
    logits = output.logits.float()
    return logits.log_softmax(-1).gather(1, index.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1])).cpu()


def sentence_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the prompt's tokens, unit length: the all-MiniLM / sentence-transformers pooling."""
    weights = attention_mask.to(hidden.device, hidden.dtype)[..., None]
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return F.normalize(pooled.float(), dim=-1)


def _similarity(hidden: torch.Tensor, attention_mask: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (sentence_embedding(hidden, attention_mask) * reference.to(hidden.device)).sum(-1)
