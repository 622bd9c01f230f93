"""Time a sweep over every feature of an SAE (issue 15 item 5): causal against a naive hook loop over features.

    python benchmarks/sae_features.py [--examples 8] [--tokens 24] [--features 512] [--layer 8] [--quick]
    /tmp/saevenv/bin/python benchmarks/sae_features.py --sae-lens   # also SAELens' HookedSAETransformer

One seeded random GPT-2-small-shaped model (12 layers, d_model 768, float32; no download) and a seeded
random ReLU SAE in SAELens' folder format at `blocks.<layer>.hook_resid_pre`. The sweep: for each
feature, patch its activation from the corrupt prompts into the clean ones at every position, keeping the
SAE's reconstruction error (the activation moves by (f_corrupt - f_clean) * W_dec[feature]); metric: the
log-prob of the answer at the last position. Methods:

- naive loop: what a hook script does, one full forward of the clean batch per feature (the features of
  both runs encoded once, from one forward each);
- causal: `patch sae(...)[feature=*] from corrupt into clean` (features packed into rows; layers below the
  SAE's read once from the cached clean run);
- causal attribution: `attribute sae(...)[feature=*]`, 2 forwards and 1 backward per batch, whose
  correlation with the exact sweep is printed;
- SAELens (`--sae-lens`, where sae_lens and a transformer_lens with HookedTransformer import): the same
  model in a HookedSAETransformer with the SAE attached (use_error_term), one run_with_hooks per feature.

The exact sweeps must agree within 1e-4 (max |diff| printed). Prints times and ratios, and the floor
ratio: naive FLOPs over the least a sweep needs (floor_ratio).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

if not __package__:  # run as a script: make `causal` (this checkout's) and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import causal
from benchmarks.references import answer_logprob, build_gpt2, save_model_folder, write_causal_experiment
from benchmarks.sweep import GPT2_SMALL, TINY, data_rows, full_forward_flops, machine, make_inputs, site_floor_flops

AGREEMENT = 1e-4


def write_random_sae(folder: Path, resid: torch.Tensor, d_sae: int, layer: int, seed: int = 0) -> Path:
    """A ReLU SAE fitted to `resid` (tokens, d) only in scale: each feature fires on about 5% of its tokens,
    and a decoder row is twice a typical residual's norm, so patching one feature moves the metric."""
    gen = torch.Generator().manual_seed(seed)
    d_in = resid.shape[1]
    W_enc = torch.randn(d_in, d_sae, generator=gen) / d_in ** 0.5
    W_dec = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=gen), dim=1) * resid.norm(dim=1).mean() * 2
    tensors = {"W_enc": W_enc, "b_enc": -(resid @ W_enc).quantile(0.95, dim=0), "W_dec": W_dec,
               "b_dec": torch.zeros(d_in)}
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    hook = f"blocks.{layer}.hook_resid_pre"
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "hook_name": hook,
        "metadata": {"hook_name": hook, "model_name": "random-gpt2"}}))
    return folder


