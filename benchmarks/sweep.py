"""Time one activation-patching sweep three ways: TransformerLens, a naive hook loop, and causal.

    python benchmarks/sweep.py [--device cpu|cuda] [--examples 8] [--tokens 16] [--repeats 3] [--quick]

One seeded random GPT-2-small-shaped model (float32), clean/corrupt token-id prompts of equal
length (corrupt differs at one or two positions), metric: log-prob of an answer token at the last
position. Direction is TransformerLens' (denoising): run the corrupt prompts, patch in activations
of the clean run. Two sweeps:

- resid_pre: every (layer, position); TL `patching.get_act_patch_resid_pre`.
- head: every (layer, head) at the last position, patching the head's z (before the output
  projection); TL `patching.generic_activation_patch` with an index_df of (layer, last pos, head).

Each method's time covers all of its work after loading: the source (clean) run it reads
activations from, then every patched forward (causal's also its two baseline runs and building the
Dataset). Times: median and best of --repeats runs (best is the steadier figure on a shared machine,
where other load only ever adds time). Exits non-zero when any two methods differ by more than
--tolerance anywhere.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pandas as pd
import torch
from transformer_lens import patching
from transformers.utils import logging as hf_logging

if not __package__:  # run as a script: make `causal` (this checkout's) and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import causal  # noqa: E402
from benchmarks.references import (  # noqa: E402
    answer_logprob, boot_transformer_lens, build_gpt2, max_logit_gap, naive_head_sweep,
    naive_resid_pre_sweep, save_model_folder, write_causal_experiment,
)

GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257, n_positions=1024)
TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab=512, n_positions=64)

STATEMENTS = {
    "resid_pre": "patch resid_pre[layer=*, pos=*] from clean into corrupt as sweep",
    "head": "patch z[layer=*, head=*, pos=-1] from clean into corrupt as sweep",
}
AXES = {"resid_pre": ("layer", "pos", "example"), "head": ("layer", "head", "example")}


@dataclass
class Inputs:
    clean: torch.Tensor  # (examples, tokens)
    corrupt: torch.Tensor
    answers: torch.Tensor  # (examples,)


def make_inputs(examples: int, tokens: int, vocab: int, seed: int) -> Inputs:
    """Random ids (never 0, the pad/BOS id); corrupt differs at the middle position, and odd examples
    also at the second-to-last one."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (examples, tokens), generator=gen)
    corrupt = clean.clone()
    for row in range(examples):
        for pos in ([tokens // 2] if row % 2 == 0 else [tokens // 2, tokens - 2]):
            shift = int(torch.randint(1, vocab - 1, (1,), generator=gen))  # never a multiple of vocab - 1
            corrupt[row, pos] = (clean[row, pos] - 1 + shift) % (vocab - 1) + 1
    return Inputs(clean, corrupt, torch.randint(1, vocab, (examples,), generator=gen))


def data_rows(inputs: Inputs) -> list[dict]:
    """The prompts as a data file's rows (token ids), with the answer in `io`."""
    return [{"clean": c, "corrupt": k, "io": a}
            for c, k, a in zip(inputs.clean.tolist(), inputs.corrupt.tolist(), inputs.answers.tolist())]


# ---- the three methods; each returns (sites..., example) as a float32 numpy array on the CPU ----

def transformer_lens_sweep(bridge, inputs: Inputs, sweep: str, device) -> np.ndarray:
    clean, corrupt = inputs.clean.to(device), inputs.corrupt.to(device)
    metric = answer_logprob(inputs.answers.to(device))
    hook = "hook_resid_pre" if sweep == "resid_pre" else "attn.hook_z"
    _, cache = bridge.run_with_cache(clean, names_filter=lambda name: name.endswith(hook))
    with mock.patch.object(patching, "tqdm", partial(patching.tqdm, disable=True)):  # its per-site progress bar
        if sweep == "resid_pre":
            result = patching.get_act_patch_resid_pre(bridge, corrupt, cache, metric, reduce="none")
            return result.values.float().cpu().numpy()
        layers, heads, last = bridge.cfg.n_layers, bridge.cfg.n_heads, corrupt.shape[1] - 1
        index = pd.DataFrame([(layer, last, head) for layer in range(layers) for head in range(heads)],
                             columns=["layer", "pos", "head"])
        result = patching.generic_activation_patch(
            bridge, corrupt, cache, metric, patch_setter=patching.layer_pos_head_vector_patch_setter,
            activation_name="z", index_df=index, reduce="none")
        return result.values.float().cpu().numpy().reshape(layers, heads, -1)


def naive_sweep(model, inputs: Inputs, sweep: str, device) -> np.ndarray:
    clean, corrupt = inputs.clean.to(device), inputs.corrupt.to(device)
    metric = answer_logprob(inputs.answers.to(device))
    run = naive_resid_pre_sweep if sweep == "resid_pre" else naive_head_sweep
    return run(model, corrupt, clean, metric).numpy()


def causal_sweep(experiment, config: causal.RunConfig, sweep: str) -> np.ndarray:
    array = causal.run_prepared(experiment, config)["sweep"]
    if sweep == "head":
        array = array.squeeze("pos", drop=True)
    return array.transpose(*AXES[sweep]).values.astype(np.float32)


# ---- timing ----

def timed(methods: dict[str, Callable[[], np.ndarray]], repeats: int, warmup: int,
          device) -> dict[str, tuple[np.ndarray, list[float]]]:
    """Each method's last result and its run times. Repeats go round-robin over the methods, so a
    change in machine load (other processes) spreads over all of them instead of hitting one."""
    for _ in range(warmup):
        for compute in methods.values():
            compute()
    out: dict[str, tuple[np.ndarray, list[float]]] = {name: (None, []) for name in methods}
    for _ in range(repeats):
        for name, compute in methods.items():
            synchronize(device)
            start = time.perf_counter()
            result = compute()
            synchronize(device)
            out[name] = (result, [*out[name][1], time.perf_counter() - start])
    return out


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- FLOPs (matmuls only, 2 per multiply-add; LayerNorm, softmax, GELU, biases left out) ----

def block_flops(d: int, position: int) -> int:
    """One block at one position: QKV 6d², attention 4d(position+1) (scores + weighted sum over the
    keys at 0..position), output projection 2d², MLP 16d²."""
    return 24 * d * d + 4 * d * (position + 1)


def full_forward_flops(layers: int, d: int, vocab: int, tokens: int) -> int:
    """What a plain HF forward does: every block at every position, logits at every position."""
    return layers * sum(block_flops(d, t) for t in range(tokens)) + tokens * 2 * d * vocab


def site_floor_flops(sweep: str, layer: int, pos: int, layers: int, d: int, vocab: int, tokens: int) -> int:
    """The least one patched site needs, given the base run's cached residuals and keys/values:
    resid_pre at (l, p): blocks l..L-1 at positions p..S-1 (earlier positions' keys/values are
    cached); head z at (l, S-1): layer l's output projection and MLP at S-1, then blocks l+1..L-1
    at S-1. Plus logits at the one position the metric reads."""
    if sweep == "resid_pre":
        work = (layers - layer) * sum(block_flops(d, t) for t in range(pos, tokens))
    else:
        work = 18 * d * d + (layers - layer - 1) * block_flops(d, tokens - 1)
    return work + 2 * d * vocab


def flop_ratio(sweep: str, layers: int, heads: int, d: int, vocab: int, tokens: int) -> tuple[float, float, float]:
    """(naive FLOPs, floor FLOPs, naive / floor) per example. Naive: one full forward for the source
    run plus one per site. Floor: the base and source runs without logits, plus each site's floor."""
    full = full_forward_flops(layers, d, vocab, tokens)
    sites = ([(l, p) for l in range(layers) for p in range(tokens)] if sweep == "resid_pre"
             else [(l, tokens - 1) for l in range(layers) for _ in range(heads)])
    naive = (1 + len(sites)) * full
    trunk = full - tokens * 2 * d * vocab
    floor = 2 * trunk + sum(site_floor_flops(sweep, l, p, layers, d, vocab, tokens) for l, p in sites)
    return naive, floor, naive / floor


# ---- report ----

def si(flops: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}FLOP"
    return f"{flops:.3g} FLOP"

def machine(device) -> str:
    if torch.device(device).type == "cuda":
        where = f"GPU {torch.cuda.get_device_name()}"
    else:
        where = f"CPU {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    load = ", load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return f"{where}; torch {torch.__version__}; python {platform.python_version()}{load}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; median and best are reported")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs per method first (default: 1 on cuda, 0 on cpu)")
    parser.add_argument("--batch-size", type=int, default=causal.RunConfig().batch_size,
                        help="causal's rows per forward (RunConfig.batch_size)")
    parser.add_argument("--sweeps", nargs="+", default=list(STATEMENTS), choices=list(STATEMENTS))
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"tiny model {TINY} for a smoke run")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.device == "cuda" else 0
    if args.tokens < 3 or args.examples < 1 or args.repeats < 1:
        parser.error("need --tokens >= 3, --examples >= 1, --repeats >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    shape = TINY if args.quick else GPT2_SMALL
    print(f"machine: {machine(args.device)}")
    print(f"model: random GPT-2 {shape}, float32, seed {args.seed}; {args.examples} examples x {args.tokens} "
          f"tokens; causal batch_size {args.batch_size}; {args.repeats} repeat(s) (round-robin "
          f"over the methods) after {args.warmup} warm-up run(s)")
    model = build_gpt2(**shape, seed=args.seed)
    inputs = make_inputs(args.examples, args.tokens, shape["vocab"], args.seed)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_folder(model, Path(tmp) / "model")
        model = model.to(args.device)
        bridge = boot_transformer_lens(folder, args.device)
        gap = max_logit_gap(bridge, model, inputs.clean.to(args.device))
        print(f"TransformerLens vs HF logits: max |diff| {gap:.2e}")
        if gap > args.tolerance:
            failures.append(f"TransformerLens logits differ from HF's by {gap:.2e}")
        rows = data_rows(inputs)
        config = causal.RunConfig(device=args.device, progress=False, batch_size=args.batch_size, seed=args.seed)
        for sweep in args.sweeps:
            workdir = Path(tmp) / sweep
            workdir.mkdir()
            path = write_causal_experiment(workdir, folder, rows, f"metric logprob(io)\n{STATEMENTS[sweep]}")
            experiment = causal.prepare(path, config)
            methods = {
                "TransformerLens": lambda: transformer_lens_sweep(bridge, inputs, sweep, args.device),
                "naive loop": lambda: naive_sweep(model, inputs, sweep, args.device),
                "causal": lambda: causal_sweep(experiment, config, sweep),
            }
            results = timed(methods, args.repeats, args.warmup, args.device)
            failures += report(sweep, results, shape, args)
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


def report(sweep: str, results: dict[str, tuple[np.ndarray, list[float]]], shape: dict, args) -> list[str]:
    values = {name: result for name, (result, _) in results.items()}
    sites = values["causal"].shape[:-1]
    print(f"\n== {sweep}: {STATEMENTS[sweep]}  ({' x '.join(map(str, sites))} sites x {args.examples} examples)")
    failures = []
    names = list(values)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if values[first].shape != values[second].shape:
                failures.append(f"{sweep}: {first} shape {values[first].shape} vs {second} {values[second].shape}")
                continue
            gap = float(np.nanmax(np.abs(values[first] - values[second])))
            ok = gap <= args.tolerance
            print(f"agreement {first} vs {second}: max |diff| {gap:.2e} {'ok' if ok else 'TOO LARGE'}")
            if not ok or np.isnan(values[first]).any() or np.isnan(values[second]).any():
                failures.append(f"{sweep}: {first} and {second} differ by {gap:.2e} (or hold NaN)")
    spread = values["causal"].max(axis=tuple(range(len(sites)))) - values["causal"].min(axis=tuple(range(len(sites))))
    print(f"signal: per example, the metric varies across sites by up to {spread.max():.2e} "
          f"(median example {np.median(spread):.2e})")
    for name, (_, all_times) in results.items():
        shown = ", ".join(f"{t:.2f}" for t in all_times)
        print(f"time {name:16s} median {statistics.median(all_times):9.2f} s  best {min(all_times):9.2f} s  "
              f"(runs: {shown})")
    naive_flops, floor_flops, floor_ratio = flop_ratio(
        sweep, shape["n_layer"], shape["n_head"], shape["n_embd"], shape["vocab"], args.tokens)
    print(f"FLOPs per example: naive {si(naive_flops)}, floor {si(floor_flops)} -> floor ratio {floor_ratio:.2f}x")
    for label, pick in (("median", statistics.median), ("best", min)):
        times = {name: pick(t) for name, (_, t) in results.items()}
        achieved = times["naive loop"] / times["causal"]
        print(f"ratios ({label}): TransformerLens / causal {times['TransformerLens'] / times['causal']:.2f}, "
              f"naive / causal {achieved:.2f} ({achieved / floor_ratio:.0%} of the floor ratio {floor_ratio:.2f})")
    return failures


if __name__ == "__main__":
    sys.exit(main())
