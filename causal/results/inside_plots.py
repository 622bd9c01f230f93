"""Figures of what a run read inside the model, for one example with its tokens on the axes: the logit lens
(layer x position, coloured by the answer's log-prob, the top token written in each cell), attention
patterns per head (query x key), the per-head pattern scores (mean over examples), and SAE features'
activations over the tokens.

Effects are drawn by causal.results.plot; these variables are readouts, not effects, so they get their own
figures. Recordings of other sites are data for analysis, not drawn.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

from causal.methods.kinds import kind_of

EXAMPLE = 0  # the example drawn: a lens or a pattern averaged over different prompts has no tokens to show
MAX_HEADS = 16  # per pattern figure: layers x heads panels beyond this are left to the Dataset
MAX_FEATURES = 8  # per feature figure: the features most active on the drawn example


def inside_figures(dataset: xr.Dataset) -> Iterator[tuple[str, Figure]]:
    """Each variable whose kind names a drawing here, drawn where the drawing applies to it."""
    for name, variable in dataset.data_vars.items():
        drawing = DRAWINGS.get(kind_of(variable.attrs).figure)
        if drawing is not None:
            yield from drawing(dataset, name)


def _lens(dataset: xr.Dataset, name: str) -> Iterator[tuple[str, Figure]]:
    if "answer" in dataset[name].dims and f"{name}_top" in dataset:
        yield name, lens_figure(dataset, name)


def _patterns(dataset: xr.Dataset, name: str) -> Iterator[tuple[str, Figure]]:
    variable = dataset[name]
    if variable.attrs.get("site") == "pattern" and "key_pos" in variable.dims:
        yield name, pattern_figure(dataset, name)


def _head_scores(dataset: xr.Dataset, name: str) -> Iterator[tuple[str, Figure]]:
    yield name, scores_figure(dataset, name)


def _features(dataset: xr.Dataset, name: str) -> Iterator[tuple[str, Figure]]:
    if name.endswith("_frequency"):  # one figure per recording, not one per summary variable
        recording = dataset[name].attrs["recording"]
        yield recording, feature_figure(dataset, recording)


def tokens(dataset: xr.Dataset, variable: xr.DataArray, positions, example: int = EXAMPLE) -> list[str]:
    """'pos token' labels of the drawn example, from the prompts the variable ran on."""
    column = f"token_{variable.attrs.get('prompts', '')}"
    if column not in dataset.coords or "pos" not in dataset[column].dims:
        return [str(p) for p in positions]
    words = dataset[column].isel(example=example).sel(pos=list(positions)).values
    return [f"{p} {w}" for p, w in zip(positions, words)]


def lens_figure(dataset: xr.Dataset, name: str) -> Figure:
    lens = dataset[name].isel(example=EXAMPLE, answer=0).dropna("pos", how="all")
    top = dataset[f"{name}_top"].isel(example=EXAMPLE).sel(top=0, pos=lens["pos"])
    grid = lens.transpose("layer", "pos")
    fig = Figure(figsize=(min(4 + 0.55 * grid.shape[1], 20), 1.8 + 0.45 * grid.shape[0]))
    ax = fig.subplots()
    sns.heatmap(grid.values, ax=ax, cmap="viridis", annot=top.transpose("layer", "pos").values, fmt="",
                annot_kws={"fontsize": 7}, xticklabels=tokens(dataset, dataset[name], grid["pos"].values),
                yticklabels=[str(v) for v in grid["layer"].values],
                cbar_kws={"label": f"log-prob of {lens['answer'].item()}"})
    ax.set_xlabel("position and token (cells: the top token read there)")
    ax.set_ylabel("layer")
    ax.set_title(f"{name}: {dataset[name].attrs.get('statement', '')} (example {EXAMPLE})", fontsize=9)
    fig.tight_layout()
    return fig


def pattern_figure(dataset: xr.Dataset, name: str) -> Figure:
    pattern = dataset[name].isel(example=EXAMPLE).dropna("pos", how="all").dropna("key_pos", how="all")
    panels = [(layer, head) for layer in pattern["layer"].values for head in pattern["head"].values][:MAX_HEADS]
    columns = min(len(pattern["head"]), 4)
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4.2 * columns, 4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    queries = tokens(dataset, dataset[name], pattern["pos"].values)
    keys = tokens(dataset, dataset[name], pattern["key_pos"].values)
    for ax, (layer, head) in zip(axes, panels):
        grid = pattern.sel(layer=layer, head=head).transpose("pos", "key_pos")
        sns.heatmap(grid.values, ax=ax, cmap="Blues", vmin=0, vmax=1, cbar=False, xticklabels=keys,
                    yticklabels=queries)
        ax.tick_params(labelsize=5)
        ax.set_title(f"layer {layer} head {head}", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{name}: attention pattern per head (example {EXAMPLE})", fontsize=10)
    fig.tight_layout()
    return fig


def scores_figure(dataset: xr.Dataset, name: str) -> Figure:
    scores = dataset[name].mean("example")
    layers = list(scores["layer"].values)
    fig = Figure(figsize=(4 + 1.2 * len(scores["score"]), 1.5 + 0.4 * len(layers) * len(scores["head"])))
    ax = fig.subplots()
    grid = scores.stack(row=("layer", "head")).transpose("row", "score")
    sns.heatmap(grid.values, ax=ax, cmap="magma", vmin=0, vmax=1, annot=True, fmt=".2f",
                xticklabels=list(scores["score"].values),
                yticklabels=[f"L{layer} H{head}" for layer, head in grid["row"].values],
                cbar_kws={"label": "mean attention (over examples)"})
    ax.set_title(f"{name}: which heads attend to the previous token, the induction target, BOS", fontsize=9)
    fig.tight_layout()
    return fig


def feature_activations(dataset: xr.Dataset, recording: str, example: int = EXAMPLE) -> xr.DataArray:
    """(feature, pos) activations of one example, from a dense recording or from its top K (0 elsewhere)."""
    if recording in dataset:
        return dataset[recording].isel(example=example).dropna("pos", how="all").fillna(0.0).transpose("feature", "pos")
    ids = dataset[f"{recording}_top"].isel(example=example).dropna("pos", how="all")
    acts = dataset[f"{recording}_top_activation"].isel(example=example).sel(pos=ids["pos"])
    features = dataset[f"{recording}_frequency"]["feature"].values
    row_of = {int(f): i for i, f in enumerate(features)}
    top_ids, top_acts = ids.transpose("pos", "top").values, acts.transpose("pos", "top").values
    fired = (np.nan_to_num(top_ids, nan=-1) >= 0) & np.isfinite(top_acts)
    grid = np.zeros((len(features), len(ids["pos"])))
    grid[[row_of[int(f)] for f in top_ids[fired]], np.nonzero(fired)[0]] = top_acts[fired]
    return xr.DataArray(grid, dims=("feature", "pos"), coords={"feature": features, "pos": ids["pos"].values})


def feature_figure(dataset: xr.Dataset, recording: str, features=None, example: int = EXAMPLE) -> Figure:
    """Features' activations over one example's tokens: by default the MAX_FEATURES most active on it."""
    acts = feature_activations(dataset, recording, example)
    if features is None:
        strongest = acts.max("pos").sortby(lambda a: -a)
        recorded = dataset[f"{recording}_frequency"].notnull().sel(feature=strongest["feature"]).values
        features = list(strongest["feature"].values[recorded][:MAX_FEATURES])  # the strongest, firing or not
    grid = acts.sel(feature=list(features))
    frequency = dataset[f"{recording}_frequency"].sel(feature=list(features)).values
    fig = Figure(figsize=(min(4 + 0.55 * grid.shape[1], 20), 2.4 + 0.4 * max(len(features), 1)))
    ax = fig.subplots()
    labels = tokens(dataset, dataset[f"{recording}_frequency"], grid["pos"].values, example)
    top = float(grid.max()) if grid.size else 0.0
    sns.heatmap(grid.values, ax=ax, cmap="Reds", vmin=0, vmax=top if top > 0 else 1.0, xticklabels=labels,
                yticklabels=[f"{f} ({100 * q:.1f}%)" for f, q in zip(features, frequency)],
                cbar_kws={"label": "feature activation"})
    ax.set_xlabel("position and token")
    ax.set_ylabel("feature (fires on % of tokens)")
    ax.tick_params(axis="y", labelrotation=0)
    statement = dataset[f"{recording}_frequency"].attrs.get("statement", "")
    silent = "" if top > 0 else "; none of these fires here"
    ax.set_title(f"{recording}: {statement} (example {example}{silent})", fontsize=9)
    fig.tight_layout()
    return fig


DRAWINGS = {"lens_grid": _lens, "patterns": _patterns, "head_score_grid": _head_scores,  # ResultKind.figure
            "feature_activations": _features}
