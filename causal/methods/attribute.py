"""Attribution patching (Nanda 2023; Kramár et al. 2024, AtP*): every site from one backward pass.

The effect of patching a site from the source run is estimated to first order as
(a_source - a_base) . dM/da, summed over the site's slice. For queries and keys that
linearisation is poor (attention saturates), so, as AtP* prescribes, the attention
pattern change they cause is computed exactly (a softmax with the patched scores) and
multiplied with dM/d(pattern). The top sites can then be patched exactly to check.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from causal import interventions as iv
from causal.engine.plan import Packer, RowStarts, row_starts
from causal.resolve.experiment import Experiment
from causal.metrics import metric_values, read_slots
from causal.engine.writes import WriteBuilder

if TYPE_CHECKING:
    from causal.engine.execute import Executor

SCALE_TOLERANCE = 1e-3  # max |log-pattern residual| for the dot-product-softmax model of attention


class AttributionRun:
    def __init__(self, experiment: Experiment, intervention: iv.Attribute):
        self.experiment, self.intervention = experiment, intervention
        n, metrics = experiment.n_examples, len(experiment.metrics)
        self.estimates = torch.full((len(intervention.sweep.points), n, metrics), float("nan"))
        self.exact = torch.full_like(self.estimates, float("nan"))
        self.qk_fix_layers: set[int] = set()
        self.qk_fallback_layers: set[int] = set()
        self.correlation: list[float] = []
        self.index = experiment.interventions.index(intervention)

    # estimates
    def chunk(self, executor: "Executor", chunk, caches) -> None:
        examples = chunk.examples
        for start in range(0, len(examples), executor.plan.batch_size):
            batch = examples[start:start + executor.plan.batch_size]
            self.estimates[:, batch] = self.estimate(executor, batch, caches)

    def chunk_state(self, chunk) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of one chunk: its estimates, and the layers the q/k fix was (not) used at."""
        return {"estimates": self.estimates[:, chunk.examples].contiguous(),
                "qk_fix_layers": torch.tensor(sorted(self.qk_fix_layers), dtype=torch.long),
                "qk_fallback_layers": torch.tensor(sorted(self.qk_fallback_layers), dtype=torch.long)}

    def restore_chunk(self, chunk, state: dict[str, torch.Tensor]) -> None:
        self.estimates[:, chunk.examples] = state["estimates"]
        self.qk_fix_layers.update(state["qk_fix_layers"].tolist())
        self.qk_fallback_layers.update(state["qk_fallback_layers"].tolist())

    def estimate(self, executor: "Executor", examples: torch.Tensor, caches) -> torch.Tensor:
        experiment, intervention = self.experiment, self.intervention
        prompts = experiment.prompts[intervention.base]
        keys = self.intervention.site_keys
        qk_layers = {layer for site, layer in keys if site in ("q", "k")}
        watched = keys | {(s, l) for l in qk_layers for s in ("q", "k", "pattern")}
        kept: dict[tuple, torch.Tensor] = {}
        hooks = {key: _keep_with_grad(kept, key) for key in watched}
        slots = read_slots(experiment, intervention.base, examples)
        mask = prompts.attention_mask[examples]
        with _frozen_parameters(experiment.model.model), _input_requires_grad(experiment.model.model):
            output = executor.runner.forward(prompts.ids[examples], mask, hooks, read=slots[0], grad=True)
            values = metric_values(experiment, output, intervention.base, examples, slots,
                                   executor.references_for(examples), mask)
            grads = []
            live = [k for k in sorted(watched, key=str) if kept[k].requires_grad]  # a constant site has no gradient
            for m in range(values.shape[1]):
                got = torch.autograd.grad(values[:, m].sum(), [kept[k] for k in live],
                                          retain_graph=m < values.shape[1] - 1, allow_unused=True) if live else ()
                grads.append({k: None for k in watched} | dict(zip(live, got)))
        sources = {key: caches.get(intervention.source, key, examples).to(kept[key].device, kept[key].dtype)
                   for key in keys}
        scales: dict[int, float | None] = {}  # per q/k layer, shared by q, k and every metric
        per_metric = [{key: self.contribution(key, kept, grad, sources[key], scales) for key in keys}
                      for grad in grads]
        return self.point_estimates(values.detach(), per_metric, WriteBuilder(experiment, caches, executor.stats),
                                    examples).cpu()

    def point_estimates(self, values: torch.Tensor, per_metric: list[dict], builder: WriteBuilder,
                        examples: torch.Tensor) -> torch.Tensor:
        """(points, rows, metrics): base value plus each point's contributions, on the device, no sync per point."""
        points = self.intervention.sweep.points
        out = values.float()[None].repeat(len(points), 1, 1)
        for index, point in enumerate(points):
            for target in point:
                where = builder.target_mask(target, examples, self.intervention.base).to(values.device)
                for layer in target.layers:
                    for m, contributions in enumerate(per_metric):
                        contribution = contributions[(target.site, layer)].to(values.device)
                        out[index, :, m] += (contribution * where).flatten(1).sum(1)
        return out

    def contribution(self, key, kept, grad, source, scales: dict) -> torch.Tensor:
        """(rows, width, *extra dims) first-order effect of patching each slice of the site."""
        site, layer = key
        base = kept[key].detach()
        if site in ("q", "k"):
            exact = self.qk_contribution(site, layer, kept, grad, source, scales)
            if exact is not None:
                return exact
        if grad[key] is None:
            return torch.zeros(base.shape[:2 + len(self.extra(site))], device=base.device)
        product = (source - base).float() * grad[key].float()
        feature_dims = product.dim() - 2 - len(self.extra(site))
        return product.sum(tuple(range(product.dim() - feature_dims, product.dim()))) if feature_dims else product

    def extra(self, site: str):
        return self.experiment.model.adapter.site_info(site).extra_dims

    def qk_contribution(self, site: str, layer: int, kept, grad, source, scales: dict) -> torch.Tensor | None:
        """AtP*: the exact pattern change of patching one query or key, times dM/d(pattern)."""
        pattern = kept[("pattern", layer)].detach().double()  # (rows, q, heads, k)
        pattern_grad = grad[("pattern", layer)]
        if pattern_grad is None:
            return None
        pattern_grad = pattern_grad.double()
        q, k = kept[("q", layer)].detach().double(), kept[("k", layer)].detach().double()
        group = q.shape[2] // k.shape[2]
        k_heads = k.repeat_interleave(group, dim=2)  # (rows, k, heads, d)
        if layer not in scales:
            scales[layer] = fit_scale(pattern, q, k_heads)
        scale = scales[layer]
        if scale is None:
            self.qk_fallback_layers.add(layer)
            return None
        self.qk_fix_layers.add(layer)
        log_pattern = pattern.log()
        if site == "q":
            delta = scale * torch.einsum("rqhd,rkhd->rqhk", source.double() - q, k_heads)
            changed = torch.softmax(log_pattern + delta, -1).nan_to_num(0.0)
            return ((changed - pattern) * pattern_grad).sum(-1).float()  # (rows, q, heads)
        dk = (source.double() - k).repeat_interleave(group, dim=2)
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
    def finish(self, executor: "Executor") -> None:
        top = self.intervention.verify_top
        if not top:
            return
        effect = (self.estimates - self.base_of(executor)[None]).nanmean(1)[..., 0]  # (points,) first metric
        chosen = effect.abs().argsort(descending=True)[:top]
        packer = Packer(self.experiment, executor.plan.batch_size, "auto", self.experiment.model.device.type)
        for chunk_index, chunk in enumerate(executor.plan.chunks):
            caches = executor.base_runs(chunk_index, chunk, set(), need=True)
            rows = _only_points(row_starts(self.experiment, self.intervention, chunk.examples), chosen)
            for job in packer.pack(self.index, rows):
                values = executor.run_job(job, caches)
                self.exact[job.points, job.examples] = values.float().cpu()
        exact = (self.exact[chosen] - self.base_of(executor)[None]).nanmean(1)[..., 0]
        if len(chosen) > 1:
            self.correlation = [float(torch.corrcoef(torch.stack([effect[chosen], exact]))[0, 1])]

    def base_of(self, executor: "Executor") -> torch.Tensor:
        return executor.baselines[self.intervention.base]

    def arrays(self) -> dict[str, torch.Tensor]:
        out = {self.intervention.name: self.estimates}
        if self.intervention.exact_name:
            out[self.intervention.exact_name] = self.exact
        return out

    def notes(self) -> dict[str, dict]:
        note = {"qk_fix_layers": sorted(self.qk_fix_layers), "qk_plain_gradient_layers": sorted(self.qk_fallback_layers)}
        if self.correlation:
            note["exact_correlation"] = self.correlation[0]
        return {self.intervention.name: note}


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


def _only_points(rows: RowStarts, chosen: torch.Tensor) -> RowStarts:
    keep = torch.isin(rows.points, chosen)
    zeros = torch.zeros(int(keep.sum()), dtype=torch.long)
    return RowStarts(rows.examples[keep], rows.points[keep], rows.samples[keep], zeros, zeros)


def _keep_with_grad(kept: dict, key):
    def keep(act: torch.Tensor, start: int) -> torch.Tensor:
        new = act.clone()
        if new.requires_grad:
            new.retain_grad()
        kept[key] = new
        return new
    return keep


@contextmanager
def _frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Gradients are wanted for activations only: parameters stay out of the graph."""
    states = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in states:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, state in states:
            p.requires_grad_(state)


@contextmanager
def _input_requires_grad(model: torch.nn.Module) -> Iterator[None]:
    """Make the token embeddings a leaf that requires grad, so every later activation is in the graph."""
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _m, _a, output: output.detach().requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
