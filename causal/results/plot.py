"""Seaborn figures for a results Dataset: one per intervention variable (and metric).

Figures are made without pyplot, so drawing needs no display and never switches a notebook's
backend: `plot` returns them (shown inline in a notebook), `plot_all` saves them as PNGs.
Nothing is averaged but examples, and what a figure shows is said on it: the statement, the
baseline levels the change is taken between, the number of examples.
"""
from __future__ import annotations

import base64
import io
import itertools
import logging
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Bar plots of heads/neurons have category labels that look like numbers; matplotlib says so at INFO on
# every bar plot, which Hydra's logging prints. Our labels are meant as categories.
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # and "generated new fontManager" once per machine
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from causal.errors import CausalError  # noqa: E402
from causal.files import write_atomically  # noqa: E402
from causal.methods.kinds import kind_of  # noqa: E402
from causal.results.inside_plots import inside_figures  # noqa: E402
from causal.results.summary import effect  # noqa: E402
from causal.results.trained_plots import trained_figures  # noqa: E402

SITE_DIMS = ("layer", "head", "kv_head", "pos", "neuron", "feature", "key_pos")  # what a statement sweeps: the axes of a panel
MAX_PANELS = 16


class Figures(list):
    """The figures of a Dataset; a notebook shows them all inline (a plain list would show its repr)."""

    def _repr_html_(self) -> str:
        return "".join(f'<img src="data:image/png;base64,{_png(fig)}"/><br/>' for fig in self)


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def plot(dataset: xr.Dataset, name: str | None = None) -> Figures:
    """The figures `causal run` saves (of one variable, with `name`), as matplotlib Figures."""
    if name is not None and name not in dataset.data_vars:
        raise CausalError(f"no variable {name!r} to plot; the Dataset has {', '.join(dataset.data_vars)}")
    return Figures(fig for stem, fig in _figures(dataset) if name is None or stem.split(".")[0] == name)


def plot_all(dataset: xr.Dataset, folder: str | Path) -> list[Path]:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CausalError(f"cannot write plots into {str(folder)!r}: {exc.strerror}"
                          f"{' (a file is in the way)' if isinstance(exc, FileExistsError) else ''}") from None
    written = []
    for stem, fig in _figures(dataset):
        written.append(_save(fig, folder / f"{stem.replace('.', '_')}.png"))
    return written


# --------------------------------------------------------------------------------- what is drawn

@dataclass
class _Plotted:
    """One intervention variable at one metric: its per-example change and how to label it."""

    name: str
    metric: str | None
    change: xr.DataArray
    title: str
    note: str

    @property
    def stem(self) -> str:
        suffix = "" if self.metric is None else "." + "".join(c if c.isalnum() else "_" for c in self.metric)
        return self.name + suffix


def _figures(dataset: xr.Dataset) -> Iterator[tuple[str, Figure]]:
    """Each variable's figure; variables of one method over the same dims share a colour scale (and a
    comparison figure), and an attribution is drawn beside its exact check."""
    plotted = list(_plotted(dataset))
    groups: dict[tuple, list[_Plotted]] = {}
    for item in plotted:
        groups.setdefault(_group_key(dataset, item), []).append(item)
    exact_of = {dataset[n].attrs["estimated_by"]: n for n in dataset.data_vars if "estimated_by" in dataset[n].attrs}
    for item in plotted:
        if "estimated_by" in dataset[item.name].attrs:
            continue  # drawn with its estimate, and compared with nothing else
        if item.name in exact_of:
            exact = next(p for p in plotted if p.name == exact_of[item.name] and p.metric == item.metric)
            yield item.stem, _attribution_figure(item, exact, dataset)
        else:
            scale = _Scale.over([p.change for p in groups[_group_key(dataset, item)]])
            yield item.stem, effect_figure(item.change, dataset, item.title, item.note, scale)
    for (method, _), members in groups.items():
        members = [m for m in members if "estimated_by" not in dataset[m.name].attrs]
        if len(members) > 1:
            yield f"{method}_compared" + members[0].stem[len(members[0].name):], _comparison(members, dataset)
    yield from inside_figures(dataset)  # logit lens, attention patterns: readouts, not effects
    yield from trained_figures(dataset)  # align / reft: held-out scores and training curves


def _plotted(dataset: xr.Dataset) -> Iterator[_Plotted]:
    for name, variable in dataset.data_vars.items():
        if not kind_of(variable.attrs).effect:
            continue
        change = effect(dataset, name)
        for dim in [d for d in change.dims if d != "example"]:  # the Dataset's union of positions, etc.
            change = change.dropna(dim, how="all")
        for metric in list(change["metric"].values) if "metric" in change.dims else [None]:
            one = change.sel(metric=metric, drop=True) if metric is not None else change
            label = metric or variable.attrs.get("metric", "metric")
            yield _Plotted(name, metric, one, f"{name}: Δ {label}", _note(dataset, name, metric, one))


def _group_key(dataset: xr.Dataset, item: _Plotted) -> tuple:
    """Variables comparable on one scale: one method, one metric, the same sites swept (path into q/k/v)."""
    swept = tuple((d, tuple(item.change[d].values.tolist())) for d in item.change.dims if d != "example")
    return dataset[item.name].attrs.get("method"), (swept, item.metric)


