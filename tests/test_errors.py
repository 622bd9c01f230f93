"""Bad experiment files fail with CausalError naming file:line:col, before any forward pass."""
from __future__ import annotations

import json

import pytest

import causal
from causal import CausalError
from causal.lang.parser import parse_text
from tests.conftest import make_rows


def error_of(call) -> CausalError:
    with pytest.raises(CausalError) as info:
        call()
    return info.value


@pytest.mark.parametrize("text, where, expected", [
    ('model "m"\ndata "d"\nmetric logprob(io) at\n', "x.cx:3:22", "expected '*', '[', a name, an integer"),
    ('model "m"\ndata "d"\nmetric logprob(io)\npatch resid_pre[layer=*] frm a into b\n', "x.cx:4:26", "'from'"),
    ('model 3\n', "x.cx:1:7", 'a "string"'),
    ('model "m"\ndata "d"\nmetric logprob(io)\nablate attn_out[layer=0..] with zero\n', "x.cx:4:26", "an integer"),
    ('model "m"\ndata "d" @\n', "x.cx:2:10", "unexpected '@'"),
])
def test_syntax_errors_name_position_and_expectation(text, where, expected):
    err = error_of(lambda: parse_text(text, "x.cx"))
    assert str(err).startswith(where + ": error: syntax error")
    assert expected in str(err)
    line = int(where.split(":")[1])
    column = int(where.split(":")[2])
    rendered = str(err).splitlines()
    assert rendered[1].strip() == text.splitlines()[line - 1].strip()
    assert rendered[2].index("^") - 4 == column - 1


@pytest.mark.parametrize("text, message", [
    ('data "d"\nmetric logprob(io)\nablate z with zero\n', "no 'model' statement"),
    ('model "m"\nmetric logprob(io)\nablate z with zero\n', "no 'data' statement"),
    ('model "m"\ndata "d"\nablate z with zero\n', "no 'metric' statement"),
    ('model "m"\ndata "d"\nmetric logprob(io)\n', "no intervention"),
    ('model "m"\nmodel "n"\n', "'model' is declared twice (first at line 1)"),
])
def test_structural_errors(text, message):
    assert message in str(error_of(lambda: parse_text(text, "x.cx")))


SEMANTIC = [
    ("metric logprob(io)\nablate attn_out[layer=14] with zero", "5:23",
     "layer 14 is out of range: the model has 3 layers (valid: 0..2"),
    ("metric logprob(io)\nablate z[layer=0, head=4] with zero", "5:24", "head 4 is out of range: the model has 4 heads"),
    ("metric logprob(io)\nablate attn_ot[layer=0] with zero", "5:8", "did you mean 'attn_out'?"),
    ("metric logprob(io)\nablate attn_out[head=0] with zero", "5:17", "site 'attn_out' has no dimension 'head'"),
    ("metric logprob(io)\nablate attn_out[layer=0] with zeros", "5:31", "unknown ablation 'zeros'"),
    ("metric logprob(io)\npatch attn_out[layer=0] from corupt into clean", "5:30", "did you mean 'corrupt'?"),
    ("metric logprob(answer)\nablate mlp_out with zero", "4:16", "no data column 'answer'"),
    ("metric logprb(io)\nablate mlp_out with zero", "4:1", "did you mean 'logprob'?"),
    ("metric logit_diff(io)\nablate mlp_out with zero", "4:1", "takes 2 answer column(s), got 1"),
    ("metric logprob(io) at 9\nablate mlp_out with zero", "4:23", "metric position 9 is outside example 0"),
    ("metric logprob(io)\npatch resid_pre[layer=0, pos=7] from corrupt into clean", "5:30", "position 7 is outside the prompt"),
    ("metric logprob(io)\nablate mlp_out[layer=2..1] with zero", "5:22", "start\n    ablate mlp_out[layer=2..1] with zero\n                         ^^^^"),
]


@pytest.mark.parametrize("body, where, message", SEMANTIC)
def test_semantic_errors_before_any_forward(body, where, message, write_experiment, cpu_config, monkeypatch):
    path = write_experiment(body)
    forwards = []
    monkeypatch.setattr("causal.engine.forward.Runner.forward", lambda *a, **k: forwards.append(1))
    err = error_of(lambda: causal.run(path, cpu_config))
    assert str(err).startswith(f"{path}:{where}: error:"), str(err)
    assert message in str(err)
    assert forwards == []


def test_answer_that_is_not_one_token(write_experiment, cpu_config):
    rows = make_rows()
    rows[2]["io"] = "t5 t6"
    err = error_of(lambda: causal.run(write_experiment("metric logprob(io)\nablate mlp_out with zero", rows), cpu_config))
    assert "column 'io', example 2: answer 't5 t6' is 2 tokens ['t5', 't6'], not one" in str(err)


def test_misaligned_prompts_for_patching(write_experiment, cpu_config):
    rows = make_rows()
    rows[3]["corrupt"] += " t9"
    path = write_experiment("metric logprob(io)\npatch resid_pre[layer=0, pos=*] from corrupt into clean", rows)
    err = error_of(lambda: causal.run(path, cpu_config))
    assert "equal token length; example 3 has 8 and 7 tokens" in str(err)
    assert ":5:1: error" in str(err)


def test_missing_data_file_and_bad_json(write_experiment, tmp_path, cpu_config):
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero")
    (tmp_path / "data.jsonl").write_text(json.dumps(make_rows()[0]) + "\n{not json\n")
    err = error_of(lambda: causal.run(path, cpu_config))
    assert "data.jsonl:2:2: invalid JSON" in str(err) and ":3:1: error" in str(err)
    (tmp_path / "data.jsonl").unlink()
    assert "cannot read data file" in str(error_of(lambda: causal.run(path, cpu_config)))


def test_unknown_zoo_model_and_missing_model(write_experiment, cpu_config):
    err = error_of(lambda: causal.run(write_experiment("metric logprob(io)\nablate mlp_out with zero",
                                                       model="zoo:attn-only-2"), cpu_config))
    assert ":2:7: error: no toy model 'attn-only-2' in the zoo" in str(err)
    assert "did you mean 'attn-only-2l'?" in str(err)
    err = error_of(lambda: causal.run(write_experiment("metric logprob(io)\nablate mlp_out with zero",
                                                       model="/nonexistent/model"), cpu_config))
    assert "no model folder '/nonexistent/model'" in str(err)


def test_missing_experiment_file():
    assert "cannot read experiment file" in str(error_of(lambda: causal.run("/nonexistent.cx")))
