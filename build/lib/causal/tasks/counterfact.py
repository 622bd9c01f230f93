"""Factual recall prompts from CounterFact records (Meng et al. 2022, ROME).

A record's `requested_rewrite` holds a prompt with a `{}` for the subject, the subject,
the true target and the counterfactual one:
    {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is",
     "subject": "Danielle Darrieux", "target_true": {"str": "French"},
     "target_new": {"str": "English"}}, ...}
Other keys (paraphrase_prompts, neighborhood_prompts, ...) are ignored.
"""
from __future__ import annotations

from pathlib import Path

from causal.data.examples import Examples, read_records
from causal.data.load import register_generator
from causal.data.params import Count
from causal.errors import CausalError


@register_generator
def counterfact(tokenizer, path: Path, n: Count | None = None) -> Examples:
    """The first `n` records (all when n is not given) of a CounterFact JSON list or JSONL file.

    Columns: `clean` (the prompt with the subject filled in), `subject` (its text, to name
    its tokens), `target` and `target_new` (the true and the counterfactual object, with
    the leading space ROME adds so that they continue the prompt: " French").
    """
    records = read_records(path)
    if n is not None:
        records = records[:n]
    columns: dict[str, list] = {"clean": [], "subject": [], "target": [], "target_new": []}
    for index, (_, record) in enumerate(records):
        prompt, subject, target, target_new = (
            _field(record, keys, path, index) for keys in (
                ("requested_rewrite", "prompt"), ("requested_rewrite", "subject"),
                ("requested_rewrite", "target_true", "str"), ("requested_rewrite", "target_new", "str")))
        if prompt.count("{}") != 1:
            raise CausalError(f"{path}: record {index}: the prompt {prompt!r} must contain '{{}}' exactly once, "
                              f"where the subject goes")
        columns["clean"].append(prompt.replace("{}", subject))
        columns["subject"].append(subject)
        columns["target"].append(_with_leading_space(target))
        columns["target_new"].append(_with_leading_space(target_new))
    return Examples(columns)


def _field(record: dict, keys: tuple[str, ...], path: Path, index: int) -> str:
    """record[k1][k2]..., which must be non-empty text."""
    value = record
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise CausalError(f"{path}: record {index} has no key {'.'.join(keys[: depth + 1])!r}",
                              hint="CounterFact records look like {\"requested_rewrite\": {\"prompt\": "
                                   "\"{} is located in\", \"subject\": ..., \"target_true\": {\"str\": ...}, "
                                   "\"target_new\": {\"str\": ...}}}")
        value = value[key]
    if not isinstance(value, str) or not value.strip():
        raise CausalError(f"{path}: record {index}: {'.'.join(keys)!r} must be non-empty text, got {value!r}")
    return value


def _with_leading_space(target: str) -> str:
    return target if target[:1].isspace() else " " + target
