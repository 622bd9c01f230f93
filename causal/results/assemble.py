"""Raw metric tensors -> a labelled xr.Dataset (schema: docs/results.md).

One variable per intervention statement with dims named after what it swept (layer,
pos, head, ...) plus `example` (and `metric` when there are several); one baseline
variable per run the statements compare against; token strings and prompt texts as
coords; provenance in attrs; CF-style `long_name`/`units` on every variable and coordinate.
Per-example values are always kept.
"""
from __future__ import annotations

import math
import platform
from datetime import datetime, timezone

import numpy as np
import torch
import xarray as xr

from causal.engine.execute import RawResults
from causal.errors import CausalError
from causal.methods.kinds import BASELINE, kind_of
from causal.results.io import package_versions
from causal.values import Experiment


def assemble(experiment: Experiment, raw: RawResults, run_info: dict) -> xr.Dataset:
    effects, baselines = normalize(experiment, raw)
    names = metric_labels(experiment)
    several = len(names) > 1
    textual_pos = any(isinstance(v, str) for i in experiment.interventions for v in i.sweep.coords.get("pos", []))
    variables = [_variable_array(variable, effects[variable.name], names, several, textual_pos)
                 for variable in raw.variables]
    for stream, values in baselines.items():
        variables.append(_labelled(values.numpy(), ["example"], {}, names, several, stream,
                                   {"kind": BASELINE.kind, "prompts": stream}))
    dataset = xr.merge(variables, join="outer", combine_attrs="drop")
    if textual_pos:  # the union of the statements' positions, in the order they are written
        dataset = dataset.reindex(pos=_position_order(experiment))
    for variable in variables:
        described = {} if "long_name" in variable.attrs else _described(experiment, variable.attrs, several)
        dataset[variable.name].attrs = {**variable.attrs, **described}
    dataset = dataset.assign_coords(example=np.arange(experiment.n_examples))
    if textual_pos:  # pos=-1 stays a number beside the names, so ds.sel(pos=-1) works
        dataset = dataset.assign_coords(pos=np.array([_number_or_name(p) for p in dataset["pos"].values], object))
    if "pos" in dataset.dims:
        dataset = dataset.assign_coords(_token_coords(experiment, dataset["pos"].values))
    dataset = dataset.assign_coords(_prompt_coords(experiment))
    if several:
        dataset = dataset.assign_coords(metric_units=("metric", [_units(m) for m in experiment.metrics]))
    _describe_coords(dataset)
    dataset.attrs.update(_provenance(experiment, names, run_info))
    return dataset


def _number_or_name(position: str):
    return int(position) if position.lstrip("-").isdigit() else str(position)


def _units(metric) -> str:
    return "1" if metric.normalization else metric.kind.units


def _described(experiment: Experiment, attrs: dict, several: bool) -> dict:
    """long_name and units, for readers (and tools) that know nothing of causal."""
    metric = "the metrics" if several else attrs["metric"]
    if kind_of(attrs).baseline:
        long_name = f"{metric} on the {attrs['prompts']} prompts, no intervention"
    else:
        long_name = f"{metric} under `{attrs.get('statement', '')}`"
    units = "see metric_units" if several else _units(experiment.metrics[0])
    return {"long_name": long_name, "units": units}


COORD_NAMES = {
    "layer": "layer (block index, 0-based)",
    "head": "attention head (query head index)",
    "kv_head": "key-value head (index into k and v)",
    "pos": "token position (from the start; negative: from each prompt's end; or a named position)",
    "key_pos": "attended key position (from the start)",
    "neuron": "MLP neuron",
    "feature": "SAE feature (index into the sparse autoencoder's latents)",
    "example": "example (row of the data)",
    "metric": "metric",
    "metric_units": "units of each metric",
}


def _describe_coords(dataset: xr.Dataset) -> None:
    for name in dataset.coords:
        column = name.split("_", 1)[1] if name.startswith(("token_", "prompt_")) else None
        if name.startswith("token_"):
            long_name = f"token of the {column} prompt at each position"
        elif name.startswith("prompt_"):
            long_name = f"the {column} prompt"
        else:
            long_name = COORD_NAMES.get(name, name)
        dataset[name].attrs["long_name"] = long_name
        if name in ("layer", "head", "kv_head", "pos", "key_pos", "neuron", "feature", "example"):
            dataset[name].attrs["units"] = "1"


def _prompt_coords(experiment: Experiment) -> dict:
    """`prompt_<column>` (example): each prompt as given (text, or its tokens joined where ids were given)."""
    coords = {}
    for column, prompts in experiment.prompts.items():
        texts = prompts.texts or [None] * len(prompts.tokens)
        coords[f"prompt_{column}"] = ("example", np.array(
            [text if text is not None else " ".join(tokens) for text, tokens in zip(texts, prompts.tokens)], str))
    return coords


def _position_order(experiment: Experiment) -> list[str]:
    """Positions in the order the statements first name them."""
    return [str(v) for v in dict.fromkeys(v for i in experiment.interventions for v in i.sweep.coords.get("pos", []))]


