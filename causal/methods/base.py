"""The method protocol: all the engine knows about a statement.

A method is one module under causal/methods/ with one class, registered under its statement keyword
(`@method("patch")`), of one of two shapes:

- `JobMethod`: planned. The engine makes its (point, example) rows, packs them into jobs and runs each
  as a forward with the method's `writes` (edits, causal.methods.edits), resumed from the base run at
  the first layer and position it changes (`start_layer`, `passes`); patch, ablate, steer, trace, path.
- `SelfDriven`: its own passes, `chunk_pass` per chunk of examples (checkpointed) and `finish` after
  every chunk; attribute, record, lens, generate, align, reft.

Both resolve (`resolve`, `link`, `check_run`), say what they need (`streams`, `records`,
`statistics`), keep their state in a dataclass of their own (`new_state`) and report `variables`
of the result kinds they register (causal.methods.kinds). Whatever runs gets a `Context`, the only
part of the engine a method can reach. The engine asks a method's shape, never which method it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from causal.methods.edits import Edit, Masks, Replace, as_hook, grouped
from causal.methods.kinds import ResultKind, result_kind
from causal.values import CacheKey, Chunk, Job, Output, Plan, Resume, Stream, Sweep, Target

if TYPE_CHECKING:
    from causal.lang import ast
    from causal.methods.statistics import Accumulator
    from causal.resolve.resolver import Resolution
    from causal.values import Experiment


class Context(Protocol):
    """All a method may use of the run executing it. The engine hands each call a context with exactly these
    members (tests/test_context.py checks the surface): no executor, runner, checkpoint store or cache object
    is reachable from a method, so the engine can change how it runs without a method noticing."""

    experiment: "Experiment"  # model, prompts, metrics, the other statements
    masks: Masks  # which (row, position) each target of a row selects
    batch_size: int  # rows per forward
    cache_bytes: int | None  # the run's memory budget for kept activations, None for unbounded
    optimize: bool  # False on the reference path: every forward from layer 0, logits at every position

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, hooks: dict, resume: Resume | None = None,
                read: torch.Tensor | None = None, record_kv: bool = False, grad: bool = False,
                what: str = "") -> Output:
        """One forward of the unmodified model with `hooks` ((site, layer) -> fn(act, start)); `what` names the
        rows when memory runs out."""

    def forward_job(self, method: "JobMethod", job: Job, hooks: dict, start_layer: int | None = None,
                    start_pos: int | None = None, recorders: dict | None = None) -> torch.Tensor:
        """(rows, metrics): a job's rows with `hooks`, resumed from their base run's cache where the plan allows."""

    def metric_values(self, output: Output, column: str, examples: torch.Tensor, slots, mask: torch.Tensor
                      ) -> torch.Tensor:
        """(rows, metrics) of an output, against the references (kl, similarity) the base runs gave."""

    def cached(self, stream: str, key: CacheKey, examples: torch.Tensor,
               samples: torch.Tensor | None = None) -> torch.Tensor:
        """A base run's activation at (site, layer) for these rows of the current chunk (`records` asks for it)."""

    def baseline(self, stream: str) -> torch.Tensor:
        """(examples, metrics) of a stream's unpatched run; NaN for chunks not yet run."""

    def state(self, name: str) -> Any:
        """Another statement's state (its `new_state`), for applying its writes (`generate ... under s1`)."""

    def saved(self, key: str) -> dict[str, torch.Tensor] | None:
        """What `save(key, ...)` kept in an earlier, interrupted run; None if nothing (or no checkpoints)."""

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Checkpoint tensors under `key` (a no-op when the run keeps no checkpoints)."""

    @property
    def checkpointed(self) -> bool:
        """Whether `save` keeps anything: the run has a checkpoint folder."""

    def run_points(self, method: "JobMethod", points: torch.Tensor) -> torch.Tensor:
        """(points, examples, metrics) exact values of some points of a job method's sweep, NaN at the others."""


CONTEXT_MEMBERS = frozenset(Context.__annotations__) | {
    name for name, member in vars(Context).items() if not name.startswith("_") and (callable(member) or isinstance(member, property))}


EFFECT = result_kind(ResultKind("intervention", effect=True))  # what Method.attrs gives: a metric under its writes
METHODS: dict[str, type["Method"]] = {}  # statement keyword -> its method


