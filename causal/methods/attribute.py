"""attribute SITES from SOURCE into BASE [verify top k]: attribution patching (Nanda 2023; Kramár et al. 2024, AtP*).

The effect of patching a site from the source run is estimated to first order as
(a_source - a_base) . dM/da, summed over the site's slice, for every site from one
backward pass per batch. For queries and keys that linearisation is poor (attention
saturates), so, as AtP* prescribes, the attention pattern change they cause is computed
exactly (a softmax with the patched scores) and multiplied with dM/d(pattern). The top k
sites are then patched exactly to check (a second variable, `<name>_exact`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from causal.methods.base import SelfDriven, Variable, method
from causal.methods.edits import target_first_position
from causal.methods.patch import Patch
from causal.metrics import read_slots
from causal.models.adapter import KEY, MODULE, PATTERN, QUERY
from causal.models.load import frozen_parameters, widest_float

NOT_ATTRIBUTABLE = (PATTERN, MODULE)  # a pattern is not patched on its own; a module's output has no known layout
SCALE_TOLERANCE = 1e-3  # max |log-pattern residual| for the dot-product-softmax model of attention


@dataclass
class AttributionState:
    """One run's estimates and exact values (points, examples, metrics), and where the q/k fix applied."""

    estimates: torch.Tensor
    exact: torch.Tensor
    qk_fix_layers: set[int] = field(default_factory=set)
    qk_fallback_layers: set[int] = field(default_factory=set)
    correlation: list[float] = field(default_factory=list)


