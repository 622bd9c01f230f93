"""Site names -> hook points on a HF model, the same meaning on every architecture.

An architecture is described by a table, not code: where its blocks and token embedding
live, and for each site which module to hook, whether the activation is that module's
input or output, and a few flags. Everything else (registering hooks, canonical layouts,
reading and replacing values) is shared. q/k/v/pattern are taken inside the attention
computation (causal/models/attention.py). Any other submodule is reachable as
`module:<dotted.path>`, where the path may contain `{layer}`.
"""
from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from torch import nn

from causal.errors import CausalError, did_you_mean
from causal.models.attention import ActivationFn, attention_hooks
from causal.models.sae import SparseAutoencoder

__all__ = ["ActivationFn", "ArchSpec", "HookPoint", "ModelAdapter", "SiteInfo", "adapter_for"]

SITE_ORDER = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
              "z", "q", "k", "v", "pattern", "neuron")
ATTENTION_SITES = ("q", "k", "v", "pattern")
PER_HEAD = frozenset({"z", "q", "k", "v", "pattern"})
MODULE_PREFIX = "module:"

SITE_DOCS = {
    "embed": "token embedding output, before positions are added (dims: pos, d_model)",
    "resid_pre": "residual stream entering the block",
    "resid_mid": "residual stream between the attention and MLP sub-layers (sequential blocks only); "
                 "writing it changes both what enters the MLP and the residual carried on",
    "resid_post": "residual stream leaving the block",
    "attn_out": "what the attention sub-layer adds to the residual stream (after its output projection)",
    "mlp_out": "what the MLP sub-layer adds to the residual stream",
    "z": "per-head attention output, before the output projection (dims: pos, head, d_head)",
    "q": "per-head queries as they enter the attention computation, after rotary (dims: pos, head, d_head)",
    "k": "per-KV-head keys as they enter the attention computation, after rotary (dims: pos, kv_head, d_head)",
    "v": "per-KV-head values as they enter the attention computation (dims: pos, kv_head, d_head)",
    "pattern": "attention probabilities after softmax (dims: query pos, head, key_pos)",
    "neuron": "MLP hidden activations: the input of the MLP's down/output projection (dims: pos, neuron)",
}


# Index roles: what one slice of a site is, so the engine and methods ask the adapter, not the name.
RESIDUAL, EMBEDDING, HEAD_OUTPUT, QUERY, KEY, VALUE, PATTERN, NEURON, MODULE, FEATURE = (
    "residual", "embedding", "head output", "query", "key", "value", "pattern", "neuron", "module", "feature")
SITE_ROLES = {"embed": EMBEDDING, "z": HEAD_OUTPUT, "q": QUERY, "k": KEY, "v": VALUE, "pattern": PATTERN,
              "neuron": NEURON}
KV_ROLES = (KEY, VALUE)  # indexed by key-value head (fewer than query heads under grouped-query attention)
BLOCK_INPUT = "resid_pre"  # the residual stream entering a block: what a forward resumed at a layer starts from


@dataclass(frozen=True)
class SiteInfo:
    """What a site is: canonical trailing dims after (batch, pos); a size of None is sized by the sequence.

    role: what the site is (RESIDUAL, HEAD_OUTPUT, QUERY, KEY, ...; KV_ROLES index key-value heads); `features`: numbers per slice
    of the extra dims (d_head for per-head sites, 1 for patterns and neurons, d_model for the residual).
    """

    name: str
    per_layer: bool
    extra_dims: tuple[tuple[str, int | None], ...]
    doc: str
    role: str = RESIDUAL
    features: int | None = None
    layers: tuple[int, ...] | None = None  # the only layers it exists at (an SAE's), not selectable; None: all

    def width(self, seq_len: int) -> int:
        """Numbers per position of the activation (a pattern has one per key position)."""
        size = self.features or 1
        for _, extent in self.extra_dims:
            size *= extent if extent is not None else seq_len
        return size


@dataclass(frozen=True)
class HookPoint:
    """`module` is a path below the block ('' = the block itself); for `embed`, below the base model.

    carry: resid_mid of a sequential block read at the second norm's input; a write also
        adds (new - old) to the block output so the residual carried on sees it.
    flat: the module sees (batch * pos, ...) rather than (batch, pos, ...) (OPT's MLP).
    """

    module: str
    where: str = "output"  # "input" or "output"
    carry: bool = False
    flat: bool = False


