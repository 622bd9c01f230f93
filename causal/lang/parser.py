"""Experiment text -> ExperimentFile, or a CausalError pointing at the offending text."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from causal.errors import CausalError, Span
from causal.lang import ast

GRAMMAR_PATH = Path(__file__).resolve().parents[2] / "grammars" / "causal.lark"

# Readable names for the grammar's anonymous terminals in "expected ..." messages.
_TERMINAL_NAMES = {
    "LSQB": "'['", "RSQB": "']'", "LPAR": "'('", "RPAR": "')'", "COMMA": "','",
    "EQUAL": "'='", "STAR": "'*'", "DOT": "'.'", "NAME": "a name", "STRING": 'a "string"',
    "INT": "an integer", "SIGNED_INT": "an integer", "SIGNED_NUMBER": "a number",
}


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(GRAMMAR_PATH.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def parse_file(path: str | Path) -> ast.ExperimentFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CausalError(f"cannot read experiment file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CausalError(f"experiment file {str(path)!r} is not UTF-8 text") from None
    return parse_text(text, str(path))


def parse_text(text: str, path: str = "<experiment>") -> ast.ExperimentFile:
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, path) from None
    statements = _ToAst(path).transform(tree).children
    return _assemble(statements, text, path)


def _syntax_error(exc: UnexpectedInput, text: str, path: str) -> CausalError:
    line, column = max(exc.line, 1), max(exc.column, 1)
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        found = "end of file"
        lines = text.rstrip().splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    elif isinstance(exc, UnexpectedToken):
        found = repr(str(exc.token))
    elif isinstance(exc, UnexpectedCharacters):
        found = repr(text[exc.pos_in_stream]) if exc.pos_in_stream < len(text) else "end of file"
    else:
        found = "this"
    expected = sorted({_TERMINAL_NAMES.get(t, _keyword(t)) for t in (exc.expected or ())} if hasattr(exc, "expected") else set())
    allowed = getattr(exc, "allowed", None)
    if not expected and allowed:
        expected = sorted({_TERMINAL_NAMES.get(t, _keyword(t)) for t in allowed})
    message = f"syntax error: unexpected {found}"
    if expected:
        message += "; expected " + ", ".join(expected)
    return CausalError(message, Span(path, line, column), text)


def _keyword(terminal: str) -> str:
    """Lark names a keyword's terminal after the keyword itself, in upper case."""
    return f"'{terminal.lower()}'" if terminal.isalpha() else terminal