def method(keyword: str):
    """Register a Method subclass as what the statement `keyword` resolves to."""
    def register(cls: type[Method]) -> type[Method]:
        cls.keyword = keyword
        METHODS[keyword] = cls
        return cls
    return register


@dataclass
class Variable:
    """One Dataset variable a method reports: values over its sweep's points, then `dims`.

    The default, (points, examples, metrics), is a metric effect: normalised where its metric is,
    labelled by metric. Other trailing dims (a recording's `d_model`, a training curve's `epoch`,
    top-k `rank`) carry what is not a metric value; `coords` labels those that have labels, and
    `values` may then be a numpy array of strings (top tokens).
    """

    name: str
    values: Any  # torch.Tensor, or np.ndarray for strings
    sweep: Sweep
    attrs: dict
    dims: tuple[str, ...] = ("example", "metric")
    coords: dict[str, Any] = field(default_factory=dict)

    @property
    def is_effect(self) -> bool:
        """A metric value per example: normalised, summarised and plotted as an effect."""
        return self.dims == ("example", "metric")


@dataclass
class NoState:
    """The state of a method that keeps none: its writes depend on the statement and the base runs alone."""


@dataclass
class Method:
    """A resolved statement: its name, text, the prompts it runs on, and its sweep. Every method is one of two
    shapes: a `JobMethod`, whose rows the engine plans, packs and runs (it says what a forward changes), or a
    `SelfDriven` one, which makes its own passes per chunk of examples and after them (gradients, generation,
    recordings, training). The engine asks which shape a method has, never which method it is."""

    name: str
    statement: str
    base: str  # the prompt column the forward pass runs on
    sweep: Sweep

    keyword: ClassVar[str] = "intervention"

    # --- resolution ---------------------------------------------------------------------------
    @classmethod
    def resolve(cls, node: "ast.Statement", resolution: "Resolution") -> "Method":
        raise NotImplementedError

    def link(self, interventions: list["Method"], resolution: "Resolution") -> None:
        """Once every statement is resolved: check and keep the others it names (`generate ... under s1`)."""

    def check_run(self, experiment: "Experiment", config) -> None:
        """Checks that need the other statements or the run's settings (causal.RunConfig), before any compute;
        `causal check` makes them too (a recording's memory bound, the statement it records under)."""

    def shard_problem(self) -> str | None:
        """Why a shard (a part of the examples) cannot compute its numbers, or None: they need only its examples."""
        return None

    # --- what it needs ------------------------------------------------------------------------
    @property
    def stream(self) -> str:
        """The stream (base run) its rows run on."""
        return self.base

    @property
    def site_keys(self) -> set[CacheKey]:
        """Every (site, layer) some point of the sweep writes."""
        return {(t.site, layer) for point in self.sweep.points for t in point for layer in t.layers}

    def streams(self) -> list[Stream]:
        """Base runs it adds besides one per prompt column."""
        return []

    def records(self, n_layers: int) -> dict[str, set[CacheKey]]:
        """Stream -> activations of that stream's base run it reads (`Context.cached`)."""
        return {}

    def new_state(self, experiment: "Experiment") -> Any:
        """Its per-run state, a dataclass of its own (statistics, estimates); handed back to every call below."""
        return NoState()

    def statistics(self, experiment: "Experiment", state: Any) -> list["Accumulator"]:
        """Passes over whole prompt columns it needs before any job (means, noise scales)."""
        return []

    def check_statistics(self, state: Any) -> None:
        """What its statistics passes gave, checked before any job (a difference of means with no direction):
        refused here, the base runs and jobs are not computed for nothing."""

    # --- results ------------------------------------------------------------------------------
    def variables(self, effects: torch.Tensor, state: Any) -> list[Variable]:
        """Its Dataset variables; `effects` is the mean of its jobs' values per (point, example) (NaN without jobs)."""
        return [Variable(self.name, effects, self.sweep, self.attrs())]

    @property
    def method_label(self) -> str:
        return self.keyword

    @property
    def source_label(self) -> str:
        return getattr(self, "source", "")

    def attrs(self) -> dict:
        sites = sorted({t.site for point in self.sweep.points for t in point})
        return {"kind": EFFECT.kind, "method": self.method_label, "site": ",".join(sites), "prompts": self.stream,
                "source": self.source_label, "statement": self.statement}

    def describe_runs(self, plan: Plan, index: int) -> str:
        """For `causal check`: the work the plan gives it."""
        raise NotImplementedError


