"""Check causal's SAE encode/decode against SAELens' own SAE on the same weights (issue 15).

sae-lens is heavy, so it lives in a venv of its own that shares this machine's torch/transformers:

    python -m venv --system-site-packages /tmp/saevenv && /tmp/saevenv/bin/pip install sae-lens
    /tmp/saevenv/bin/python scripts/check_sae_lens.py

For the zoo's attn-only-2l-sae (on the toy model's real activations) and for random ReLU, TopK
(with and without rescale_acts_by_decoder_norm) and JumpReLU folders in SAELens' format, both
libraries load the same folder (SAELens with `SAE.load_from_disk`); feature activations and
reconstructions must agree within 1e-5. Exits non-zero otherwise.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from causal.models.load import load_model  # noqa: E402
from causal.models.sae import load_sae  # noqa: E402
from causal.zoo import zoo_path  # noqa: E402

TOLERANCE = 1e-5


def random_folder(root: Path, architecture: str, **cfg) -> Path:
    gen = torch.Generator().manual_seed(1)
    d_in, d_sae = 64, 128
    tensors = {"W_enc": torch.randn(d_in, d_sae, generator=gen) / 8, "b_enc": torch.randn(d_sae, generator=gen) / 10,
               "W_dec": torch.randn(d_sae, d_in, generator=gen) / 8, "b_dec": torch.randn(d_in, generator=gen) / 10}
    if architecture == "jumprelu":
        tensors["threshold"] = torch.rand(d_sae, generator=gen) / 5
    folder = root / f"{architecture}-{len(list(root.iterdir()))}"
    folder.mkdir()
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "hook_name": "blocks.1.hook_resid_pre",
        "metadata": {"hook_name": "blocks.1.hook_resid_pre", "model_name": "test"}, **cfg}))
    return folder


def compare(folder: Path, x: torch.Tensor) -> tuple[float, float]:
    from sae_lens import SAE
    theirs = SAE.load_from_disk(str(folder), device="cpu")
    ours = load_sae(str(folder))
    with torch.no_grad():
        f_theirs, f_ours = theirs.encode(x), ours.encode(x)
        return float((f_theirs - f_ours).abs().max()), float((theirs.decode(f_theirs) - ours.decode(f_ours)).abs().max())


def main() -> None:
    import sae_lens
    loaded = load_model("zoo:attn-only-2l", device="cpu")
    ids = torch.randint(1, 64, (16, 48), generator=torch.Generator().manual_seed(0))
    kept = {}
    with torch.no_grad(), loaded.adapter.hooks({("resid_pre", 1): lambda act, start: kept.setdefault("x", act)}):
        loaded.model(input_ids=ids)
    real = kept["x"]
    noise = torch.randn(16, 48, 64, generator=torch.Generator().manual_seed(2))
    worst = 0.0
    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = [("zoo:attn-only-2l-sae", zoo_path("attn-only-2l-sae"), real),
                 ("relu (random)", random_folder(root, "standard"), noise),
                 ("topk k=8 (random)", random_folder(root, "topk", k=8), noise),
                 ("topk k=8, rescaled by |W_dec| (random)",
                  random_folder(root, "topk", k=8, rescale_acts_by_decoder_norm=True), noise),
                 ("jumprelu (random)", random_folder(root, "jumprelu"), noise)]
        for name, folder, x in cases:
            encoded, decoded = compare(folder, x)
            worst = max(worst, encoded, decoded)
            print(f"{name:42s} max |encode diff| {encoded:.2e}   max |decode diff| {decoded:.2e}")
    if worst > TOLERANCE:
        sys.exit(f"causal and SAELens differ by {worst:.2e} > {TOLERANCE}")
    print(f"all within {TOLERANCE}")


if __name__ == "__main__":
    main()
