"""Data files (JSONL, JSON, CSV, TSV), generator argument checking, prompt offsets and find_span."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import pytest
import torch

import causal
from causal import CausalError
from causal.errors import reported_against
from causal.data import (GENERATORS, Count, Examples, Range, find_span, find_spans, load_examples, read_table,
                         register_generator, tokenize_column)
from causal.lang.parser import parse_text
from causal.zoo import word_tokenizer
from tests.conftest import make_rows
from tests.test_tasks import byte_level_bpe

ROWS = [{"clean": "Then, Mary and John went", "io": " Mary"}, {"clean": "When Anna left", "io": " Anna"}]


def error_of(call) -> CausalError:
    with pytest.raises(CausalError) as info:
        call()
    return info.value


def experiment_data(line: str):
    """The data declaration of a minimal experiment file, and the file's text (for spans)."""
    text = f'model "m"\n{line}\nmetric logprob(next)\nablate z with zero\n'
    return parse_text(text, "x.cx").data, text


def load(line: str, base_dir: Path, tokenizer=None) -> Examples:
    decl, text = experiment_data(line)
    with reported_against(text):  # what the pipeline does at its boundary: errors show the file's line
        return load_examples(decl, base_dir, tokenizer or word_tokenizer(64))


# ---------------------------------------------------------------- files

def test_jsonl_json_csv_and_tsv_give_the_same_columns(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "d.csv").write_text('clean, io\n"Then, Mary and John went", Mary\nWhen Anna left, Anna\n')
    (tmp_path / "d.tsv").write_text("clean\tio\nThen, Mary and John went\t Mary\nWhen Anna left\t Anna\n")
    expected = {"clean": [r["clean"] for r in ROWS], "io": [r["io"] for r in ROWS]}
    for name in ("d.jsonl", "d.json", "d.csv", "d.tsv"):
        assert load(f'data "{name}"', tmp_path).columns == expected, name
    # CSV header names are stripped, values are kept verbatim: the leading space of " Mary" matters.
    assert read_table(tmp_path / "d.csv").columns["io"] == [" Mary", " Anna"]


def test_csv_with_quotes_bom_and_limit(tmp_path):
    (tmp_path / "d.csv").write_bytes('\ufeffclean,io\n"a, ""quoted"" prompt", x\n\nb,y\nc,z\n'.encode())
    data = load('data "d.csv" limit 2', tmp_path)
    assert data.columns == {"clean": ['a, "quoted" prompt', "b"], "io": [" x", "y"]}


