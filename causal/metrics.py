"""The metric catalogue: one declaration per metric, read by resolve, compile and execute alike.

A metric declares its arity (answer columns), what it reads (next-token logits at the
positions `at` names, or the sentence embedding of an encoder), whether its argument is
a reference run it compares with (kl, similarity), whether it takes `next` (each prompt's
own next token), and how it scores. Every metric can be `normalized` (by the clean and
corrupt baselines, in results/assemble.py). Logits are only computed at the union of the
positions any metric reads (`read_slots`); each metric then averages over its own.

Importing this module does not import torch (the CLI checks metric names before any model).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from causal.values import EMBEDDING, LOGITS, MetricKind

if TYPE_CHECKING:
    import torch

    from causal.values import Experiment, Output

def _at(table: "torch.Tensor", token: "torch.Tensor") -> "torch.Tensor":
    return table.gather(-1, token[..., None])[..., 0]


def _logprob(logits, answers):
    return _at(logits.log_softmax(-1), answers[0])


def _prob(logits, answers):
    return _logprob(logits, answers).exp()


def _logit_diff(logits, answers):
    return _at(logits, answers[0]) - _at(logits, answers[1])


def _rank(logits, answers):
    return (logits > _at(logits, answers[0])[..., None]).sum(-1).float()


def _accuracy(logits, answers):
    return (logits.argmax(-1) == answers[0]).float()


def _kl(logits, chosen, reference):
    """KL(reference || run) per slot; `reference` holds log-probs at the metric's positions in order."""
    import torch
    index, valid = compact(chosen.cpu())
    run = logits.log_softmax(-1).gather(1, index.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1]))
    ref = reference[:, : index.shape[1]].to(logits.device)
    kl = (ref.exp() * (ref - run)).sum(-1) * valid.to(logits.device)
    out = torch.zeros(chosen.shape, device=logits.device)
    return out.scatter(1, index.to(logits.device), kl)


def _reference_logprobs(output: "Output", chosen, attention_mask):
    """Log-probs at a kl metric's positions (in order), to compare later runs against."""
    index, _ = compact(chosen.cpu())
    logits = output.logits.float()
    return logits.log_softmax(-1).gather(1, index.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1])).cpu()


def sentence_embedding(hidden, attention_mask):
    """Mean over the prompt's tokens, unit length: the all-MiniLM / sentence-transformers pooling."""
    import torch.nn.functional as F
    weights = attention_mask.to(hidden.device, hidden.dtype)[..., None]
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return F.normalize(pooled.float(), dim=-1)


def _similarity(hidden, attention_mask, reference):
    return (sentence_embedding(hidden, attention_mask) * reference.to(hidden.device)).sum(-1)


METRICS: dict[str, MetricKind] = {kind.name: kind for kind in (
    MetricKind("logprob", 1, LOGITS, _logprob, "nat", takes_next=True),
    MetricKind("prob", 1, LOGITS, _prob, "1", takes_next=True),
    MetricKind("logit_diff", 2, LOGITS, _logit_diff, "logit"),
    MetricKind("rank", 1, LOGITS, _rank, "1", takes_next=True),
    MetricKind("accuracy", 1, LOGITS, _accuracy, "1", takes_next=True),
    MetricKind("kl", 1, LOGITS, _kl, "nat", reference=_reference_logprobs),
    MetricKind("similarity", 1, EMBEDDING, _similarity, "1",
               reference=lambda output, chosen, mask: sentence_embedding(output.hidden, mask).cpu()),
)}


# --- evaluation -------------------------------------------------------------------------------


def compact(mask: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(rows, width) bool -> (rows, k) indices of the set positions in increasing order, and which are real."""
    import torch
    k = max(int(mask.sum(1).max()), 1)
    order = torch.where(mask, torch.arange(mask.shape[1]), mask.shape[1] + torch.arange(mask.shape[1]))
    index = order.argsort(1)[:, :k]
    return index, mask.gather(1, index)


def read_slots(experiment: "Experiment", column: str, examples: "torch.Tensor"):
    """The positions whose logits any metric reads, per row: (rows, k) positions and validity."""
    import torch
    union = torch.stack([m.positions[column][examples] for m in experiment.metrics]).any(0)
    return compact(union)


def chosen_slots(metric, column: str, examples: "torch.Tensor", slots) -> "torch.Tensor":
    """(rows, k) which of the read slots this metric averages over."""
    positions, valid = slots
    return metric.positions[column][examples].to(positions.device).gather(1, positions) & valid


def metric_values(experiment: "Experiment", output: "Output", column: str, examples: "torch.Tensor", slots,
                  references: dict, attention_mask=None) -> "torch.Tensor":
    """(rows, metrics) float32. `references[i]`: what metric i compares against, for these rows."""
    import torch
    values = []
    logits = output.logits.float() if output.logits is not None else None  # once, not per metric
    for index, metric in enumerate(experiment.metrics):
        kind = metric.kind
        if kind.reads == EMBEDDING:
            values.append(kind.score(output.hidden, attention_mask, references[index]))
            continue
        chosen = chosen_slots(metric, column, examples, slots)
        if kind.compares:
            per_slot = kind.score(logits, chosen, references[index])
        else:
            per_slot = kind.score(logits, _answers(experiment, metric, column, examples, slots[0], logits))
        chosen = chosen.to(per_slot.device)
        values.append((per_slot * chosen).sum(1) / chosen.sum(1).clamp(min=1))
    return torch.stack(values, 1).float()


def _answers(experiment: "Experiment", metric, column: str, examples, positions, logits) -> list:
    """Answer token ids per read slot: the answer columns', or each prompt's next token."""
    device = logits.device
    if metric.next_token:
        ids = experiment.prompts[column].ids[examples]
        return [ids.gather(1, (positions + 1).clamp(max=ids.shape[1] - 1)).to(device)]
    return [a[examples].to(device)[:, None].expand(-1, logits.shape[1]) for a in metric.answers]
