"""Experiment text -> ExperimentFile, or a CausalError pointing at the offending text.

Parameters (`param n = 200`) are substituted here, after command-line overrides are
applied, so later stages only ever see plain values.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from causal.errors import CausalError, Span, did_you_mean, reported_against, source_lines
from causal.files import check_experiment_file
from causal.lang import ast
from causal.limits import LARGEST, MAX_DEPTH

GRAMMAR_PATH = Path(__file__).parent / "causal.lark"  # a link to grammars/causal.lark, packaged with the code

# Readable names for the grammar's terminals in "expected ..." messages.
_TERMINAL_NAMES = {
    "LSQB": "'['", "RSQB": "']'", "LPAR": "'('", "RPAR": "')'", "COMMA": "','", "LBRACE": "'{'",
    "RBRACE": "'}'", "EQUAL": "'='", "STAR": "'*'", "DOT": "'.'", "PLUS": "'+'", "MINUS": "'-'",
    "NAME": "a name", "STRING": 'a "string"', "INT": "an integer", "SIGNED_INT": "an integer",
    "SIGNED_NUMBER": "a number", "POSITION_FN": "first(...), last(...) or span(...)", "SIGMA": "'sigma'",
    "LOGITS": "'logits'", "__ANON_0": "'..'", "__ANON_1": "'->'",
}


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(GRAMMAR_PATH.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


DECLARATIONS = ("experiment", "model", "data", "param", "positions", "metric")


@lru_cache(maxsize=1)
def intervention_keywords() -> tuple[str, ...]:
    """The grammar's statement keywords that are not declarations: one per method."""
    names = dict.fromkeys(str(rule.origin.name) for rule in _parser().rules)
    return tuple(n.removesuffix("_stmt") for n in names
                 if n.endswith("_stmt") and n.removesuffix("_stmt") not in DECLARATIONS)


def parse_file(path: str | Path, params: dict[str, object] | None = None,
               model_given: bool = False) -> ast.ExperimentFile:
    path = Path(path)
    check_experiment_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is not part of the file
    except OSError as exc:
        raise CausalError(f"cannot read experiment file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CausalError(f"experiment file {str(path)!r} is not UTF-8 text") from None
    return parse_text(text, str(path), params, model_given)


def parse_text(text: str, path: str = "<experiment>", params: dict[str, object] | None = None,
               model_given: bool = False) -> ast.ExperimentFile:
    """`params` override the file's `param` declarations (e.g. from `causal run file.cx n=50`).

    `model_given`: the caller supplies the model object, so a `model` line is optional.
    """
    with reported_against(text, path):
        return _parse(text, path, params, model_given)


def _parse(text: str, path: str, params: dict[str, object] | None, model_given: bool) -> ast.ExperimentFile:
    _check_characters(text, path)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, path) from None
    _check_depth(tree, path)
    values = _parameters(tree, path, params or {})
    try:
        statements = _ToAst(path, values).transform(tree).children
    except VisitError as exc:
        if isinstance(exc.orig_exc, CausalError):
            raise exc.orig_exc from None
        raise
    return _assemble(statements, text, path, model_given)


def _check_depth(tree: Tree, path: str) -> None:
    """Refuse a tree nested deeper than MAX_DEPTH before the (recursive) transformer meets it."""
    stack = [(tree, 1, None)]
    while stack:
        node, depth, where = stack.pop()
        where = where if node.meta.empty else node.meta
        if depth > MAX_DEPTH:
            raise CausalError(f"this expression nests more than {MAX_DEPTH} deep (a sum of n terms, or n signs, "
                              f"nests n deep); split it, or use a parameter", _span(path, where) if where else None)
        stack.extend((child, depth + 1, where) for child in node.children if isinstance(child, Tree))


# NUL cannot be stored in the results' attributes (netCDF strings end at it), and a lone surrogate
# is not UTF-8: either would be lost or fail when the experiment's text is saved with its results.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _check_characters(text: str, path: str) -> None:
    found = _UNSTORABLE.search(text)
    if found:
        before = text[:found.start()]
        line, column = before.count("\n") + 1, found.start() - (before.rfind("\n") + 1) + 1
        what = "a NUL byte" if found.group() == "\x00" else f"a lone surrogate {found.group()!a}"
        raise CausalError(f"the file contains {what}, which is not text (was it saved by a text editor?)",
                          Span(path, line, column))


