"""The training loop of `align`: every candidate subspace in the rows of one forward and backward.

Rows are candidate-major: candidate i owns rows [i b, (i + 1) b) of a batch of b pairs. A hook at
each (site, layer) swaps the subspace of the candidates writing there; the others pass through.
"""
from __future__ import annotations

import zlib

import torch

from causal.methods.attribute import frozen_parameters
from causal.methods.rotations import BOUNDLESS_END_TEMPERATURE, BOUNDLESS_START_TEMPERATURE, Subspace, swap

EPOCH_KEY = "align-{index}-epoch"


def train(align, run, state) -> None:
    experiment = run.experiment
    t = align.training
    model = experiment.model
    state.subspaces = [Subspace(t.kind, align.width, t.ks[j], _initial(t.seed, align.sweep.points[p], t.ks[j]))
                       .to(model.device) for p, j in align.candidates]
    parameters = [p for s in state.subspaces for p in s.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=t.lr)
    steps_per_epoch = -(-len(align.split.train) // t.batch)
    temperatures = torch.linspace(BOUNDLESS_START_TEMPERATURE, BOUNDLESS_END_TEMPERATURE,
                                  max(1, t.epochs * steps_per_epoch)).tolist()
    best = [None] * len(state.subspaces)
    best_loss = [float("inf")] * len(state.subspaces)
    waited = [0] * len(state.subspaces)
    active = list(range(len(state.subspaces)))
    step = 0
    with frozen_parameters(model.model):
        for epoch in range(t.epochs):
            order = align.split.train[torch.randperm(len(align.split.train),
                                                     generator=torch.Generator().manual_seed(t.seed + 1 + epoch))]
            losses = torch.zeros(len(state.subspaces))
            for start in range(0, len(order), t.batch):
                batch = order[start:start + t.batch]
                for s in state.subspaces:
                    s.temperature = temperatures[min(step, len(temperatures) - 1)]
                loss = _loss(align, run, state, active, batch, grad=True)
                total = loss.sum() + sum(state.subspaces[i].penalty() for i in active)
                optimiser.zero_grad(set_to_none=True)
                total.backward()
                optimiser.step()
                losses[active] += loss.detach().cpu() * len(batch)
                step += 1
            dev_loss, dev_accuracy = _evaluate(align, run, state, active, align.split.dev)
            for slot, i in enumerate(active):
                p, j = align.candidates[i]
                state.loss[p, j, epoch] = losses[i] / len(order)
                state.dev[p, j, epoch] = dev_accuracy[slot]
                if dev_loss[slot] < best_loss[i] - 1e-6 or t.kind == "boundless":
                    best_loss[i], waited[i] = float(dev_loss[slot]), 0
                    best[i] = {k: v.detach().clone() for k, v in state.subspaces[i].state_dict().items()}
                else:
                    waited[i] += 1
            active = [i for i in active if waited[i] < t.patience]
            state.epochs_run = epoch + 1
            if not active:
                break
    for i, subspace in enumerate(state.subspaces):
        if best[i] is not None:
            subspace.load_state_dict(best[i])
    everyone = list(range(len(state.subspaces)))
    _, iia = _evaluate(align, run, state, everyone, align.split.heldout)
    for i, (p, j) in enumerate(align.candidates):
        state.iia[p, j] = iia[i]
        basis = state.subspaces[i].basis().cpu()
        state.size[p, j] = basis.shape[1]
        state.bases[p, j, :, : basis.shape[1]] = basis[:, : state.bases.shape[-1]]


def _initial(seed: int, point, k: int) -> torch.Generator:
    """Each candidate's first rotation depends on the seed, its site and k only, so trained with others or
    alone it starts (and so ends) the same."""
    return torch.Generator().manual_seed(zlib.crc32(repr((seed, point, k)).encode()))


def _evaluate(align, run, state, candidates: list[int], examples: torch.Tensor):
    losses, correct = torch.zeros(len(candidates)), torch.zeros(len(candidates))
    for start in range(0, len(examples), align.training.batch):
        batch = examples[start:start + align.training.batch]
        with torch.no_grad():
            loss, right = _loss(align, run, state, candidates, batch, grad=False, accuracy=True)
        losses += loss.cpu() * len(batch)
        correct += right.cpu()
    return losses / len(examples), correct / len(examples)


def _loss(align, run, state, candidates: list[int], batch: torch.Tensor, grad: bool, accuracy: bool = False):
    """(candidates,) mean cross-entropy of the counterfactual label; with `accuracy`, also correct counts."""
    experiment = run.experiment
    base, source = experiment.prompts[align.base], experiment.prompts[align.source]
    targets = [align.sweep.points[align.candidates[i][0]][0] for i in candidates]
    keys = {(t.site, t.layers[0]) for t in targets}
    sources = _source_activations(run, source, batch, keys)
    directions = [state.subspaces[i].directions() for i in candidates]
    hooks = {}
    for key in keys:
        owners = [slot for slot, t in enumerate(targets) if (t.site, t.layers[0]) == key]
        hooks[key] = _swap_hook(run, align, targets, owners, directions, sources[key], batch)
    rows = len(candidates)
    ids = base.ids[batch].repeat(rows, 1)
    mask = base.attention_mask[batch].repeat(rows, 1)
    read = (base.lengths[batch] - 1).repeat(rows)[:, None]
    output = run.runner.forward(ids, mask, hooks, read=read, grad=grad)
    logits = output.logits[:, 0].float()
    labels = align.labels[batch].to(logits.device).repeat(rows)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none").view(rows, len(batch)).mean(1)
    if not accuracy:
        return loss
    return loss, (logits.argmax(-1) == labels).view(rows, len(batch)).float().sum(1)


def _source_activations(run, source, batch: torch.Tensor, keys: set) -> dict:
    kept = {}

    def keep(key):
        def hook(act, start):
            kept[key] = act
            return act
        return hook
    run.runner.forward(source.ids[batch], source.attention_mask[batch], {key: keep(key) for key in keys},
                       read=(source.lengths[batch] - 1)[:, None])
    return {key: value.clone() for key, value in kept.items()}  # out of inference mode, usable in a graph


def _swap_hook(run, align, targets, owners: list[int], directions, source: torch.Tensor, batch: torch.Tensor):
    b = len(batch)
    wheres = {slot: run.masks.target(targets[slot], batch, align.base) for slot in owners}

    def apply(act, start):
        pieces, done = [], 0
        for slot in owners:
            if slot * b > done:
                pieces.append(act[done:slot * b])
            h = act[slot * b:(slot + 1) * b]
            where = wheres[slot][:, start:start + h.shape[1]].to(act.device)
            where = where.reshape(*where.shape, *([1] * (h.dim() - where.dim()))).to(h.dtype)
            weight, weights = directions[slot]
            src = source[:, start:start + h.shape[1]].to(h.dtype)
            pieces.append(swap(h, src, where, weight.to(h.dtype), None if weights is None else weights.to(h.dtype)))
            done = (slot + 1) * b
        if done < act.shape[0]:
            pieces.append(act[done:])
        return torch.cat(pieces)
    return apply


__all__ = ["train"]