def _in(path: str, **flags) -> HookPoint:
    return HookPoint(path, "input", **flags)


def _out(path: str, **flags) -> HookPoint:
    return HookPoint(path, "output", **flags)


@dataclass(frozen=True)
class ArchSpec:
    """One architecture family. Paths are relative to `model.base_model`, so any head class works.

    attention: path below the block of the module that runs the attention computation (q/k/v/pattern).
    core: "interface" (HF's ALL_ATTENTION_FUNCTIONS) or "gpt_neo" (its own `_attn`).
    variants: per-config changes to `sites`; a None value removes the site.
    config_window: the family applies `config.sliding_window` to every layer (its attention
    modules do not carry their own `sliding_window`).
    final_norm: path of the norm between the last block and the unembedding (the logit lens
    applies it to any layer's residual); None where the family has none.
    """

    name: str
    hf_class: str
    blocks: str
    embed: HookPoint
    attention: str
    sites: dict[str, HookPoint]
    core: str = "interface"
    is_causal: bool = True
    variants: Callable[[object], dict[str, HookPoint | None]] = field(default=lambda config: {})
    config_window: bool = False
    final_norm: str | None = None

    def sites_for(self, config) -> dict[str, HookPoint]:
        sites = {"embed": self.embed, **self.sites, **self.variants(config)}
        return {name: point for name, point in sites.items() if point is not None}


LLAMA_SITES = {
    "resid_pre": _in(""),
    "resid_mid": _in("post_attention_layernorm", carry=True),
    "resid_post": _out(""),
    "attn_out": _out("self_attn"),
    "mlp_out": _out("mlp"),
    "z": _in("self_attn.o_proj"),
    "neuron": _in("mlp.down_proj"),
}


def _llama_like(name: str, hf_class: str, config_window: bool = False, **changes: HookPoint) -> ArchSpec:
    return ArchSpec(name, hf_class, blocks="layers", embed=_out("embed_tokens"), attention="self_attn",
                    sites={**LLAMA_SITES, **changes}, config_window=config_window, final_norm="norm")


GPT2_SPEC = ArchSpec(
    "gpt2", "GPT2LMHeadModel", blocks="h", embed=_out("wte"), attention="attn",
    sites={"resid_pre": _in(""), "resid_mid": _in("ln_2", carry=True), "resid_post": _out(""),
           "attn_out": _out("attn"), "mlp_out": _out("mlp"), "z": _in("attn.c_proj"), "neuron": _in("mlp.c_proj")},
    final_norm="ln_f")

GPT_NEO_SPEC = replace(
    GPT2_SPEC, name="gpt_neo", hf_class="GPTNeoForCausalLM", attention="attn.attention", core="gpt_neo",
    sites={**GPT2_SPEC.sites, "z": _in("attn.attention.out_proj")})

GPT_NEOX_SPEC = ArchSpec(
    "gpt_neox", "GPTNeoXForCausalLM", blocks="layers", embed=_out("embed_in"), attention="attention",
    sites={"resid_pre": _in(""), "resid_mid": _in("post_attention_layernorm", carry=True),
           "resid_post": _out(""), "attn_out": _out("attention"), "mlp_out": _out("mlp"),
           "z": _in("attention.dense"), "neuron": _in("mlp.dense_4h_to_h")},
    variants=lambda config: {"resid_mid": None} if config.use_parallel_residual else {},
    final_norm="final_layer_norm")

OPT_SPEC = ArchSpec(
    "opt", "OPTForCausalLM", blocks="decoder.layers", embed=_out("decoder.embed_tokens"), attention="self_attn",
    sites={"resid_pre": _in(""), "resid_mid": _in("final_layer_norm", carry=True, flat=True),
           "resid_post": _out(""), "attn_out": _out("self_attn"), "mlp_out": _out("fc2", flat=True),
           "z": _in("self_attn.out_proj"), "neuron": _in("fc2", flat=True)},
    final_norm="decoder.final_layer_norm",
    # project_in maps narrow word embeddings (350m) to d_model; post-LN blocks carry the normed stream.
    variants=lambda config: {
        **({"embed": _out("decoder.project_in")} if config.word_embed_proj_dim != config.hidden_size else {}),
        **({} if config.do_layer_norm_before else {"resid_mid": _out("self_attn_layer_norm")})})

