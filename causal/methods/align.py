"""align SITES from SOURCE into BASE predicting COLUMN by das(k=1): trained interchange interventions.

Distributed alignment search (Geiger et al. 2023) tests whether a high-level variable lives in a
k-dimensional subspace of a site: swapping that subspace from the source run into the base run
must change the output as swapping the variable in the high-level model does (COLUMN holds that
counterfactual answer, one token per pair). The subspace is learned by gradient descent on the
cross-entropy of COLUMN at the base prompt's last position, the model frozen.

Every candidate (sweep point x k) trains in the rows of the same forward and backward passes:
a batch of b pairs becomes (candidates x b) rows, each candidate's rows edited at its own site.
Losses are summed over candidates and Adam is elementwise, so each candidate's steps are those
it would take alone. Pairs are split once by the seed into train, dev (early stopping) and
held-out (the reported interchange intervention accuracy, IIA); each finished epoch is
checkpointed, so a killed run resumes from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from causal.data.prompts import answer_ids
from causal.methods.base import SelfDriven, Variable, method
from causal.methods.kinds import ResultKind, result_kind
from causal.methods.rotations import Subspace
from causal.methods.subspace import VECTOR_ROLES
from causal.values import Sweep

TRAINERS = ("das", "lowrank", "boundless")
DEFAULTS = {"k": 1, "epochs": 20, "lr": 0.01, "batch": 64, "patience": 3, "heldout": 0.2, "dev": 0.1, "seed": 0}
MIN_SPLIT = 4  # pairs each of train, dev and held-out must have at least


@dataclass(frozen=True)
class Training:
    kind: str
    ks: tuple[int, ...]  # one candidate per k (boundless: one, its k is learned)
    epochs: int
    lr: float
    batch: int
    patience: int
    heldout: float
    dev: float
    seed: int


@dataclass
class Split:
    train: torch.Tensor
    dev: torch.Tensor
    heldout: torch.Tensor


@dataclass
class AlignState:
    """Per candidate (points, ks): curves over epochs, held-out IIA and the learned bases."""

    loss: torch.Tensor  # (points, ks, epochs) mean training loss
    dev: torch.Tensor  # (points, ks, epochs) dev interchange accuracy
    iia: torch.Tensor  # (points, ks)
    size: torch.Tensor  # (points, ks) dimensions that swap
    bases: torch.Tensor  # (points, ks, width, max k) NaN-padded
    epochs_run: int = 0
    subspaces: list = field(default_factory=list)
    unpatched: object = None  # causal.methods.training.Unpatched, while training
    saved: dict = field(default_factory=dict)  # (point, k index) -> the module's saved tensors
    reached: set = field(default_factory=set)  # candidates the loss's gradient has reached (nonzero) so far


ALIGNMENT = result_kind(ResultKind("alignment", score=("_iia", "held-out IIA")))


@method("align")
@dataclass
class Align(SelfDriven):
    source: str
    labels: torch.Tensor  # (examples,) the counterfactual answer's token id
    column: str
    training: Training
    width: int
    split: Split

    per_chunk = False  # training is its own loop over epochs, in finish

    @classmethod
    def resolve(cls, node, resolution):
        source, base = resolution.source_and_base(node, "alignment")
        return cls.trained(node, resolution, base, source, TRAINERS)

    @classmethod
    def trained(cls, node, resolution, base: str, source: str | None, trainers: tuple[str, ...]):
        """What align and reft resolve alike: one-width vector sites, settings, labels, the split."""
        adapter = resolution.adapter
        vector_sites = tuple(s for s in adapter.site_names if adapter.site_info(s).role in VECTOR_ROLES)
        sweep = resolution.sweep(node.sites, base, vector_sites)
        width = one_width(resolution, node, sweep, cls.keyword)
        training = training_settings(resolution, node, width, trainers)
        column, span = node.get("predicting"), node.span_of("predicting")
        labels = answer_ids(resolution.column(column, span), resolution.model.tokenizer, column, span)
        resolution.check_has_logit(column, labels, span)
        return cls(resolution.name_for(node, node.sites[0].name), resolution.statement(node.span), base, sweep,
                   source, labels, column, training, width, split(resolution, node, len(labels), training))

    @property
    def candidates(self) -> list[tuple[int, int]]:
        return [(p, j) for p in range(len(self.sweep.points)) for j in range(len(self.training.ks))]

    def new_state(self, experiment) -> AlignState:
        points, ks, epochs = len(self.sweep.points), len(self.training.ks), self.training.epochs
        nan = float("nan")
        return AlignState(torch.full((points, ks, epochs), nan), torch.full((points, ks, epochs), nan),
                          torch.full((points, ks), nan), torch.zeros(points, ks),
                          torch.full((points, ks, self.width, max(self.training.ks)), nan))

    def describe_runs(self, plan, index):
        t, n = self.training, len(self.candidates)
        unit = "pairs" if self.source else "examples"
        steps = t.epochs * -(-len(self.split.train) // t.batch)
        return (f"training {n} {t.kind} candidates together: up to {t.epochs} epochs of {len(self.split.train)} "
                f"{unit} ({len(self.split.dev)} dev, {len(self.split.heldout)} held-out), up to {steps} steps of "
                f"{t.batch} {unit} x {n} candidates in one forward and backward each")

    def shard_problem(self):
        return f"'{self.statement}' trains on every example's pair; run it unsharded"

    # training
    def new_module(self, point: int, k_index: int, generator: torch.Generator, dtype: torch.dtype):
        return Subspace(self.training.kind, self.width, self.training.ks[k_index], generator, dtype)

    def finish(self, run, state: AlignState) -> None:
        from causal.methods.training import train
        train(self, run, state)

    @property
    def source_label(self) -> str:
        return self.source or ""  # reft trains without one

    def training_attrs(self, state: AlignState) -> dict:
        t = self.training
        return {**self.attrs(), "trainer": t.kind, "predicting": self.column, "epochs_run": state.epochs_run,
                "lr": t.lr, "batch": t.batch, "seed": t.seed, "heldout_pairs": len(self.split.heldout),
                "heldout_examples": self.split.heldout.tolist(), "unreached_candidates": self.unreached(state)}

    def unreached(self, state: AlignState) -> list[str]:
        """Candidates no training step's loss reached, described by their site coordinates and k."""
        return [f"{self.sweep.describe(p)} k={self.training.ks[j]}" for i, (p, j) in enumerate(self.candidates)
                if i not in state.reached]

    def variables(self, effects, state: AlignState) -> list[Variable]:
        t = self.training
        attrs = self.training_attrs(state)
        k = {"k": list(t.ks)}
        epochs = {"epoch": list(range(1, t.epochs + 1))}
        return [
            Variable(f"{self.name}_iia", state.iia, self.sweep,
                     {**attrs, "long_name": f"interchange intervention accuracy on held-out pairs ({self.column})"},
                     ("k",), k),
            Variable(f"{self.name}_loss", state.loss, self.sweep, {**attrs, "long_name": "mean training loss"},
                     ("k", "epoch"), {**k, **epochs}),
            Variable(f"{self.name}_dev_accuracy", state.dev, self.sweep,
                     {**attrs, "long_name": "interchange accuracy on the dev pairs, per epoch"},
                     ("k", "epoch"), {**k, **epochs}),
            Variable(f"{self.name}_size", state.size, self.sweep,
                     {**attrs, "long_name": "dimensions of the learned subspace"}, ("k",), k),
            Variable(f"{self.name}_basis", state.bases, self.sweep,
                     {**attrs, "long_name": "learned basis: (component, direction), NaN past its size"},
                     ("k", "component", "direction"),
                     {**k, "component": list(range(self.width)), "direction": list(range(max(t.ks)))}),
        ]

    def attrs(self) -> dict:
        return {**super().attrs(), "kind": ALIGNMENT.kind}


