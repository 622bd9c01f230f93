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


# --- steering vectors -----------------------------------------------------------------------


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


# --- interventions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    sites: tuple[SiteRef, ...]
    source: str
    base: str
    label: str | None
    span: Span
    source_span: Span
    base_span: Span


@dataclass(frozen=True)
class Ablate:
    sites: tuple[SiteRef, ...]
    method: str
    over: str | None  # reference prompts for mean / resample (default: the base prompts)
    base: str | None
    label: str | None
    span: Span
    method_span: Span
    over_span: Span | None
    base_span: Span | None


@dataclass(frozen=True)
class Steer:
    sites: tuple[SiteRef, ...]
    vector: Expr
    base: str | None
    label: str | None
    span: Span
    base_span: Span | None


@dataclass(frozen=True)
class Noise:
    """Gaussian noise of `scale` (times the embeddings' std when `relative`), k samples, a seed."""

    scale: float
    relative: bool
    options: tuple[tuple[str, object, Span], ...]
    span: Span


@dataclass(frozen=True)
class Trace:
    noise: Noise
    noised: IndexSet  # positions the noise is added to
    sites: tuple[SiteRef, ...]  # restored from the clean run
    severing: tuple[tuple[str, Span], ...]
    base: str | None
    label: str | None
    span: Span
    base_span: Span | None


@dataclass(frozen=True)
class PathPatch:
    senders: tuple[SiteRef, ...]
    receivers: tuple[SiteRef, ...] | None  # None: the logits (direct path to the output)
    source: str
    base: str
    freezing: tuple[tuple[str, Span], ...]
    label: str | None
    span: Span
    source_span: Span
    base_span: Span


@dataclass(frozen=True)
class Attribute:
    sites: tuple[SiteRef, ...]
    source: str
    base: str
    verify_top: int | None
    label: str | None
    span: Span
    source_span: Span
    base_span: Span


Intervention = Patch | Ablate | Steer | Trace | PathPatch | Attribute


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
    interventions: tuple[Intervention, ...]
    span: Span = field(compare=False)
    positions_in: tuple[str, Span] | None = None  # the column named positions are located in
