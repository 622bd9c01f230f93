"""Seaborn figures for a results Dataset: one PNG per intervention variable (and metric)."""
from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
# Bar plots of heads/neurons have category labels that look like numbers; matplotlib says so at INFO on
# every bar plot, which Hydra's logging prints. Our labels are meant as categories.
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # and "generated new fontManager" once per machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402

from causal.errors import CausalError  # noqa: E402
from causal.results.summary import effect  # noqa: E402


def plot_all(dataset: xr.Dataset, folder: str | Path) -> list[Path]:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CausalError(f"cannot write plots into {str(folder)!r}: {exc.strerror}"
                          f"{' (a file is in the way)' if isinstance(exc, FileExistsError) else ''}") from None
    written = []
    for name, variable in dataset.data_vars.items():
        if variable.attrs.get("kind") != "intervention":
            continue
        change = effect(dataset, name)
        metrics = list(change["metric"].values) if "metric" in change.dims else [None]
        for metric in metrics:
            one = change.sel(metric=metric) if metric is not None else change
            label = metric or variable.attrs.get("metric", "metric")
            suffix = "" if metric is None else "_" + "".join(c if c.isalnum() else "_" for c in metric)
            written.append(plot_effect(one, dataset, f"{name}: Δ {label}", folder / f"{name}{suffix}.png"))
    return written


SITE_DIMS = ("layer", "head", "kv_head", "pos", "neuron", "key_pos")  # what a statement sweeps: the axes of a panel
MAX_PANELS = 16


def plot_effect(change: xr.DataArray, dataset: xr.Dataset, title: str, path: Path) -> Path:
    """Mean change over examples. Nothing is averaged but examples: the site dims make a panel's axes (two
    at most), every other dim (a merged sweep's seed or model, a third site dim) one panel per value."""
    for dim in [d for d in change.dims if d != "example"]:  # the merged Dataset's union of positions, etc.
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
    columns = min(len(shown), 4)
    rows = math.ceil(len(shown) / columns)
    width, height = _size(change.mean("example").isel({d: 0 for d in facets}).transpose(*axes_dims))
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    limit = float(np.nanmax(np.abs(change.mean("example").values))) if change.size else 1.0
    for ax, where in zip(axes.flat, shown):
        _draw(ax, change.sel(where) if where else change, dataset, axes_dims, limit or 1.0)
        if where:
            ax.set_title(", ".join(f"{d}={v}" for d, v in where.items()), fontsize=10)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    if facets or len(shown) > 1:
        fig.suptitle(title)
    else:
        axes.flat[0].set_title(title)
    fig.tight_layout()
    _save(fig, path)
    return path


def _draw(ax, change: xr.DataArray, dataset: xr.Dataset, dims: list[str], limit: float) -> None:
    """One panel: a heatmap of two dims, lines or bars over one, or the examples' histogram."""
    mean = change.mean("example")
    if len(dims) == 2:
        rows, cols = dims
        grid = mean.transpose(rows, cols)
        sns.heatmap(grid.values, ax=ax, cmap="RdBu_r", center=0, vmin=-limit, vmax=limit,
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
            sns.barplot(frame, x=dim, y="change", ax=ax, errorbar=("ci", 95), color="tab:blue")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("change (95% CI over examples)")
    else:
        sns.histplot(change.values, ax=ax)
        ax.set_xlabel("change per example")


def _save(fig, path: Path) -> None:
    """Beside the target, then renamed: a full disk leaves no half-written PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    except OSError as exc:
        raise CausalError(f"cannot write the plot {str(path)!r}: {exc.strerror}") from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _ordered(coord: xr.DataArray) -> bool:
    return coord.name in ("layer", "pos") and np.issubdtype(coord.dtype, np.number)


def _labels(dataset: xr.Dataset, dim: str, values) -> list[str]:
    if dim != "pos":
        return [str(v) for v in values]
    base = next((c for c in dataset.coords if c.startswith("token_")), None)
    if base is None:
        return [str(v) for v in values]
    tokens = dataset[base].sel(pos=values).transpose(..., "pos").values.reshape(-1, len(values))  # (runs x examples, pos)
    shared = (tokens == tokens[:1]).all(0)
    return [f"{p} {t!s}".rstrip() if same else f"{p}" for p, t, same in zip(values, tokens[0], shared)]


def _size(mean: xr.DataArray) -> tuple[float, float]:
    if mean.ndim < 2:
        return (6, 4)
    return (min(max(5.0, 2 + 0.6 * mean.shape[1]), 18), min(max(2.5, 1.5 + 0.5 * mean.shape[0]), 12))