def _note(dataset: xr.Dataset, name: str, metric, change: xr.DataArray) -> str:
    """The statement, and the levels the change lies between (e.g. a trace's noised and clean runs)."""
    attrs = dataset[name].attrs
    levels = []
    for role in ("prompts", "source"):
        run = attrs.get(role)
        if run in dataset:
            level = dataset[run].sel(metric=metric) if metric is not None else dataset[run]
            levels.append(f"{run} {float(level.mean()):.3g}")
    examples = change.sizes.get("example", 0)
    return f"{attrs.get('statement', name)}\nmean over {examples} examples; unpatched: {', '.join(levels)}"


def _means(changes: list[xr.DataArray]) -> np.ndarray:
    means = [c.mean("example").values.ravel() for c in changes if c.size]
    values = np.concatenate(means) if means else np.array([])
    return values[np.isfinite(values)]


# --------------------------------------------------------------------------------- figures

def effect_figure(change: xr.DataArray, dataset: xr.Dataset, title: str, note: str = "",
                  scale: "_Scale | None" = None) -> Figure:
    """Mean change over examples. Nothing is averaged but examples: the site dims make a panel's axes (two
    at most), every other dim (a merged sweep's seed or model, a third site dim) one panel per value."""
    for dim in [d for d in change.dims if d != "example"]:  # a comparison's union of sites, etc.
        change = change.dropna(dim, how="all")
    single = [d for d in change.dims if d != "example" and change.sizes[d] == 1]
    if single:  # a one-value axis is a label, not a plot dimension
        title += " (" + ", ".join(f"{d}={change[d].values[0]}" for d in single) + ")"
        change = change.squeeze(single, drop=True)
    dims = [d for d in change.dims if d != "example"]
    axes_dims = ([d for d in dims if d in SITE_DIMS] + [d for d in dims if d not in SITE_DIMS])[:2]
    facets = [d for d in dims if d not in axes_dims]
    panels = [dict(zip(facets, values)) for values in itertools.product(*(change[d].values for d in facets))]
    shown = panels[:MAX_PANELS]
    if len(panels) > len(shown):
        title += f"; the first {len(shown)} of {len(panels)} panels ({', '.join(facets)})"
    scale = scale or _Scale.over([change])
    fig, axes = _grid(len(shown), _size(change.mean("example").isel({d: 0 for d in facets}).transpose(*axes_dims)))
    for ax, where in zip(axes, shown):
        _draw(ax, change.sel(where) if where else change, dataset, axes_dims, scale)
        if where:
            ax.set_title(", ".join(f"{d}={v}" for d, v in where.items()), fontsize=10)
    _titled(fig, axes, title, note, several=bool(facets) or len(shown) > 1)
    return fig


def _attribution_figure(estimate: _Plotted, exact: _Plotted, dataset: xr.Dataset) -> Figure:
    """Estimate and exact patching on one grid and one scale (unverified sites blank), and the verified
    sites' estimate against exact with their correlation."""
    dims = [d for d in estimate.change.dims if d != "example" and estimate.change.sizes[d] > 1]
    if len(dims) > 2:  # facets would not line up side by side: the two figures, on one scale
        return effect_figure(estimate.change, dataset, estimate.title, estimate.note,
                             _Scale.over([estimate.change, exact.change]))
    checked = exact.change.reindex({d: estimate.change[d].values for d in dims})  # unverified sites: NaN, kept
    squeezed = [c.squeeze([d for d in c.dims if d != "example" and c.sizes[d] == 1])
                for c in (estimate.change, checked)]
    scale = _Scale.over(squeezed)
    fig, axes = _grid(3, (5.5, 4.5))
    for ax, change, label in zip(axes, squeezed, ("estimate (attribution)", "exact (patching; blank: not verified)")):
        _draw(ax, change, dataset, dims, scale)
        ax.set_title(label, fontsize=10)
    _scatter(axes[2], *(c.mean("example") for c in squeezed))
    _titled(fig, axes, estimate.title, estimate.note, several=True)
    return fig


def _scatter(ax, estimate: xr.DataArray, exact: xr.DataArray) -> None:
    x, y = estimate.values.ravel(), exact.values.ravel()
    verified = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[verified], y[verified], color="tab:blue")
    low, high = _span(np.concatenate([x[verified], y[verified]]))
    ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--")
    r = np.corrcoef(x[verified], y[verified])[0, 1] if verified.sum() > 1 else float("nan")
    ax.set_title(f"{verified.sum()} verified sites: r = {r:.3f}", fontsize=10)
    ax.set_xlabel("estimated mean change")
    ax.set_ylabel("exact mean change")


