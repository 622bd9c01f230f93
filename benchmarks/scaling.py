"""How causal's time grows with examples, tokens, layers and d_model, against a naive hook loop and the FLOP floor.

    python benchmarks/scaling.py [--repeats 2] [--tl] [--memory] [--plot benchmarks/scaling.png]

A `resid_pre` layer x position patching sweep (benchmarks/sweep.py's, on seeded random GPT-2-shaped
models) timed at each point of one axis while the others stay at the base shape. For each axis it fits
the exponent of time ~ size^k (log-log least squares) for naive, causal and the floor's FLOPs
(benchmarks/sweep.py's `flop_ratio`), prints a table and saves a log-log plot. causal tracking the
floor means its exponent is the floor's, not the naive loop's. `--tl` adds TransformerLens at the
smallest point of each axis; `--memory` measures peak resident memory (each run in its own process)
as examples and tokens grow, with and without a small `cache_gb`, which bounds the cached activations.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a script: make `causal` (this checkout's) and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import causal  # noqa: E402
from benchmarks.references import build_gpt2, save_model_folder, write_causal_experiment  # noqa: E402
from benchmarks.sweep import (  # noqa: E402
    STATEMENTS, causal_sweep, data_rows, flop_ratio, machine, make_inputs, naive_sweep, transformer_lens_sweep,
)

BASE = dict(examples=8, tokens=12, layers=4, d_model=256)
AXES = {"examples": [4, 8, 16, 32], "tokens": [6, 12, 24], "layers": [2, 4, 8], "d_model": [128, 256, 512]}
VOCAB, HEAD_DIM = 2048, 64


def shape_at(axis: str, value: int) -> dict:
    return {**BASE, axis: value}


def measure(shape: dict, repeats: int, with_tl: bool, folder: Path) -> dict:
    """Best-of-`repeats` seconds of naive and causal (and TL) on one shape, and the FLOPs of naive and floor."""
    model = build_gpt2(n_layer=shape["layers"], n_embd=shape["d_model"], n_head=shape["d_model"] // HEAD_DIM,
                       vocab=VOCAB, n_positions=64)
    inputs = make_inputs(shape["examples"], shape["tokens"], VOCAB, seed=0)
    model_folder = save_model_folder(model, folder / "model")
    path = write_causal_experiment(folder, model_folder, data_rows(inputs),
                                   f"metric logprob(io)\n{STATEMENTS['resid_pre']}")
    config = causal.RunConfig(device="cpu", progress=False)
    experiment = causal.prepare(path, config)
    methods = {"naive": lambda: naive_sweep(model, inputs, "resid_pre", "cpu"),
               "causal": lambda: causal_sweep(experiment, config, "resid_pre")}
    if with_tl:
        from benchmarks.references import boot_transformer_lens
        bridge = boot_transformer_lens(model_folder)
        methods["tl"] = lambda: transformer_lens_sweep(bridge, inputs, "resid_pre", "cpu")
    seconds = {}
    results = {}
    for name, compute in methods.items():
        compute()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            results[name] = compute()
            times.append(time.perf_counter() - start)
        seconds[name] = min(times)
    gap = float(np.nanmax(np.abs(results["naive"] - results["causal"])))
    naive, floor, _ = flop_ratio("resid_pre", shape["layers"], shape["d_model"] // HEAD_DIM, shape["d_model"], VOCAB,
                                 shape["tokens"])
    return {**seconds, "naive_flops": naive * shape["examples"], "floor_flops": floor * shape["examples"], "gap": gap}


def exponent(sizes: list[int], values: list[float]) -> float:
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def scaling(repeats: int, with_tl: bool) -> dict[str, list[dict]]:
    table: dict[str, list[dict]] = {}
    for axis, values in AXES.items():
        table[axis] = []
        for i, value in enumerate(values):
            with tempfile.TemporaryDirectory() as tmp:
                table[axis].append({axis: value, **measure(shape_at(axis, value), repeats, with_tl and i == 0,
                                                           Path(tmp))})
    return table


def report(table: dict[str, list[dict]]) -> None:
    for axis, rows in table.items():
        sizes = [row[axis] for row in rows]
        print(f"\n{axis} (others at {', '.join(f'{k}={v}' for k, v in BASE.items() if k != axis)})")
        print(f"{axis:>9} {'naive s':>9} {'causal s':>9} {'TL s':>7} {'naive/causal':>13} {'floor ratio':>12} {'max|diff|':>10}")
        for row in rows:
            tl = f"{row['tl']:7.2f}" if "tl" in row else f"{'':7}"
            print(f"{row[axis]:>9} {row['naive']:9.3f} {row['causal']:9.3f} {tl} {row['naive'] / row['causal']:13.2f} "
                  f"{row['naive_flops'] / row['floor_flops']:12.2f} {row['gap']:10.1e}")
        fits = {name: exponent(sizes, [row[key] for row in rows])
                for name, key in (("naive", "naive"), ("causal", "causal"), ("naive FLOPs", "naive_flops"),
                                  ("floor FLOPs", "floor_flops"))}
        print("exponents (time ~ size^k): " + ", ".join(f"{name} {k:.2f}" for name, k in fits.items()))


def plot(table: dict[str, list[dict]], path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 9))
    for ax, (axis, rows) in zip(fig.subplots(2, 2).flat, table.items()):
        sizes = [row[axis] for row in rows]
        for key, style in (("naive", "o-"), ("causal", "s-")):
            ax.loglog(sizes, [row[key] for row in rows], style, label=f"{key} (k={exponent(sizes, [r[key] for r in rows]):.2f})")
        floor = np.array([row["floor_flops"] for row in rows])
        scale = rows[0]["causal"] / floor[0]  # the floor's FLOPs, drawn through causal's first point
        ax.loglog(sizes, floor * scale, "k--", label=f"floor FLOPs (k={exponent(sizes, list(floor)):.2f})")
        ax.set_xlabel(axis)
        ax.set_ylabel("seconds")
        ax.set_title(f"resid_pre sweep vs {axis}")
        ax.legend(fontsize=8)
    fig.suptitle(f"causal scaling; {machine('cpu')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


PEAK_RSS = """
import json, resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, {root!r})
import causal
from benchmarks.references import build_gpt2, save_model_folder, write_causal_experiment
from benchmarks.sweep import STATEMENTS, data_rows, make_inputs
examples, tokens, cache_gb = {examples}, {tokens}, {cache_gb}
with tempfile.TemporaryDirectory() as tmp:
    model = save_model_folder(build_gpt2(n_layer=4, n_embd=256, n_head=4, vocab=2048, n_positions=64), Path(tmp) / "m")
    inputs = make_inputs(examples, tokens, 2048, seed=0)
    path = write_causal_experiment(Path(tmp), model, data_rows(inputs), "metric logprob(io)\\n" + STATEMENTS["resid_pre"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    causal.run(path, causal.RunConfig(device="cpu", progress=False, cache_gb=cache_gb))
    print(json.dumps(dict(before=before, after=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
"""


def peak_memory() -> None:
    """Peak resident memory of whole runs, each in a fresh process (ru_maxrss never goes down)."""
    root = str(Path(__file__).resolve().parent.parent)
    print("\npeak resident memory of one run (MiB; the growth over the process before the run)")
    print(f"{'examples':>9} {'tokens':>7} {'cache_gb':>9} {'peak':>8} {'growth':>8}")
    for examples, tokens in ((64, 24), (256, 24), (1024, 24), (256, 12), (256, 48)):
        for cache_gb in (None, 0.001):
            code = PEAK_RSS.format(root=root, examples=examples, tokens=tokens, cache_gb=cache_gb)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            rss = json.loads(out.strip().splitlines()[-1])
            print(f"{examples:>9} {tokens:>7} {str(cache_gb):>9} {rss['after'] / 1024:8.0f} "
                  f"{(rss['after'] - rss['before']) / 1024:8.0f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tl", action="store_true", help="TransformerLens too, at the smallest point of each axis")
    parser.add_argument("--memory", action="store_true", help="peak memory as examples and tokens grow")
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/scaling.png"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(machine("cpu"))
    table = scaling(args.repeats, args.tl)
    report(table)
    plot(table, args.plot)
    print(f"\nplot: {args.plot}")
    if args.memory:
        peak_memory()
    worst = max(row["gap"] for rows in table.values() for row in rows)
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
