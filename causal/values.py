"""The value types every stage shares: what resolution produces (Experiment, Sweep, Target, Metric, the
metric kinds), what the plan is made of (Stream, Job, Chunk, Plan) and where a forward starts and what it
gives back (Resume, Output).

A leaf of the import graph: it imports nothing of causal at run time (and not torch either: the command
line checks metric names before torch loads), so every layer can name these types without pointing up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from causal.data import Examples, Prompts
    from causal.lang import ast
    from causal.models import LoadedModel

LOGITS, EMBEDDING = "logits", "embedding"


@dataclass(frozen=True)
class MetricKind:
    name: str
    arity: int
    reads: str  # LOGITS: next-token logits at positions (language models); EMBEDDING: an encoder's sentence embedding
    score: Callable  # LOGITS: (logits (rows, k, vocab), answers [(rows, k)] or reference) -> (rows, k); EMBEDDING: ->(rows,)
    units: str  # CF-style, for the results: "nat", "logit", "1" (a fraction, count or cosine)
    takes_next: bool = False
    reference: Callable | None = None  # (output, chosen, attention_mask) -> what a compared run is scored against

    @property
    def reads_whole_prompt(self) -> bool:
        return self.reads == EMBEDDING

    @property
    def compares(self) -> bool:
        """Its argument names a prompt column whose unpatched run it compares with, not answers."""
        return self.reference is not None


Position = int | str | None


def absolute_positions(lengths: torch.Tensor, pos: int) -> torch.Tensor:
    """(examples,) where an integer position falls in each prompt: negative counts from its end."""
    import torch
    return lengths + pos if pos < 0 else torch.full_like(lengths, pos)


@dataclass(frozen=True)
class Target:
    """One site to intervene on in a forward row: a site at some layers, a position, and a slice of its extra dims."""

    site: str
    layers: tuple[int | None, ...]  # (None,) for sites without layers (embed)
    pos: Position
    extra: tuple[tuple[int, ...] | None, ...] = ()  # per extra dim of the site (head, neuron, ...): indices or all


@dataclass
class Sweep:
    """Points of an intervention, row-major over `dims`; each point is the targets applied together."""

    dims: tuple[str, ...]
    coords: dict[str, list]
    points: list[tuple[Target, ...]]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.coords[d]) for d in self.dims)

    def describe(self, point: int) -> str:
        """'layer=1 pos=3': a point by its coordinates, for messages."""
        if not self.dims:
            return "every site"
        import torch
        index = torch.unravel_index(torch.tensor(point), self.shape)
        return " ".join(f"{d}={self.coords[d][int(i)]}" for d, i in zip(self.dims, index))


@dataclass
class Metric:
    name: str  # label, e.g. "logit_diff(io, s)"
    kind: MetricKind  # its declaration in causal/metrics.py
    answers: tuple[torch.Tensor, ...]  # per answer column, (examples,) token ids
    next_token: bool
    reference: str | None  # prompt column whose unpatched output kl/similarity compare against
    positions: dict[str, torch.Tensor]  # base column -> (examples, width) bool mask of positions read
    normalization: ast.Normalization | None = None


@dataclass
class NamedPositions:
    """Named positions per example, located in the anchor column's prompts."""

    anchor: str | None
    indices: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)  # name -> per example
    lengths: torch.Tensor | None = None  # the anchor prompts' lengths, to check other prompts line up
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, name: str, width: int) -> torch.Tensor:
        """(examples, width) bool: where `name` falls in each example (built once per width)."""
        key = (name, width)
        if key not in self._masks:
            import torch
            rows = self.indices[name]
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for example, positions in enumerate(rows):
                mask[example, list(positions)] = True
            self._masks[key] = mask
        return self._masks[key]

    def first(self, name: str) -> torch.Tensor:
        """(examples,) the first position `name` covers in each example."""
        import torch
        return torch.tensor([min(positions) for positions in self.indices[name]])


@dataclass
class Experiment:
    file: ast.ExperimentFile
    name: str
    model: LoadedModel
    examples: Examples
    prompts: dict[str, Prompts]
    positions: NamedPositions
    metrics: list[Metric]
    interventions: list  # one resolved method (causal.methods) per intervention statement
    seed: int = 0
    runs: list[str] = field(default_factory=list)  # prompt columns the model runs on (each gets a baseline)

    @property
    def n_examples(self) -> int:
        return len(self.examples)


# --- the plan -----------------------------------------------------------------------------------

CacheKey = tuple[str, int | None]  # (site, layer)


@dataclass
class Stream:
    """A way to run the model on the examples: a prompt column, possibly with noised embeddings.

    Stream row r is example r // samples, noise sample r % samples.
    """

    name: str
    column: str
    samples: int = 1
    owner: object | None = None  # the method that added it; every forward on it carries its stream_writes


@dataclass
class Job:
    """One forward pass: rows of one intervention that start at the same layer and position."""

    intervention: int
    examples: torch.Tensor  # (rows,)
    points: torch.Tensor  # (rows,) index into the sweep's points
    samples: torch.Tensor  # (rows,) noise sample (0 for streams without noise)
    start_layer: int
    start_pos: int


@dataclass
class Chunk:
    """Examples whose base runs are held in memory together, and the jobs that read them."""

    examples: torch.Tensor
    jobs: list[Job] = field(default_factory=list)
    in_shard: bool = True  # False: another shard's examples; only its base runs (baselines) run here


@dataclass
class Plan:
    batch_size: int
    optimize: bool
    streams: dict[str, Stream]
    records: dict[str, set[CacheKey]]  # stream -> activations its base run must keep
    resume_layers: dict[str, set[int]]  # stream -> layers whose input later jobs start from
    kv_streams: set[str]  # streams whose keys/values later jobs reuse
    chunks: list[Chunk]
    shard: object | None = None  # causal.results.shards.Shard: the part of the examples this run computes
    cache_bytes: float | None = None  # what a chunk's base runs may keep; methods with their own loops heed it too

    @property
    def jobs(self) -> list[Job]:
        return [job for chunk in self.chunks for job in chunk.jobs]

    @property
    def rows(self) -> int:
        return sum(len(job.examples) for job in self.jobs)


# --- a forward ----------------------------------------------------------------------------------

@dataclass
class Resume:
    """Where a forward starts and what it starts from (rows of the base run's cache)."""

    layer: int = 0
    pos: int = 0
    hidden: torch.Tensor | None = None  # (rows, seq - pos, d): input of block `layer` at positions >= pos
    # per layer: the base run's keys/values, at positions < pos or (rows the job owns, a fresh copy) at every
    # position, where the forward then writes its own in place
    keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class Output:
    logits: torch.Tensor | None  # (rows, k, vocab) at the read positions
    hidden: torch.Tensor | None  # (rows, seq, d) final hidden states (encoders)
    keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer, when recorded
