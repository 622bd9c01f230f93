"""The experiment file as frozen dataclasses; every node keeps the span it came from.

Nothing here knows about models or data: that is the resolver's job.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from causal.errors import Span


@dataclass(frozen=True)
class AllIndices:
    span: Span

    def describe(self) -> str:
        return "*"


@dataclass(frozen=True)
class IndexRange:
    """Inclusive on both ends, as researchers write layer ranges (`0..5` is six layers)."""

    start: int
    stop: int
    span: Span

    def describe(self) -> str:
        return f"{self.start}..{self.stop}"


@dataclass(frozen=True)
class SingleIndex:
    value: int
    span: Span

    def describe(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class IndexList:
    values: tuple[int, ...]
    span: Span

    def describe(self) -> str:
        return "[" + ", ".join(map(str, self.values)) + "]"


IndexSet = AllIndices | IndexRange | SingleIndex | IndexList


@dataclass(frozen=True)
class Selector:
    dim: str
    indices: IndexSet
    span: Span


@dataclass(frozen=True)
class SiteRef:
    name: str
    selectors: tuple[Selector, ...]
    span: Span


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
class MetricDecl:
    name: str
    args: tuple[tuple[str, Span], ...]
    positions: IndexSet | None
    span: Span


@dataclass(frozen=True)
class Patch:
    site: SiteRef
    source: str
    base: str
    label: str | None
    span: Span
    source_span: Span
    base_span: Span


@dataclass(frozen=True)
class Ablate:
    site: SiteRef
    method: str
    base: str | None
    label: str | None
    span: Span
    method_span: Span
    base_span: Span | None


Intervention = Patch | Ablate


@dataclass(frozen=True)
class ExperimentFile:
    """A parsed file: what it says, plus the text and path errors are reported against."""

    path: str
    text: str
    name: str | None
    model: ModelDecl | None
    data: DataFile | DataGenerator | None
    metrics: tuple[MetricDecl, ...]
    interventions: tuple[Intervention, ...]
    span: Span = field(compare=False)
