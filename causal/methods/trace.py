"""trace noise(S [sigma], samples=k, seed=s) on POSITIONS restore SITES [severing mlp, attn]: ROME causal tracing.

A noised stream runs the base prompts with Gaussian noise added to the token embeddings at
POSITIONS (S times the std of those embeddings with `sigma`, as ROME does; k samples per
example); each swept site is then restored to its clean value in the noised run. Severing
freezes the named sub-layer at its noised value at the restored token, in every later layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from causal.errors import did_you_mean
from causal.limits import MAX_SAMPLES
from causal.methods.base import JobMethod, method
from causal.methods.edits import Add, Replace, grouped
from causal.methods.statistics import standard_noise
from causal.resolve.positions import position_masks
from causal.values import Stream, Target

DEFAULT_NOISE = {"samples": 10, "seed": None}
SEVERABLE = {"mlp": "mlp_out", "attn": "attn_out"}


@dataclass(frozen=True, eq=False)
class NoiseSpec:
    """Gaussian noise added to the token embeddings at `positions` (ROME's corruption)."""

    scale: float
    relative: bool  # scale is in units of the standard deviation of the noised embeddings
    samples: int
    seed: int
    positions: torch.Tensor  # (examples, width) bool


@dataclass
class TraceState:
    """The noise std (known after the statistics pass when relative) and each example's drawn noise."""

    scale: float | None = None
    noise: dict[int, torch.Tensor] = field(default_factory=dict)


@method("trace")
@dataclass
class Trace(JobMethod):
    noise: NoiseSpec
    severing: tuple[str, ...]  # sites frozen at their noised values at the restored token (mlp_out, attn_out)
    noised_name: str  # the noised run's stream and baseline variable
    embedding: str  # the site the noise is added to
    noise_width: int  # numbers per position there (d_model)

    @classmethod
    def resolve(cls, node, resolution):
        base = node.get("on") or resolution.default_base(node.span)
        prompts = resolution.run_prompt(base, node.span_of("on") or node.span)
        noise = node.get("noise")
        options = cls.noise_options(resolution, noise)
        if noise.scale <= 0:
            raise resolution.error(f"the noise scale must be positive, got {noise.scale}", noise.span)
        noised = position_masks(node.get("noised"), prompts, resolution.named, default_last=False)
        severing = cls.severed_sites(resolution, node)
        seed = resolution.seed if options["seed"] is None else options["seed"]
        spec = NoiseSpec(noise.scale, noise.relative, options["samples"], seed, noised)
        sweep = resolution.sweep(node.sites, base)
        name = resolution.name_for(node, node.sites[0].name)
        return cls(name, resolution.statement(node.span), base, sweep, spec, severing,
                   resolution.unique_name(f"{name}_noised"), resolution.adapter.embedding_site,
                   resolution.adapter.d_model)

    @staticmethod
    def noise_options(resolution, noise) -> dict:
        options = dict(DEFAULT_NOISE)
        for key, value, span in noise.options:
            if key not in options:
                raise resolution.error(f"noise takes no option {key!r}; it takes {', '.join(options)}", span,
                                       did_you_mean(key, options))
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "samples" else 0):
                raise resolution.error(f"noise option {key!r} must be a "
                                       f"{'positive' if key == 'samples' else 'non-negative'} whole number, "
                                       f"got {value!r}", span)
            if key == "samples" and value > MAX_SAMPLES:  # a seed is bounded by the language's integers
                raise resolution.error(f"noise option 'samples' is {value}, more than the {MAX_SAMPLES} allowed",
                                       span)
            options[key] = value
        return options

    @staticmethod
    def severed_sites(resolution, node) -> tuple[str, ...]:
        severing = []
        restored = {site.name for site in node.sites}
        for kind, span in node.get("sever", ()):
            if kind not in SEVERABLE:
                raise resolution.error(f"cannot sever {kind!r}; choose from {', '.join(SEVERABLE)}", span,
                                       did_you_mean(kind, SEVERABLE))
            site = resolution.require_site(SEVERABLE[kind], span)
            if site in restored:
                raise resolution.error(f"severing {kind} freezes {site} at the noised values at the restored token, "
                                       "the very site this statement restores there; restore another site", span)
            severing.append(site)
        return tuple(severing)

    # needs
    @property
    def stream(self) -> str:
        return self.noised_name

    @property
    def samples(self) -> int:
        return self.noise.samples

    @property
    def source_label(self) -> str:
        return self.base

    def streams(self):
        return [Stream(self.noised_name, self.base, self.noise.samples, owner=self)]

    def records(self, n_layers):
        return {self.base: self.site_keys,
                self.noised_name: {(site, layer) for site in self.severing for layer in range(n_layers)}}

    def new_state(self, experiment) -> TraceState:
        return TraceState()

    def statistics(self, experiment, state):
        state.noise = {}
        if not self.noise.relative:
            state.scale = self.noise.scale
            return []
        return [_NoiseScale(self, experiment.prompts, state)]

    # writes
    def stream_writes(self, stream, examples, samples, state):
        return {(self.embedding, None): [self.noise_write(examples, samples, state)]}

    def noise_write(self, examples: torch.Tensor, samples: torch.Tensor, state) -> Add:
        where = self.noise.positions[examples]
        value = torch.stack([self.noise_of(int(e), state)[int(s)] for e, s in zip(examples, samples)])
        return Add(where, value)

    def noise_of(self, example: int, state) -> torch.Tensor:
        """(samples, width, d) Gaussian noise for one example, at the trace's scale."""
        if example not in state.noise:
            shape = (self.noise.samples, self.noise.positions.shape[1], self.noise_width)
            state.noise[example] = standard_noise(self.noise.seed, example, shape) * state.scale
        return state.noise[example]

    def writes(self, job, run, state):
        n_layers = run.experiment.model.adapter.n_layers

        def severed(target, point, job):
            return [("sever", Target(site, tuple(range(job.start_layer, n_layers)), target.pos))
                    for site in self.severing]
        masks = run.masks.of_points(self, job, severed)
        writes = [((self.embedding, None), self.noise_write(job.examples, job.samples, state))]
        for (key, role), where in masks.items():
            if role == "sever":  # frozen at the noised run's own value
                writes.append((key, Replace(where, run.cached(self.noised_name, key, job.examples, job.samples))))
            else:
                writes.append((key, Replace(where, run.cached(self.base, key, job.examples))))
        return grouped(writes)


class _NoiseScale:
    """ROME: noise std = scale x the std of the embeddings of the noised (subject) tokens."""

    def __init__(self, trace: Trace, prompts, state: TraceState):
        self.trace, self.state = trace, state
        self.column, self.key = trace.base, (trace.embedding, None)
        self.values: list[torch.Tensor] = []

    def add(self, act: torch.Tensor, examples: torch.Tensor) -> None:
        self.values.append(act[self.trace.noise.positions[examples].to(act.device)].flatten().cpu())

    def finish(self) -> None:
        self.state.scale = self.trace.noise.scale * float(torch.cat(self.values).std())
