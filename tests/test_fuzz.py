"""Fuzzing the front end: whatever text a user writes, parse + resolve fail only with a CausalError.

Valid experiment files (the language's constructs on the toy model, a tiny GPT-2 and a tiny
grouped-query Llama) are mutated token by token and line by line: tokens deleted, duplicated,
swapped, or replaced by keywords, site names, columns and extreme numbers; random characters
inserted; lines dropped, repeated or moved. Each result goes through `parse_text` and
`resolve` against a model loaded once per module, and through `parse_text` with random
parameter overrides. Anything but a CausalError (an IndexError, a KeyError, a Lark exception,
a torch error) is a bug: a user would see a traceback instead of file:line:col.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from causal.app.cli import check_command_line, run_settings
from causal.data import read_table
from causal.errors import CausalError
from causal.lang.parser import parse_text
from causal.app.settings import RunConfig, check_config
from causal.models import load_model
from causal.methods import METHODS
from causal.resolve import resolve
from causal.zoo import word_tokenizer
from tests.conftest import VOCAB
from tests.grammar_fuzz import generate, unsampled_terminals

pytestmark = pytest.mark.slow  # fuzzing

TOY = "zoo:attn-only-2l"

# Prompts of the toy vocabulary with a subject and an answer inside, equal length clean/corrupt.
ROWS = [
    {"clean": "t0 t5 t6 t7 t5 t9 t3", "corrupt": "t0 t8 t6 t7 t8 t9 t3", "io": "t6", "s": "t5", "subject": "t5 t6",
     "other": "t0 t1"},
    {"clean": "t0 t11 t12 t13 t11 t14 t2", "corrupt": "t0 t15 t12 t13 t15 t14 t2", "io": "t12", "s": "t11",
     "subject": "t11 t12", "other": "t0 t1 t2"},
    {"clean": "t0 t21 t22 t23 t21 t24 t4", "corrupt": "t0 t25 t22 t23 t25 t24 t4", "io": "t22", "s": "t21",
     "subject": "t21 t22", "other": "t0"},
]

SAMPLE = """experiment demo
model "zoo:attn-only-2l"
data "data.jsonl" limit n
param n = 20
param alpha = 4.0
positions in clean { S1 = first(s), IO = first(io), S2 = last(s), END = -1, NEXT = last(s) + 1, SUBJ = span(subject) }
metric logit_diff(io, s) at END normalized
metric kl(clean) at [END, S2]
metric logprob(next) at 1..5
patch resid_pre[layer=*, pos=*] from corrupt into clean
patch z[layer=1, head=0] + z[layer=1, head=3] from corrupt into clean as pair
ablate mlp_out[layer=0..1] with mean over corrupt
ablate z[layer=*, head=*] with resample on clean
steer resid_pre[layer=1] by alpha * (mean(clean at END) - mean(corrupt at END)) on clean
trace noise(3 sigma, samples=2) on SUBJ restore resid_post[layer=* window 2, pos=*] severing mlp
path z[layer=0, head=*] -> q[layer=1, head=*] + k[layer=1, kv_head=0] from corrupt into clean freezing mlp
path z[layer=*, head=*] -> logits from corrupt into clean
attribute z[layer=*, head=*] from corrupt into clean verify top 5
patch module("gpt_neox.layers.{layer}.attention")[layer=*] from corrupt into clean
"""

SMALL = """model "zoo:attn-only-2l"
data "data.jsonl"
positions { A = first(s), B = last(io) - 1, C = span(subject) }
metric logprob(io) at [A, -1]
metric rank(s) normalized by clean, corrupt
metric accuracy(next) at *
ablate attn_out[layer=-1, pos=[0, A, C]] with zero as zeroed
ablate embed[pos=1..2] with mean
trace noise(0.5, seed=3) on [1, 2] restore attn_out[layer=0 window 1] + resid_post[layer=0] severing mlp on corrupt
attribute q[layer=1, head=*, pos=B] + k[layer=1, pos=B] from clean into corrupt
"""

GENERATED = """experiment gen
model "zoo:attn-only-2l"
data induction(n=k, length=4, seed=s) limit 3
param k = 4
param s = 0
metric logprob(next) at 5..7
metric prob(next) at -2
ablate z[layer=*, head=*] with mean
patch resid_pre[layer=0, pos=-3] + resid_post[layer=0, pos=-3] from corrupt into clean
steer resid_pre by 2 * mean(clean) - mean(corrupt at 1) as push
"""

GQA = """model "llama"
data "data.jsonl"
metric logit_diff(io, s)
patch k[layer=*, kv_head=*] from corrupt into clean
patch v[layer=0, kv_head=1] + q[layer=0, head=3] from corrupt into clean
ablate neuron[layer=1, neuron=0..3] with zero
ablate resid_mid[layer=*, pos=-1] with resample
path attn_out[layer=0] -> v[layer=1, kv_head=-1, pos=-1] from corrupt into clean
"""

SEEDS = {"toy": [SAMPLE, SMALL, GENERATED], "llama": [GQA, SMALL.replace("zoo:attn-only-2l", "llama")]}

KEYWORDS = ["experiment", "model", "data", "param", "positions", "in", "metric", "at", "normalized", "by",
            "patch", "ablate", "steer", "trace", "path", "attribute", "from", "into", "with", "over", "on", "as",
            "noise", "sigma", "restore", "severing", "freezing", "verify", "top", "logits", "module", "window",
            "limit", "first", "last", "span", "mean", "samples", "seed"]
NAMES = ["embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern",
         "neuron", "layer", "pos", "head", "key_pos", "clean", "corrupt", "io", "s", "subject", "other", "next",
         "logprob", "prob", "logit_diff", "rank", "accuracy", "kl", "similarity", "zero", "mean", "resample",
         "mlp", "attn", "S1", "S2", "END", "A", "B", "n", "alpha", "k", "induction", "ioi", "counterfact", "nope"]
NUMBERS = ["0", "1", "-1", "2", "-2", "3", "7", "-7", "48", "63", "64", "-64", "4096", "-4096",
           "99999999999999999999", "-99999999999999999999", "0.0", "2.5", "-0.5", "1e308", "1e999", "-1e999", "1e-320"]
PUNCT = ["[", "]", "(", ")", "{", "}", ",", "=", "*", "..", "->", "+", "-", '"', "#", "\n", " ", "@", "\\", "\x00",
         "é", "\t"]
TOKEN = re.compile(r'"[^"\n]*"|\.\.|->|[A-Za-z_][A-Za-z0-9_]*|-?\d+(?:\.\d+)?(?:[eE]-?\d+)?|\s+|.', re.S)


def tokens_of(text: str) -> list[str]:
    return TOKEN.findall(text)


@st.composite
def mutated(draw, seeds: list[str]) -> str:
    """A seed file with 1-4 random edits at the token or line level."""
    text = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            text = _mutate_tokens(draw, tokens_of(text))
        else:
            text = _mutate_lines(draw, text.splitlines(keepends=True), seeds)
    return text


def _mutate_tokens(draw, toks: list[str]) -> str:
    if not toks:
        return draw(st.sampled_from(KEYWORDS))
    i = draw(st.integers(0, len(toks) - 1))
    how = draw(st.sampled_from(["delete", "duplicate", "swap", "keyword", "name", "number", "punct", "chars"]))
    if how == "delete":
        del toks[i]
    elif how == "duplicate":
        toks.insert(i, toks[i])
    elif how == "swap":
        j = draw(st.integers(0, len(toks) - 1))
        toks[i], toks[j] = toks[j], toks[i]
    elif how == "keyword":
        toks[i] = draw(st.sampled_from(KEYWORDS))
    elif how == "name":
        toks[i] = draw(st.sampled_from(NAMES))
    elif how == "number":
        numbers = [j for j, t in enumerate(toks) if re.fullmatch(r"-?\d.*", t)]
        toks[draw(st.sampled_from(numbers)) if numbers else i] = draw(st.sampled_from(NUMBERS))
    elif how == "punct":
        toks.insert(i, draw(st.sampled_from(PUNCT)))
    else:
        toks.insert(i, draw(st.text(min_size=1, max_size=4)))
    return "".join(toks)


def _mutate_lines(draw, lines: list[str], seeds: list[str]) -> str:
    if not lines:
        return draw(st.sampled_from(seeds))
    i = draw(st.integers(0, len(lines) - 1))
    how = draw(st.sampled_from(["delete", "duplicate", "move", "borrow"]))
    if how == "delete":
        del lines[i]
    elif how == "duplicate":
        lines.insert(i, lines[i])
    elif how == "move":
        lines.insert(draw(st.integers(0, len(lines) - 1)), lines.pop(i))
    else:  # a statement from another seed file
        other = draw(st.sampled_from(seeds)).splitlines(keepends=True)
        lines.insert(i, draw(st.sampled_from(other)))
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


OVERRIDES = st.dictionaries(st.sampled_from(["n", "alpha", "k", "s", "nope"]),
                            st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True), st.booleans(),
                                      st.text(max_size=5), st.sampled_from(["3", "-1", "2.5", "1e999", "nan"])),
                            max_size=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(folder with the data, {kind: loaded model}): the toy model and a tiny grouped-query Llama."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    torch.manual_seed(0)
    llama = folder / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0)).save_pretrained(llama)
    word_tokenizer(VOCAB).save_pretrained(llama)
    models = {"toy": load_model(TOY, device="cpu"), "llama": load_model(str(llama), device="cpu")}
    return folder, models


def front_end(text: str, folder, model, params=None) -> None:
    """parse + resolve; only a CausalError may come out, and it must render with a location or none."""
    try:
        resolve(parse_text(text, str(folder / "fuzz.cx"), params), model, METHODS)
        event("resolved")
    except CausalError as exc:
        event("syntax error" if "syntax error" in exc.message else "other error")
        rendered = str(exc)
        assert "error:" in rendered
        if exc.span is not None:
            assert rendered.startswith(f"{exc.span.file}:{exc.span.line}:{exc.span.column}: error:")


def test_seed_files_are_valid(world):
    """The starting points resolve, so mutations explore the neighbourhood of valid files."""
    folder, models = world
    for kind, seeds in SEEDS.items():
        for text in seeds:
            resolve(parse_text(text, str(folder / "fuzz.cx")), models[kind], METHODS)


EXAMPLES = int(os.environ.get("CAUSAL_FUZZ_EXAMPLES", 300))  # raise it for a longer hunt; CI keeps 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(text=mutated(SEEDS["toy"]))
def test_mutated_files_on_the_toy_model(world, text):
    folder, models = world
    front_end(text, folder, models["toy"])


@FUZZ
@given(text=mutated(SEEDS["llama"]))
def test_mutated_files_on_a_grouped_query_llama(world, text):
    folder, models = world
    front_end(text, folder, models["llama"])


@st.composite
def extreme_numbers(draw, seeds: list[str]) -> str:
    """A seed file with some of its numbers (indices, ranges, limits, noise scales, seeds) made extreme."""
    toks = tokens_of(draw(st.sampled_from(seeds)))
    numbers = [i for i, t in enumerate(toks) if re.fullmatch(r"-?\d.*", t)]
    for _ in range(draw(st.integers(1, 3))):
        toks[draw(st.sampled_from(numbers))] = draw(st.sampled_from(NUMBERS))
    return "".join(toks)


@FUZZ
@given(text=extreme_numbers(SEEDS["toy"] + SEEDS["llama"]))
def test_extreme_numbers(world, text):
    folder, models = world
    front_end(text, folder, models["llama" if text.startswith('model "llama"') else "toy"])


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(text=st.one_of(st.sampled_from(SEEDS["toy"]), mutated(SEEDS["toy"])), params=OVERRIDES)
def test_parameter_overrides(world, text, params):
    folder, models = world
    front_end(text, folder, models["toy"], params)


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(text=st.text(alphabet=st.sampled_from(list("[](){},=*.+-\"#\n :->0123456789abcdefklmnoprstxz_")), max_size=80))
def test_random_text_only_syntax_errors(text):
    """Text that is mostly punctuation never gets past the parser with anything but a CausalError."""
    try:
        parse_text(text, "fuzz.cx")
    except CausalError as exc:
        assert str(exc).startswith(("fuzz.cx:", "error:"))


# --------------------------------------------------------------------------------- generated from the grammar

GRAMMAR_SEED = int(os.environ.get("CAUSAL_FUZZ_SEED", 20261201))
GRAMMAR_FILES = int(os.environ.get("CAUSAL_FUZZ_FILES", 1500))
TIME_BOUND_S = float(os.environ.get("CAUSAL_FUZZ_SECONDS", 25))  # CI stops here even if files remain
CASES = sorted((Path(__file__).parent / "fuzz_cases").glob("*.cx"))  # what scripts/fuzz.py found, kept


def test_every_grammar_terminal_has_a_sampler():
    assert unsampled_terminals() == set()


def test_files_generated_from_the_grammar_fail_only_with_a_causal_error(world):
    """Seeded, so a failure repeats; time-bounded, so a slow machine runs fewer files, not a longer suite."""
    folder, models = world
    rng = random.Random(GRAMMAR_SEED)
    start, outcomes, failures = time.monotonic(), Counter(), []
    for _ in range(GRAMMAR_FILES):
        if time.monotonic() - start > TIME_BOUND_S:
            break
        text = generate(rng)
        try:
            resolve(parse_text(text, str(folder / "fuzz.cx")), models["toy"], METHODS)
            outcomes["resolved"] += 1
        except CausalError as exc:
            outcomes["syntax" if "syntax error" in exc.message else "semantic"] += 1
            assert exc.span is None or str(exc).startswith(f"{exc.span}: error:")
        except Exception as exc:  # noqa: BLE001 -- the bug this test looks for
            failures.append(f"{type(exc).__name__}: {exc}\n{text}")
    assert not failures, f"{len(failures)} generated file(s) raised a raw exception; first:\n{failures[0]}"
    assert outcomes["semantic"] > 10 * outcomes["syntax"] / 2 and sum(outcomes.values()) >= 200, outcomes


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_saved_fuzz_cases(world, case):
    """Files that once crashed (found by scripts/fuzz.py, or by hand): now a CausalError or a valid file."""
    folder, models = world
    with pytest.raises(CausalError) as info:  # each saved case is a bad file
        resolve(parse_text(case.read_text(encoding="utf-8"), str(folder / case.name)), models["toy"], METHODS)
    assert str(info.value).startswith(f"{folder / case.name}:")


SETTING_VALUES = st.one_of(st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                           st.booleans(), st.none(), st.text(max_size=6),
                           st.sampled_from(["", "auto", "cpu", "cuda:7", "meta", "mps", "float64", "[a,b]", "{}",
                                            "nan", "inf", "-1", "1e400", "null", "true", "${x}"]))


@settings(FUZZ, max_examples=EXAMPLES)
@given(key=st.sampled_from([f.name for f in fields(RunConfig) if f.name not in ("params", "overrides")]),
       value=SETTING_VALUES)
def test_random_settings_in_python_fail_only_with_a_causal_error(key, value):
    try:
        check_config(RunConfig(**{key: value}))
    except CausalError as exc:
        assert str(exc).startswith("error: setting ")


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(key=st.sampled_from(run_settings() + ["n", "nope", "hydra.run.dir"]), value=SETTING_VALUES)
def test_random_settings_on_the_command_line_fail_only_with_a_causal_error(world, key, value):
    folder, _ = world
    path = folder / "settings.cx"
    path.write_text(SMALL.replace('model "zoo:attn-only-2l"', 'model "zoo:attn-only-2l"\nparam n = 3'))
    written = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    try:
        check_command_line(path, [f"{key}={written}"])
    except CausalError as exc:
        assert str(exc).startswith(("error:", f"{path}:"))


VALID_DATA = {".jsonl": "\n".join(json.dumps(r) for r in ROWS) + "\n",
              ".csv": "clean,corrupt,io\n" + "\n".join(f'"{r["clean"]}",{r["corrupt"]},{r["io"]}' for r in ROWS) + "\n",
              ".json": json.dumps(ROWS)}
DATA_NOISE = [b"\x00", b"\xff", b'"', b"\n", b"\r", b",", b"{", b"}", b"[", b"]", b":", b"\\", b"\\ud800",
              b"\xef\xbb\xbf", "\u2028".encode(), b'"clean": 1, ', b"\t", b"  "]


@settings(FUZZ, max_examples=EXAMPLES)
@given(suffix=st.sampled_from(sorted(VALID_DATA)), edits=st.lists(
    st.tuples(st.floats(0, 1), st.sampled_from(["insert", "delete", "flip", "truncate"]), st.sampled_from(DATA_NOISE)),
    min_size=1, max_size=4))
def test_damaged_data_files_fail_only_with_a_causal_error(world, suffix, edits):
    folder, _ = world
    data = bytearray(VALID_DATA[suffix].encode())
    for where, how, noise in edits:
        at = int(where * len(data))
        if how == "insert":
            data[at:at] = noise
        elif how == "delete":
            del data[at:at + 3]
        elif how == "flip" and at < len(data):
            data[at] ^= 1 << (at % 8)
        else:
            del data[at:]
    path = folder / f"damaged{suffix}"
    path.write_bytes(bytes(data))
    try:
        read_table(path)
    except CausalError as exc:
        assert str(exc).startswith("error:")