def _syntax_error(exc: UnexpectedInput, text: str, path: str) -> CausalError:
    line, column = max(exc.line, 1), max(exc.column, 1)
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        found = "end of file"
        lines = source_lines(text.rstrip())
        line, column = len(lines), len(lines[-1]) + 1
    elif isinstance(exc, UnexpectedToken):
        found = repr(str(exc.token))
    elif isinstance(exc, UnexpectedCharacters):
        found = repr(text[exc.pos_in_stream]) if exc.pos_in_stream < len(text) else "end of file"
    else:
        found = "this"
    expected = _acceptable(exc)
    message = f"syntax error: unexpected {found}"
    readable = sorted({_TERMINAL_NAMES.get(t, _keyword(t)) for t in expected})
    if readable:
        message += "; expected " + ", ".join(readable)
    keywords = [name.strip("'") for name in readable if name.startswith("'") and name.strip("'").isalpha()]
    hint = did_you_mean(found.strip("'"), keywords) if found.startswith("'") else None
    return CausalError(message, Span(path, line, column), hint)


def _acceptable(exc: UnexpectedInput) -> set[str]:
    """The terminals the parser could take here: exact from its state when Lark keeps it."""
    parser = getattr(exc, "interactive_parser", None)
    if parser is not None:
        try:
            return {t for t in parser.accepts() if t != "$END"}
        except Exception:  # noqa: BLE001 -- fall back to Lark's own (wider) list
            pass
    return set(getattr(exc, "expected", None) or ()) or set(getattr(exc, "allowed", None) or ())


def _keyword(terminal: str) -> str:
    """Lark names a keyword's terminal after the keyword itself, in upper case."""
    return f"'{terminal.lower()}'" if terminal.isalpha() else terminal


def _span(path: str, meta_or_token) -> Span:
    return Span(path, meta_or_token.line, meta_or_token.column,
                getattr(meta_or_token, "end_line", None), getattr(meta_or_token, "end_column", None))


# --- parameters ------------------------------------------------------------------------------


def _parameters(tree: Tree, path: str, overrides: dict[str, object]) -> dict[str, object]:
    """The file's declared parameters with overrides applied, each keeping its declared type."""
    declared: dict[str, tuple[object, Span]] = {}
    for stmt in tree.children:
        if isinstance(stmt, Tree) and stmt.data == "param_stmt":
            name_token, literal = stmt.children
            span = _span(path, name_token)
            if str(name_token) in declared:
                raise CausalError(f"parameter {str(name_token)!r} is declared twice", span)
            value = _literal_value(literal)
            problem = _checked(value, str(literal.children[0])) if literal.data == "number" else None
            if problem:
                raise CausalError(problem, _span(path, literal.children[0]))
            declared[str(name_token)] = (value, span)
    values = {name: value for name, (value, _) in declared.items()}
    for name, raw in overrides.items():
        if name not in declared:
            known = ", ".join(declared) or "none"
            raise CausalError(f"unknown parameter {name!r} on the command line; {path} declares: {known}",
                              hint=did_you_mean(name, declared))
        values[name] = _convert(name, raw, declared[name][0])
    return values


def _literal_value(tree: Tree):
    token = tree.children[0]
    if tree.data == "number":
        return _number(str(token))
    if tree.data == "string":
        return str(token)[1:-1]
    return str(token)


def _number(text: str) -> int | float:
    if any(c in text for c in ".eE"):
        return float(text)
    if len(text.lstrip("+-")) > len(str(LARGEST)):  # Python refuses int() of 4,300+ digits: too large anyway
        return math.copysign(math.inf, -1 if text.startswith("-") else 1)
    return int(text)


def _checked(value: int | float, written: str) -> str | None:
    """Why a number cannot be used, or None."""
    shown = written if len(written) <= 24 else f"{written[:12]}... ({len(written.lstrip('+-'))} digits)"
    whole = written.strip().lstrip("+-").isdigit()  # an integer as written, however large
    if isinstance(value, float) and not math.isfinite(value) and not whole:
        return f"the number {shown} is too large (it is {value} as a float)"
    if (whole or isinstance(value, int)) and abs(value) > LARGEST:
        return f"the number {shown} is too large (at most {LARGEST})"
    return None


