"""Random experiment files generated from the grammar itself (grammars/causal.lark), for fuzzing.

Unlike mutations of the example files, these reach every rule: each nonterminal is expanded by a
randomly chosen alternative (the shortest one once deep enough), and each terminal is sampled from
values that mean something to the resolver (site, dimension, column and metric names, edge-case
numbers) mixed with junk. Shared by tests/test_fuzz.py (fixed seed, time bound) and
scripts/fuzz.py (long runs that save new failures as test cases).
"""
from __future__ import annotations

import random
from functools import lru_cache

from lark.grammar import NonTerminal, Terminal

from causal.lang.parser import _parser

COLUMNS = ["clean", "corrupt", "io", "s", "subject", "other"]
SITES = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "embed", "z", "q", "k", "v", "pattern",
         "neuron"]
# What a NAME means where it stands (the rule it is in): mostly meaningful values, so the resolver is reached.
NAMES_BY_RULE = {
    "site": SITES, "selector": ["layer", "pos", "head", "kv_head", "key_pos", "neuron"], "source": COLUMNS, "base": COLUMNS,
    "on": COLUMNS, "over": COLUMNS, "normalized": COLUMNS, "position_expr": COLUMNS,
    "how": ["zero", "mean", "resample"], "names": ["mlp", "attn"], "position_def": ["A", "B", "END"],
    "index": ["A", "B", "END", "n"], "factor": ["alpha", "n"], "count": ["n"], "param_stmt": ["n", "alpha"],
    "kwarg": ["n", "length", "seed", "samples"], "data_stmt": ["induction", "ioi"],
    "metric_stmt": ["logprob", "logit_diff", "prob", "rank", "kl", "accuracy", "next", *COLUMNS],
}
JUNK = ["x", "_", "A1", "nope", "logits", "first", "layer", "mean", "next", "similarity"]
STRINGS = ['"data.jsonl"', '"zoo:attn-only-2l"', '"gpt_neox.layers.{layer}.attention"', '"gpt_neox.layers.{layer}"',
           '""', '"nope.jsonl"', '"data.csv"', '"{layer}"']
SMALL = ["0", "1", "2", "3", "-1", "-2"]
EXTREME = ["7", "11", "64", "-64", "2147483647", "2147483648", "-2147483648", "100000000000000000000"]
NUMBERS = ["0", "1", "-1", "0.5", "-2.5", "3", "1e999", "1e-320", "-0", "1e3"]
SAMPLERS = {
    "INT": [s for s in SMALL if not s.startswith("-")],
    "SIGNED_INT": SMALL,
    "SIGNED_NUMBER": NUMBERS,
    "POSITION_FN": ["first", "last", "span"],
    "NAME": JUNK,
    "STRING": STRINGS,
}
IGNORED = {"WS", "COMMENT"}


@lru_cache(maxsize=1)
def _grammar() -> tuple[dict[str, list[tuple]], dict[str, str]]:
    parser = _parser()
    rules: dict[str, list[tuple]] = {}
    for rule in parser.rules:
        rules.setdefault(rule.origin.name, []).append(tuple(rule.expansion))
    literals = {t.name: t.pattern.value for t in parser.terminals if type(t.pattern).__name__ == "PatternStr"}
    return rules, literals


def unsampled_terminals() -> set[str]:
    """Terminals of the grammar this generator cannot write (a new terminal needs a sampler above)."""
    _, literals = _grammar()
    return {t.name for t in _parser().terminals} - set(literals) - set(SAMPLERS) - IGNORED


@lru_cache(maxsize=1)
def _depths() -> dict[str, int]:
    """How deep each nonterminal must expand before only terminals remain (for cutting recursion short)."""
    rules, _ = _grammar()
    depth = {name: 10 ** 6 for name in rules}
    changed = True
    while changed:
        changed = False
        for name, expansions in rules.items():
            best = min(1 + max([depth.get(s.name, 0) if isinstance(s, NonTerminal) else 0 for s in e] or [0])
                       for e in expansions)
            if best < depth[name]:
                depth[name], changed = best, True
    return depth


HEADERS = ['model "zoo:attn-only-2l"\ndata "data.jsonl"\nparam n = 2\nparam alpha = 1.5',
           'model "zoo:attn-only-2l"\ndata induction(n=4, length=5, seed=0)\nparam n = 1\nparam alpha = -2.0']
INTERVENTIONS = ["patch_stmt", "ablate_stmt", "steer_stmt", "trace_stmt", "path_stmt", "attribute_stmt"]
STATEMENTS = ["statement", "positions_stmt", "param_stmt", "patch_stmt", "ablate_stmt", "steer_stmt", "trace_stmt",
              "path_stmt", "attribute_stmt", "metric_stmt"]


def generate(rng: random.Random, max_depth: int = 8) -> str:
    """A random experiment file. Mostly a valid header, a metric and a few random statements (so the
    resolver sees them), sometimes a whole file from `start` (so the structure checks do)."""
    if rng.random() < 0.15:
        body = derive(rng, "start", max_depth)
    else:
        statements = ["metric_stmt", rng.choice(INTERVENTIONS), *(rng.choice(STATEMENTS) for _ in range(rng.randint(0, 2)))]
        body = rng.choice(HEADERS) + "\n" + "\n".join(derive(rng, name, max_depth) for name in statements)
    if rng.random() < 0.2:  # a comment somewhere, sometimes with a line separator in it
        lines = body.split("\n")
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(["# note", "# a\u2028b", "# \f", "#"]))
        body = "\n".join(lines)
    return body + "\n"


def derive(rng: random.Random, start: str, max_depth: int) -> str:
    """Text derived from the nonterminal `start`: random alternatives, the shallowest past `max_depth`."""
    rules, literals = _grammar()
    depths = _depths()
    out: list[str] = []

    def deepest(expansion) -> int:
        return max([depths.get(s.name, 0) if isinstance(s, NonTerminal) else 0 for s in expansion] or [0])

    def expand(symbol, depth: int, parent: str = start) -> None:
        if isinstance(symbol, Terminal):
            out.append(terminal(rng, symbol.name, parent, literals))
            return
        options = rules[symbol.name]
        if symbol.name.startswith("__") and "star" in symbol.name and depth < max_depth:  # a repetition: short
            options = options[:1] if rng.random() < 0.6 else options
        if depth >= max_depth:
            least = min(deepest(e) for e in options)
            options = [e for e in options if deepest(e) <= least]
        expansion = rng.choice(options)
        if symbol.name.endswith("_stmt") and out:
            out.append("\n")
        for part in expansion:
            expand(part, depth + 1, parent if symbol.name.startswith("__") else symbol.name)

    expand(NonTerminal(start), 0)
    return " ".join(out).replace(" \n ", "\n").replace("\n ", "\n").strip(" ")


def terminal(rng: random.Random, name: str, parent: str, literals: dict[str, str]) -> str:
    """A keyword as itself; a NAME as what its rule expects (now and then junk); numbers small, now and then extreme."""
    if name in literals:
        return literals[name]
    if name == "NAME" and parent in NAMES_BY_RULE and rng.random() < 0.9:
        return rng.choice(NAMES_BY_RULE[parent])
    if name in ("INT", "SIGNED_INT") and rng.random() < 0.1:
        return rng.choice(EXTREME)
    return rng.choice(SAMPLERS[name])
