"""Sparse autoencoders in SAELens' on-disk format, bound to a site of the loaded model.

A folder holds `cfg.json` and `sae_weights.safetensors` (W_enc (d_in, d_sae), b_enc, W_dec
(d_sae, d_in), b_dec, and `threshold` for JumpReLU). The cfg's `hook_name` is a TransformerLens
hook point (`blocks.3.hook_resid_pre`), mapped here onto causal's site names. References:
`zoo:<name>` (shipped with causal), a local folder, or `saelens:<release>/<sae id>` (SAELens'
pretrained table; needs `sae_lens` installed and the hub, or its cache). Everything is checked
against the model before any forward: width, hook point, tensor names and shapes.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from causal.errors import CausalError, Span

WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"
SAELENS_PREFIX = "saelens:"
ACTIVATIONS = ("relu", "topk", "jumprelu")
# TransformerLens hook names (below blocks.<layer>.) -> causal site names
TL_HOOKS = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
            "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "attn.hook_z": "z", "mlp.hook_post": "neuron"}


@dataclass
class SparseAutoencoder:
    """f = act(x - b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc); x̂ = f @ W_dec + b_dec, as SAELens computes them."""

    ref: str
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    activation: str  # relu | topk | jumprelu
    site: str  # causal's site name and layer of its hook point
    layer: int
    hook_name: str
    threshold: torch.Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    rescale_by_decoder_norm: bool = False  # TopK: pre-activations scaled by |W_dec row|, decoded divided by it
    _placed: dict = field(default_factory=dict, repr=False)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def _on(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weights on the activation's device and dtype (moved once per pair)."""
        key = (like.device, like.dtype)
        if key not in self._placed:
            names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if self.threshold is not None else ())
            placed = {n: getattr(self, n).to(like.device, like.dtype) for n in names}
            placed["norm"] = placed["W_dec"].norm(dim=-1) if self.rescale_by_decoder_norm else None
            self._placed[key] = placed
        return self._placed[key]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) feature activations."""
        w = self._on(x)
        sae_in = x - w["b_dec"] if self.apply_b_dec_to_input else x
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if w["norm"] is not None:
            pre = pre * w["norm"]
        if self.activation == "topk":
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        acts = pre.relu()
        return acts * (pre > w["threshold"]).to(acts.dtype) if self.activation == "jumprelu" else acts

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decode_change(f) + self._on(f)["b_dec"]

    def decode_change(self, delta: torch.Tensor) -> torch.Tensor:
        """What a change of feature activations adds to the activation: delta @ W_dec (no bias, no error term)."""
        w = self._on(delta)
        return (delta if w["norm"] is None else delta / w["norm"]) @ w["W_dec"]


def hook_site(hook_name: str) -> tuple[str, int] | None:
    """`blocks.3.hook_resid_pre` -> ("resid_pre", 3); None for hook points causal has no site for."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name or "")
    if not match or match.group(2) not in TL_HOOKS:
        return None
    return TL_HOOKS[match.group(2)], int(match.group(1))


def sae_folder(ref: str, base_dir: Path, span: Span | None = None) -> Path:
    """The folder a `zoo:` or local reference names."""
    from causal.zoo import sae_names, zoo_path
    if ref.startswith("zoo:"):
        name = ref[4:]
        if name not in sae_names():
            from causal.errors import did_you_mean
            raise CausalError(f"no SAE {name!r} in the zoo; available: {', '.join(sae_names()) or 'none'}", span,
                              did_you_mean(name, sae_names()))
        return zoo_path(name)
    folder = Path(ref).expanduser()
    folder = folder if folder.is_absolute() else base_dir / folder
    if not folder.is_dir():
        raise CausalError(f"SAE folder {ref!r} not found (looked in {folder})", span,
                          hint=f"an SAE folder holds {CONFIG} and {WEIGHTS} (SAELens' format); or use "
                               f"'{SAELENS_PREFIX}<release>/<sae id>' with sae_lens installed")
    return folder


def load_sae(ref: str, base_dir: Path = Path("."), span: Span | None = None) -> SparseAutoencoder:
    """Read and check an SAE (shapes against its cfg); binding to a model is `check_against`."""
    if ref.startswith(SAELENS_PREFIX):
        cfg, tensors = _from_saelens(ref, span)
    else:
        folder = sae_folder(ref, base_dir, span)
        cfg, tensors = _read_folder(folder, ref, span)
    return _build(ref, cfg, tensors, span)


def _read_folder(folder: Path, ref: str, span: Span | None) -> tuple[dict, dict[str, torch.Tensor]]:
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise CausalError(f"SAE {ref!r}: {folder / name} is missing (an SAE folder in SAELens' format holds "
                              f"{CONFIG} and {WEIGHTS})", span)
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CausalError(f"SAE {ref!r}: cannot read {folder / CONFIG}: {exc}", span) from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise CausalError(f"SAE {ref!r}: cannot read {folder / WEIGHTS}: {exc}", span) from None
    if not isinstance(cfg, dict):
        raise CausalError(f"SAE {ref!r}: {folder / CONFIG} holds no JSON object", span)
    return cfg, tensors


