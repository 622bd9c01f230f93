"""What a result variable is, declared by the method that writes it (issue 33, item 4).

A variable's `kind` attr names its ResultKind; the method module that writes variables of a kind registers
it here, and the results and the CLI look kinds up instead of testing names. A kind says what its
variables are (a metric's change per example, generated text, a readout to draw, a trained statement's
held-out score); how each is drawn, summarised or reported stays in causal.results, named by
`figure`, since methods do not import matplotlib or HTML and a saved file must be readable without them:
`causal plot DIR` and `causal report DIR` need only the file's attrs and this registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class ResultKind:
    kind: str  # the `kind` attr its variables carry
    effect: bool = False  # a metric per example under an intervention: summarised, drawn and reported as Δ from its base
    baseline: bool = False  # a metric per example of unpatched prompts: what effects are measured from
    text: bool = False  # generated text (the summary shows its first example)
    figure: str | None = None  # the drawing of causal.results.inside_plots that shows it, if any
    score: tuple[str, str] | None = None  # a trained statement's held-out score: (variable suffix, label)


KINDS: dict[str, ResultKind] = {}
UNKNOWN = ResultKind("")  # a variable no method wrote (added by hand): shown as nothing in particular


def result_kind(kind: ResultKind) -> ResultKind:
    """Register a kind under its name; a method module calls this for each kind of variable it writes."""
    if KINDS.get(kind.kind, kind) != kind:
        raise ValueError(f"result kind {kind.kind!r} registered twice, differently")
    KINDS[kind.kind] = kind
    return kind


def kind_of(attrs: Mapping) -> ResultKind:
    """The kind a variable's attrs name; UNKNOWN for one without a registered kind."""
    return KINDS.get(str(attrs.get("kind", "")), UNKNOWN)


BASELINE = result_kind(ResultKind("baseline", baseline=True))  # the engine's unpatched runs, not a method's
