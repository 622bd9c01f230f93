"""Site references with selectors -> a Sweep of points, checked against the model's sizes.

A selector names the values a dimension is swept over; a dimension left out is
intervened on all at once. Sites joined with '+' share dimensions of the same name (a
shared dimension is one axis, so `resid_pre[layer=*, pos=S1] + resid_pre[layer=*, pos=S2]`
patches both positions at each layer); other dimensions multiply.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from causal.errors import CausalError, Span, did_you_mean
from causal.lang import ast
from causal.limits import MAX_INDICES
from causal.models import ModelAdapter
from causal.models.adapter import KV_ROLES
from causal.values import NamedPositions, Position, Sweep, Target


@dataclass
class _Part:
    """One site of a '+' combination: its swept dims and the target for given dim values."""

    site: str
    dims: list[str]
    coords: dict[str, list]
    windows: dict[int, tuple[int, ...]]  # layer -> the layers its window covers
    extra_names: tuple[str, ...]
    fixed: dict[str, object]  # values of dims that are not swept (None: all at once)
    per_layer: bool

    def target(self, values: dict[str, object]) -> Target:
        chosen = {**self.fixed, **{d: values[d] for d in self.dims}}
        if not self.per_layer:
            layers: tuple[int | None, ...] = (None,)
        elif chosen.get("layer") is None:
            layers = tuple(self.windows)  # every layer at once
        else:
            layers = self.windows[chosen["layer"]]
        extra = tuple(_as_tuple(chosen.get(d)) for d in self.extra_names)
        return Target(self.site, layers, chosen.get("pos"), extra)


def _as_tuple(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


class SweepBuilder:
    """Resolves site references for one experiment; positions are checked against `lengths`."""

    def __init__(self, adapter: ModelAdapter, positions: NamedPositions):
        self.adapter, self.positions = adapter, positions

    def error(self, message: str, span: Span, hint: str | None = None) -> CausalError:
        return CausalError(message, span, hint)

    def sweep(self, sites: tuple[ast.SiteRef, ...], lengths: tuple[int, int],
              allowed: tuple[str, ...] | None = None) -> Sweep:
        """`lengths`: the (shortest, longest) prompt the sites will be applied to."""
        parts = [self.part(site, lengths, allowed) for site in sites]
        _fix_distinct_singletons(parts)
        dims: list[str] = []
        coords: dict[str, list] = {}
        for part, site in zip(parts, sites):
            for dim in part.dims:
                if dim in coords and coords[dim] != part.coords[dim]:
                    raise self.error(f"the sites joined with '+' both sweep {dim!r} but over different values "
                                     f"({_show(coords[dim])} and {_show(part.coords[dim])}); a shared dimension is "
                                     "one axis", site.span)
                if dim not in coords:
                    dims.append(dim)
                    coords[dim] = part.coords[dim]
        points = []
        for combo in itertools.product(*(coords[d] for d in dims)):
            values = dict(zip(dims, combo))
            points.append(tuple(part.target(values) for part in parts))
        return Sweep(tuple(dims), coords, points)

    def part(self, site: ast.SiteRef, lengths: tuple[int, int], allowed: tuple[str, ...] | None) -> _Part:
        info = self.site_info(site, allowed)
        extra_names = tuple(name for name, _ in info.extra_dims)
        sizes = {name: size for name, size in info.extra_dims}
        dims_allowed = (["layer"] if info.per_layer and info.layers is None else []) + ["pos", *extra_names]
        layers = list(info.layers) if info.layers is not None else list(range(self.adapter.n_layers))
        windows: dict[int, tuple[int, ...]] = {l: (l,) for l in layers} if info.per_layer else {}
        swept: list[str] = []
        coords: dict[str, list] = {}
        fixed: dict[str, object] = {}
        for sel in site.selectors:
            if sel.dim not in dims_allowed:
                raise self.error(f"site {site.name!r} has no dimension {sel.dim!r}; it has "
                                 f"{', '.join(dims_allowed)}", sel.span, _dim_hint(sel.dim, dims_allowed, info))
            if sel.dim in coords or sel.dim in fixed:
                raise self.error(f"dimension {sel.dim!r} is selected twice", sel.span)
            if sel.window is not None:
                if sel.dim != "layer":
                    raise self.error(f"'window' applies to layers, not to {sel.dim!r}", sel.span)
                windows = {l: rome_window(l, sel.window, self.adapter.n_layers) for l in layers}
            if sel.dim == "pos":
                values = self.positions_of(sel.indices, lengths)
            elif sel.dim != "layer" and sizes[sel.dim] is None:
                values = self.prompt_indices_of(sel, lengths, site.name)
            else:
                size = self.adapter.n_layers if sel.dim == "layer" else sizes[sel.dim]
                values = self.indices_of(sel, size, site.name)
            swept.append(sel.dim)
            coords[sel.dim] = values
        for dim in dims_allowed:
            if dim not in coords:
                fixed[dim] = None
        return _Part(site.name, swept, coords, windows, extra_names, fixed, info.per_layer)

    def site_info(self, site: ast.SiteRef, allowed: tuple[str, ...] | None):
        if allowed is not None and site.name not in allowed:
            raise self.error(f"site {site.name!r} cannot be used here; use one of {', '.join(allowed)}", site.span)
        try:
            return self.adapter.site_info(site.name)
        except CausalError as exc:
            raise self.error(exc.message, site.span, exc.hint) from None

    def indices_of(self, sel: ast.Selector, size: int, site: str) -> list[int]:
        """Layer, head and other model indices, normalised to 0..size-1."""
        if isinstance(sel.indices, ast.AllIndices):
            return list(range(size))
        values = expand(sel.indices)
        for v in values:
            if isinstance(v, ast.Name):
                raise self.error(f"{v.name!r} is not a number; {sel.dim} indices are whole numbers "
                                 "(names stand for positions, in pos=...)", v.span)
            if not -size <= v < size:
                raise self.error(f"{sel.dim} {v} is out of range: {self.range_phrase(sel.dim, size, site)} "
                                 f"(valid: 0..{size - 1}, or -{size}..-1 from the end)", sel.indices.span)
        normal = [v % size for v in values]
        check_distinct(normal, values, sel.dim, sel.indices.span)
        return normal

    def prompt_indices_of(self, sel: ast.Selector, lengths: tuple[int, int], site: str) -> list[int]:
        """Indices into the prompt (key_pos): like pos=*, `*` covers the longest prompt and a prompt
        shorter than an index gets NaN there; counting from the end needs prompts of one length."""
        shortest, longest = lengths
        if shortest != longest and not isinstance(sel.indices, ast.AllIndices) and \
                any(isinstance(v, int) and v < 0 for v in expand(sel.indices)):
            raise self.error(f"{sel.dim} counts from the end here, but the prompts have {shortest} to {longest} "
                             f"tokens, so the end differs between them; write {sel.dim} from the start "
                             f"(0..{longest - 1}, NaN for prompts shorter than that)", sel.indices.span)
        return self.indices_of(sel, longest, site)

    def range_phrase(self, dim: str, size: int, site: str) -> str:
        if dim == "layer":
            return f"the model has {size} layers"
        if dim == "kv_head":
            grouped = f" (grouped-query attention; {self.adapter.n_heads} query heads)" \
                if size != self.adapter.n_heads else ""
            return f"the model has {size} key/value heads per layer{grouped}"
        if dim == "head":
            return f"the model has {size} heads per layer"
        if dim == "neuron":
            return f"the model has {size} MLP neurons per layer"
        if dim == "feature":
            return f"the SAE has {size} features"
        if dim == "key_pos":
            return f"the longest prompt has {size} tokens to attend to"
        return f"{site} has {size} values of {dim}"

    def positions_of(self, indices: ast.IndexSet, lengths: tuple[int, int]) -> list[Position]:
        """Integer positions (negative from the end) must exist in every prompt; names must be defined.

        `*` sweeps every position of the longest prompt; shorter prompts get NaN where they end.
        """
        shortest, longest = lengths
        if isinstance(indices, ast.AllIndices):
            return list(range(longest))
        values = expand(indices)
        out: list[Position] = []
        for v in values:
            if isinstance(v, ast.Name):
                self.check_position_name(v)
                out.append(v.name)
            elif not -shortest <= v < shortest:
                raise self.error(f"position {v} is outside the prompt: the shortest prompt has {shortest} tokens "
                                 f"(valid: {-shortest}..{shortest - 1})", indices.span)
            else:
                out.append(v)
        check_distinct(out, out, "position", indices.span)
        return out

    def check_position_name(self, name: ast.Name) -> None:
        known = self.positions.indices
        if name.name not in known:
            listed = ", ".join(known) or "none (declare them with positions { NAME = first(column), ... })"
            raise self.error(f"unknown position {name.name!r}; named positions: {listed}", name.span,
                             did_you_mean(name.name, known))


def _dim_hint(dim: str, dims: list[str], info) -> str | None:
    if dim == "head" and info.role in KV_ROLES:
        return ("keys and values are indexed by key-value head, kv_head=... (fewer than the query heads under "
                "grouped-query attention; query head h reads kv_head h // (n_heads / n_kv_heads))")
    return did_you_mean(dim, dims)


def _fix_distinct_singletons(parts: list[_Part]) -> None:
    """`z[layer=9, head=6] + z[layer=10, head=0]`: single values that differ between parts are not an
    axis but each part's own fixed choice (nothing is swept along them)."""
    for dim in {d for part in parts for d in part.dims}:
        having = [p for p in parts if dim in p.dims]
        values = [p.coords[dim] for p in having]
        if len(having) > 1 and all(len(v) == 1 for v in values) and len({repr(v) for v in values}) > 1:
            for part in having:
                part.fixed[dim] = part.coords.pop(dim)[0]
                part.dims.remove(dim)