def metric_labels(experiment: Experiment) -> list[str]:
    return [m.name + (" normalized" if m.normalization else "") for m in experiment.metrics]


def normalize(experiment: Experiment, raw: RawResults):
    """Metrics declared `normalized`: (value - corrupt) / mean(clean - corrupt), per example.

    Dividing by the mean gap (not each example's) keeps single examples with a tiny gap
    from exploding; the mean over examples is the usual (patched - corrupt) / (clean - corrupt).
    """
    effects = {v.name: v.values.clone() if v.is_effect else v.values for v in raw.variables}
    baselines = {k: v.clone() for k, v in raw.baselines.items()}
    for m, metric in enumerate(experiment.metrics):
        if metric.normalization is None:
            continue
        clean = raw.baselines[metric.normalization.clean][:, m]
        corrupt = raw.baselines[metric.normalization.corrupt][:, m]
        gap = float(torch.nanmean(clean - corrupt))
        if gap == 0 or not math.isfinite(gap):  # zero by construction is refused in resolve; this is the data
            raise CausalError(f"metric {metric.name}: the normalization gap mean({metric.normalization.clean} - "
                              f"{metric.normalization.corrupt}) over {len(clean)} examples is {gap}, so normalized "
                              "values would be inf or NaN; drop `normalized by` or use data where the runs differ",
                              metric.normalization.span)
        for table in (*(effects[v.name] for v in raw.variables if v.is_effect), *baselines.values()):
            table[..., m] = (table[..., m] - corrupt) / gap
    return effects, baselines


def _variable_array(variable, values: torch.Tensor, names: list[str], several: bool,
                    textual_pos: bool) -> xr.DataArray:
    sweep = variable.sweep
    data = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    data = data.reshape(*sweep.shape, *data.shape[1:])
    coords = {d: [str(v) for v in c] if d == "pos" and textual_pos else list(c) for d, c in sweep.coords.items()}
    coords.update({d: list(c) for d, c in variable.coords.items()})
    attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in variable.attrs.items()}
    if "metric" not in variable.dims:  # not a metric value: the method describes it (long_name, units)
        attrs = {"long_name": f"under `{attrs.get('statement', '')}`", "units": "1", **attrs}
        return xr.DataArray(data, dims=[*sweep.dims, *variable.dims], coords=coords, name=variable.name, attrs=attrs)
    dims = [d for d in variable.dims if d != "metric"]
    if variable.dims[-1] != "metric":
        raise ValueError(f"variable {variable.name}: its metric dim must come last, not in {variable.dims}")
    return _labelled(data, [*sweep.dims, *dims], coords, names, several, variable.name, attrs)


def _labelled(data, dims, coords, names, several, name, attrs) -> xr.DataArray:
    if several:
        return xr.DataArray(data, dims=[*dims, "metric"], coords={**coords, "metric": names}, name=name, attrs=attrs)
    return xr.DataArray(data[..., 0], dims=dims, coords=coords, name=name, attrs={**attrs, "metric": names[0]})


def _token_coords(experiment: Experiment, positions: np.ndarray) -> dict:
    """`token_<column>` (example, pos): the token each example has at each labelled position."""
    coords = {}
    readable = _readable(experiment.model.tokenizer)
    for column, prompts in experiment.prompts.items():
        table = [[_token_at(experiment, [readable(t) for t in tokens], example, p) for p in positions]
                 for example, tokens in enumerate(prompts.tokens)]
        coords[f"token_{column}"] = (("example", "pos"), np.array(table, dtype=object).astype(str))
    return coords


def _readable(tokenizer):
    """'ĠMary' -> ' Mary': tokens as text, as the tokenizer would print them."""
    def show(token: str) -> str:
        try:
            return tokenizer.convert_tokens_to_string([token])
        except Exception:  # noqa: BLE001 -- a tokenizer that cannot: keep its own spelling
            return token
    return show


def _token_at(experiment: Experiment, tokens: list[str], example: int, position) -> str:
    if isinstance(position, str) and not position.lstrip("-").isdigit():
        indices = experiment.positions.indices[position][example]
        return " ".join(tokens[i] for i in indices if i < len(tokens))
    index = int(position)
    index = index if index >= 0 else len(tokens) + index
    return tokens[index] if 0 <= index < len(tokens) else ""


def _provenance(experiment: Experiment, names: list[str], run_info: dict) -> dict:
    model = experiment.model
    return {
        "Conventions": "CF-1.10",
        "title": f"{experiment.name}: causal interventions on {model.ref}",
        "source": f"causal {package_versions().get('causal', '')}",
        "experiment": experiment.name,
        "experiment_file": experiment.file.path,
        "experiment_text": experiment.file.text,
        "model": model.ref,
        "model_revision": model.revision,
        "model_class": type(model.model).__name__,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "metrics": names,
        "n_examples": experiment.n_examples,
        "params": {p.name: p.value for p in experiment.file.params},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": package_versions(),
        **run_info,
    }
