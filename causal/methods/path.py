"""path SENDERS -> RECEIVERS|logits from SOURCE into BASE [freezing mlp]: path patching (Wang et al. 2022).

Sender outputs take the source run's values and reach only the receivers: in a first pass
every other head (and the sub-layers `freezing` names) is frozen at its base value and the
receivers' inputs are recorded; a second pass patches only those inputs. With `logits` as
receiver the first pass alone is the effect on the output through the residual stream.
"""
from __future__ import annotations

from dataclasses import dataclass

from causal.errors import did_you_mean
from causal.methods.base import JobMethod, hooks, method
from causal.methods.edits import Replace, as_hook, grouped
from causal.models.adapter import HEAD_OUTPUT
from causal.values import Target

PATH_SENDERS = ("z", "attn_out", "mlp_out")
PATH_RECEIVERS = ("q", "k", "v")
FREEZABLE = {"mlp": "mlp_out"}


@method("path")
@dataclass
class PathPatch(JobMethod):
    source: str
    receivers: tuple[Target, ...] | None  # None: the logits, through the residual stream
    frozen: tuple[str, ...]  # sites frozen at base values: every head's output, and what `freezing` names

    reuses_prefix = False  # the frozen heads are frozen at every position

    @classmethod
    def resolve(cls, node, resolution):
        source, base = resolution.source_and_base(node, "path patching")
        sweep = resolution.sweep(node.sites, base, PATH_SENDERS)
        receivers = None
        if node.get("receivers") is not None:  # one joint set: every selected receiver at once, nothing swept
            receivers = tuple(dict.fromkeys(t for site in node.get("receivers")
                                            for point in resolution.sweep((site,), base, PATH_RECEIVERS).points
                                            for t in point))
        freezing = []
        for kind, span in node.get("freeze", ()):
            if kind not in FREEZABLE:
                raise resolution.error(f"cannot freeze {kind!r}; path patching always freezes every other head, and "
                                       f"can also freeze: {', '.join(FREEZABLE)}", span, did_you_mean(kind, FREEZABLE))
            freezing.append(resolution.require_site(FREEZABLE[kind], span))
        heads = resolution.adapter.site_with_role(HEAD_OUTPUT)
        return cls(resolution.name_for(node, node.sites[0].name), resolution.statement(node.span), base, sweep,
                   source, receivers, (heads, *freezing))

    @property
    def first_receiver_layer(self) -> int | None:
        """Where the second pass (receivers patched) may start; None when the receivers are the logits."""
        if self.receivers is None:
            return None
        return min(layer or 0 for target in self.receivers for layer in target.layers)

    # needs and plan
    def records(self, n_layers):
        frozen = {(site, layer) for site in self.frozen for layer in range(n_layers)}
        return {self.source: self.site_keys, self.base: frozen}

    def start_layer(self, point):
        layer = super().start_layer(point)
        return layer if self.receivers is None else min(layer, self.first_receiver_layer)  # receivers read in pass 1

    def resume_layers(self, optimize):
        return {self.first_receiver_layer} if optimize and self.receivers else set()

    def passes(self, job, optimize):
        first = [(job.start_layer, job.start_pos)]
        if not self.receivers:
            return first
        return first + [(self.first_receiver_layer if optimize else 0, 0)]

    # execution
    def run_job(self, job, run, state):
        """Phase A: senders patched, the rest frozen, receiver inputs recorded; phase B: only those patched."""
        first = hooks(self.phase_a(job, run))
        if self.receivers is None:
            return run.forward_job(self, job, first, start_pos=0)
        receivers = self.receiver_masks(job, run)
        recorded: dict = {}
        recorders = {key: _keeper(recorded, key) for key in receivers}
        run.forward_job(self, job, first, start_pos=0, recorders=recorders)
        second = {key: as_hook([Replace(where, recorded[key])]) for key, where in receivers.items()}
        return run.forward_job(self, job, second, start_layer=self.first_receiver_layer, start_pos=0)

    def phase_a(self, job, run):
        """Senders take the source run's values; every other head (and what `freezing` names) keeps its base value."""
        n_layers = run.experiment.model.adapter.n_layers

        def frozen(target, point, job):
            first = min(layer for t in point for layer in t.layers)
            return [("freeze", Target(site, tuple(range(first, n_layers)), None)) for site in self.frozen]
        masks = run.masks.of_points(self, job, frozen)
        freezes, sends = [], []
        for (key, role), where in masks.items():
            if role == "freeze":  # the senders themselves are not frozen
                senders = masks.get((key, "main"))
                keep = where & ~senders if senders is not None else where
                freezes.append((key, Replace(keep, run.cached(self.base, key, job.examples))))
            else:
                sends.append((key, Replace(where, run.cached(self.source, key, job.examples))))
        return grouped(freezes + sends)  # per key, freezing first: the senders' values win

    def receiver_masks(self, job, run):
        """(key -> (rows, width, *extra) mask) of the receiver inputs, the same for every row."""
        import torch
        masks: dict = {}
        everyone = torch.arange(len(job.examples))
        for target in self.receivers or ():
            run.masks.add(masks, target, "receiver", everyone, job, self.base)
        return {key: where for (key, _), where in masks.items()}


def _keeper(store: dict, key):
    def keep(act, start: int) -> None:
        store[key] = act.detach().clone()
    return keep
