"""The training loop of `align`: every candidate subspace in the rows of one forward and backward.

Rows are candidate-major: candidate i owns rows [i b, (i + 1) b) of a batch of b pairs. A hook at
each (site, layer) swaps the subspace of the candidates writing there; the others pass through.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field

import torch

from causal.methods.base import first_layer
from causal.methods.rotations import BOUNDLESS_END_TEMPERATURE, BOUNDLESS_START_TEMPERATURE
from causal.models.adapter import BLOCK_INPUT
from causal.models.load import frozen_parameters
from causal.values import Resume

EPOCH_KEY = "align-{name}-epochs"  # one checkpoint per statement, rewritten each epoch
log = logging.getLogger(__name__)
ACTIVATIONS_PER_LAYER = 40  # (seq, d_model) tensors a block keeps per row for its backward (GPT-2: ~34, MLP at 4d)


@dataclass
class Progress:
    """What a killed training needs to go on from its last finished epoch (checkpointed after each)."""

    epoch: int = 0
    step: int = 0
    best: list = field(default_factory=list)  # per candidate: its best state_dict so far, or None
    best_loss: list = field(default_factory=list)
    waited: list = field(default_factory=list)
    active: list = field(default_factory=list)


def train(align, run, state) -> None:
    experiment = run.experiment
    t = align.training
    model = experiment.model
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32  # never trained in half precision
    state.subspaces = [align.new_module(p, j, initial(t.seed, align.sweep.points[p], t.ks[j]), dtype).to(model.device)
                       for p, j in align.candidates]
    parameters = [p for s in state.subspaces for p in s.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(parameters, lr=t.lr)
    steps_per_epoch = -(-len(align.split.train) // t.batch)
    temperatures = torch.linspace(BOUNDLESS_START_TEMPERATURE, BOUNDLESS_END_TEMPERATURE,
                                  max(1, t.epochs * steps_per_epoch)).tolist()
    n = len(state.subspaces)
    state.unpatched = Unpatched(align, run)
    progress = _resumed(align, run, state, optimiser) or Progress(0, 0, [None] * n, [float("inf")] * n, [0] * n,
                                                                  list(range(n)))
    with frozen_parameters(model.model):
        for epoch in range(progress.epoch, t.epochs):
            if not progress.active:
                break
            _epoch(align, run, state, optimiser, temperatures, progress, epoch)
            _checkpoint(align, run, state, optimiser, progress)
    for i, subspace in enumerate(state.subspaces):
        if progress.best[i] is not None:
            subspace.load_state_dict(progress.best[i])
    _warn_unreached(align, state)
    everyone = list(range(n))
    _, iia = _evaluate(align, run, state, everyone, align.split.heldout)
    state.unpatched = None  # its memory is the cache budget's again
    for i, (p, j) in enumerate(align.candidates):
        state.iia[p, j] = iia[i]
        saved = {name: tensor.cpu() for name, tensor in state.subspaces[i].saved().items()}
        state.size[p, j] = saved["basis"].shape[1]
        state.bases[p, j, :, : saved["basis"].shape[1]] = saved["basis"][:, : state.bases.shape[-1]]
        state.saved[(p, j)] = saved


def _warn_unreached(align, state) -> None:
    unreached = align.unreached(state)
    if unreached:
        log.warning("'%s': the loss never reached %d of %d candidates (%s): their edit cannot change the readout "
                    "(e.g. a last-layer site before the position read), so their subspaces stay as initialised and "
                    "their IIA is the unedited model's; listed in the results' attrs as unreached_candidates",
                    align.statement, len(unreached), len(align.candidates), "; ".join(unreached[:5]))


def _epoch(align, run, state, optimiser, temperatures: list[float], progress: Progress, epoch: int) -> None:
    """One pass over the training pairs; then dev loss decides each candidate's best and early stop."""
    t = align.training
    active = progress.active
    order = align.split.train[torch.randperm(len(align.split.train),
                                             generator=torch.Generator().manual_seed(t.seed + 1 + epoch))]
    losses = torch.zeros(len(state.subspaces))
    for start in range(0, len(order), t.batch):
        batch = order[start:start + t.batch]
        for s in state.subspaces:
            s.temperature = temperatures[min(progress.step, len(temperatures) - 1)]
        optimiser.zero_grad(set_to_none=True)
        loss = _loss(align, run, state, active, batch, grad=True)  # each forward's backward done inside
        optimiser.step()
        losses[active] += loss.cpu() * len(batch)
        progress.step += 1
    dev_loss, dev_accuracy = _evaluate(align, run, state, active, align.split.dev)
    for slot, i in enumerate(active):
        p, j = align.candidates[i]
        state.loss[p, j, epoch] = losses[i] / len(order)
        state.dev[p, j, epoch] = dev_accuracy[slot]
        if dev_loss[slot] < progress.best_loss[i] - 1e-6 or t.kind == "boundless":
            progress.best_loss[i], progress.waited[i] = float(dev_loss[slot]), 0
            progress.best[i] = {k: v.detach().clone() for k, v in state.subspaces[i].state_dict().items()}
        else:
            progress.waited[i] += 1
    progress.active = [i for i in active if progress.waited[i] < t.patience]
    progress.epoch = state.epochs_run = epoch + 1