def rome_window(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """The layers ROME restores together around `layer` (causal_trace.py's window rule)."""
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def expand(indices: ast.IndexSet) -> list:
    """The values an index set names; ranges are inclusive and must be numeric."""
    if isinstance(indices, ast.SingleIndex):
        return [indices.value]
    if isinstance(indices, ast.IndexList):
        _check_count(len(indices.values), indices)
        return list(indices.values)
    if isinstance(indices, ast.IndexRange):
        if isinstance(indices.start, ast.Name) or isinstance(indices.stop, ast.Name):
            raise CausalError(f"a range needs numbers at both ends, got {indices.describe()}", indices.span)
        if indices.stop < indices.start:
            raise CausalError(f"empty range {indices.describe()}: the end comes before the start", indices.span)
        _check_count(indices.stop - indices.start + 1, indices)
        return list(range(indices.start, indices.stop + 1))
    raise TypeError(indices)


def _check_count(count: int, indices: ast.IndexSet) -> None:
    if count > MAX_INDICES:
        what = f"the range {indices.describe()}" if isinstance(indices, ast.IndexRange) else "this list"
        raise CausalError(f"{what} names {count} values, more than "
                          f"the {MAX_INDICES} an index set may name", indices.span,
                          hint="'*' selects every value of a dimension")


def check_distinct(values: list, shown: list, dim: str, span: Span) -> None:
    """A value listed twice would be one coordinate twice in the results: refuse it where it is written."""
    seen: dict = {}
    for value, written in zip(values, shown):
        if value in seen:
            twice = f"{written} is listed twice" if seen[value] == written else \
                f"{seen[value]} and {written} name the same index"
            raise CausalError(f"{dim} {twice}; each value of a swept dimension is listed once", span)
        seen[value] = written


def _show(values: list) -> str:
    return "[" + ", ".join(map(str, values[:6])) + (", ..." if len(values) > 6 else "") + "]"
