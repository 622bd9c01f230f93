"""The trainable interventions `align` and `reft` learn, parametrised as pyvene and pyreft parametrise them.

Each is a (d, m) matrix W with orthonormal columns, kept orthonormal by torch's orthogonal
parametrisation (as pyvene's RotateLayer / LowRankRotateLayer), and per column a weight c in
[0, 1]; swapping the subspace from a source is h' = h + W diag(c) Wᵀ (h_src − h).

- `das`: a full rotation (d, d) whose first k columns swap (pyvene's RotatedSpaceIntervention);
- `lowrank`: a (d, k) basis only (LowRankRotatedSpaceIntervention), cheaper for large d;
- `boundless`: a full rotation and a learned boundary b: column i swaps with weight
  σ(i / T) σ((b d − i) / T), the temperature T annealed (BoundlessRotatedSpaceIntervention);
- `loreft` (no source): h + R (W h + b − Rᵀ h) with R a (d, k) orthonormal basis and W, b a learned
  linear map into its k coordinates (pyreft's LoreftIntervention, h + Rᵀ(Wh + b − Rh) with R as rows).
"""
from __future__ import annotations

import torch
from torch import nn

BOUNDLESS_START_TEMPERATURE, BOUNDLESS_END_TEMPERATURE = 50.0, 0.1


class _Columns(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


def _orthonormal(width: int, columns: int, generator: torch.Generator, dtype: torch.dtype) -> nn.Module:
    """A (width, columns) weight kept orthonormal by torch's parametrisation, first drawn from `generator`."""
    weight = torch.empty(width, columns, dtype=dtype)
    nn.init.orthogonal_(weight, generator=generator)
    with torch.random.fork_rng(devices=[]):  # completing a (d, k) basis to a rotation draws from the global RNG
        torch.manual_seed(generator.initial_seed())
        return nn.utils.parametrizations.orthogonal(_Columns(weight))


class Subspace(nn.Module):
    """One candidate's trainable subspace at one site."""

    def __init__(self, kind: str, width: int, k: int, generator: torch.Generator, dtype: torch.dtype = torch.float32):
        """Built in its dtype: a float32 rotation cast to float64 is orthogonal only to ~1e-7."""
        super().__init__()
        self.kind, self.k, self.width = kind, k, width
        self.rotation = _orthonormal(width, width if kind in ("das", "boundless") else k, generator, dtype)
        self.boundary = nn.Parameter(torch.tensor([0.5], dtype=dtype)) if kind == "boundless" else None
        self.temperature = BOUNDLESS_START_TEMPERATURE

    def editor(self):
        """edit(h, source, where) for one forward, its weights computed once (the parametrisation is not free)."""
        weight, weights = self.directions()

        def edit(h, source, where):
            return swap(h, source.to(h.dtype), where, weight.to(h.dtype), None if weights is None else weights.to(h.dtype))
        return edit

    def saved(self) -> dict[str, torch.Tensor]:
        return {"basis": self.basis()}

    def directions(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W (d, m), per-column weights (m,) or None for all ones): what one swap applies."""
        weight = self.rotation.weight
        if self.kind == "das":
            return weight[:, : self.k], None
        if self.kind == "lowrank":
            return weight, None
        return weight, self.column_weights()

    def column_weights(self) -> torch.Tensor:
        boundary = self.boundary.clamp(1e-3, 1.0) * self.width
        index = torch.arange(self.width, device=boundary.device, dtype=boundary.dtype)
        t = self.temperature
        return torch.sigmoid(index / t) * torch.sigmoid((boundary - index) / t)

    def penalty(self) -> torch.Tensor | float:
        """Boundless DAS pushes its boundary down (pyvene's tutorial: the boundary's sum, weight 1)."""
        return self.boundary.clamp(1e-3, 1.0).sum() if self.boundary is not None else 0.0

    def learned_size(self) -> int:
        """How many columns swap (weight above one half); k for das and lowrank."""
        if self.boundary is None:
            return self.k
        with torch.no_grad():
            return int((self.column_weights() > 0.5).sum())

    def basis(self) -> torch.Tensor:
        """(d, size) the directions that swap, detached: what `within basis(...)` reuses."""
        with torch.no_grad():
            weight, weights = self.directions()
            return weight[:, weights > 0.5] if weights is not None else weight.clone()


class Loreft(nn.Module):
    """One candidate's LoReFT at one site: R (d, k) orthonormal (torch's parametrisation), W (k, d) and b (k)
    initialised as torch's Linear is, from the candidate's own generator."""

    kind = "loreft"

    def __init__(self, width: int, k: int, generator: torch.Generator, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.k, self.width = k, width
        self.rotation = _orthonormal(width, k, generator, dtype)
        bound = width ** -0.5  # nn.Linear's default: kaiming_uniform(a=√5) and its bias, both U(-1/√d, 1/√d)
        self.learned_source = nn.Linear(width, k, dtype=dtype)
        with torch.no_grad():
            self.learned_source.weight.uniform_(-bound, bound, generator=generator)
            self.learned_source.bias.uniform_(-bound, bound, generator=generator)
        self.temperature = None

    def editor(self):
        basis, linear = self.rotation.weight, self.learned_source

        def edit(h, source, where):
            edited = loreft_edit(h, basis.to(h.dtype), linear.weight.to(h.dtype), linear.bias.to(h.dtype))
            return h + where * (edited - h)
        return edit

    def penalty(self) -> float:
        return 0.0

    def learned_size(self) -> int:
        return self.k

    def saved(self) -> dict[str, torch.Tensor]:
        """What `steer ... by loreft("FILE")` reuses: basis R (d, k), weight W (k, d), bias b (k)."""
        with torch.no_grad():
            return {"basis": self.rotation.weight.clone(), "weight": self.learned_source.weight.clone(),
                    "bias": self.learned_source.bias.clone()}


def loreft_edit(h: torch.Tensor, basis: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h + R (W h + b − Rᵀ h): a saved LoReFT applied as it was trained."""
    return h + ((h @ weight.T + bias) - h @ basis) @ basis.T


def swap(h: torch.Tensor, source: torch.Tensor, where: torch.Tensor, weight: torch.Tensor,
         weights: torch.Tensor | None) -> torch.Tensor:
    """h + where · W diag(c) Wᵀ (source − h): the subspace of h taken from the source where `where` is set."""
    coordinates = (source - h) @ weight
    if weights is not None:
        coordinates = coordinates * weights
    return h + where * (coordinates @ weight.T)


__all__ = ["Loreft", "Subspace", "loreft_edit", "swap"]
