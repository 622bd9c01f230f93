"""The method protocol: all the engine knows about an intervention statement.

A method is one module under causal/methods/ with one `Method` subclass, registered
under its statement keyword (`@method("patch")`). For its kind the module owns:

- resolution: `resolve(statement, resolution)` checks the statement's clauses against the
  model and data (through the shared `Resolution` helpers) and returns the resolved method;
- needs: the streams it adds (`streams`), the activations of base runs its writes read
  (`records`), statistics over whole columns (`statistics`, run before any job);
- planning: how its rows start (`samples`, `reuses_prefix`, `start_layer`), what else later
  passes resume from (`resume_layers`), the forwards a job makes (`passes`), or no jobs at
  all (`plans_jobs = False`, with `chunk_pass`/`finish` doing its own work);
- execution: the writes it applies inside a forward (`writes`, `stream_writes`), or a
  job of its own shape (`run_job`);
- results: how its numbers become Dataset variables (`variables`).

The engine calls these through the protocol only; it never asks what kind of method it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch

from causal.methods.edits import Edit, Replace, grouped
from causal.values import CacheKey, Chunk, Job, Plan, Stream, Sweep, Target

if TYPE_CHECKING:
    from causal.lang import ast
    from causal.methods.statistics import Accumulator
    from causal.resolve.resolver import Resolution
    from causal.values import Experiment


class Run(Protocol):
    """What a method may use of the run executing it: the engine's Executor provides every member
    (tests/test_edits.py checks it). Methods never import the engine: it sits above them. This is today's
    wide surface, written down; narrowing it is issue 33's item 2."""

    experiment: "Experiment"
    plan: Plan
    masks: Any  # causal.methods.edits.Masks over the experiment's prompts
    caches: Any  # the current chunk's base runs: get(stream, key, examples, samples)
    states: dict[str, Any]  # statement name -> its state (new_state), for statements that apply another's writes
    baselines: dict[str, torch.Tensor]  # stream -> (examples, metrics)
    store: Any  # the run's checkpoint store, or None
    runner: Any  # causal.engine.forward.Runner: forward(ids, mask, hooks, resume, read, grad, record_kv)

    def forward(self, method: "Method", job: Job, hooks: dict, start_layer: int | None = None,
                start_pos: int | None = None, recorders: dict | None = None) -> torch.Tensor: ...

    def hooks(self, writes: dict) -> dict: ...

    def guarded(self, compute: Callable, what: str): ...

    def references_for(self, examples: torch.Tensor) -> dict[int, torch.Tensor]: ...

    def run_points(self, method: "Method", points: torch.Tensor) -> torch.Tensor: ...

    def saved_tensors(self, key: str, done: set[str]) -> dict[str, torch.Tensor] | None: ...


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
class Method:
    """A resolved intervention statement: its name, text, the prompts it runs on, and its sweep."""

    name: str
    statement: str
    base: str  # the prompt column the forward pass runs on
    sweep: Sweep

    keyword: ClassVar[str] = "intervention"
    samples: ClassVar[int] = 1  # rows per (point, example); noise samples for tracing
    reuses_prefix: ClassVar[bool] = True  # rows may start at their first edited position (causal models)
    plans_jobs: ClassVar[bool] = True  # False: no patched jobs; the work is chunk_pass/finish
    works_per_chunk: ClassVar[bool] = False  # True: chunk_pass runs once per chunk of examples

    # --- resolution ---------------------------------------------------------------------------
    @classmethod
    def resolve(cls, node: "ast.Statement", resolution: "Resolution") -> "Method":
        raise NotImplementedError

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
        """Stream -> activations its writes read from that stream's base run."""
        return {}

    def new_state(self, experiment: "Experiment") -> Any:
        """Per-run state (statistics, estimates); handed back to every call below."""
        return {}

    def statistics(self, experiment: "Experiment", state: Any) -> list["Accumulator"]:
        """Passes over whole prompt columns it needs before any job (means, noise scales)."""
        return []

    def check_statistics(self, state: Any) -> None:
        """What its statistics passes gave, checked before any job (a difference of means with no direction):
        refused here, the base runs and jobs are not computed for nothing."""

    # --- planning -----------------------------------------------------------------------------
    def start_layer(self, point: tuple[Target, ...]) -> int:
        """The first layer a row of this point changes: its forward starts there."""
        return min((layer or 0) for target in point for layer in target.layers) if point else 0

    def resume_layers(self, optimize: bool) -> set[int]:
        """Layers later passes of its jobs start from, besides each job's own start."""
        return set()

    def passes(self, job: Job, optimize: bool) -> list[tuple[int, int]]:
        """(start layer, start position) of each forward a job makes."""
        return [(job.start_layer, job.start_pos)]

    # --- execution ----------------------------------------------------------------------------
    def run_job(self, job: Job, run: "Run", state: Any) -> torch.Tensor:
        """(rows, metrics) values of one batched job."""
        return run.forward(self, job, run.hooks(self.writes(job, run, state)))

    def writes(self, job: Job, run: "Run", state: Any) -> dict[CacheKey, list[Edit]]:
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

    def link(self, interventions: list["Method"], resolution: "Resolution") -> None:
        """Once every statement is resolved: check and keep the others it names (`generate ... under s1`)."""

    def chunk_pass(self, run: "Run", chunk: Chunk, caches, state: Any) -> dict[str, torch.Tensor] | None:
        """Work of its own per chunk of examples; what it returns is checkpointed."""
        return None

    def restore_chunk(self, chunk: Chunk, saved: dict[str, torch.Tensor], state: Any) -> None:
        """Take back a chunk's checkpointed `chunk_pass` result."""

    def finish(self, run: "Run", state: Any) -> None:
        """After every chunk (attribution's exact verification)."""

    def check_run(self, experiment: "Experiment", config) -> None:
        """Checks that need the other statements or the run's settings (causal.RunConfig), before any compute;
        `causal check` makes them too (a recording's memory bound, the statement it records under)."""

    def shard_problem(self) -> str | None:
        """Why a shard (a part of the examples) cannot compute its numbers, or None: they need only its examples."""
        return None

    # --- results ------------------------------------------------------------------------------
    def variables(self, effects: torch.Tensor, state: Any) -> list[Variable]:
        """Its Dataset variables, from the mean of its jobs' values per (point, example)."""
        return [Variable(self.name, effects, self.sweep, self.attrs())]

    @property
    def method_label(self) -> str:
        return self.keyword

    @property
    def source_label(self) -> str:
        return getattr(self, "source", "")

    def attrs(self) -> dict:
        sites = sorted({t.site for point in self.sweep.points for t in point})
        return {"kind": "intervention", "method": self.method_label, "site": ",".join(sites), "prompts": self.stream,
                "source": self.source_label, "statement": self.statement}

    def describe_runs(self, plan: Plan, index: int) -> str:
        """For `causal check`: the rows and forward passes the plan gives it."""
        jobs = [job for job in plan.jobs if job.intervention == index]
        rows = sum(len(job.examples) for job in jobs)
        passes = sum(len(self.passes(job, plan.optimize)) for job in jobs)
        return f"{rows} rows in {passes} forward passes"


def source_writes(method: Method, source: str, job: Job, run: "Run") -> dict[CacheKey, list[Edit]]:
    """Every target of each row takes the `source` run's activation there (patching's write)."""
    masks = run.masks.of_points(method, job)
    return grouped([(key, Replace(where, run.caches.get(source, key, job.examples))) for (key, _), where in masks.items()])