def _checkpoint(align, run, state, optimiser, progress: Progress) -> None:
    """Everything as named tensors (safetensors, no pickle): weights, Adam's moments, bests, counters, curves."""
    if not run.checkpointed:
        return
    n = len(state.subspaces)
    tensors = {"loss": state.loss, "dev": state.dev,
               "counters": torch.tensor([progress.epoch, progress.step]),
               "best_loss": torch.tensor(progress.best_loss, dtype=torch.float64),
               "waited": torch.tensor(progress.waited),
               "active": torch.tensor([i in progress.active for i in range(n)]),
               "reached": torch.tensor([i in state.reached for i in range(n)])}
    for i, subspace in enumerate(state.subspaces):
        tensors.update({f"now.{i}.{k}": v.detach().cpu() for k, v in subspace.state_dict().items()})
        if progress.best[i] is not None:
            tensors.update({f"best.{i}.{k}": v.cpu() for k, v in progress.best[i].items()})
    for index, moments in optimiser.state_dict()["state"].items():
        tensors.update({f"adam.{index}.{k}": torch.as_tensor(v).cpu() for k, v in moments.items()})
    run.save(EPOCH_KEY.format(name=align.name), tensors)


def _resumed(align, run, state, optimiser) -> Progress | None:
    """The last finished epoch's Progress, its weights and Adam's state loaded; None to start afresh."""
    key = EPOCH_KEY.format(name=align.name)
    saved = run.saved(key)
    if saved is None:
        return None
    n, device = len(state.subspaces), run.experiment.model.device
    state.loss.copy_(saved["loss"])
    state.dev.copy_(saved["dev"])
    for i, subspace in enumerate(state.subspaces):
        subspace.load_state_dict({k: saved[f"now.{i}.{k}"] for k in subspace.state_dict()})
    best = [_prefixed(saved, f"best.{i}.", device) or None for i in range(n)]  # None: no epoch improved yet
    adam = optimiser.state_dict()
    indices = {int(name.split(".")[1]) for name in saved if name.startswith("adam.")}
    adam["state"] = {index: _prefixed(saved, f"adam.{index}.", device) for index in indices}
    for moments in adam["state"].values():
        moments["step"] = moments["step"].cpu()  # Adam keeps its step count on the CPU
    optimiser.load_state_dict(adam)
    reached = saved.get("reached")  # None: a checkpoint from before it was kept; claim no candidate unreached
    state.reached = {i for i in range(n) if reached is None or bool(reached[i])}
    epoch, step = saved["counters"].tolist()
    state.epochs_run = epoch
    log.warning("resuming %s: %d of %d epochs already trained", align.name, epoch, align.training.epochs)
    return Progress(epoch, step, best, saved["best_loss"].tolist(), saved["waited"].tolist(),
                    [i for i in range(n) if bool(saved["active"][i])])


