"""Experiments on a model object the caller already holds (a notebook), and inline experiment text.

The object must give exactly the numbers its saved folder gives, and come back untouched: no
hooks left, same attention implementation, same weights, same requires_grad, same mode.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM, AutoTokenizer

import causal
from causal import CausalError
from tests.conftest import make_rows

STATEMENTS = """metric logprob(io)
patch resid_pre[layer=*, pos=*] from corrupt into clean
ablate z[layer=*, head=*] with mean over corrupt
patch q[layer=1, head=*] from corrupt into clean
ablate pattern[layer=2, head=*] with zero
attribute mlp_out[layer=*, pos=*] from corrupt into clean verify top 2"""


@pytest.fixture
def held(tiny_gpt2):
    return AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval(), AutoTokenizer.from_pretrained(tiny_gpt2)


@pytest.fixture
def data_here(tmp_path, monkeypatch):
    """Inline experiments read data relative to the working directory."""
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in make_rows()) + "\n")
    monkeypatch.chdir(tmp_path)


def hooks_of(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("architecture", ["gpt2", "gpt_neox"])
def test_a_held_model_gives_what_its_folder_gives_and_comes_back_untouched(architecture, tiny_models, data_here,
                                                                          cpu_config):
    folder = tiny_models[architecture]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    implementation = model.config._attn_implementation
    from_object = causal.run_text(f'data "data.jsonl"\n{STATEMENTS}', cpu_config, model=model, tokenizer=tokenizer)
    from_folder = causal.run_text(f'model "{folder}"\ndata "data.jsonl"\n{STATEMENTS}', cpu_config)
    xr.testing.assert_equal(from_object.drop_attrs(deep=False), from_folder.drop_attrs(deep=False))
    assert from_object.attrs["model"] == str(folder) and from_object.attrs["model_revision"].startswith("sha256:")
    assert hooks_of(model) == 0 and model.config._attn_implementation == implementation and not model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_the_model_object_replaces_the_files_model_line(held, write_experiment, cpu_config):
    model, tokenizer = held
    path = write_experiment("metric logprob(io)\nablate mlp_out[layer=*] with zero", model="zoo:no-such-model")
    ds = causal.run(path, cpu_config, model=model, tokenizer=tokenizer)
    assert ds.attrs["model"] == model.config._name_or_path and ds["ablate_mlp_out"].sizes["layer"] == 3


def test_a_bfloat16_model_runs_in_bfloat16(held, data_here):
    model, tokenizer = held
    ds = causal.run_text('data "data.jsonl"\nmetric logprob(io)\nablate mlp_out[layer=*] with zero',
                         causal.RunConfig(progress=False), model=model.to(torch.bfloat16), tokenizer=tokenizer)
    assert ds.attrs["dtype"] == "bfloat16" and bool(ds["ablate_mlp_out"].notnull().all())


def test_the_weights_digest_tells_models_apart(held, data_here, cpu_config):
    model, tokenizer = held
    text = 'data "data.jsonl"\nmetric logprob(io)\nablate mlp_out[layer=*] with zero'
    before = causal.run_text(text, cpu_config, model=model, tokenizer=tokenizer).attrs["model_revision"]
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1
    after = causal.run_text(text, cpu_config, model=model, tokenizer=tokenizer).attrs["model_revision"]
    assert before != after


@pytest.mark.parametrize("change, message", [
    (lambda m, t, c: (m.train(), t, c), "is in training mode, so dropout would randomise every result"),
    (lambda m, t, c: (torch.nn.Linear(2, 2), t, c), "model must be a transformers PreTrainedModel"),
    (lambda m, t, c: (m, None, c), "a model passed in needs its tokenizer"),
    (lambda m, t, c: (None, t, c), "a tokenizer was passed without its model"),
    (lambda m, t, c: (m, t, causal.RunConfig(model="gpt2")), "RunConfig.model='gpt2' and a model object"),
    (lambda m, t, c: (m, t, causal.RunConfig(dtype="float16")), "dtype 'float16' was asked for but the model "
                                                                 "passed in is float32"),
    (lambda m, t, c: (m.to("meta"), t, c), "has no weights \\(they are on the meta device\\)"),
], ids=["training", "not-hf", "no-tokenizer", "no-model", "two-models", "dtype", "meta"])
def test_a_held_model_that_cannot_be_used_as_given_is_refused(held, data_here, cpu_config, no_forward, change,
                                                               message):
    model, tokenizer, config = change(*held, cpu_config)
    with pytest.raises(CausalError, match=message):
        causal.prepare_text('data "data.jsonl"\nmetric logprob(io)\nablate mlp_out[layer=*] with zero', config,
                            model=model, tokenizer=tokenizer)


def test_inline_text_without_a_model_line_or_object_says_so(data_here, cpu_config, no_forward):
    with pytest.raises(CausalError) as err:
        causal.prepare_text('data "data.jsonl"\nmetric logprob(io)\nablate mlp_out[layer=*] with zero', cpu_config)
    assert str(err.value).startswith("<experiment>:1:1: error: the experiment has no 'model' statement")


def test_a_held_models_tokenizer_is_checked_against_its_embeddings(held, data_here, cpu_config, no_forward):
    """A token the tokenizer knows but the model has no embedding row for: the resolver's check, as for a folder."""
    model, tokenizer = held
    tokenizer.add_tokens(["beyond"])
    rows = make_rows()
    rows[2]["clean"] = rows[2]["corrupt"] = "t1 beyond t2 t3 t4 t5 t6"
    Path("data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(CausalError, match="example 2.*has no embedding: the model has 64"):
        causal.prepare_text('data "data.jsonl"\nmetric logprob(io)\nablate mlp_out[layer=*] with zero', cpu_config,
                            model=model, tokenizer=tokenizer)


def test_a_held_model_on_another_device_than_asked_is_refused(held, data_here, no_forward, monkeypatch):
    """No GPU here: the asked-for device is faked to be cuda:0 while the model stays on the CPU."""
    monkeypatch.setattr("causal.models.load.pick_device", lambda name: torch.device("cuda", 0))
    model, tokenizer = held
    with pytest.raises(CausalError, match="device 'cuda' was asked for but the model passed in is on cpu"):
        causal.prepare_text('data "data.jsonl"\nmetric logprob(io)\nablate mlp_out[layer=*] with zero',
                            causal.RunConfig(device="cuda"), model=model, tokenizer=tokenizer)
