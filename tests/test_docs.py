"""Every fenced code block in README.md and docs/*.md is checked by its kind, so the docs cannot drift
from the code: experiments pass `causal check`, statements and sites of the language resolve or parse,
Python runs, `causal` command lines parse (cheap ones run), error and run-output samples are
reproduced, excerpts match the source they quote. A block of no known kind fails, so new docs are
checked too; one that cannot be says so in the markdown, `<!-- not-checked: why -->` right before it.

Offline stand-ins, so the blocks run as written: the hub id "gpt2" is a random GPT-2 of GPT-2 small's
depth (12 layers, 12 heads) but tiny width, with a t0..t63 word vocabulary; the data files the docs
name (`data.jsonl`, `prompts.jsonl`) are written in that vocabulary (the zoo toys' too); the results
folders they load come from small real runs, made once per session. Each model loads once per session.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import causal
from causal.app import api, cli
from causal.app.check import describe
from causal.data.load import GENERATORS
from causal import tasks  # noqa: F401  (the built-in generators register themselves)
from causal.errors import CausalError
from causal.app.hydra_app import summary
from causal.lang.parser import DECLARATIONS, intervention_keywords, parse_file, parse_text
from causal.models.load import load_model
from causal.zoo import word_tokenizer

pytestmark = pytest.mark.slow  # every documented example run

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```|~~~)(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
                   re.M | re.S)
MARKER = re.compile(r"<!--\s*(not-checked|excerpt):\s*(.*?)\s*-->\s*$")
ERROR = re.compile(r"^(?P<file>[^\s:]+):(?P<line>\d+):(?P<col>\d+): error: (?P<message>.+)$")
SITE = re.compile(r'^(\w+|module\("[^"]*"\))(\[.*\])?$')
MAX_NOT_CHECKED = 2  # a diagram; keep this list short and honest


# --------------------------------------------------------------------------------- the blocks

@dataclasses.dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    info: str
    text: str  # without the fence's indentation
    marker: tuple[str, str] | None  # ("not-checked", why) or ("excerpt", source path)

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks_of(doc: Path) -> list[Block]:
    """The fenced blocks of one markdown file, each with the marker comment on the line before it."""
    text = doc.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        indent = len(match["indent"])
        body = "".join(line[indent:] if line[:indent].isspace() else line
                       for line in match["body"].splitlines(keepends=True))
        found.append(Block(doc, text.count("\n", 0, match.start()) + 1, match["info"].strip(), body,
                           marker.groups() if marker else None))
    return found


BLOCKS = [block for doc in DOCS for block in blocks_of(doc)]


def keywords() -> tuple[str, ...]:
    return (*DECLARATIONS, *intervention_keywords())


def statements(text: str) -> list[str] | None:
    """The statements of a block of the language, one per line that starts with a keyword (a line
    that does not continues the one above); None when the block does not start with one."""
    found: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in keywords():
            found.append(line)
        elif found:
            found[-1] += "\n" + line
        elif words and not words[0].startswith("#"):
            return None
    return found or None


def kind(block: Block) -> str:
    """What a block is, hence how it is checked; "unknown" fails."""
    if block.marker:
        return block.marker[0]
    if block.info in ("python", "bash", "sh", "shell"):
        return {"bash": "shell", "sh": "shell"}.get(block.info, block.info)
    if block.info not in ("", "cx"):
        return "unknown"
    first = block.text.split("\n", 1)[0]
    if ERROR.match(first):
        return "error"
    if first.startswith("results: "):
        return "run output"
    found = statements(block.text)
    if found:
        declared = {s.split()[0] for s in found}
        whole = {"model", "data", "metric"} <= declared and declared & set(intervention_keywords())
        return "experiment" if whole else "statements"
    lines = [line.split("#")[0].strip() for line in block.text.splitlines() if line.strip()]
    return "sites" if lines and all(SITE.match(line) for line in lines) else "unknown"


# --------------------------------------------------------------------------------- fixtures

class Models:
    """One load per (reference, device, dtype) for the whole session; hub ids by offline stand-ins."""

    def __init__(self, stand_ins: dict[str, Path]):
        self.stand_ins, self.loaded = stand_ins, {}

    def load(self, ref, device="auto", dtype="float32", span=None, trust_remote_code=False, **placement):
        key = (ref, device, dtype, *placement.items())
        if key not in self.loaded:
            target = str(self.stand_ins.get(ref, ref))
            self.loaded[key] = dataclasses.replace(load_model(target, device, dtype, span, trust_remote_code,
                                                              **placement), ref=ref)
        return self.loaded[key]

    def patch(self, monkeypatch) -> None:
        """causal's loads and the notebook's `from_pretrained("gpt2")` both go to the cache / stand-ins."""
        monkeypatch.setattr(api, "load_model", self.load)
        for cls in (AutoModelForCausalLM, AutoTokenizer):
            real = cls.from_pretrained
            monkeypatch.setattr(cls, "from_pretrained",
                                lambda name, *a, _real=real, **k: _real(str(self.stand_ins.get(name, name)), *a, **k))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    folder = tmp_path_factory.mktemp("gpt2-stand-in")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=48, n_layer=12, n_head=12, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(folder)
    word_tokenizer(64).save_pretrained(folder)
    return Models({"gpt2": folder})


RUNS = {"outputs/2026-11-23/04-10-00_induction": ("experiments/induction.cx", {}),
        "outputs/2026-11-23/04-10-00_ioi": ("experiments/ioi.cx", {"n": 16})}


@pytest.fixture(scope="session")
def runs(tmp_path_factory, models) -> Path:
    """The results folders the docs load, from real runs of the experiments they are named after."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        models.patch(patch)
        for folder, (experiment, params) in RUNS.items():
            config = causal.RunConfig(device="cpu", progress=False, params=params)
            causal.save(causal.run(ROOT / experiment, config), root / folder / "results.nc")
    return root