@dataclass
class JobMethod(Method):
    """A method of planned jobs: each (point, example) row is one forward with the method's writes, resumed
    from the base run's cache at its first changed layer and position; the engine batches rows of every point."""

    samples: ClassVar[int] = 1  # rows per (point, example); noise samples for tracing
    reuses_prefix: ClassVar[bool] = True  # rows may start at their first edited position (causal models)

    def start_layer(self, point: tuple[Target, ...]) -> int:
        """The first layer a row of this point changes: its forward starts there."""
        return first_layer(point)

    def resume_layers(self, optimize: bool) -> set[int]:
        """Layers later passes of its jobs start from, besides each job's own start."""
        return set()

    def passes(self, job: Job, optimize: bool) -> list[tuple[int, int]]:
        """(start layer, start position) of each forward a job makes."""
        return [(job.start_layer, job.start_pos)]

    def run_job(self, job: Job, run: Context, state: Any) -> torch.Tensor:
        """(rows, metrics) values of one batched job."""
        return run.forward_job(self, job, hooks(self.writes(job, run, state)))

    def writes(self, job: Job, run: Context, state: Any) -> dict[CacheKey, list[Edit]]:
        """What its rows change inside the forward pass."""
        raise NotImplementedError

    def stream_writes(self, stream: Stream, examples: torch.Tensor, samples: torch.Tensor,
                      state: Any) -> dict[CacheKey, list[Edit]]:
        """Edits every forward on a stream it added carries (noise on a noised run)."""
        return {}

    @property
    def writes_past_prompt(self) -> bool:
        """Whether its write values exist at positions no prompt has (tokens being generated): a vector or
        zeros do; another run's activations or per-position means do not."""
        return False

    @property
    def is_plain_writes(self) -> bool:
        """One forward on its own prompts with its writes and nothing else: what another statement can apply
        (`generate ... under`, `record ... under`)."""
        return (self.samples == 1 and not self.streams() and self.stream == self.base
                and type(self).run_job is JobMethod.run_job)

    def describe_runs(self, plan: Plan, index: int) -> str:
        jobs = [job for job in plan.jobs if job.intervention == index]
        rows = sum(len(job.examples) for job in jobs)
        passes = sum(len(self.passes(job, plan.optimize)) for job in jobs)
        return f"{rows} rows in {passes} forward passes"


@dataclass
class SelfDriven(Method):
    """A method that makes its own passes: per chunk of examples (`chunk_pass`, checkpointed), then once after
    every chunk (`finish`). The engine plans no jobs for it; its base runs and statistics are made as for any."""

    per_chunk: ClassVar[bool] = True  # False: all its work is in finish (training)

    def chunk_pass(self, run: Context, chunk: Chunk, state: Any) -> dict[str, torch.Tensor] | None:
        """Its work on one chunk of examples; what it returns is checkpointed and given back to `restore_chunk`."""
        return None

    def restore_chunk(self, chunk: Chunk, saved: dict[str, torch.Tensor], state: Any) -> None:
        """Take back a chunk's checkpointed `chunk_pass` result."""

    def finish(self, run: Context, state: Any) -> None:
        """After every chunk (attribution's exact verification, training)."""


def first_layer(point: tuple[Target, ...]) -> int:
    """The first layer a point's targets change (0 for the embeddings, or no target)."""
    return min((layer or 0) for target in point for layer in target.layers) if point else 0


def hooks(writes: dict[CacheKey, list[Edit]]) -> dict:
    """(site, layer) -> edits  ->  (site, layer) -> the forward hook that applies them."""
    return {key: as_hook(edits) for key, edits in writes.items()}


def source_writes(method: Method, source: str, job: Job, run: Context) -> dict[CacheKey, list[Edit]]:
    """Every target of each row takes the `source` run's activation there (patching's write)."""
    masks = run.masks.of_points(method, job)
    return grouped([(key, Replace(where, run.cached(source, key, job.examples))) for (key, _), where in masks.items()])
