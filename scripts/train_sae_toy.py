"""Train the zoo's `attn-only-2l-sae`: a ReLU sparse autoencoder on zoo:attn-only-2l's residual stream.

It reads blocks.1.hook_resid_pre (what layer 0 wrote: token identity and, from the previous-token
head, the token before), the input of the layer-1 induction heads, on the sequences the model was
trained on (scripts/train_toy.py). Standard SAE training (Bricken et al. 2023 / SAELens): MSE plus
an L1 penalty on activations times decoder row norms, Adam. It is written in SAELens' folder format
(cfg.json, sae_weights.safetensors) with training.json: variance explained, L0 and dead features
on held-out sequences, and the model's repeated-half loss with the reconstruction spliced in.

    python scripts/train_sae_toy.py       # about a minute on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from train_toy import repeated_batch, repeated_half_loss  # noqa: E402  (the model's own training data)

from causal.models.load import load_model  # noqa: E402
from causal.zoo import zoo_path  # noqa: E402

HOOK, SITE, LAYER = "blocks.1.hook_resid_pre", "resid_pre", 1


def activations(loaded, ids: torch.Tensor) -> torch.Tensor:
    """(rows, pos, d_model) at the SAE's site, through causal's adapter."""
    kept = {}

    def keep(act, start):
        kept["act"] = act.detach().clone()
    with torch.no_grad(), loaded.adapter.hooks({(SITE, LAYER): keep}):
        loaded.model(input_ids=ids)
    return kept["act"]


def train(d_sae: int, steps: int, batch: int, lr: float, l1: float, seed: int) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    loaded = load_model("zoo:attn-only-2l", device="cpu")
    ids = torch.cat([repeated_batch(gen, 256, 6, 20)[0] for _ in range(8)])
    acts = torch.cat([activations(loaded, ids[i:i + 256]) for i in range(0, len(ids), 256)]).flatten(0, 1)  # BOS too
    d_in = acts.shape[1]
    W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae) / d_in ** 0.5)
    W_dec = torch.nn.Parameter(W_enc.detach().T.clone() / W_enc.detach().T.norm(dim=1, keepdim=True))
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(acts.mean(0).clone())
    params = [W_enc, W_dec, b_enc, b_dec]
    opt = torch.optim.Adam(params, lr=lr)
    start = time.time()
    for step in range(steps):
        x = acts[torch.randint(0, len(acts), (batch,), generator=gen)]
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
        recon = f @ W_dec + b_dec
        mse = (recon - x).pow(2).sum(-1).mean()
        sparsity = (f * W_dec.norm(dim=1)).sum(-1).mean()
        loss = mse + l1 * min(1.0, step / (0.1 * steps)) * sparsity  # L1 warm-up over the first 10%
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step:5d}  mse {mse.item():.4f}  L1 {sparsity.item():.3f}  L0 {(f > 0).float().sum(-1).mean():.1f}",
                  flush=True)
    weights = {"W_enc": W_enc.detach(), "b_enc": b_enc.detach(), "W_dec": W_dec.detach(), "b_dec": b_dec.detach()}
    record = {"d_in": d_in, "d_sae": d_sae, "steps": steps, "batch": batch, "lr": lr, "l1_coefficient": l1,
              "seed": seed, "train_activations": len(acts), "train_seconds": round(time.time() - start, 1),
              "torch_threads": torch.get_num_threads(), **evaluate(loaded, weights, seed)}
    return weights, record


def evaluate(loaded, w: dict, seed: int) -> dict:
    """Held-out: variance explained, L0, dead features, and the model's loss with the reconstruction spliced in."""
    ids, predictable = repeated_batch(torch.Generator().manual_seed(seed + 1), 512, 6, 20)
    x = activations(loaded, ids)
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    recon = f @ w["W_dec"] + w["b_dec"]
    flat, flat_recon = x.flatten(0, 1), recon.flatten(0, 1)
    explained = 1 - (flat - flat_recon).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum()
    active = (f > 0).flatten(0, 1)

    def loss_with(replacement) -> float:
        hooks = {} if replacement is None else {(SITE, LAYER): lambda act, start: replacement}
        with torch.no_grad(), loaded.adapter.hooks(hooks):
            return repeated_half_loss(loaded.model(input_ids=ids).logits, ids, predictable).item()
    mean_ablated = x.mean((0, 1)).expand_as(x)
    return {"heldout": "512 sequences of the model's training task (48 tokens, a segment of 6..20 repeated)",
            "variance_explained": round(float(explained), 4),
            "l0_mean": round(float(active.float().sum(-1).mean()), 2),
            "dead_features": int((~active.any(0)).sum()),
            "repeated_half_loss_clean": round(loss_with(None), 4),
            "repeated_half_loss_reconstructed": round(loss_with(recon), 4),
            "repeated_half_loss_mean_ablated": round(loss_with(mean_ablated), 4)}


def save(folder: Path, weights: dict, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": record["d_in"], "d_sae": record["d_sae"], "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none", "hook_name": HOOK,
           "hook_head_index": None, "model_name": "zoo:attn-only-2l", "context_size": 48, "prepend_bos": True,
           "activation_fn": "relu", "reshape_activations": "none",
           "metadata": {"model_name": "zoo:attn-only-2l", "hook_name": HOOK, "context_size": 48, "prepend_bos": True}}
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-sae", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--l1", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=zoo_path("attn-only-2l-sae"))
    args = parser.parse_args()
    weights, record = train(args.d_sae, args.steps, args.batch, args.lr, args.l1, args.seed)
    save(args.out, weights, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