PHI_SPEC = ArchSpec(
    "phi", "PhiForCausalLM", blocks="layers", embed=_out("embed_tokens"), attention="self_attn",
    sites={"resid_pre": _in(""), "resid_post": _out(""), "attn_out": _out("self_attn"), "mlp_out": _out("mlp"),
           "z": _in("self_attn.dense"), "neuron": _in("mlp.fc2")}, final_norm="final_layernorm")

BERT_SPEC = ArchSpec(
    "bert", "BertModel / BertForMaskedLM", blocks="encoder.layer", embed=_out("embeddings.word_embeddings"),
    attention="attention.self", is_causal=False,
    sites={"resid_pre": _in(""), "resid_mid": _out("attention"), "resid_post": _out(""),
           "attn_out": _out("attention.output.dense"), "mlp_out": _out("output.dense"),
           "z": _in("attention.output.dense"), "neuron": _in("output.dense")})

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": GPT2_SPEC,
    "gpt_neo": GPT_NEO_SPEC,
    "gpt_neox": GPT_NEOX_SPEC,
    "attn-only-neox": GPT_NEOX_SPEC,
    "llama": _llama_like("llama", "LlamaForCausalLM"),
    "mistral": _llama_like("mistral", "MistralForCausalLM", config_window=True),
    "qwen2": _llama_like("qwen2", "Qwen2ForCausalLM"),
    "qwen3": _llama_like("qwen3", "Qwen3ForCausalLM"),
    "gemma": _llama_like("gemma", "GemmaForCausalLM"),
    "gemma2": _llama_like("gemma2", "Gemma2ForCausalLM",
                          resid_mid=_in("pre_feedforward_layernorm", carry=True),
                          attn_out=_out("post_attention_layernorm"), mlp_out=_out("post_feedforward_layernorm")),
    "phi3": _llama_like("phi3", "Phi3ForCausalLM", config_window=True),
    "opt": OPT_SPEC,
    "phi": PHI_SPEC,
    "bert": BERT_SPEC,
}