def one_width(resolution, node, sweep: Sweep, keyword: str) -> int:
    """Every candidate is one site at one layer, all of one vector width."""
    widths = set()
    for point in sweep.points:
        if len(point) != 1 or len(point[0].layers) != 1:
            raise resolution.error(f"{keyword} trains one intervention per site: give one site (no '+') and single "
                                   "layers (layer=* sweeps them, layer=0..3 as one range is not a site)", node.span)
        widths.add(resolution.adapter.site_info(point[0].site).features)
    if len(widths) > 1:
        raise resolution.error(f"{keyword} needs sites of one width; these have {sorted(widths)}", node.span)
    return widths.pop()


def training_settings(resolution, node, width: int, trainers: tuple[str, ...]) -> Training:
    kind, settings = node.get("trainer")
    span = node.span_of("trainer")
    if kind not in trainers:
        raise resolution.error(f"unknown trainer {kind!r}; choose {', '.join(trainers)}", span)
    values = dict(DEFAULTS)
    for key, value, at in settings:
        if key not in DEFAULTS:
            raise resolution.error(f"{kind}() has no setting {key!r}; it takes {', '.join(DEFAULTS)}", at)
        values[key] = value
    ks = values["k"] if isinstance(values["k"], tuple) else (values["k"],)
    at = {key: a for key, _, a in settings}
    for k in ks:
        if not isinstance(k, int) or not 1 <= k <= width:
            raise resolution.error(f"k={k!r}: a subspace of the sites' {width}-number vectors has 1..{width} "
                                   "dimensions", at.get("k", span))
    if kind == "boundless":
        if "k" in at:
            raise resolution.error("boundless learns its k; drop k=", at["k"])
        ks = (width,)
    for key, low, kind_of in (("epochs", 1, int), ("batch", 1, int), ("patience", 1, int), ("seed", 0, int)):
        if not isinstance(values[key], kind_of) or values[key] < low:
            raise resolution.error(f"{key}={values[key]!r}: a whole number of at least {low} is needed",
                                   at.get(key, span))
    for key in ("lr", "heldout", "dev"):
        bad = not isinstance(values[key], (int, float)) or not (0 < values[key] < (1 if key != "lr" else 10))
        if bad:
            raise resolution.error(f"{key}={values[key]!r}: " + ("a learning rate above 0" if key == "lr" else
                                   "a fraction of the pairs, between 0 and 1"), at.get(key, span))
    return Training(kind, tuple(ks), values["epochs"], float(values["lr"]), values["batch"], values["patience"],
                    float(values["heldout"]), float(values["dev"]), values["seed"])


def split(resolution, node, n: int, training: Training) -> Split:
    """Seeded: held-out first, then dev, the rest trains."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(training.seed))
    heldout, dev = round(n * training.heldout), round(n * training.dev)
    train = n - heldout - dev
    if min(heldout, dev, train) < MIN_SPLIT:
        raise resolution.error(f"{n} pairs split {training.heldout:g} held-out / {training.dev:g} dev leaves "
                               f"{train} to train, {dev} dev and {heldout} held-out; each needs at least "
                               f"{MIN_SPLIT} (give more data)", node.span_of("trainer"))
    return Split(order[heldout + dev:], order[heldout:heldout + dev], order[:heldout])


__all__ = ["Align", "AlignState", "Training", "one_width", "split", "training_settings"]
