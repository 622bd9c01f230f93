"""Figures of trained interventions (align, reft): where the held-out score is high, and how training went.

One figure per statement: the held-out score (align: interchange intervention accuracy, reft: accuracy of
the target) over the swept sites, one heatmap (or line) per k on a fixed 0..1 scale, and beside it every
candidate's dev accuracy per epoch, the best candidate drawn thick. Scores are not effects (there is no
unpatched level to subtract), so they get their own figures.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

from causal.results.bases import trained_statements

MAX_CURVES = 40  # dev-accuracy lines drawn; a larger sweep shows its best candidates only


def trained_figures(dataset: xr.Dataset) -> Iterator[tuple[str, Figure]]:
    for stem, score, label in trained_statements(dataset):
        yield stem, trained_figure(score, dataset[f"{stem}_dev_accuracy"], label)


def trained_figure(score: xr.DataArray, dev: xr.DataArray, label: str) -> Figure:
    """k is one more axis while the swept sites leave room (a line over k, or sites x k); else a panel per k."""
    swept = [d for d in score.dims if d != "k" and score.sizes[d] > 1]
    ks = score["k"].values.tolist() if len(swept) == 2 and score.sizes["k"] > 1 else [None]
    fig = Figure(figsize=(5.5 * (len(ks) + 1), 4.8))
    axes = list(fig.subplots(1, len(ks) + 1, squeeze=False).flat)
    for ax, k in zip(axes, ks):
        _scores(ax, score if k is None else score.sel(k=k, drop=True))
        ax.set_title(label if k is None else f"{label}, k={k}", fontsize=10)
    _curves(axes[-1], score, dev)
    fig.suptitle(f"{score.attrs['statement']}\n{score.attrs.get('heldout_pairs', '?')} held-out examples; "
                 f"{score.attrs.get('epochs_run', '?')} epochs run", fontsize=10)
    fig.tight_layout()
    return fig


def _scores(ax, score: xr.DataArray) -> None:
    values = score.squeeze([d for d in score.dims if score.sizes[d] == 1], drop=True)
    beyond = list(values.dims)[2:]
    if beyond:  # a third swept dim (e.g. head over layer x pos): its best value per cell
        values = values.max(beyond)
    if values.ndim == 2:
        rows, cols = values.dims
        sns.heatmap(values.values, ax=ax, cmap="Purples", vmin=0, vmax=1, annot=values.size <= 64, fmt=".2f",
                    xticklabels=[str(v) for v in values[cols].values],
                    yticklabels=[str(v) for v in values[rows].values],
                    cbar_kws={"label": "held-out score" + (f" (max over {', '.join(beyond)})" if beyond else "")})
        ax.set_xlabel(cols)
        ax.set_ylabel(rows)
        return
    if values.ndim == 1:
        dim = values.dims[0]
        ax.plot([str(v) for v in values[dim].values], values.values, marker="o")
        ax.set_xlabel(dim)
    else:
        ax.bar(["the site"], [float(values)], color="tab:purple")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out score")


def _curves(ax, score: xr.DataArray, dev: xr.DataArray) -> None:
    dims = [d for d in score.dims]
    candidates = [dict(zip(dims, values)) for values in itertools.product(*(score[d].values for d in dims))]
    ranked = sorted(candidates, key=lambda at: -np.nan_to_num(float(score.sel(at)), nan=-1))[:MAX_CURVES]
    for rank, at in enumerate(ranked):
        curve = dev.sel(at).values
        epochs = dev["epoch"].values[np.isfinite(curve)]
        text = " ".join(f"{d}={v}" for d, v in at.items() if score.sizes[d] > 1) or "the site"
        ax.plot(epochs, curve[np.isfinite(curve)], lw=2.5 if rank == 0 else 0.8,
                label=text if rank < 5 else None, alpha=1 if rank == 0 else 0.6)
    ax.set_ylim(0, 1.05)
    ax.set_xticks(dev["epoch"].values)
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev accuracy")
    ax.set_title("training (best candidate thick)", fontsize=10)
    if ranked:
        ax.legend(fontsize=8, loc="lower right")


__all__ = ["trained_figures"]
