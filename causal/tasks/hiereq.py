"""Hierarchical equality (Geiger et al., DAS, 2023): is (a == b) the same as (c == d)?

The high-level causal model has two intermediate variables, WX = (a == b) and YZ = (c == d),
and the output O = (WX == YZ). Swapping a variable from a source input into a base input changes
the output as the high-level model says: with WX from the source, O = (source.WX == base.YZ).
Those counterfactual outputs are the label columns an alignment is trained and scored on.

Each input draws WX and YZ as fair coins and then four shapes that satisfy them, so half of all
pairs change their output when a variable is swapped: an intervention that does nothing scores
0.5 interchange accuracy, the chance level.
"""
from __future__ import annotations

import random

from causal.data.examples import Examples
from causal.data.load import register_generator
from causal.data.params import Count, Seed

SHAPES = [chr(ord("A") + i) for i in range(10)]  # the shape tokens: "A" .. "J"
ANSWERS = {True: " true", False: " false"}
VARIABLES = ("wx", "yz")  # the high-level model's intermediate variables, in input order


def draw(rng: random.Random) -> tuple[list[str], dict[str, bool]]:
    """Four shapes and the two equalities they satisfy."""
    values = {v: rng.random() < 0.5 for v in VARIABLES}
    shapes = []
    for variable in VARIABLES:
        first = rng.choice(SHAPES)
        second = first if values[variable] else rng.choice([s for s in SHAPES if s != first])
        shapes += [first, second]
    return shapes, values


def output(values: dict[str, bool]) -> bool:
    """The high-level model's output: whether the two equalities agree."""
    return values["wx"] == values["yz"]


def prompt(shapes: list[str]) -> str:
    return " ".join(shapes) + " ="


@register_generator
def hiereq(tokenizer, n: Count = 256, seed: Seed = 0) -> Examples:
    """Base/source pairs of the hierarchical-equality task, with the high-level model's labels.

    Columns: `base`, `source` ("A A C D =": four shapes and '='), `label` and `source_label`
    (" true" or " false", each input's own output), `negated` (the answer the base's is not: a target
    for `reft`, which must learn to flip the model's answer), and per variable V in wx, yz: `cf_V`, the
    output of the base with V taken from the source, and `V_changes` ("yes"/"no": whether that
    swap changes the base's output).
    """
    rng = random.Random(seed)
    columns: dict[str, list] = {name: [] for name in ("base", "source", "label", "source_label", "negated")}
    for variable in VARIABLES:
        columns[f"cf_{variable}"], columns[f"{variable}_changes"] = [], []
    for _ in range(n):
        (base, base_values), (source, source_values) = draw(rng), draw(rng)
        columns["base"].append(prompt(base))
        columns["source"].append(prompt(source))
        columns["label"].append(ANSWERS[output(base_values)])
        columns["source_label"].append(ANSWERS[output(source_values)])
        columns["negated"].append(ANSWERS[not output(base_values)])
        for variable in VARIABLES:
            swapped = output({**base_values, variable: source_values[variable]})
            columns[f"cf_{variable}"].append(ANSWERS[swapped])
            columns[f"{variable}_changes"].append("yes" if swapped != output(base_values) else "no")
    return Examples(columns)