def _from_saelens(ref: str, span: Span | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """`saelens:<release>/<sae id>` through SAELens' own loader (its pretrained table and the hub)."""
    release, _, sae_id = ref[len(SAELENS_PREFIX):].partition("/")
    if not release or not sae_id:
        raise CausalError(f"{ref!r}: write '{SAELENS_PREFIX}<release>/<sae id>', e.g. "
                          f"'{SAELENS_PREFIX}gpt2-small-res-jb/blocks.8.hook_resid_pre'", span)
    try:
        from sae_lens import SAE
    except ImportError:
        raise CausalError(f"{ref!r} names an SAE in SAELens' pretrained table, and sae_lens is not installed",
                          span, hint="pip install sae-lens, or point at a local folder in SAELens' format") from None
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as exc:  # noqa: BLE001 -- unknown release or id, no hub: sae_lens' message says which
        raise CausalError(f"SAELens could not load {ref!r}: {exc}", span) from None
    sae = sae[0] if isinstance(sae, tuple) else sae  # older sae_lens returned (sae, cfg, sparsity)
    cfg = sae.cfg.to_dict()
    tensors = {name: value.detach().float() for name, value in sae.state_dict().items()}
    return cfg, tensors


def _activation(cfg: dict, ref: str, span: Span | None) -> tuple[str, int | None]:
    architecture = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if architecture == "jumprelu":
        return "jumprelu", None
    if architecture == "topk" or activation == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if not isinstance(k, int) or k < 1:
            raise CausalError(f"SAE {ref!r}: a TopK SAE needs a whole k >= 1 in its cfg, got {k!r}", span)
        return "topk", k
    if architecture != "standard" or activation != "relu":
        raise CausalError(f"SAE {ref!r}: architecture {architecture!r} with activation {activation!r} is not "
                          f"supported; causal reads ReLU ('standard'), TopK and JumpReLU SAEs", span)
    return "relu", None


def _build(ref: str, cfg: dict, tensors: dict[str, torch.Tensor], span: Span | None) -> SparseAutoencoder:
    activation, k = _activation(cfg, ref, span)
    normalize = cfg.get("normalize_activations") or "none"
    if normalize != "none":
        raise CausalError(f"SAE {ref!r} normalizes its input ({normalize!r}); causal reads SAEs that encode the "
                          "activation as it is (normalize_activations 'none')", span)
    if cfg.get("hook_head_index") is not None:
        raise CausalError(f"SAE {ref!r} reads one head (hook_head_index {cfg['hook_head_index']}); causal reads "
                          "SAEs on a whole hook point", span)
    hook_name = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    where = hook_site(hook_name)
    if where is None:
        known = ", ".join(f"blocks.<layer>.{h}" for h in TL_HOOKS)
        raise CausalError(f"SAE {ref!r} was trained on hook point {hook_name!r}, which causal has no site for; "
                          f"it reads {known}", span)
    needed = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if activation == "jumprelu" else ())
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise CausalError(f"SAE {ref!r}: {WEIGHTS} lacks {', '.join(missing)} (it has "
                          f"{', '.join(sorted(tensors)) or 'no tensors'})", span)
    w_enc = tensors["W_enc"]
    if w_enc.dim() != 2:
        raise CausalError(f"SAE {ref!r}: W_enc has shape {tuple(w_enc.shape)}, not (d_in, d_sae)", span)
    d_in, d_sae = w_enc.shape
    for name, size in (("d_in", d_in), ("d_sae", d_sae)):
        if cfg.get(name) is not None and cfg[name] != size:
            raise CausalError(f"SAE {ref!r}: cfg.json says {name} = {cfg[name]} but W_enc has shape "
                              f"{tuple(w_enc.shape)} (d_in, d_sae)", span)
    shapes = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name in needed[1:]:
        if tuple(tensors[name].shape) != shapes[name]:
            raise CausalError(f"SAE {ref!r}: {name} has shape {tuple(tensors[name].shape)}, expected "
                              f"{shapes[name]} for W_enc of shape ({d_in}, {d_sae})", span)
    if k is not None and k > d_sae:
        raise CausalError(f"SAE {ref!r}: TopK k = {k} is more than its {d_sae} features", span)
    site, layer = where
    return SparseAutoencoder(ref, *(tensors[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec")), activation,
                             site, layer, hook_name,
                             tensors["threshold"].float() if activation == "jumprelu" else None, k,
                             bool(cfg.get("apply_b_dec_to_input", True)),
                             activation == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False)))


def check_against(sae: SparseAutoencoder, adapter, span: Span | None = None) -> None:
    """The SAE's hook point exists on this model and has the SAE's width."""
    model_name = f"this {adapter.arch} model"
    if sae.site not in adapter.site_names:
        raise CausalError(f"SAE {sae.ref!r} reads {sae.hook_name} ({sae.site}), which {model_name} does not have; "
                          f"its sites: {', '.join(adapter.site_names)}", span)
    if not 0 <= sae.layer < adapter.n_layers:
        raise CausalError(f"SAE {sae.ref!r} reads {sae.hook_name}, layer {sae.layer}, but {model_name} has "
                          f"{adapter.n_layers} layers (0..{adapter.n_layers - 1})", span)
    width = adapter.site_width(sae.site, 1)
    if width != sae.d_in:
        what = "d_model" if sae.site != "z" else "n_heads x d_head"
        raise CausalError(f"SAE {sae.ref!r} encodes d_in = {sae.d_in} numbers at {sae.hook_name}, but {model_name}'s "
                          f"{sae.site} has {width} ({what}): it was trained on another model", span)