def _prefixed(saved: dict, prefix: str, device) -> dict:
    """The tensors saved under `prefix`, keyed by the rest of their name, on `device`."""
    return {name[len(prefix):]: tensor.to(device) for name, tensor in saved.items() if name.startswith(prefix)}


def initial(seed: int, point, k: int) -> torch.Generator:
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
    """(candidates,) mean cross-entropy of the label (align: the counterfactual answer, reft: the target); with
    `accuracy`, also correct counts. With `grad`, each forward's backward is run here (the parameters'
    gradients accumulate; candidates share none) and the losses come back detached.

    Candidates are grouped by the layer their site is at: each group's forward resumes there from the base
    run's residual stream, as a sweep's jobs do, so blocks below a site are run once per batch, not per
    candidate. A group too large for one forward's activations (the run's cache budget) is split."""
    targets = [align.sweep.points[align.candidates[i][0]][0] for i in candidates]
    sources = state.unpatched.get(align.source, batch) if align.source else {}
    starts = state.unpatched.get(align.base, batch)
    groups: dict[int, list[int]] = {}
    for slot, i in enumerate(candidates):
        groups.setdefault(_start_layer(align, run, align.candidates[i][0]), []).append(slot)
    per_forward = max(1, _rows_per_forward(run, grad) // len(batch))
    losses, rights = [None] * len(candidates), [None] * len(candidates)  # per slot, filled forward by forward
    for layer, slots in groups.items():
        for first in range(0, len(slots), per_forward):
            part = slots[first:first + per_forward]
            loss, right = _forward(align, run, state, [candidates[s] for s in part], [targets[s] for s in part],
                                   layer, sources, starts, batch, grad)
            if grad:
                loss.sum().backward()
                _note_reached(state, [candidates[s] for s in part])
                penalty = sum(state.subspaces[candidates[s]].penalty() for s in part)
                if isinstance(penalty, torch.Tensor) and penalty.requires_grad:
                    penalty.backward()  # after the note: a size penalty's gradient is not the loss reaching
                loss = loss.detach()
            for g, slot in enumerate(part):
                losses[slot], rights[slot] = loss[g], right[g]
    return (torch.stack(losses), torch.stack(rights)) if accuracy else torch.stack(losses)


def _note_reached(state, candidates: list[int]) -> None:
    """Which candidates the loss's gradient has reached: one whose edit cannot change the readout (a last-layer
    site before the read position) gets exactly zero, trains nothing, and is reported as such."""
    for i in set(candidates) - state.reached:  # once reached, not looked at again (each look is a device sync)
        if any(p.grad is not None and bool(p.grad.any()) for p in state.subspaces[i].parameters()):
            state.reached.add(i)


def _forward(align, run, state, candidates: list[int], targets, layer: int, sources: dict, starts: dict,
             batch: torch.Tensor, grad: bool):
    """One forward of len(candidates) x len(batch) rows, resumed at `layer`: (loss, correct) per candidate."""
    base = run.experiment.prompts[align.base]
    editors = [state.subspaces[i].editor() for i in candidates]
    hooks = {}
    for key in {(t.site, t.layers[0]) for t in targets}:
        owners = [g for g, t in enumerate(targets) if (t.site, t.layers[0]) == key]
        hooks[key] = _edit_hook(run, align, targets, owners, editors, sources.get(key), batch)
    rows = len(candidates)
    resume = Resume(layer, 0, starts[(BLOCK_INPUT, layer)].repeat(rows, 1, 1)) if layer else None
    output = run.forward(base.ids[batch].repeat(rows, 1), base.attention_mask[batch].repeat(rows, 1), hooks,
                         resume=resume, read=(base.lengths[batch] - 1).repeat(rows)[:, None], grad=grad,
                         what=f"{rows} candidates x {len(batch)} pairs training '{align.statement}'")
    logits = output.logits[:, 0].float()
    labels = align.labels[batch].to(logits.device).repeat(rows)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none").view(rows, len(batch)).mean(1)
    return loss, (logits.argmax(-1) == labels).view(rows, len(batch)).float().sum(1)


def _rows_per_forward(run, grad: bool) -> int:
    """Rows whose activations (kept for the backward when training) fit in the run's cache budget: a rough
    ACTIVATIONS_PER_LAYER tensors of (seq, d_model) per block and row; unbounded without a budget."""
    budget = run.cache_bytes
    if budget is None:
        return 1 << 30
    experiment = run.experiment
    adapter = experiment.model.adapter
    seq = max(p.ids.shape[1] for p in experiment.prompts.values())
    width = adapter.site_info(BLOCK_INPUT).features if BLOCK_INPUT in adapter.site_names else 1
    per_row = seq * width * max(adapter.n_layers, 1) * (ACTIVATIONS_PER_LAYER if grad else 2) * 4
    return int(budget // per_row)


def _start_layer(align, run, point: int) -> int:
    """Where a candidate's rows begin: its site's layer, or 0 for the reference path (optimize=False)."""
    if not run.optimize or not run.experiment.model.adapter.has_blocks:
        return 0
    return first_layer(align.sweep.points[point])


class Unpatched:
    """What training reads from unpatched runs: the source run's activations at every candidate's site, the
    base run's block inputs where candidates' forwards resume. Recorded once for all pairs when they fit
    in the run's cache budget (every epoch then reuses them), else run again for each batch."""

    def __init__(self, align, run):
        self.run = run
        layers = {_start_layer(align, run, p) for p in range(len(align.sweep.points))}
        self.keys = {align.source: {(point[0].site, point[0].layers[0]) for point in align.sweep.points}} \
            if align.source else {}
        self.keys.setdefault(align.base, set()).update((BLOCK_INPUT, layer) for layer in layers if layer > 0)
        self.kept: dict[str, dict] | None = None
        n, batch = run.experiment.n_examples, run.batch_size
        first = {column: self.computed(column, torch.arange(min(batch, n))) for column in self.keys}
        first_bytes = sum(v.numel() * v.element_size() for kept in first.values() for v in kept.values())
        if run.cache_bytes is None or first_bytes / min(batch, n) * n <= run.cache_bytes:
            self.kept = {column: self._all(column, first[column], batch, n) for column in self.keys if first[column]}

    def _all(self, column: str, first: dict, batch: int, n: int) -> dict:
        """Every example's activations of `column`, its first batch (already run) joined by the others'."""
        rest = [self.computed(column, torch.arange(s, min(s + batch, n))) for s in range(batch, n, batch)]
        return {key: torch.cat([first[key], *(part[key] for part in rest)]) for key in first}

    def get(self, column: str, batch: torch.Tensor) -> dict:
        if self.kept is None:
            return self.computed(column, batch)
        kept = self.kept.get(column, {})
        return {key: values[batch.to(values.device)] for key, values in kept.items()}

    def computed(self, column: str, batch: torch.Tensor) -> dict:
        return _activations(self.run, self.run.experiment.prompts[column], batch, self.keys[column])


def _activations(run, prompts, batch: torch.Tensor, keys: set) -> dict:
    """One unpatched forward of the batch keeping the activations at `keys`, detached."""
    if not keys:
        return {}
    kept = {}

    def keep(key):
        def hook(act, start):
            kept[key] = act
            return act
        return hook
    run.forward(prompts.ids[batch], prompts.attention_mask[batch], {key: keep(key) for key in keys},
                read=(prompts.lengths[batch] - 1)[:, None], what=f"{len(batch)} unpatched rows for training")
    return {key: value.clone() for key, value in kept.items()}  # out of inference mode, usable in a graph


def _edit_hook(run, align, targets, owners: list[int], editors, source: torch.Tensor | None, batch: torch.Tensor):
    """Each owner's rows (slot-major blocks of the batch) edited by its own candidate; the others pass."""
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
            src = None if source is None else source[:, start:start + h.shape[1]]
            pieces.append(editors[slot](h, src, where))
            done = (slot + 1) * b
        if done < act.shape[0]:
            pieces.append(act[done:])
        return torch.cat(pieces)
    return apply


__all__ = ["train"]