@pytest.mark.parametrize("name, text, expected", [
    ("d.csv", "clean,io\na,b\nc\n", "d.csv:3: 1 field(s), but the header has 2 columns (clean, io)"),
    ("d.csv", "clean,io\na,b,c\n", "d.csv:2: 3 field(s), but the header has 2 columns"),
    ("d.csv", "clean,clean\na,b\n", "d.csv:1: column 'clean' appears twice"),
    ("d.csv", "clean,\na,b\n", "d.csv:1: the header row has an empty column name"),
    ("d.json", '{"clean": "a"}', "expected a JSON list of objects (one per example), got dict"),
    ("d.json", '[{"clean": "a"}, ["b"]]', "d.json: record 1: each example must be a JSON object, got list"),
    ("d.json", '[{"clean": "a"}, {"other": "b"}]', "d.json: record 1: columns ['other'] differ"),
    ("d.json", '[{"clean": "a"},\n {"clean": }]', "d.json:2:12: invalid JSON: Expecting value"),
    ("d.jsonl", '{"clean": "a"}\n{"io": "b"}\n', "d.jsonl:2: columns ['io'] differ from the first record's"),
    ("d.jsonl", '{"clean": "a"}\n[1]\n', "d.jsonl:2: each example must be a JSON object"),
    ("d.txt", "clean\na\n", "unsupported extension '.txt'; supported: .csv, .json, .jsonl, .tsv"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    err = error_of(lambda: load(f'data "{name}"', tmp_path))
    assert expected in str(err) and str(err).startswith("x.cx:2:1: error:")


def test_missing_file_and_empty_data(tmp_path):
    assert "cannot read data file" in str(error_of(lambda: load('data "nope.csv"', tmp_path)))
    (tmp_path / "empty.csv").write_text("clean,io\n")
    assert "the data has no examples" in str(error_of(lambda: load('data "empty.csv"', tmp_path)))


def test_csv_runs_through_prepare(tmp_path, tiny_gpt2, cpu_config):
    rows = make_rows(4)
    lines = ["clean,corrupt,io,s"] + [",".join(r[k] for k in ("clean", "corrupt", "io", "s")) for r in rows]
    (tmp_path / "prompts.csv").write_text("\n".join(lines) + "\n")
    path = tmp_path / "exp.cx"
    path.write_text(f'model "{tiny_gpt2}"\ndata "prompts.csv"\nmetric logit_diff(io, s)\n'
                    "patch resid_pre[layer=*] from corrupt into clean\n")
    experiment = causal.prepare(path, cpu_config)
    assert experiment.examples.columns == {k: [r[k] for r in rows] for k in rows[0]}
    assert experiment.prompts["clean"].texts == [r["clean"] for r in rows]


# ---------------------------------------------------------------- generator arguments

@pytest.mark.parametrize("line, where, expected", [
    ("data induction(n=0)", "2:16", "argument 'n' of 'induction' must be an integer in 1..100000, got 0"),
    ("data induction(seed=-1)", "2:16", "argument 'seed' of 'induction' must be an integer in 0..2147483647, got -1"),
    ("data induction(length=2.5)", "2:16", "must be an integer in 1..100000, got 2.5"),
    ('data induction(n="many")', "2:16", "must be an integer in 1..100000, got 'many'"),
    ("data induction(n=2, n=3)", "2:21", "argument 'n' is given twice"),
    ("data induction(lenght=3)", "2:16", "takes no argument 'lenght'; it takes n (an integer in 1..100000; default 64)"),
    ("data ioi(templates=ABAB)", "2:10", "must be one of 'mixed', 'ABBA', 'BABA', got 'ABAB'"),
    ("data ioi(corruption=3)", "2:10", "argument 'corruption' of 'ioi' must be one of 'ABC', got 3"),
    ("data counterfact(n=3)", "2:1", "needs argument(s) path (a file path (relative to the experiment file); "
                                     "required)"),
    ('data counterfact(path="missing.json")', "2:18", "there is no file"),
    ("data counterfact(path=3)", "2:18", "must be a file path (relative to the experiment file), got 3"),
    ("data inductoin(n=3)", "2:1", "unknown data generator 'inductoin'; available: counterfact, hiereq, induction, ioi"),
])
def test_bad_generator_arguments(tmp_path, line, where, expected):
    err = error_of(lambda: load(line, tmp_path))
    assert str(err).startswith(f"x.cx:{where}: error:") and expected in str(err)


def test_bad_arguments_suggest_the_nearest_name(tmp_path):
    assert "did you mean 'length'?" in str(error_of(lambda: load("data induction(lenght=3)", tmp_path)))
    assert "did you mean 'ABBA'?" in str(error_of(lambda: load("data ioi(templates=ABB)", tmp_path)))
    assert "did you mean 'induction'?" in str(error_of(lambda: load("data inductoin()", tmp_path)))


@pytest.fixture
def scaled(monkeypatch):
    """A generator with a float range, a path and a bare-word choice, registered for one test."""
    monkeypatch.setattr(causal.data.load, "GENERATORS", dict(GENERATORS))

    @register_generator
    def scaled(tokenizer, path: Path, scale: Annotated[float, Range(0, 1)] = 0.5, n: Count = 2,
               mode: Literal["up", "down"] = "up") -> Examples:
        return Examples({"clean": [f"{path.name} {scale} {mode}"] * n})

    return scaled


def test_float_range_path_and_bare_choice(tmp_path, scaled):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_text("x")
    data = load('data scaled(path="sub/f.txt", scale=1, mode=down)', tmp_path)
    assert data.columns["clean"] == ["f.txt 1.0 down"] * 2  # an int is accepted as a float; paths resolved
    err = error_of(lambda: load('data scaled(path="sub/f.txt", scale=1.5)', tmp_path))
    assert "argument 'scale' of 'scaled' must be a number in 0..1, got 1.5" in str(err)
    assert str(err).startswith("x.cx:2:31:")  # the span of `scale=1.5`


def test_unsupported_parameter_annotation_fails_at_registration(monkeypatch):
    monkeypatch.setattr(causal.data.load, "GENERATORS", dict(GENERATORS))
    with pytest.raises(TypeError, match="unsupported annotation"):
        @register_generator
        def broken(tokenizer, values: list = None) -> Examples:  # noqa: ARG001
            return Examples({})


# ---------------------------------------------------------------- prompts: texts, offsets, spans

@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe(["Then, Mary and John went to the store. John gave a drink to Mary"] * 4
                          + ["Sarah met Sara and Danielle Darrieux in Paris"] * 4)


def test_text_columns_keep_texts_and_offsets(bpe):
    prompts = tokenize_column([r["clean"] for r in ROWS] + [[5, 6]], bpe, "clean")
    assert prompts.texts == [ROWS[0]["clean"], ROWS[1]["clean"], None]
    assert prompts.offsets[2] is None and len(prompts.offsets[0]) == int(prompts.lengths[0])
    for text, offsets, row in zip(prompts.texts[:2], prompts.offsets, prompts.ids):
        pieces = [text[a:b] for a, b in offsets]
        assert "".join(pieces) == text  # byte-level BPE: offsets tile the text, spaces inside tokens
        assert [bpe.decode([t]) for t in row[: len(offsets)].tolist()] == pieces


def test_find_span_first_and_last(bpe):
    prompts = tokenize_column(["Then, Mary and John went to the store. John gave a drink to"], bpe, "clean")
    tokens = [bpe.decode([t]) for t in prompts.ids[0].tolist()]
    first, last = find_span(prompts, 0, " John", "first"), find_span(prompts, 0, " John", "last")
    assert first[0] == first[1] and last[0] == last[1] and first[0] < last[0]
    assert tokens[first[0]] == tokens[last[0]] == " John"
    assert tokens[find_span(prompts, 0, " Mary")[0]] == " Mary"
    assert find_spans(prompts, [" John"], "last").tolist() == [list(last)]


def test_find_span_leading_space_and_word_boundaries(bpe):
    prompts = tokenize_column(["Mary met Sarah and Sara, then Mary left"], bpe, "clean")
    tokens = [bpe.decode([t]) for t in prompts.ids[0].tolist()]
    # " Mary" also finds the name at the start of the prompt, so `first` is the first mention.
    first, last = find_span(prompts, 0, " Mary", "first")
    assert first == 0 and bpe.decode(prompts.ids[0, : last + 1].tolist()) == "Mary"
    assert tokens[find_span(prompts, 0, " Mary", "last")[0]] == " Mary"
    # "Sara" does not match inside "Sarah"; the comma after the name is not part of the span.
    first, last = find_span(prompts, 0, " Sara")
    assert bpe.decode(prompts.ids[0, first: last + 1].tolist()) == " Sara"
    assert "Sarah" not in bpe.decode(prompts.ids[0, first: last + 1].tolist())


def test_find_span_multi_token_subject(bpe):
    prompts = tokenize_column(["The mother tongue of Danielle Darrieux is"], bpe, "clean")
    first, last = find_span(prompts, 0, "Danielle Darrieux")
    assert bpe.decode(prompts.ids[0, first: last + 1].tolist()) == " Danielle Darrieux"
    assert bpe.decode(prompts.ids[0, :first].tolist()) == "The mother tongue of"


def test_find_span_with_the_toy_word_tokenizer():
    """Whitespace-split words: the offsets leave the spaces out."""
    tok = word_tokenizer(64)
    prompts = tokenize_column(["t1 t2 t3 t2"], tok, "clean")
    assert prompts.offsets[0] == [(0, 2), (3, 5), (6, 8), (9, 11)]
    assert find_span(prompts, 0, " t2", "last") == (3, 3)


def test_find_span_errors(bpe):
    prompts = tokenize_column(["Then, Mary and John went", [1, 2, 3]], bpe, "clean")
    err = error_of(lambda: find_span(prompts, 0, " Anna"))
    assert "example 0: ' Anna' does not occur in the prompt 'Then, Mary and John went'" in str(err)
    err = error_of(lambda: find_span(prompts, 0, "Mar"))  # a match must not end inside a word
    assert "'Mar' does not occur" in str(err)
    err = error_of(lambda: find_span(prompts, 1, " Mary"))
    assert "example 1: cannot locate ' Mary': the prompt was given as token ids" in str(err)
    assert "occurrence must be one of first, last, got 'middle'" in str(
        error_of(lambda: find_span(prompts, 0, " Mary", "middle")))
    assert "example 5 does not exist; there are 2" in str(error_of(lambda: find_span(prompts, 5, " Mary")))
    assert "does not occur" in str(error_of(lambda: find_span(prompts, 0, "  ")))
    bare = causal.data.Prompts(prompts.ids[:1], prompts.lengths[:1], prompts.tokens[:1])
    assert "cannot locate" in str(error_of(lambda: find_span(bare, 0, " Mary")))
    assert "2 span texts for 1 prompts" in str(error_of(lambda: find_spans(bare, ["a", "b"])))


def test_slow_tokenizers_give_no_offsets(bpe):
    class Slow:
        """A tokenizer without character offsets (not a Rust tokenizer)."""
        is_fast = False

        def __call__(self, text, add_special_tokens=False):
            return bpe(text, add_special_tokens=add_special_tokens)

        def __len__(self):
            return len(bpe)

        def convert_ids_to_tokens(self, ids):
            return bpe.convert_ids_to_tokens(ids)

    prompts = tokenize_column(["Then, Mary and John went"], Slow(), "clean")
    assert prompts.texts == ["Then, Mary and John went"] and prompts.offsets == [None]
    assert torch.equal(prompts.ids, tokenize_column(["Then, Mary and John went"], bpe, "clean").ids)
    err = error_of(lambda: find_span(prompts, 0, " Mary"))
    assert "the tokenizer reports no character offsets" in str(err) and "fast (Rust) tokenizer" in str(err)