@torch.inference_mode()
def block_input(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """(examples, tokens, d): the residual stream entering block `layer`."""
    kept = {}

    def keep(_m, args, kwargs):
        kept["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
    handle = model.transformer.h[layer].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        model(ids)
    finally:
        handle.remove()
    return kept["x"]


@torch.inference_mode()
def naive_feature_sweep(model, sae: dict, layer: int, clean, corrupt, metric) -> np.ndarray:
    """(feature, example): one forward of the clean batch per feature, a pre-hook on the block adding the change."""
    block = model.transformer.h[layer]
    kept = {"clean": block_input(model, layer, clean), "corrupt": block_input(model, layer, corrupt)}
    encode = lambda x: torch.relu((x - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"])  # noqa: E731
    delta = encode(kept["corrupt"]) - encode(kept["clean"])  # (examples, tokens, d_sae)
    out = np.empty((sae["W_enc"].shape[1], clean.shape[0]), np.float32)
    for feature in range(out.shape[0]):
        change = delta[..., feature, None] * sae["W_dec"][feature]

        def add(_m, args, kwargs, change=change):
            if args:
                return (args[0] + change, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + change}

        handle = block.register_forward_pre_hook(add, with_kwargs=True)
        try:
            out[feature] = metric(model(clean).logits).numpy()
        finally:
            handle.remove()
    return out


def boot_sae_lens(hf_model, folder: Path):
    """The HF model's weights in a HookedSAETransformer (raw LayerNorms, as HF computes) with the SAE attached
    keeping its error term; and the max |logit| gap to HF on a few tokens."""
    from sae_lens import SAE, HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    c = hf_model.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
                                  n_heads=c.n_head, d_vocab=c.vocab_size, d_mlp=4 * c.n_embd, act_fn="gelu_new",
                                  normalization_type="LN", default_prepend_bos=False, device="cpu")
    model = HookedSAETransformer(cfg)
    model.load_state_dict(convert_gpt2_weights(hf_model, cfg), strict=False)
    model.eval()
    probe = torch.arange(1, 9)[None]
    with torch.inference_mode():
        gap = float((model(probe) - hf_model(probe).logits).abs().max())
    sae = SAE.load_from_disk(str(folder), device="cpu")
    sae.use_error_term = True
    model.add_sae(sae)
    return model, gap


@torch.inference_mode()
def sae_lens_feature_sweep(model, layer: int, clean, corrupt, metric) -> np.ndarray:
    """(feature, example): SAELens' way, one run_with_hooks per feature on the SAE's feature hook."""
    name = f"blocks.{layer}.hook_resid_pre.hook_sae_acts_post"
    _, cache = model.run_with_cache(corrupt, names_filter=name)
    source = cache[name]
    out = np.empty((source.shape[-1], clean.shape[0]), np.float32)
    for feature in range(out.shape[0]):
        def patch(acts, hook, feature=feature):
            acts[..., feature] = source[..., feature]
            return acts
        out[feature] = metric(model.run_with_hooks(clean, fwd_hooks=[(name, patch)])).numpy()
    return out


def floor_ratio(shape: dict, layer: int, features: int, tokens: int) -> float:
    """naive FLOPs / floor FLOPs per example. Naive: a full forward of each run, then one per feature. Floor:
    both runs without logits, then per feature the blocks from the SAE's on at every position (it patches
    every position) and the logits at the one position the metric reads (the SAE's own work left out)."""
    layers, d, vocab = shape["n_layer"], shape["n_embd"], shape["vocab"]
    full = full_forward_flops(layers, d, vocab, tokens)
    trunk = full - tokens * 2 * d * vocab
    per_feature = site_floor_flops("resid_pre", layer, 0, layers, d, vocab, tokens)
    return (2 + features) * full / (2 * trunk + features * per_feature)


def prepare_sweep(root: Path, name: str, model_folder: Path, inputs, body: str, config):
    folder = root / name
    folder.mkdir()
    return causal.prepare(write_causal_experiment(folder, model_folder, data_rows(inputs), body), config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--layer", type=int, default=None, help="the SAE's block (default: two thirds of the depth)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sae-lens", action="store_true", help="also time SAELens' HookedSAETransformer")
    parser.add_argument("--quick", action="store_true", help=f"tiny model {TINY} for a smoke run")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    shape = TINY if args.quick else GPT2_SMALL
    layer = args.layer if args.layer is not None else 2 * shape["n_layer"] // 3
    print(f"machine: {machine('cpu')}")
    print(f"model: random GPT-2 {shape}, float32; SAE: {args.features} ReLU features at blocks.{layer}.hook_resid_pre; "
          f"{args.examples} examples x {args.tokens} tokens; {args.repeats} repeat(s), round-robin")
    model = build_gpt2(**shape, seed=0)
    inputs = make_inputs(args.examples, args.tokens, shape["vocab"], seed=0)
    metric = answer_logprob(inputs.answers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_folder(model, Path(tmp) / "model")
        sae_folder = write_random_sae(Path(tmp) / "sae", block_input(model, layer, inputs.clean).flatten(0, 1),
                                      args.features, layer)
        from safetensors.torch import load_file
        sae = load_file(str(sae_folder / "sae_weights.safetensors"))
        config = causal.RunConfig(device="cpu", progress=False)
        site = f'sae("{sae_folder}")[feature=*] from corrupt into clean'
        prepared = {name: prepare_sweep(Path(tmp), name, folder, inputs, f"metric logprob(io)\n{statement} {site} as sweep",
                                        config) for name, statement in (("causal", "patch"), ("attribution", "attribute"))}
        methods = {"naive loop": lambda: naive_feature_sweep(model, sae, layer, inputs.clean, inputs.corrupt, metric),
                   "causal": lambda: causal.run_prepared(prepared["causal"], config)["sweep"].transpose(
                       "feature", "example").values,
                   "causal attribution": lambda: causal.run_prepared(prepared["attribution"], config)["sweep"].transpose(
                       "feature", "example").values}
        if args.sae_lens:
            lens_model, gap = boot_sae_lens(model, sae_folder)
            print(f"SAELens model vs HF: max |logit diff| {gap:.2e}")
            methods["SAELens"] = lambda: sae_lens_feature_sweep(lens_model, layer, inputs.clean, inputs.corrupt, metric)
        times: dict[str, list[float]] = {name: [] for name in methods}
        results = {}
        for _ in range(args.repeats):
            for name, method in methods.items():
                start = time.perf_counter()
                results[name] = method()
                times[name].append(time.perf_counter() - start)
    exact = results["causal"]
    worst = 0.0
    for name in ("naive loop", "SAELens"):
        if name in results:
            gap = float(np.abs(results[name] - exact).max())
            worst = max(worst, gap)
            print(f"agreement {name} vs causal: max |diff| {gap:.2e} {'ok' if gap <= AGREEMENT else 'TOO LARGE'}")
    with torch.inference_mode():
        clean_metric = metric(model(inputs.clean).logits).numpy()
    predicted, actual = (results["causal attribution"] - clean_metric).mean(1), (exact - clean_metric).mean(1)
    print(f"attribution vs exact, mean change per feature: Pearson {np.corrcoef(predicted, actual)[0, 1]:.2f} "
          f"(exact changes: max |{np.abs(actual).max():.3g}|, median |{np.median(np.abs(actual)):.3g}| nat)")
    for name, runs in times.items():
        print(f"time {name:18s} median {statistics.median(runs):8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in runs)})")
    causal_s = statistics.median(times["causal"])
    floor = floor_ratio(shape, layer, args.features, args.tokens)
    for name in ("naive loop", "SAELens"):
        if name in times:
            print(f"ratio {name} / causal {statistics.median(times[name]) / causal_s:.2f}")
    print(f"floor ratio naive / least work for the exact sweep: {floor:.2f} (layers below the SAE computed once, "
          f"logits at the metric's position only); causal reaches "
          f"{100 * statistics.median(times['naive loop']) / causal_s / floor:.0f}% of it")
    print(f"ratio naive loop / causal attribution {statistics.median(times['naive loop']) / statistics.median(times['causal attribution']):.1f}")
    return 0 if worst <= AGREEMENT else 1


if __name__ == "__main__":
    sys.exit(main())