def _span(path: str, meta_or_token) -> Span:
    return Span(path, meta_or_token.line, meta_or_token.column,
                getattr(meta_or_token, "end_line", None), getattr(meta_or_token, "end_column", None))


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds AST nodes bottom-up; statements come out as (kind, node) pairs."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _s(self, item) -> Span:
        return _span(self.path, item)

    # index sets
    def all_indices(self, meta, _):
        return ast.AllIndices(self._s(meta))

    def index_range(self, meta, items):
        return ast.IndexRange(int(items[0]), int(items[1]), self._s(meta))

    def single_index(self, meta, items):
        return ast.SingleIndex(int(items[0]), self._s(meta))

    def index_list(self, meta, items):
        return ast.IndexList(tuple(int(t) for t in items), self._s(meta))

    # sites
    def selector(self, meta, items):
        return ast.Selector(str(items[0]), items[1], self._s(meta))

    def selectors(self, meta, items):
        return tuple(items)

    def site(self, meta, items):
        selectors = items[-1] if items and isinstance(items[-1], tuple) else ()
        names = [str(t) for t in items if isinstance(t, Token)]
        return ast.SiteRef(".".join(names), selectors, self._s(meta))

    # clauses
    def limit(self, meta, items):
        return ("limit", int(items[0]))

    def label(self, meta, items):
        return ("label", str(items[0]))

    def on_clause(self, meta, items):
        return ("on", items[0])

    def at_clause(self, meta, items):
        return ("at", items[0])

    def number(self, meta, items):
        text = str(items[0])
        return float(text) if any(c in text for c in ".eE") else int(text)

    def string(self, meta, items):
        return str(items[0])[1:-1]

    def word(self, meta, items):
        return str(items[0])

    def kwarg(self, meta, items):
        return (str(items[0]), items[1], self._s(meta))

    # statements
    def experiment_stmt(self, meta, items):
        return ("experiment", str(items[0]), self._s(meta))

    def model_stmt(self, meta, items):
        return ("model", ast.ModelDecl(str(items[0])[1:-1], self._s(items[0])), self._s(meta))

    def data_file(self, meta, items):
        limit = dict(i for i in items[1:] if isinstance(i, tuple)).get("limit")
        return ("data", ast.DataFile(str(items[0])[1:-1], limit, self._s(meta)), self._s(meta))

    def data_generator(self, meta, items):
        kwargs = tuple(i for i in items[1:] if isinstance(i, tuple) and len(i) == 3)
        limit = dict(i for i in items[1:] if isinstance(i, tuple) and len(i) == 2).get("limit")
        return ("data", ast.DataGenerator(str(items[0]), kwargs, limit, self._s(meta)), self._s(meta))

    def metric_stmt(self, meta, items):
        name, rest = items[0], items[1:]
        at = next((i[1] for i in rest if isinstance(i, tuple)), None)
        args = tuple((str(t), self._s(t)) for t in rest if isinstance(t, Token))
        return ("metric", ast.MetricDecl(str(name), args, at, self._s(meta)), self._s(meta))

    def patch_stmt(self, meta, items):
        site, source, base = items[0], items[1], items[2]
        label = items[3][1] if len(items) > 3 and items[3] else None
        node = ast.Patch(site, str(source), str(base), label, self._s(meta), self._s(source), self._s(base))
        return ("intervention", node, self._s(meta))

    def ablate_stmt(self, meta, items):
        site, method = items[0], items[1]
        clauses = dict(i for i in items[2:] if i)
        base = clauses.get("on")
        node = ast.Ablate(site, str(method), str(base) if base else None, clauses.get("label"),
                          self._s(meta), self._s(method), self._s(base) if base else None)
        return ("intervention", node, self._s(meta))


def _assemble(statements: list, text: str, path: str) -> ast.ExperimentFile:
    singles: dict[str, tuple] = {}
    metrics, interventions = [], []
    for kind, node, span in statements:
        if kind == "metric":
            metrics.append(node)
        elif kind == "intervention":
            interventions.append(node)
        elif kind in singles:
            first = singles[kind][1]
            raise CausalError(f"'{kind}' is declared twice (first at line {first.line})", span, text)
        else:
            singles[kind] = (node, span)
    start = Span(path, 1, 1)
    for required in ("model", "data"):
        if required not in singles:
            raise CausalError(f"the experiment has no '{required}' statement", start, text,
                              hint=f"add a line such as: {_EXAMPLES[required]}")
    if not metrics:
        raise CausalError("the experiment has no 'metric' statement", start, text,
                          hint=f"add a line such as: {_EXAMPLES['metric']}")
    if not interventions:
        raise CausalError("the experiment has no intervention ('patch' or 'ablate')", start, text,
                          hint=f"add a line such as: {_EXAMPLES['intervention']}")
    return ast.ExperimentFile(
        path=path, text=text,
        name=singles["experiment"][0] if "experiment" in singles else None,
        model=singles["model"][0], data=singles["data"][0],
        metrics=tuple(metrics), interventions=tuple(interventions), span=start,
    )


_EXAMPLES = {
    "model": 'model "zoo:attn-only-2l"',
    "data": 'data "prompts.jsonl"',
    "metric": "metric logit_diff(answer, wrong) at -1",
    "intervention": "patch resid_pre[layer=*, pos=*] from corrupt into clean",
}