@method("attribute")
@dataclass
class Attribute(SelfDriven):
    source: str
    verify_top: int | None
    exact_name: str | None  # the variable of exactly patched top sites
    query: str  # the model's query, key and pattern sites (AtP*'s exact attention fix)
    key: str
    pattern: str

    @classmethod
    def resolve(cls, node, resolution):
        source, base = resolution.source_and_base(node, "attribution patching")
        adapter = resolution.adapter
        attributable = tuple(s for s in adapter.site_names if adapter.site_info(s).role not in NOT_ATTRIBUTABLE)
        sweep = resolution.sweep(node.sites, base, attributable)
        top = node.get("verify")
        if top is not None and top < 1:
            raise resolution.error(f"verify top needs at least 1 site, got {top}", node.span_of("verify"))
        if top is not None and top > len(sweep.points):
            raise resolution.error(f"verify top {top}: the statement has only {len(sweep.points)} sites", node.span)
        name = resolution.name_for(node, node.sites[0].name)
        exact = resolution.unique_name(f"{name}_exact") if top else None
        return cls(name, resolution.statement(node.span), base, sweep, source, top, exact,
                   adapter.site_with_role(QUERY), adapter.site_with_role(KEY), adapter.site_with_role(PATTERN))

    def records(self, n_layers):
        return {self.source: self.site_keys}

    def new_state(self, experiment) -> AttributionState:
        shape = (len(self.sweep.points), experiment.n_examples, len(experiment.metrics))
        return AttributionState(torch.full(shape, float("nan")), torch.full(shape, float("nan")))

    def describe_runs(self, plan, index):
        return "gradients: one backward per batch of examples"

    def shard_problem(self):
        if self.verify_top:
            return (f"'{self.statement}' verifies the top {self.verify_top} sites by their mean over every example, "
                    "which a shard (a part of the examples) does not see; drop `verify top`, or run unsharded")
        return None

    # estimates
    def chunk_pass(self, run, chunk, state):
        examples = chunk.examples
        for start in range(0, len(examples), run.batch_size):
            batch = examples[start:start + run.batch_size]
            state.estimates[:, batch] = self.estimate(run, batch, state)
        return {"estimates": state.estimates[:, chunk.examples].contiguous(),
                "qk_fix_layers": torch.tensor(sorted(state.qk_fix_layers), dtype=torch.long),
                "qk_fallback_layers": torch.tensor(sorted(state.qk_fallback_layers), dtype=torch.long)}

    def restore_chunk(self, chunk, saved, state):
        state.estimates[:, chunk.examples] = saved["estimates"]
        state.qk_fix_layers.update(saved["qk_fix_layers"].tolist())
        state.qk_fallback_layers.update(saved["qk_fallback_layers"].tolist())

    def estimate(self, run, examples: torch.Tensor, state) -> torch.Tensor:
        experiment = run.experiment
        prompts = experiment.prompts[self.base]
        keys = self.site_keys
        qk_layers = {layer for site, layer in keys if site in (self.query, self.key)}
        watched = keys | {(s, l) for l in qk_layers for s in (self.query, self.key, self.pattern)}
        kept: dict[tuple, torch.Tensor] = {}
        hooks = {key: _keep_with_grad(kept, key) for key in watched}
        slots = read_slots(experiment, self.base, examples)
        mask = prompts.attention_mask[examples]
        with frozen_parameters(experiment.model.model), _input_requires_grad(experiment.model.model):
            output = run.forward(prompts.ids[examples], mask, hooks, read=slots[0], grad=True,
                                 what=f"{len(examples)} '{self.base}' prompts with gradients for '{self.statement}'")
            values = run.metric_values(output, self.base, examples, slots, mask)
            grads = []
            live = [k for k in sorted(watched, key=str) if kept[k].requires_grad]  # a constant site has no gradient
            for m in range(values.shape[1]):
                got = torch.autograd.grad(values[:, m].sum(), [kept[k] for k in live],
                                          retain_graph=m < values.shape[1] - 1, allow_unused=True) if live else ()
                grads.append({k: None for k in watched} | dict(zip(live, got)))
        sources = {key: run.cached(self.source, key, examples).to(kept[key].device, kept[key].dtype) for key in keys}
        scales: dict[int, float | None] = {}  # per q/k layer, shared by q, k and every metric
        per_metric = [{key: self.contribution(run, key, kept, grad, sources[key], scales, state) for key in keys}
                      for grad in grads]
        return self.point_estimates(run, values.detach(), per_metric, examples).cpu()

    def point_estimates(self, run, values: torch.Tensor, per_metric: list[dict], examples: torch.Tensor) -> torch.Tensor:
        """(points, rows, metrics): base value plus each point's contributions, on the device, no sync per point."""
        points = self.sweep.points
        out = values.float()[None].repeat(len(points), 1, 1)
        lengths = run.experiment.prompts[self.base].lengths[examples]
        for index, point in enumerate(points):
            for target in point:
                where = run.masks.target(target, examples, self.base).to(values.device)
                for layer in target.layers:
                    for m, contributions in enumerate(per_metric):
                        contribution = contributions[(target.site, layer)].to(values.device)
                        out[index, :, m] += (contribution * where).flatten(1).sum(1)
                _, exists = target_first_position(run.experiment, target, examples, lengths)
                out[index, ~exists.to(values.device)] = float("nan")  # as patch: the site is not in this prompt
        return out

    def contribution(self, run, key, kept, grad, source, scales: dict, state) -> torch.Tensor:
        """(rows, width, *extra dims) first-order effect of patching each slice of the site."""
        site, layer = key
        base = kept[key].detach()
        if site in (self.query, self.key):
            exact = self.qk_contribution(site, layer, kept, grad, source, scales, state)
            if exact is not None:
                return exact
        extra = len(run.experiment.model.adapter.site_info(site).extra_dims)
        if grad[key] is None:
            return torch.zeros(base.shape[:2 + extra], device=base.device)
        product = (source - base).float() * grad[key].float()
        feature_dims = product.dim() - 2 - extra
        return product.sum(tuple(range(product.dim() - feature_dims, product.dim()))) if feature_dims else product

    def qk_contribution(self, site: str, layer: int, kept, grad, source, scales: dict, state) -> torch.Tensor | None:
        """AtP*: the exact pattern change of patching one query or key, times dM/d(pattern)."""
        wide = widest_float(source.device)
        pattern = kept[(self.pattern, layer)].detach().to(wide)  # (rows, q, heads, k)
        pattern_grad = grad[(self.pattern, layer)]
        if pattern_grad is None:
            return None
        pattern_grad = pattern_grad.to(wide)
        q, k = kept[(self.query, layer)].detach().to(wide), kept[(self.key, layer)].detach().to(wide)
        group = q.shape[2] // k.shape[2]
        k_heads = k.repeat_interleave(group, dim=2)  # (rows, k, heads, d)
        if layer not in scales:
            scales[layer] = fit_scale(pattern, q, k_heads)
        scale = scales[layer]
        if scale is None:
            state.qk_fallback_layers.add(layer)
            return None
        state.qk_fix_layers.add(layer)
        log_pattern = pattern.log()
        if site == self.query:
            delta = scale * torch.einsum("rqhd,rkhd->rqhk", source.to(wide) - q, k_heads)
            changed = torch.softmax(log_pattern + delta, -1).nan_to_num(0.0)
            return ((changed - pattern) * pattern_grad).sum(-1).float()  # (rows, q, heads)
        dk = (source.to(wide) - k).repeat_interleave(group, dim=2)
        delta = (scale * torch.einsum("rqhd,rkhd->rqhk", q, dk)).clamp(-80, 80)  # score change of key j, per query
        p = pattern
        weighted = (p * pattern_grad).sum(-1, keepdim=True)  # S = sum_k p_k G_k
        z = 1 - p + p * delta.exp()
        term = (1 / z - 1) * (weighted - p * pattern_grad) + p * (delta.exp() / z - 1) * pattern_grad
        term = torch.where(p > 0, term, torch.zeros_like(term))
        per_head = term.sum(1).transpose(1, 2)  # (rows, k, heads): summed over queries
        rows, keys, heads = per_head.shape
        return per_head.view(rows, keys, heads // group, group).sum(-1).float()  # (rows, k, kv heads)

    # verification
    def finish(self, run, state):
        top = self.verify_top
        if not top:
            return
        base = run.baseline(self.base)
        effect = (state.estimates - base[None]).nanmean(1)[..., 0]  # (points,) first metric
        chosen = effect.abs().argsort(descending=True)[:top]
        exact_patch = Patch(self.name, self.statement, self.base, self.sweep, self.source)
        state.exact = run.run_points(exact_patch, chosen)
        exact = (state.exact[chosen] - base[None]).nanmean(1)[..., 0]
        if len(chosen) > 1:
            state.correlation = [float(torch.corrcoef(torch.stack([effect[chosen], exact]))[0, 1])]

    def variables(self, effects, state):
        note = {"qk_fix_layers": sorted(state.qk_fix_layers),
                "qk_plain_gradient_layers": sorted(state.qk_fallback_layers)}
        if state.correlation:
            note["exact_correlation"] = state.correlation[0]
        out = [Variable(self.name, state.estimates, self.sweep, {**self.attrs(), **note})]
        if self.exact_name:
            out.append(Variable(self.exact_name, state.exact, self.sweep,
                                {**self.attrs(), "estimated_by": self.name}))
        return out


def fit_scale(pattern: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> float | None:
    """The softmax temperature that turns q.k into this pattern, or None if attention is not of that form."""
    scores = torch.einsum("rqhd,rkhd->rqhk", q, k)
    live = pattern > 1e-12
    top = pattern.argmax(-1, keepdim=True)
    dx = scores - scores.gather(-1, top)
    dy = pattern.clamp(min=1e-300).log() - pattern.gather(-1, top).log()
    dx, dy = dx[live], dy[live]
    denominator = float((dx * dx).sum())
    if denominator == 0:
        return None
    scale = float((dx * dy).sum()) / denominator
    residual = float((dy - scale * dx).abs().max())
    return scale if residual < SCALE_TOLERANCE * max(1.0, float(dy.abs().max())) else None


def _keep_with_grad(kept: dict, key):
    def keep(act: torch.Tensor, start: int) -> torch.Tensor:
        new = act.clone()
        if new.requires_grad:
            new.retain_grad()
        kept[key] = new
        return new
    return keep


@contextmanager
def _input_requires_grad(model: torch.nn.Module) -> Iterator[None]:
    """Make the token embeddings a leaf that requires grad, so every later activation is in the graph."""
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _m, _a, output: output.detach().requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
