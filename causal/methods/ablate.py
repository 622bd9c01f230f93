"""ablate SITES with zero|mean|resample [over COLUMN] [within basis(...)] [on BASE]: remove what a site carries.

zero writes zeros; mean writes the per-position mean over the reference prompts (examples
too short for a position do not count towards its mean); resample writes another example's
activation at the same position (a fixed derangement, seeded by the run's seed). `within basis(...)`
ablates only the span of B: h' = h + B Bᵀ (value - h), e.g. the projection onto B removed for zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from causal.errors import did_you_mean
from causal.methods.base import JobMethod, method
from causal.methods.edits import Edit, Replace, grouped, in_span
from causal.methods.statistics import PositionMean, derangement
from causal.methods.subspace import BasisState, FixedBasis, MeansBasis, within_basis

ABLATIONS = ("zero", "mean", "resample")


@dataclass
class AblateState(BasisState):
    """Per-position means (mean), each example's donor (resample)."""

    means: dict[tuple, torch.Tensor] = field(default_factory=dict)
    donors: torch.Tensor | None = None


@method("ablate")
@dataclass
class Ablate(JobMethod):
    how: str  # zero | mean | resample
    reference: str
    basis: FixedBasis | MeansBasis | None = None  # from `within basis(...)`

    @classmethod
    def resolve(cls, node, resolution):
        how, how_span = node.get("how"), node.span_of("how")
        if how not in ABLATIONS:
            raise resolution.error(f"unknown ablation {how!r}; use one of {', '.join(ABLATIONS)}", how_span,
                                   did_you_mean(how, ABLATIONS))
        base = node.get("on") or resolution.default_base(node.span)
        resolution.run_prompt(base, node.span_of("on") or node.span)
        over, over_span = node.get("over"), node.span_of("over")
        if over and how == "zero":
            raise resolution.error("'over' names the reference prompts of a mean or resample ablation; zero needs "
                                   "none", over_span)
        reference = over or base
        resolution.run_prompt(reference, over_span or node.span)
        if how == "mean":
            cls.check_reference_covers(resolution, reference, base, over_span or node.span)
        if how == "resample":
            cls.check_resample(resolution, reference, base, over_span or node.span)
        sweep = resolution.sweep(node.sites, base)
        return cls(resolution.name_for(node, node.sites[0].name), resolution.statement(node.span), base, sweep, how,
                   reference, within_basis(resolution, node, sweep))

    @staticmethod
    def check_reference_covers(resolution, reference: str, base: str, span) -> None:
        longest_ref = int(resolution.prompts[reference].lengths.max())
        longest_base = int(resolution.prompts[base].lengths.max())
        if longest_ref < longest_base:
            raise resolution.error(f"the mean is taken per position, but the {reference!r} prompts have at most "
                                   f"{longest_ref} tokens and the {base!r} prompts up to {longest_base}", span)

    @staticmethod
    def check_resample(resolution, reference: str, base: str, span) -> None:
        """Donors come from prompts of the same token length (the same position is the same place in both):
        each example needs another of its length, and its reference and base prompts one length."""
        ref, own = resolution.prompts[reference].lengths, resolution.prompts[base].lengths
        if len(resolution.examples) < 2:
            raise resolution.error("resample ablation takes another example's activations; the data has one example",
                                   span)
        differ = (ref != own).nonzero()
        if len(differ):
            i = int(differ[0])
            raise resolution.error(f"resample ablation writes another example's {reference!r} activation at the same "
                                   f"position of the {base!r} prompt, but example {i} has {int(ref[i])} and "
                                   f"{int(own[i])} tokens there", span, hint="use 'with mean'")
        for length in ref.unique().tolist():
            alone = (ref == length).nonzero().flatten()
            if len(alone) == 1:
                raise resolution.error(f"resample ablation takes a donor of the same token length, but example "
                                       f"{int(alone[0])} is the only prompt with {length} tokens", span,
                                       hint="use 'with mean', more examples, or data of one template")

    @property
    def method_label(self) -> str:
        return self.how

    @property
    def writes_past_prompt(self) -> bool:  # zeros exist everywhere; means and donors at the prompt's positions
        return self.how == "zero"

    def new_state(self, experiment) -> AblateState:
        return AblateState()

    def records(self, n_layers):
        return {self.reference: self.site_keys} if self.how == "resample" else {}

    def statistics(self, experiment, state):
        return self.ablation_statistics(experiment, state) + (self.basis.statistics(self.site_keys, state)
                                                              if self.basis else [])

    def check_statistics(self, state):
        if self.basis:
            self.basis.check(self.site_keys, state)

    def ablation_statistics(self, experiment, state):
        if self.how == "resample":
            state.donors = derangement(experiment.n_examples, experiment.seed,
                                        groups=experiment.prompts[self.reference].lengths)
        if self.how != "mean":
            return []
        prompts = experiment.prompts[self.reference]
        return [PositionMean(prompts, self.reference, key, state.means) for key in self.site_keys]

    def writes(self, job, run, state):
        masks = run.masks.of_points(self, job)
        edits = [(key, self.write(key, where, job, run, state)) for (key, _), where in masks.items()]
        if self.basis:  # within a subspace: only its span is ablated
            edits = [(key, in_span(edit, self.basis.of(key, state))) for key, edit in edits]
        return grouped(edits)

    def write(self, key, where, job, run, state) -> Edit:
        if self.how == "zero":
            return Replace(where)
        if self.how == "mean":
            return Replace(where, state.means[key][None])
        return Replace(where, run.cached(self.reference, key, state.donors[job.examples]))