class ModelAdapter:
    """Uniform view of one loaded model: sizes, site names, and hooks on sites.

    A model of an unsupported architecture gets an adapter with `spec` None: only
    `module:` sites work there, and named sites raise a CausalError saying so.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None):
        self.model = model
        self.spec = spec
        config = model.config
        self.arch: str = spec.name if spec else str(getattr(config, "model_type", type(model).__name__))
        self.is_causal: bool = spec.is_causal if spec else type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        self.n_heads: int | None = getattr(config, "num_attention_heads", None)
        self.n_kv_heads: int | None = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.d_model: int | None = getattr(config, "hidden_size", None)
        self.d_head: int | None = getattr(config, "head_dim", None) or (
            self.d_model // self.n_heads if self.d_model and self.n_heads else None)
        self._base = model.base_model
        self.blocks: nn.ModuleList | None = self._base.get_submodule(spec.blocks) if spec else None
        self.n_layers: int | None = len(self.blocks) if spec else getattr(config, "num_hidden_layers", None)
        self._sites = self._present_sites(spec.sites_for(config)) if spec else {}
        self.saes: dict[str, SparseAutoencoder] = {}  # feature sites (sae(...)): name -> the SAE at its hook point
        self.d_mlp: int | None = _in_features(self.module("neuron", 0)) if "neuron" in self._sites else None

    def attach_sae(self, name: str, sae: SparseAutoencoder) -> None:
        """Make `name` a site: the SAE's feature activations at its hook point (checked by models.sae)."""
        self.saes[name] = sae

    def _present_sites(self, sites: dict[str, HookPoint]) -> dict[str, HookPoint]:
        """Drop sites whose module this model lacks (the attention-only toy has no MLP projections)."""
        def present(name: str, point: HookPoint) -> bool:
            root = self._base if name == "embed" else self.blocks[0]
            try:
                root.get_submodule(point.module)
            except AttributeError:
                return False
            return True
        return {name: point for name, point in sites.items() if present(name, point)}

    # what sites there are

    @property
    def site_names(self) -> list[str]:
        if self.spec is None:
            return []
        return [s for s in SITE_ORDER if s in self._sites or s in ATTENTION_SITES] + list(self.saes)

    @property
    def has_blocks(self) -> bool:
        """Whether the block list and the named sites are known: layer skipping and the per-layer
        numeric watch need them; without an adapter only `module:` sites and whole forwards work."""
        return self.spec is not None

    def is_per_head(self, site: str) -> bool:
        return site in PER_HEAD

    def site_info(self, site: str) -> SiteInfo:
        self.check_site(site)
        if site in self.saes:
            sae = self.saes[site]
            return SiteInfo(site, True, (("feature", sae.d_sae),), f"features of the SAE at {sae.hook_name}",
                            FEATURE, 1, (sae.layer,))
        if site.startswith(MODULE_PREFIX):
            return SiteInfo(site, "{layer}" in site, (), "output of the named submodule (first element if a "
                            "tuple), as the module returns it, with (batch, pos) leading", MODULE, self.d_model)
        extra: dict[str, tuple[tuple[str, int | None], ...]] = {
            "z": (("head", self.n_heads),), "q": (("head", self.n_heads),),
            "k": (("kv_head", self.n_kv_heads),), "v": (("kv_head", self.n_kv_heads),),
            "pattern": (("head", self.n_heads), ("key_pos", None)), "neuron": (("neuron", self.d_mlp),)}
        role = SITE_ROLES.get(site, RESIDUAL)
        features = {QUERY: self.d_head, KEY: self.d_head, VALUE: self.d_head, HEAD_OUTPUT: self.d_head,
                    PATTERN: 1, NEURON: 1}.get(role, self.d_model)
        return SiteInfo(site, site != "embed", extra.get(site, ()), SITE_DOCS[site], role, features)

    def site_width(self, site: str, seq_len: int) -> int:
        """Numbers per position of a site's activation: what caching it costs."""
        return self.site_info(site).width(seq_len)

    def site_with_role(self, role: str) -> str | None:
        """The site of this model that has `role` (None if none does), e.g. the pattern or the head outputs."""
        return next((s for s in self.site_names if SITE_ROLES.get(s, RESIDUAL) == role), None)

    @property
    def embedding_site(self) -> str:
        return "embed"

    def check_site(self, site: str) -> None:
        """Raise a CausalError (with a did-you-mean) unless `site` can be hooked on this model.

        Named sites must be in `site_names`; `module:<path>` must name a submodule, with
        `{layer}` standing for a block index.
        """
        if site.startswith(MODULE_PREFIX):
            self._check_module_path(site[len(MODULE_PREFIX):])
            return
        if site in self.saes:
            return
        if self.spec is None:
            supported = ", ".join(sorted(ARCHITECTURES))
            raise CausalError(f"site {site!r} needs an architecture adapter and {self.arch!r} has none; "
                              f"named sites work on: {supported}", hint=self._module_hint())
        if site not in self.site_names:
            reason = ""
            if site == "resid_mid":
                reason = f" ({self.arch} blocks run attention and MLP in parallel, so there is no resid_mid)"
            elif site in SITE_DOCS:
                reason = f" ({self.arch} has no such module here)"
            raise CausalError(f"unknown site {site!r} for {self.arch}{reason}; sites: {', '.join(self.site_names)}, "
                              f"or 'module:<dotted.path>'", hint=did_you_mean(site, self.site_names))

    def _check_module_path(self, path: str) -> None:
        if "{layer}" in path and self.n_layers is None:
            raise CausalError(f"'module:{path}' uses {{layer}} but the blocks of {self.arch!r} are unknown; "
                              f"name a concrete path")
        concrete = path.replace("{layer}", "0")
        try:
            self.model.get_submodule(concrete)
        except AttributeError:
            names = self._module_paths()
            raise CausalError(f"no submodule {path!r} in this {self.arch} model", hint=did_you_mean(path, names)
                              or "list them with model.named_modules()") from None

    def _module_paths(self) -> list[str]:
        """Every submodule path, with block indices written as {layer}."""
        paths = set()
        for name, _ in self.model.named_modules():
            if name:
                paths.add(name)
                paths.add(re.sub(r"\.\d+(\.|$)", r".{layer}\1", name, count=1))
        return sorted(paths)

    def _module_hint(self) -> str:
        lists = [name for name, m in self.model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        example = f"module:{lists[0]}.{{layer}}" if lists else "module:<dotted.path>"
        return f"hook any submodule with a '{MODULE_PREFIX}<dotted.path>' site, e.g. '{example}'"

    def module(self, site: str, layer: int | None) -> nn.Module:
        """The module a site hooks (for q/k/v/pattern: the attention module)."""
        self.check_site(site)
        if site.startswith(MODULE_PREFIX):
            return self.model.get_submodule(site[len(MODULE_PREFIX):].replace("{layer}", str(layer)))
        if site in self.saes:
            return self.module(self.saes[site].site, self.saes[site].layer)
        if site == "embed":
            return self._base.get_submodule(self._sites["embed"].module)
        path = self.spec.attention if site in ATTENTION_SITES else self._sites[site].module
        block = self.blocks[layer]
        return block.get_submodule(path) if path else block

    # reading the residual stream as logits (the logit lens)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of a residual stream (..., d_model), as the model's tail computes them from its last
        block's output: final norm, OPT's project_out, the unembedding, Gemma 2's soft-capping."""
        base, config = self._base, self.model.config
        if self.spec is None or self.model.get_output_embeddings() is None:
            raise CausalError(f"the logit lens needs a language-model head and an architecture adapter; "
                              f"{self.arch} has {'no head' if self.spec else 'no adapter'}")
        norm = base.get_submodule(self.spec.final_norm) if self.spec.final_norm else None
        if norm is not None and not (self.spec.name == "opt" and not config.do_layer_norm_before):
            hidden = norm(hidden)
        project_out = getattr(getattr(base, "decoder", None), "project_out", None)
        if project_out is not None:
            hidden = project_out(hidden)
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def supports_kv_prefix(self, seq_len: int) -> bool:
        """May the executor run positions >= p with the prefix's keys/values from a DynamicCache?

        Not for encoders, nor under a sliding window of seq_len or fewer tokens: HF's sliding-window
        cache layers then give results that differ from the full run (checked on transformers 5.23).
        GPT-Neo's local attention masks a full cache itself, so it is not a limit there.
        """
        if self.spec is None or not self.is_causal:
            return False
        window = self._sliding_window()
        return window is None or seq_len < window

    def _sliding_window(self) -> int | None:
        config = self.model.config
        windows = [getattr(block.get_submodule(self.spec.attention), "sliding_window", None) for block in self.blocks]
        if self.spec.config_window:
            windows.append(getattr(config, "sliding_window", None))
        windows = [w for w in windows if w]
        return min(windows) if windows else None

    # hooking

    @contextmanager
    def hooks(self, fns: dict[tuple[str, int | None], ActivationFn], start: int = 0) -> Iterator[None]:
        """Apply `fns[(site, layer)](act, start)` to each site's activation for the duration of the block.

        `act` is in the site's canonical layout; `start` is the absolute position of act[:, 0]:
        as given here for module-level sites; inside attention, kv_len - q_len for q and pattern
        and 0 for k and v (which include a cached prefix). A returned tensor replaces the activation.
        """
        for site, layer in fns:
            self._check_key(site, layer)
        ordered = sorted(fns.items(), key=lambda item: _order(item[0][0]))
        attention: dict[nn.Module, dict[str, ActivationFn]] = {}
        with ExitStack() as stack:
            shape = _InputShape(self.model) if any(self._needs_shape(site) for (site, _), _ in ordered) else None
            if shape:
                stack.callback(shape.remove)
            for (site, layer), fn in ordered:
                if site in ATTENTION_SITES:
                    attention.setdefault(self.module(site, layer), {})[site] = fn
                elif site in self.saes:
                    sae = self.saes[site]
                    for handle in self._attach(sae.site, sae.layer, feature_hook(sae, fn), start, shape):
                        stack.callback(handle.remove)
                else:
                    for handle in self._attach(site, layer, fn, start, shape):
                        stack.callback(handle.remove)
            stack.enter_context(attention_hooks(self.model, attention, self.spec.core if self.spec else ""))
            yield

    def _check_key(self, site: str, layer: int | None) -> None:
        self.check_site(site)
        if site in self.saes and layer != self.saes[site].layer:
            raise CausalError(f"site {site!r} is at layer {self.saes[site].layer} only; got {layer}")
        per_layer = self.site_info(site).per_layer
        if not per_layer:
            if layer is not None:
                raise CausalError(f"site {site!r} has no layer; got layer {layer}")
        elif layer is None or not 0 <= layer < self.n_layers:
            raise CausalError(f"site {site!r} needs a layer in 0..{self.n_layers - 1}; got {layer}")

    def _needs_shape(self, site: str) -> bool:
        site = self.saes[site].site if site in self.saes else site
        return site.startswith(MODULE_PREFIX) or self._sites.get(site, HookPoint("")).flat

    def _attach(self, site: str, layer: int | None, fn: ActivationFn, start: int, shape: "_InputShape | None"):
        module = self.module(site, layer)
        if site.startswith(MODULE_PREFIX):
            point, view = _out(""), _ModuleView(shape)
        else:
            point = self._sites[site]
            view = _SiteView(self.n_heads, self.d_head, site == "z", shape if point.flat else None)
        if point.carry:
            return self._attach_carry(module, self.blocks[layer], fn, start, view)

        def apply(act: torch.Tensor) -> torch.Tensor | None:
            new = fn(view.canonical(act), start)
            return None if new is None else view.restore(new, act)

        if point.where == "output":
            return [module.register_forward_hook(_output_hook(apply))]
        return [module.register_forward_pre_hook(_input_hook(apply), with_kwargs=True)]

    def _attach_carry(self, norm: nn.Module, block: nn.Module, fn: ActivationFn, start: int, view: "_SiteView"):
        """resid_mid at the second norm's input; a write is added to the block output as well."""
        pending: dict[str, torch.Tensor] = {}

        def apply(act: torch.Tensor) -> torch.Tensor | None:
            pending.pop("delta", None)
            old = view.canonical(act)
            new = fn(old, start)
            if new is None:
                return None
            pending["delta"] = new - old
            return view.restore(new, act)

        def carry(_module, _args, output):
            delta = pending.pop("delta", None)
            if delta is None:
                return None
            return _replace_output(output, lambda tensor: tensor + delta.view(tensor.shape))

        return [norm.register_forward_pre_hook(_input_hook(apply), with_kwargs=True),
                block.register_forward_hook(carry, prepend=True)]


def feature_hook(sae: SparseAutoencoder, fn: ActivationFn) -> ActivationFn:
    """`fn` sees the SAE's feature activations f (batch, pos, d_sae); what it changes them to, f', adds
    (f' - f) @ W_dec to the activation. The reconstruction error stays: editing nothing changes nothing."""
    def apply(act: torch.Tensor, start: int) -> torch.Tensor | None:
        features = sae.encode(act.reshape(*act.shape[:2], -1))
        new = fn(features, start)
        if new is None:
            return None
        return act + sae.decode_change(new - features).view(act.shape)
    return apply


def _order(site: str) -> int:
    return SITE_ORDER.index(site) if site in SITE_ORDER else len(SITE_ORDER)


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[0]  # GPT-2's Conv1D stores (in, out)


def _output_hook(apply: Callable[[torch.Tensor], torch.Tensor | None]):
    def hook(_module, _args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        new = apply(tensor)
        return None if new is None else _replace_output(output, lambda _: new)
    return hook


def _replace_output(output, change: Callable[[torch.Tensor], torch.Tensor]):
    if isinstance(output, tuple):
        return (change(output[0]), *output[1:])
    return change(output)


def _input_hook(apply: Callable[[torch.Tensor], torch.Tensor | None]):
    def hook(_module, args, kwargs):
        if args:
            new = apply(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = apply(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})
    return hook


class _InputShape:
    """(batch, pos) of the current forward, for modules that see (batch * pos, ...)."""

    def __init__(self, model: nn.Module):
        self.batch_pos: tuple[int, int] | None = None
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        source = ids if ids is not None else kwargs.get("inputs_embeds")
        self.batch_pos = tuple(source.shape[:2]) if source is not None else None

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class _SiteView:
    """Canonical layout of a named module-level site: z split into heads, flat MLP tensors unflattened."""

    n_heads: int
    d_head: int
    per_head: bool
    shape: _InputShape | None

    def canonical(self, act: torch.Tensor) -> torch.Tensor:
        if self.shape is not None:
            act = act.view(*self.shape.batch_pos, *act.shape[1:])
        if self.per_head:
            act = act.view(*act.shape[:-1], self.n_heads, self.d_head)
        return act

    def restore(self, new: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return new.reshape(act.shape)


@dataclass
class _ModuleView:
    """`module:` sites: as the module outputs, unflattened when it sees (batch * pos, ...)."""

    shape: _InputShape | None

    def canonical(self, act: torch.Tensor) -> torch.Tensor:
        batch_pos = self.shape.batch_pos if self.shape else None
        if batch_pos and act.dim() >= 1 and tuple(act.shape[:2]) != batch_pos \
                and act.shape[0] == batch_pos[0] * batch_pos[1]:
            return act.view(*batch_pos, *act.shape[1:])
        return act

    def restore(self, new: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return new.reshape(act.shape)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for the model's architecture; a `module:`-only one for architectures without a table."""
    return ModelAdapter(model, ARCHITECTURES.get(getattr(model.config, "model_type", None)))
