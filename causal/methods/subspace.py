"""Subspaces of a site's vectors for `patch | ablate | steer ... within basis(...)` (issue 14, item 1).

`basis("FILE")`: safetensors with one tensor `basis` of shape (d, k): k directions in the site's
vector space (d_model for the residual stream and block outputs, d_head for a head's z, q, k, v).
Its columns are orthonormalised here (QR), so any k independent directions name the same span;
`metadata.model` (and `model_revision`), where the file has them, must be the run's model: the
files `align` writes under bases/ carry both.
`basis(mean(a) - mean(b))`: the one direction of a difference of mean activations at each site (as
steering vectors are written), computed by the run's statistics pass and normalised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from causal.errors import CausalError, Span
from causal.methods.means import MeanTerm, linear_terms, mean_statistics, mean_term
from causal.models.adapter import EMBEDDING, HEAD_OUTPUT, KEY, QUERY, RESIDUAL, VALUE

VECTOR_ROLES = (RESIDUAL, EMBEDDING, HEAD_OUTPUT, QUERY, KEY, VALUE)  # sites whose last dim is one vector
TENSOR = "basis"
LOREFT_TENSORS = ("basis", "weight", "bias")


@dataclass
class BasisState:
    """A method's state where `within basis(mean(a) - mean(b))` may apply: the differences' vectors per site."""

    basis_vectors: dict[tuple, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class FixedBasis:
    """A basis read from a file: the same (d, k) at every site."""

    basis: torch.Tensor

    def statistics(self, keys, state) -> list:
        return []

    def of(self, key, state) -> torch.Tensor:
        return self.basis

    def check(self, keys, state) -> None:
        """A file's basis was checked when it was read."""


@dataclass(frozen=True, eq=False)
class MeansBasis:
    """A difference of means: per site key, its normalised direction (d, 1) once the statistics are in."""

    terms: tuple[MeanTerm, ...]
    span: Span  # of `basis(...)`, where a difference with no direction is reported

    def statistics(self, keys, state) -> list:
        return mean_statistics(self.terms, keys, state.basis_vectors)

    def of(self, key, state) -> torch.Tensor:
        vector = state.basis_vectors[key].flatten().double()
        norm = vector.norm()
        if not torch.isfinite(norm) or norm < 1e-12:
            raise CausalError(f"basis(...): the difference of means at {key} is zero, so it has no direction; "
                              "the two columns' mean activations are the same there", self.span)
        return (vector / norm)[:, None].float()

    def check(self, keys, state) -> None:
        """Every site's direction, once the statistics are in (`of` refuses one with none)."""
        for key in keys:
            self.of(key, state)


def within_basis(resolution, node, sweep) -> FixedBasis | MeansBasis | None:
    """The statement's `within basis(...)`, checked against its sites; None without one."""
    if node.get("within") is not None:
        return FixedBasis(site_basis(resolution, node, sweep))
    expr = node.get("within_means")
    if expr is None:
        return None
    span = node.span_of("within_means")
    site_width(resolution, sweep, span, "within basis(...)")
    means, _ = linear_terms(expr, span)
    return MeansBasis(tuple(mean_term(resolution, coef, mean) for coef, mean in means), span)


def site_basis(resolution, node, sweep) -> torch.Tensor:
    """The statement's basis, orthonormal (d, k), checked against every site it patches."""
    ref, span = node.get("within"), node.span_of("within")
    width = site_width(resolution, sweep, span, "within basis(...)")
    raw = read_learned(resolution, ref, span, (TENSOR,), "basis")[TENSOR]
    if raw.dim() != 2 or raw.shape[0] != width:
        raise resolution.error(f"basis {ref!r} has shape {tuple(raw.shape)}, but the sites' vectors have {width} "
                               f"numbers: it must be ({width}, k)", span)
    if not 1 <= raw.shape[1] <= width:
        raise resolution.error(f"basis {ref!r} has {raw.shape[1]} directions; choose 1..{width}", span)
    q, r = torch.linalg.qr(raw.double())
    if (r.diagonal().abs() < 1e-8 * r.diagonal().abs().max().clamp(min=1e-30)).any():
        raise resolution.error(f"basis {ref!r}: its {raw.shape[1]} directions are not independent", span)
    return q.float()


def site_width(resolution, sweep, span, what: str) -> int:
    """The one vector width of every site the statement edits."""
    widths = set()
    for site in {target.site for point in sweep.points for target in point}:
        info = resolution.adapter.site_info(site)
        if info.role not in VECTOR_ROLES:
            raise resolution.error(f"{what} edits a subspace of a site's vectors; {site!r} has none "
                                   "(use a residual, attn_out, mlp_out, embed, z, q, k or v site)", span)
        widths.add(info.features)
    if len(widths) > 1:
        raise resolution.error(f"{what} needs sites of one width; these have {sorted(widths)}", span)
    return widths.pop()


def loreft_parameters(resolution, node, sweep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`steer ... by loreft("FILE")`: R (d, k), W (k, d), b (k) as `reft` saved them, checked against the sites."""
    ref, span = node.get("loreft"), node.span_of("loreft")
    width = site_width(resolution, sweep, span, "loreft(...)")
    saved = read_learned(resolution, ref, span, LOREFT_TENSORS, "loreft")
    basis, weight, bias = (saved[name] for name in LOREFT_TENSORS)
    k = basis.shape[-1] if basis.dim() == 2 else -1
    expected = {"basis": (width, k), "weight": (k, width), "bias": (k,)}
    for name, tensor in saved.items():
        if k < 1 or tuple(tensor.shape) != expected[name]:
            raise resolution.error(f"loreft {ref!r}: {name} has shape {tuple(tensor.shape)}; the sites' vectors have "
                                   f"{width} numbers, so basis (d, k), weight (k, d), bias (k) need d = {width}", span)
    return basis, weight, bias


def read_learned(resolution, ref: str, span, names: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, refused (at the statement) if missing, unreadable or another model's."""
    from safetensors import SafetensorError, safe_open
    path = Path(ref)
    if not path.is_absolute() and resolution.file.path:
        path = Path(resolution.file.path).parent / path
    if not path.is_file():
        raise resolution.error(f"{what} file {ref!r} not found (looked at {path})", span)
    try:
        with safe_open(str(path), "pt") as handle:
            keys, metadata = list(handle.keys()), handle.metadata() or {}
            missing = [name for name in names if name not in keys]
            if missing:
                raise resolution.error(f"{what} file {ref!r} has no tensor {missing[0]!r} (it has {', '.join(keys) or 'none'})",
                                       span)
            tensors = {name: handle.get_tensor(name).float() for name in names}
    except SafetensorError as exc:
        raise resolution.error(f"{what} file {ref!r} is not a safetensors file: {exc}", span) from None
    model = metadata.get("model")
    if model is not None and model != resolution.model.ref:
        raise resolution.error(f"{what} {ref!r} was saved for model {model!r}, not {resolution.model.ref!r}", span)
    revision = metadata.get("model_revision")
    if model is not None and revision and resolution.model.revision and revision != resolution.model.revision:
        raise resolution.error(f"{what} {ref!r} was learned on revision {revision!r} of {model!r}; this run loads "
                               f"{resolution.model.revision!r}", span)
    return tensors


__all__ = ["FixedBasis", "MeansBasis", "loreft_parameters", "read_learned", "site_basis", "site_width", "within_basis"]
