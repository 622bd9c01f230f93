"""Train the same DAS candidates with pyvene, one at a time, and with causal's `align`, all together.

    python benchmarks/das_pyvene.py [--examples 640] [--epochs 8] [--k 1] [--tolerance 0.05]

Task and model: the zoo's hierarchical-equality toy (GPT-2, 2 layers, d 64) and `data hiereq`.
Candidates: a k-dimensional DAS rotation at resid_post (pyvene's block_output) of every layer and
position, predicting cf_wx. Both sides start each candidate from the same rotation (causal's seeded
first rotation, copied into pyvene's RotatedSpaceIntervention), see the same batches in the same
order, take Adam steps at the same learning rate, keep the weights of the epoch with the lowest dev
loss (patience is the epoch count, so no candidate stops early on one side only) and report accuracy
on the same held-out pairs. pyvene's loop is the one its DAS tutorial writes: one IntervenableModel
per candidate, the source run inside every step.

Prints per-candidate IIAs, the largest difference (exits non-zero past --tolerance: the two float32
trainings differ by rounding, which Adam's first steps magnify, so IIAs agree closely, not exactly)
and the time ratio. Times cover training and held-out evaluation, not loading.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

import causal
from causal.methods.rotations import Subspace
from causal.methods.training import initial

hf_logging.set_verbosity_error()


def experiment_text(examples: int, epochs: int, k: int) -> str:
    return ('model "zoo:hiereq-gpt2"\n'
            f"data hiereq(n={examples}, seed=0)\n"
            "metric accuracy(cf_wx) at -1\n"
            f"align resid_post[layer=*, pos=*] from source into base predicting cf_wx "
            f"by das(k={k}, epochs={epochs}, patience={epochs}) as wx\n")


def time_causal(path: Path) -> tuple[float, dict]:
    config = causal.RunConfig(progress=False)
    experiment = causal.prepare(path, config)
    start = time.perf_counter()
    ds = causal.run_prepared(experiment, config)
    seconds = time.perf_counter() - start
    iia = ds["wx_iia"].squeeze("k")
    return seconds, {(int(l), int(p)): float(iia.sel(layer=l, pos=p)) for l in iia.layer for p in iia.pos}


def time_pyvene(path: Path) -> tuple[float, dict]:
    import pyvene
    experiment = causal.prepare(path, causal.RunConfig(progress=False))
    align = experiment.interventions[0]
    model = experiment.model.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    base, source = experiment.prompts[align.base], experiment.prompts[align.source]
    assert align.sweep.dims == ("layer", "pos"), align.sweep.dims
    sites = itertools.product(align.sweep.coords["layer"], align.sweep.coords["pos"])  # the points' order
    start = time.perf_counter()
    results = {(layer, position): _train_one(pyvene, model, align, base, source, point, layer, position)
               for (layer, position), point in zip(sites, align.sweep.points)}
    return time.perf_counter() - start, results


def _train_one(pyvene, model, align, base, source, point, layer: int, position: int) -> float:
    t = align.training
    k = t.ks[0]
    config = pyvene.IntervenableConfig(representations=[{"layer": layer, "component": "block_output", "unit": "pos",
                                                         "intervention_type": pyvene.RotatedSpaceIntervention}])
    intervenable = pyvene.IntervenableModel(config, model)
    intervenable.disable_model_gradients()
    intervention = next(iter(intervenable.interventions.values()))
    intervention = intervention[0] if isinstance(intervention, (list, tuple)) else intervention
    intervention.rotate_layer.load_state_dict(Subspace("das", align.width, k, initial(t.seed, point, k))
                                              .rotation.state_dict())
    intervention.set_interchange_dim(k)
    optimiser = torch.optim.Adam(intervention.rotate_layer.parameters(), lr=t.lr)

    def loss_and_correct(batch):
        where = [[[position]] * len(batch)]
        _, out = intervenable({"input_ids": base.ids[batch]}, [{"input_ids": source.ids[batch]}],
                              {"sources->base": (where, where)})
        logits = out.logits[torch.arange(len(batch)), base.lengths[batch] - 1]
        labels = align.labels[batch]
        return torch.nn.functional.cross_entropy(logits, labels), (logits.argmax(-1) == labels).sum()

    def evaluate(examples):
        with torch.no_grad():
            parts = [loss_and_correct(examples[s:s + t.batch]) for s in range(0, len(examples), t.batch)]
        sizes = [min(t.batch, len(examples) - s) for s in range(0, len(examples), t.batch)]
        return (sum(float(l) * n for (l, _), n in zip(parts, sizes)) / len(examples),
                sum(int(c) for _, c in parts) / len(examples))

    best, best_loss = None, float("inf")
    for epoch in range(t.epochs):
        order = align.split.train[torch.randperm(len(align.split.train),
                                                 generator=torch.Generator().manual_seed(t.seed + 1 + epoch))]
        for start in range(0, len(order), t.batch):
            loss, _ = loss_and_correct(order[start:start + t.batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        dev_loss, _ = evaluate(align.split.dev)
        if dev_loss < best_loss - 1e-6:
            best_loss = dev_loss
            best = {name: value.detach().clone() for name, value in intervention.rotate_layer.state_dict().items()}
    intervention.rotate_layer.load_state_dict(best)
    return evaluate(align.split.heldout)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest allowed IIA difference")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "das.cx"
        path.write_text(experiment_text(args.examples, args.epochs, args.k))
        pyvene_seconds, pyvene_iia = time_pyvene(path)
        causal_seconds, causal_iia = time_causal(path)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{len(causal_iia)} DAS candidates (k={args.k}), {args.epochs} epochs, {args.examples} pairs")
    print(f"{'layer':>5} {'pos':>4} {'pyvene IIA':>11} {'causal IIA':>11}")
    for key in sorted(causal_iia):
        print(f"{key[0]:>5} {key[1]:>4} {pyvene_iia[key]:>11.3f} {causal_iia[key]:>11.3f}")
    worst = max(abs(pyvene_iia[key] - causal_iia[key]) for key in causal_iia)
    print(f"largest IIA difference {worst:.3f} (tolerance {args.tolerance})")
    print(f"pyvene, one candidate at a time: {pyvene_seconds:.2f} s")
    print(f"causal, all candidates together: {causal_seconds:.2f} s")
    print(f"ratio: {pyvene_seconds / causal_seconds:.2f}x")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
