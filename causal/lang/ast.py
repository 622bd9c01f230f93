"""The experiment file as frozen dataclasses; every node keeps the span it came from.

Nothing here knows about models or data: that is the resolver's job. Parameters are
already substituted by the parser, so a value here is a plain int/float/str.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from causal.errors import Span

# --- index sets: which layers / positions / heads a selector or metric names -----------------


@dataclass(frozen=True)
class Name:
    """A bare name inside an index set: a named position (`pos=S2`)."""

    name: str
    span: Span


Index = int | Name


@dataclass(frozen=True)
class AllIndices:
    span: Span

    def describe(self) -> str:
        return "*"


@dataclass(frozen=True)
class IndexRange:
    """Inclusive on both ends, as researchers write layer ranges (`0..5` is six layers)."""

    start: Index
    stop: Index
    span: Span

    def describe(self) -> str:
        return f"{_show(self.start)}..{_show(self.stop)}"


@dataclass(frozen=True)
class SingleIndex:
    value: Index
    span: Span

    def describe(self) -> str:
        return _show(self.value)


@dataclass(frozen=True)
class IndexList:
    values: tuple[Index, ...]
    span: Span

    def describe(self) -> str:
        return "[" + ", ".join(map(_show, self.values)) + "]"


IndexSet = AllIndices | IndexRange | SingleIndex | IndexList


def _show(index: Index) -> str:
    return index.name if isinstance(index, Name) else str(index)


# --- sites ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    dim: str
    indices: IndexSet
    window: int | None
    span: Span


@dataclass(frozen=True)
class SiteRef:
    """`resid_pre[layer=*, pos=*]`, or `module("path.{layer}")[...]` (name is then `module:path`)."""

    name: str
    selectors: tuple[Selector, ...]
    span: Span

    def describe(self) -> str:
        if not self.selectors:
            return self.name
        parts = [f"{s.dim}={s.indices.describe()}" + (f" window {s.window}" if s.window else "")
                 for s in self.selectors]
        return f"{self.name}[{', '.join(parts)}]"


# --- declarations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDecl:
    ref: str
    span: Span


@dataclass(frozen=True)
class DataFile:
    path: str
    limit: int | None
    span: Span


@dataclass(frozen=True)
class DataGenerator:
    name: str
    kwargs: tuple[tuple[str, object, Span], ...]
    limit: int | None
    span: Span


@dataclass(frozen=True)
class ParamDecl:
    name: str
    value: object
    span: Span


@dataclass(frozen=True)
class PositionDef:
    """`S2 = last(s) + 1` (anchor 'last', column 's', offset 1) or `END = -1` (fixed -1)."""

    name: str
    anchor: str | None  # first | last | span; None for a fixed index
    column: str | None
    offset: int
    span: Span


@dataclass(frozen=True)
class Normalization:
    """The metric is rescaled so that `clean` scores 1 and `corrupt` 0 on average."""

    clean: str
    corrupt: str
    span: Span


@dataclass(frozen=True)
class MetricDecl:
    name: str
    args: tuple[tuple[str, Span], ...]
    positions: IndexSet | None
    normalized: Normalization | None
    span: Span


# --- steering expressions -----------------------------------------------------------------------


@dataclass(frozen=True)
class MeanOf:
    """Mean activation of a prompt column at the steered site (over examples, and positions)."""

    column: str
    positions: IndexSet | None
    span: Span


@dataclass(frozen=True)
class BinaryOp:
    op: str  # + - *
    left: "Expr"
    right: "Expr"
    span: Span


Expr = float | int | MeanOf | BinaryOp


@dataclass(frozen=True)
class Noise:
    """Gaussian noise of `scale` (times the embeddings' std when `relative`), k samples, a seed."""

    scale: float
    relative: bool
    options: tuple[tuple[str, object, Span], ...]
    span: Span


# --- interventions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    """One named part of a statement: `from corrupt` is Clause("source", "corrupt", span)."""

    name: str
    value: object
    span: Span


@dataclass(frozen=True)
class Statement:
    """An intervention statement: its keyword and its clauses, named as in the grammar.

    The parser knows no method: what the clauses mean is the method module's business
    (causal/methods/<kind>.py), so a new method needs a grammar rule and a module only.
    """

    kind: str  # the statement's keyword: patch, ablate, steer, trace, path, attribute, ...
    clauses: tuple[Clause, ...]
    span: Span

    def clause(self, name: str) -> Clause | None:
        return next((c for c in self.clauses if c.name == name), None)

    def get(self, name: str, default=None):
        found = self.clause(name)
        return default if found is None else found.value

    def span_of(self, name: str) -> Span | None:
        found = self.clause(name)
        return None if found is None else found.span

    @property
    def label(self) -> str | None:
        return self.get("label")

    @property
    def sites(self) -> tuple[SiteRef, ...]:
        return self.get("sites", ())


@dataclass(frozen=True)
class ExperimentFile:
    """A parsed file: what it says, plus the text and path errors are reported against."""

    path: str
    text: str
    name: str | None
    model: ModelDecl | None
    data: DataFile | DataGenerator | None
    params: tuple[ParamDecl, ...]
    positions: tuple[PositionDef, ...]
    metrics: tuple[MetricDecl, ...]
    interventions: tuple[Statement, ...]
    span: Span = field(compare=False)
    positions_in: tuple[str, Span] | None = None  # the column named positions are located in