def _span(values: np.ndarray) -> tuple[float, float]:
    if not values.size:
        return -1.0, 1.0
    low, high = float(values.min()), float(values.max())
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def _comparison(members: list[_Plotted], dataset: xr.Dataset) -> Figure:
    """Variables of one method over the same sites (path into q, k and v, say) side by side, one scale."""
    joined = xr.concat([m.change for m in members], dim=xr.Variable("variable", [m.name for m in members]),
                       join="outer", coords="minimal", compat="override")
    method = dataset[members[0].name].attrs.get("method")
    label = members[0].metric or dataset[members[0].name].attrs.get("metric", "metric")
    note = f"mean over {joined.sizes.get('example', 0)} examples, one scale"
    return effect_figure(joined, dataset, f"{method}: Δ {label}, compared", note, _Scale.over([joined]))


@dataclass
class _Scale:
    """Colours for the values shown: diverging around 0 only where values of both signs are."""

    cmap: str
    vmin: float
    vmax: float
    limit: float

    @classmethod
    def over(cls, changes: list[xr.DataArray]) -> "_Scale":
        """One scale for the mean changes of all of `changes`."""
        return cls.of(_means(changes))

    @classmethod
    def of(cls, finite: np.ndarray) -> "_Scale":
        """Sequential where every value has one sign, up to noise (2% of the largest: a trace's -0.00)."""
        limit = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
        noise = 0.02 * limit
        if finite.size and finite.min() >= -noise:
            return cls("Purples", 0.0, limit, limit)
        if finite.size and finite.max() <= noise:
            return cls("Blues_r", -limit, 0.0, limit)
        return cls("RdBu_r", -limit, limit, limit)


def _grid(panels: int, size: tuple[float, float]) -> tuple[Figure, list]:
    columns = min(max(panels, 1), 4)
    rows = math.ceil(max(panels, 1) / columns)
    width, height = size
    fig = Figure(figsize=(width * columns, height * rows + 0.8))
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:max(panels, 1)]


def _titled(fig: Figure, axes: list, title: str, note: str, several: bool) -> None:
    """Title and note wrapped to the width they are drawn in (a long statement was cut off at the edges)."""
    chars = max(int(fig.get_figwidth() * 12), 30)
    text = "\n".join(textwrap.fill(line, chars) for line in (title + (f"\n{note}" if note else "")).splitlines())
    if several:
        fig.suptitle(text, fontsize=10)
    else:
        axes[0].set_title(text, fontsize=9)
    fig.tight_layout()


def _draw(ax, change: xr.DataArray, dataset: xr.Dataset, dims: list[str], scale: _Scale) -> None:
    """One panel: a heatmap of two dims, lines or bars over one, or the examples' histogram."""
    mean = change.mean("example")
    if len(dims) == 2:
        rows, cols = dims
        grid = mean.transpose(rows, cols)
        sns.heatmap(grid.values, ax=ax, cmap=scale.cmap, vmin=scale.vmin, vmax=scale.vmax,
                    center=0 if scale.cmap == "RdBu_r" else None,
                    xticklabels=_labels(dataset, cols, grid[cols].values),
                    yticklabels=_labels(dataset, rows, grid[rows].values),
                    annot=grid.size <= 64, fmt=".2f", cbar_kws={"label": "mean change"})
        ax.set_xlabel(cols)
        ax.set_ylabel(rows)
    elif len(dims) == 1:
        dim = dims[0]
        frame = change.to_dataframe(name="change").reset_index()
        if _ordered(change[dim]):  # layers, positions: a line over them
            sns.lineplot(frame, x=dim, y="change", ax=ax, errorbar=("ci", 95), marker="o")
            ax.set_xticks(change[dim].values)
        else:  # heads, neurons, named positions: separate bars
            frame[dim] = _labels(dataset, dim, frame[dim].values)
            sns.barplot(frame, x=dim, y="change", ax=ax, errorbar=("ci", 95), color="tab:blue",
                        order=list(dict.fromkeys(_labels(dataset, dim, change[dim].values))))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylim(-1.1 * scale.limit if scale.vmin < 0 else None, 1.1 * scale.limit if scale.vmax > 0 else None)
        ax.set_ylabel("change (95% CI over examples)")
    else:
        sns.histplot(change.values, ax=ax)
        ax.set_xlabel("change per example")


def _save(fig: Figure, path: Path) -> Path:
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), "plot")


def _ordered(coord: xr.DataArray) -> bool:
    return coord.name in ("layer", "pos") and np.issubdtype(coord.dtype, np.number)


def _labels(dataset: xr.Dataset, dim: str, values) -> list[str]:
    """Positions with their token where every example has the same one there; otherwise the position alone."""
    if dim != "pos":
        return [str(v) for v in values]
    base = next((c for c in dataset.coords if c.startswith("token_")), None)
    if base is None:
        return [str(v) for v in values]
    tokens = dataset[base].sel(pos=list(values)).transpose(..., "pos").values.reshape(-1, len(values))
    shared = (tokens == tokens[:1]).all(0)
    return [f"{p} {t!s}".rstrip() if same else f"{p}" for p, t, same in zip(values, tokens[0], shared)]


def _size(mean: xr.DataArray) -> tuple[float, float]:
    if mean.ndim < 2:
        return (6, 4)
    return (min(max(5.0, 2 + 0.6 * mean.shape[1]), 18), min(max(2.5, 1.5 + 0.5 * mean.shape[0]), 12))