def doc_rows(n: int = 16) -> list[dict]:
    """IOI-shaped rows in the t0..t63 vocabulary, with every column the docs' experiments read."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        a, io, s, b, c, d, e, other = (f"t{t + 1}" for t in torch.randperm(63, generator=gen)[:8].tolist())
        rows.append({"clean": f"{a} {io} {s} {b} {c} {s} {d} {e}", "corrupt": f"{a} {other} {s} {b} {c} {s} {d} {e}",
                     "io": io, "s": s, "subject": f"{b} {c}"})
    return rows


def reference_experiment() -> str:
    """docs/language.md's first experiment: the `file.cx` its Python block runs, and its statements' context."""
    return next(b.text for b in BLOCKS if b.doc.name == "language.md" and kind(b) == "experiment")


@pytest.fixture
def workspace(tmp_path, runs, models, monkeypatch) -> Path:
    """The working directory a block runs in (the current one): the repository's experiments, the
    results folders, the data files and `file.cx` the docs name; models from the session's cache."""
    models.patch(monkeypatch)
    shutil.copytree(ROOT / "experiments", tmp_path / "experiments")
    shutil.copytree(runs / "outputs", tmp_path / "outputs")
    for name in ("data.jsonl", "prompts.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in doc_rows()))
    (tmp_path / "file.cx").write_text(reference_experiment())
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------------- checks by kind

def causal_check(path: Path) -> str:
    """What `causal check FILE` prints, by the calls cli._check makes, on the session's models."""
    config = causal.RunConfig(device="cpu", progress=False)
    experiment = api.prepare(path, config)
    return describe(experiment, api.plan_run(experiment, config))


def check_experiment(block: Block, here: Path) -> None:
    path = here / f"{block.doc.stem}_{block.line}.cx"
    path.write_text(block.text)
    assert "ok, nothing run" in causal_check(path)


CONTEXT = {  # what docs/language.md's reference experiment declares, for its statements one at a time
    "experiment": "experiment fragment",
    "model": 'model "zoo:attn-only-2l"',
    "data": 'data "data.jsonl" limit n',
    "param n": "param n = 20",
    "param alpha": "param alpha = 4.0",
    "positions": "positions in clean { S1 = first(s), IO = first(io), S2 = last(s), END = -1, NEXT = last(s) + 1, "
                 "SUBJ = span(subject) }",
    "metric": "metric logit_diff(io, s) at END",
    "intervention": "patch resid_pre[layer=0] from corrupt into clean",
}


def in_context(statement: str) -> str:
    """The context with `statement` in place of what it declares (an intervention replaces the context's)."""
    words = statement.split()
    key = f"param {words[1]}" if words[0] == "param" else words[0] if words[0] in DECLARATIONS else "intervention"
    return "\n".join({**CONTEXT, key: statement}.values()) + "\n"


def check_statements(block: Block, here: Path) -> None:
    """Each statement in the reference context passes `causal check`; a model other than a zoo toy
    (a hub id, a local folder, a package) is only parsed, as it is not here to load."""
    for statement in statements(block.text):
        path = here / "fragment.cx"
        path.write_text(in_context(statement))
        try:
            if statement.startswith("model") and '"zoo:' not in statement:
                parse_file(path)
            else:
                causal_check(path)
        except CausalError as exc:
            pytest.fail(f"{block}: {statement.strip()!r} in the reference context:\n{exc}")


def check_sites(block: Block, here: Path) -> None:
    """Each site with its selectors parses as a patch's site (its ranges are for no model in particular)."""
    for line in block.text.splitlines():
        if line.strip():
            parse_text(in_context(f"patch {line.split('#')[0].strip()} from corrupt into clean"), str(block))


def check_python(block: Block, here: Path) -> None:
    exec(compile(block.text, str(block), "exec"), {"__name__": "__doc_block__"})


OTHER_PROGRAMS = {"pip", "python"}  # the set-up lines around causal's own


def command_lines(text: str) -> list[list[str]]:
    """The commands of a shell block, comments dropped and `&&`, `;`, `|` lists split."""
    commands: list[list[str]] = []
    for line in text.splitlines():
        command: list[str] = []
        for word in shlex.split(line, comments=True) + [";"]:
            if word in ("&&", "||", ";", "|"):
                commands += [command] if command else []
                command = []
            else:
                command.append(word)
    return commands


def check_shell(block: Block, here: Path) -> None:
    """Every `causal` line parses and its file and `key=value`s pass the CLI's checks; `check` and `plot`
    (cheap) run. Other programs must be among the known set-up ones."""
    for words in command_lines(block.text):
        args = words[1:] if words[0] == "causal" else words[3:] if words[:3] == ["python", "-m", "causal"] else None
        if args is None:
            assert words[0] in OTHER_PROGRAMS, f"{block}: {shlex.join(words)!r}: not a command this test knows"
            continue
        try:
            check_command(args)
        except (CausalError, SystemExit) as exc:
            pytest.fail(f"{block}: {shlex.join(words)!r}: {exc}")


def check_command(args: list[str]) -> None:
    if args[0] not in cli.COMMANDS:
        assert cli.main(args) == 0
        return
    parser = cli.command_parser(args[0])
    parsed = parser.parse_intermixed_args(args[1:])
    if args[0] not in ("plot", "report"):  # these take a run folder, not an experiment file
        path, given = cli.file_and_overrides(parser, [t for t in (parsed.file, *parsed.overrides) if t is not None])
        cli.check_command_line(path, given, multirun=bool(getattr(parsed, "multirun", False)))
    if args[0] in ("check", "plot", "report"):
        assert cli.main(args) == 0


ERROR_MODELS = {2: "zoo:attn-only-2l", 12: "gpt2"}  # by the layer count a sample's message names


def check_error(block: Block, here: Path) -> None:
    """The sample's line, at its line number in a minimal experiment, gives exactly that error."""
    sample = block.text.rstrip("\n").splitlines()
    where = ERROR.match(sample[0])
    layers = re.search(r"the model has (\d+) layers", where["message"])
    header = [f'model "{ERROR_MODELS[int(layers[1]) if layers else 2]}"', "data induction(n=4, length=4)",
              "metric logprob(next)"]
    padding = int(where["line"]) - 1 - len(header)
    assert padding >= 0, f"{block}: the sample's line {where['line']} leaves no room for model, data and metric"
    path = Path(where["file"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n" * padding + "\n".join(header) + "\n" + sample[1].strip() + "\n")
    with pytest.raises(CausalError) as error:
        causal_check(path)
    assert str(error.value).splitlines()[:len(sample)] == sample


def check_run_output(block: Block, here: Path) -> None:
    """What `causal run` prints: paths in its format, effects those of the session's run of that experiment."""
    lines = block.text.rstrip("\n").splitlines()
    results = re.fullmatch(r"results: (outputs/\S+)/results\.nc", lines[0])
    assert results, f"{block}: {lines[0]!r}"
    assert re.fullmatch(rf"plots:   {re.escape(results[1])}/plots/ \(\d+ file\(s\)\)", lines[1]), lines[1]
    expected = summary(causal.load(here / results[1]), Path("results.nc"), [])
    assert rounded(lines[2:]) == rounded(expected.splitlines()[1:])


def rounded(lines: list[str]) -> list[str]:
    """Printed effects to two decimals: float32 sums on another machine may differ in the third."""
    return [re.sub(r"-?\d+\.\d{3}", lambda m: f"{float(m[0]):.2f}", line) for line in lines]


def check_excerpt(block: Block, here: Path) -> None:
    """Python: each definition is the source's, up to comments and line breaks; else each line is one of its."""
    source = (ROOT / block.marker[1]).read_text(encoding="utf-8")
    if block.marker[1].endswith(".py"):
        quoted, actual = definitions(block.text), definitions(source)
        assert quoted and all(actual.get(name) == tree for name, tree in quoted.items()), f"{block} != {block.marker[1]}"
        return
    lines = {" ".join(line.split()) for line in source.splitlines()}
    missing = [line for line in block.text.splitlines() if line.strip() and " ".join(line.split()) not in lines]
    assert not missing, f"{block}: not in {block.marker[1]}: {missing}"


def definitions(text: str) -> dict[str, str]:
    return {node.name: ast.dump(node) for node in ast.parse(text).body
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))}


CHECKS = {"experiment": check_experiment, "statements": check_statements, "sites": check_sites,
          "python": check_python, "shell": check_shell, "error": check_error, "run output": check_run_output,
          "excerpt": check_excerpt, "not-checked": lambda block, here: None}


# --------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_block(block: Block, workspace: Path):
    check = CHECKS.get(kind(block))
    if check is None:
        pytest.fail(f"{block}: a {block.info or 'plain'} block of no kind this test knows ({', '.join(CHECKS)}); "
                    "make it one, teach tests/test_docs.py its kind, or mark it <!-- not-checked: why -->")
    check(block, workspace)


def test_every_fence_is_closed_and_found():
    """An unclosed or oddly indented fence would hide the blocks after it from the checks above."""
    for doc in DOCS:
        fences = [line for line in doc.read_text(encoding="utf-8").splitlines() if re.match(r"\s*(```|~~~)", line)]
        assert len(fences) == 2 * len(blocks_of(doc)), doc


def test_not_checked_blocks_are_few_and_say_why():
    skipped = [block for block in BLOCKS if kind(block) == "not-checked"]
    assert all(block.marker[1] for block in skipped)
    assert len(skipped) <= MAX_NOT_CHECKED, [str(block) for block in skipped]


def test_every_generator_argument_is_documented():
    """docs/language.md's generator table names every argument of every `data NAME(...)` generator."""
    text = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    assert {"induction", "ioi", "counterfact", "hiereq"} <= set(GENERATORS)
    for name, generator in GENERATORS.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row, f"generator {name!r} has no row in docs/language.md"
        arguments = list(inspect.signature(generator).parameters)[1:]  # after the tokenizer
        assert not [a for a in arguments if f"`{a}`" not in row], f"{name}: undocumented arguments"