def _convert(name: str, raw: object, default: object) -> object:
    """Command-line values arrive as text (or as Hydra's guess); keep the declared type."""
    try:
        if isinstance(default, bool) or isinstance(default, str):
            return str(raw)
        if isinstance(raw, bool):
            raise ValueError
        if isinstance(default, int):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            value = int(str(raw)) if not isinstance(raw, (int, float)) else int(raw)
        else:
            value = float(raw)
        if _checked(value, str(raw)):
            raise ValueError
        return value
    except (TypeError, ValueError, OverflowError):
        kind = type(default).__name__
        raise CausalError(f"parameter {name!r} must be {'an' if kind == 'int' else 'a'} {kind} "
                          f"(its default is {default!r}), got {raw!r}") from None


# --- tree -> AST -----------------------------------------------------------------------------


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds AST nodes bottom-up; statements come out as (kind, node, span) triples."""

    def __init__(self, path: str, params: dict[str, object]):
        super().__init__()
        self.path, self.params = path, params

    def _s(self, item) -> Span:
        return _span(self.path, item)

    def _error(self, message: str, item, hint: str | None = None) -> CausalError:
        return CausalError(message, self._s(item), hint)

    def _param(self, token: Token, kinds: tuple[type, ...], what: str):
        name = str(token)
        if name not in self.params:
            raise self._error(f"{name!r} is not a parameter; {what}", token,
                              hint=did_you_mean(name, self.params) or "declare it with: param "
                                   f"{name} = ...")
        value = self.params[name]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise self._error(f"parameter {name!r} is {value!r}, but {what}", token)
        return value

    # values
    def number(self, meta, items):
        return self._bounded(items[0])

    def _bounded(self, token: Token) -> int | float:
        value = _number(str(token))
        problem = _checked(value, str(token))
        if problem:
            raise self._error(problem, token)
        return value

    def string(self, meta, items):
        return str(items[0])[1:-1]

    def word(self, meta, items):
        name = str(items[0])
        return self.params.get(name, name)

    def int_value(self, meta, items):
        return self._bounded(items[0])

    def name_value(self, meta, items):
        return self._param(items[0], (int,), "a whole number is needed here")

    def kwarg(self, meta, items):
        return (str(items[0]), items[1], self._s(meta))

    def train_arg(self, meta, items):
        return (str(items[0]), items[1], self._s(meta))

    def train_list(self, meta, items):
        return (str(items[0]), tuple(items[1:]), self._s(meta))

    def trainer(self, meta, items):
        """`by das(k=1, epochs=20)`: the trainer's name and its (key, value, span) settings."""
        settings = tuple(i for i in items[1:] if isinstance(i, tuple))
        return ast.Clause("trainer", (str(items[0]), settings), self._s(meta))

    # index sets
    def int_index(self, meta, items):
        return self._bounded(items[0])

    def name_index(self, meta, items):
        token = items[0]
        if str(token) in self.params:
            return self._param(token, (int,), "an index must be a whole number")
        return ast.Name(str(token), self._s(token))

    def all_indices(self, meta, _):
        return ast.AllIndices(self._s(meta))

    def index_range(self, meta, items):
        return ast.IndexRange(items[0], items[1], self._s(meta))

    def single_index(self, meta, items):
        return ast.SingleIndex(items[0], self._s(meta))

    def index_list(self, meta, items):
        return ast.IndexList(tuple(items), self._s(meta))

    # sites
    def window(self, meta, items):
        if items[0] < 1:
            raise self._error(f"a window must cover at least one layer, got {items[0]}", meta)
        return ("window", items[0])

    def selector(self, meta, items):
        window = items[2][1] if len(items) > 2 and items[2] else None
        return ast.Selector(str(items[0]), items[1], window, self._s(meta))

    def selectors(self, meta, items):
        return tuple(items)

    def named_site(self, meta, items):
        return ast.SiteRef(str(items[0]), items[1] if len(items) > 1 else (), self._s(meta))

    def module_site(self, meta, items):
        path = str(items[0])[1:-1]
        if not path:
            raise self._error("module(\"...\") needs a module path, e.g. module(\"transformer.h.{layer}.mlp\")", meta)
        return ast.SiteRef(f"module:{path}", items[1] if len(items) > 1 else (), self._s(meta))

    def sae_site(self, meta, items):
        ref = str(items[0])[1:-1]
        if not ref:
            raise self._error("sae(\"...\") needs an SAE: a folder, \"zoo:<name>\" or \"saelens:<release>/<id>\"", meta)
        return ast.SiteRef(f"sae:{ref}", items[1] if len(items) > 1 else (), self._s(meta))

    def sites(self, meta, items):
        return tuple(i for i in items if isinstance(i, ast.SiteRef))

    # clauses
    def limit(self, meta, items):
        if items[0] < 1:  # a negative limit would slice from the end: examples silently dropped
            raise self._error(f"limit needs at least 1 example, got {items[0]}", meta)
        return ("limit", items[0])

    def at_clause(self, meta, items):
        return ("at", items[0])

    def normalized(self, meta, items):
        names = [str(t) for t in items if t is not None]
        clean, corrupt = names if names else ("clean", "corrupt")
        return ("normalized", ast.Normalization(clean, corrupt, self._s(meta)))

    def noise(self, meta, items):
        scale = items[0]
        relative = any(isinstance(i, Token) and i.type == "SIGMA" for i in items[1:])
        options = tuple(i for i in items[1:] if isinstance(i, tuple))
        seen: set[str] = set()
        for key, _, span in options:
            if key in seen:
                raise CausalError(f"noise option {key!r} is given twice", span)
            seen.add(key)
        return ast.Noise(float(scale), relative, options, self._s(meta))

    def offset(self, meta, items):
        sign = -1 if str(items[0]) == "-" else 1
        return sign * self._bounded(items[1])

    # steering expressions
    def param_ref(self, meta, items):
        return self._param(items[0], (int, float), "a number is needed here")

    def mean_of(self, meta, items):
        return ast.MeanOf(str(items[0]), items[1] if len(items) > 1 else None, self._s(meta))

    def add(self, meta, items):
        return ast.BinaryOp("+", items[0], items[2], self._s(meta))

    def sub(self, meta, items):
        return ast.BinaryOp("-", items[0], items[2], self._s(meta))

    def mul(self, meta, items):
        return ast.BinaryOp("*", items[0], items[1], self._s(meta))

    def neg(self, meta, items):
        return ast.BinaryOp("*", -1, items[1], self._s(meta))

    # statements
    def experiment_stmt(self, meta, items):
        return ("experiment", str(items[0]), self._s(meta))

    def model_stmt(self, meta, items):
        return ("model", ast.ModelDecl(str(items[0])[1:-1], self._s(items[0])), self._s(meta))

    def param_stmt(self, meta, items):
        return ("param", ast.ParamDecl(str(items[0]), self.params[str(items[0])], self._s(meta)), self._s(meta))

    def data_file(self, meta, items):
        limit = items[1][1] if len(items) > 1 and items[1] else None
        return ("data", ast.DataFile(str(items[0])[1:-1], limit, self._s(meta)), self._s(meta))

    def data_generator(self, meta, items):
        kwargs = tuple(i for i in items[1:] if isinstance(i, tuple) and len(i) == 3)
        limit = next((i[1] for i in items[1:] if isinstance(i, tuple) and len(i) == 2), None)
        return ("data", ast.DataGenerator(str(items[0]), kwargs, limit, self._s(meta)), self._s(meta))

    def positions_stmt(self, meta, items):
        anchor = next(((str(t), self._s(t)) for t in items if isinstance(t, Token)), None)
        return ("positions", (anchor, tuple(i for i in items if isinstance(i, ast.PositionDef))), self._s(meta))

    def fixed_position(self, meta, items):
        return (None, None, self._bounded(items[0]))

    def anchored_position(self, meta, items):
        return (str(items[0]), str(items[1]), items[2] if len(items) > 2 and items[2] is not None else 0)

    def position_def(self, meta, items):
        anchor, column, offset = items[1]
        return ast.PositionDef(str(items[0]), anchor, column, offset, self._s(meta))

    def metric_stmt(self, meta, items):
        clauses = dict(i for i in items[1:] if isinstance(i, tuple))
        args = tuple((str(t), self._s(t)) for t in items[1:] if isinstance(t, Token))
        node = ast.MetricDecl(str(items[0]), args, clauses.get("at"), clauses.get("normalized"), self._s(meta))
        return ("metric", node, self._s(meta))

    def names(self, meta, items):
        return tuple((str(t), self._s(t)) for t in items)

    # intervention statements: generic; the method module of the keyword gives the clauses their meaning
    def __default__(self, data, children, meta):
        if data == "start":
            return Tree(data, children, meta)
        if data.endswith("_stmt"):
            clauses = tuple(c if isinstance(c, ast.Clause) else self._unnamed(c, meta) for c in children)
            return ("statement", ast.Statement(data.removesuffix("_stmt"), clauses, self._s(meta)), self._s(meta))
        return self._clause(str(data), children, meta)

    def _clause(self, name: str, children: list, meta) -> ast.Clause:
        """`source: NAME` -> the name (spanning the name); otherwise the value of its one part."""
        if len(children) == 1 and isinstance(children[0], Token) and children[0].type == "NAME":
            return ast.Clause(name, str(children[0]), self._s(children[0]))
        value = children[0] if children else None
        if isinstance(value, Token) and value.type == "STRING":  # `within basis("file")`: the text inside
            return ast.Clause(name, str(value)[1:-1], self._s(value))
        if isinstance(value, Token):  # a keyword alternative (`-> logits`): no value of its own
            value = None
        return ast.Clause(name, value, self._s(meta))

    def _unnamed(self, child, meta) -> ast.Clause:
        """Parts of a statement that are not clause rules: its sites and its noise."""
        if isinstance(child, ast.Noise):
            return ast.Clause("noise", child, child.span)
        if isinstance(child, tuple) and all(isinstance(s, ast.SiteRef) for s in child):
            return ast.Clause("sites", child, child[0].span if child else self._s(meta))
        raise TypeError(f"statement part {child!r} has no clause name")  # a grammar rule without a clause rule


