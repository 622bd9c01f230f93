"""Time a recording of every layer's residual stream (issue 16 item 6): causal's `record` against a naive loop.

    python benchmarks/record.py [--examples 64] [--tokens 32] [--repeats 1] [--quick]

One seeded random GPT-2-small-shaped model (12 layers, d_model 768, float32; no download). causal:
`record resid_pre as resid`, one forward per batch of examples with a hook per layer. Naive baseline:
what a hook-per-run script does, one forward per layer with one hook keeping that layer's input. Both
keep every layer x position x d_model for every example; they must agree exactly (max |diff| printed).
Prints the ratio, the bytes, and the time and bytes extrapolated linearly to 1000 examples x the same
tokens (the work is linear in examples).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

if not __package__:  # run as a script: make `causal` (this checkout's) and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import causal
from benchmarks.references import build_gpt2, save_model_folder, write_causal_experiment
from benchmarks.sweep import GPT2_SMALL, TINY, machine


@torch.inference_mode()
def naive_record(model, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(layer, pos, example, d_model): one forward per layer and batch, a hook keeping that block's input."""
    layers = []
    for block in model.transformer.h:
        kept = []
        handle = block.register_forward_pre_hook(lambda _m, args, kept=kept: kept.append(args[0].detach().clone()))
        try:
            for start in range(0, len(ids), batch):
                model(ids[start:start + batch], use_cache=False)
        finally:
            handle.remove()
        layers.append(torch.cat(kept))  # (example, pos, d_model)
    return torch.stack(layers).transpose(1, 2)


def causal_record(experiment, config) -> torch.Tensor:
    dataset = causal.run_prepared(experiment, config)
    return torch.from_numpy(dataset["resid"].transpose("layer", "pos", "example", "d_model").values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help=f"tiny model {TINY} for a smoke run")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    shape = TINY if args.quick else GPT2_SMALL
    print(f"machine: {machine('cpu')}")
    print(f"model: random GPT-2 {shape}, float32; {args.examples} examples x {args.tokens} tokens; "
          f"batch {args.batch_size} rows for both; {args.repeats} repeat(s), round-robin")
    model = build_gpt2(**shape, seed=0)
    ids = torch.randint(1, shape["vocab"], (args.examples, args.tokens), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_folder(model, Path(tmp) / "model")
        rows = [{"clean": row} for row in ids.tolist()]
        path = write_causal_experiment(Path(tmp), folder, rows, "metric logprob(next) at -2\nrecord resid_pre as resid")
        config = causal.RunConfig(device="cpu", progress=False, batch_size=args.batch_size, record_memory_gb=64)
        experiment = causal.prepare(path, config)
        times = {"naive loop": [], "causal": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            naive = naive_record(model, ids, args.batch_size)
            times["naive loop"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ours = causal_record(experiment, config)
            times["causal"].append(time.perf_counter() - start)
    gap = float((naive - ours).abs().max())
    recorded = ours.numel() * ours.element_size()
    print(f"agreement naive vs causal: max |diff| {gap:.2e} {'ok' if gap <= 1e-5 else 'TOO LARGE'}")
    for name, runs in times.items():
        print(f"time {name:11s} median {statistics.median(runs):8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in runs)})")
    naive_s, causal_s = statistics.median(times["naive loop"]), statistics.median(times["causal"])
    print(f"ratio naive / causal {naive_s / causal_s:.2f} (floor: {shape['n_layer']}, one forward instead of one "
          f"per layer)")
    scale = 1000 / args.examples
    print(f"recording: {recorded / 2**20:.1f} MiB; at 1000 x {args.tokens} tokens: {recorded * scale / 2**30:.2f} GiB, "
          f"causal about {causal_s * scale:.0f} s, naive about {naive_s * scale:.0f} s on this machine")
    return 0 if gap <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