def _assemble(statements: list, text: str, path: str, model_given: bool) -> ast.ExperimentFile:
    singles: dict[str, tuple] = {}
    metrics, interventions, params, positions = [], [], [], []
    anchor: tuple[str, Span] | None = None
    for kind, node, span in statements:
        if kind == "metric":
            metrics.append(node)
        elif kind == "statement":  # a method statement (patch, ablate, ...)
            interventions.append(node)
        elif kind == "param":
            params.append(node)
        elif kind == "positions":
            if node[0] is not None and anchor is not None and node[0][0] != anchor[0]:
                raise CausalError(f"positions are located in {anchor[0]!r} (line {anchor[1].line}); one anchor "
                                  "column per experiment", node[0][1])
            anchor = node[0] or anchor
            positions.extend(node[1])
        elif kind in singles:
            first = singles[kind][1]
            raise CausalError(f"'{kind}' is declared twice (first at line {first.line})", span)
        else:
            singles[kind] = (node, span)
    _check_unique_positions(positions, params)
    start = Span(path, 1, 1)
    for required in ("data",) if model_given else ("model", "data"):
        if required not in singles:
            raise CausalError(f"the experiment has no '{required}' statement", start,
                              hint=f"add a line such as: {_EXAMPLES[required]}")
    if not metrics:
        raise CausalError("the experiment has no 'metric' statement", start,
                          hint=f"add a line such as: {_EXAMPLES['metric']}")
    if not interventions:
        *others, last = intervention_keywords()
        raise CausalError(f"the experiment has no intervention ({', '.join(others)} or {last})",
                          start, hint=f"add a line such as: {_EXAMPLES['statement']}")
    return ast.ExperimentFile(
        path=path, text=text,
        name=singles["experiment"][0] if "experiment" in singles else None,
        model=singles["model"][0] if "model" in singles else None, data=singles["data"][0], params=tuple(params),
        positions=tuple(positions),
        positions_in=anchor,
        metrics=tuple(metrics), interventions=tuple(interventions), span=start,
    )


def _check_unique_positions(positions: list[ast.PositionDef], params: list[ast.ParamDecl]) -> None:
    seen: dict[str, ast.PositionDef] = {}
    param_names = {p.name for p in params}
    for position in positions:
        if position.name in seen:
            raise CausalError(f"position {position.name!r} is defined twice (first at line "
                              f"{seen[position.name].span.line})", position.span)
        if position.name in param_names:
            raise CausalError(f"{position.name!r} is both a parameter and a position name; rename one",
                              position.span)
        seen[position.name] = position


_EXAMPLES = {
    "model": 'model "zoo:attn-only-2l"',
    "data": 'data "prompts.jsonl"',
    "metric": "metric logit_diff(answer, wrong) at -1",
    "statement": "patch resid_pre[layer=*, pos=*] from corrupt into clean",
}
