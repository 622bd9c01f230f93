"""Sharded runs: one experiment's examples split into N parts that run as separate jobs, and merged back.

`shard=i/N` (0-based) takes the i-th of N contiguous ranges of examples, decided by the number of
examples and N alone, so every machine of a cluster draws the same boundaries. A shard still runs
the statistics (means, noise scales) and the unpatched base runs over every example, so what
depends on all examples (a mean ablation's means, a normalization's mean gap) is the same in each
shard; its jobs and its results cover its own examples only. `merge` puts the shards of one run
back together along `example` and refuses a set with a shard missing.

Cheap to import: no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from causal.errors import CausalError

SHARD_ATTR = "shard"  # on a shard's Dataset: "i/N"
MAX_SHARDS = 100_000
_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def examples(self, n: int) -> range:
        """Its examples among n: contiguous, sizes differing by at most one, the same on every machine."""
        return range(self.index * n // self.count, (self.index + 1) * n // self.count)

    def boundaries(self, n: int) -> list[int]:
        """Where every shard of the run starts, and n: chunks of examples never straddle them."""
        return [i * n // self.count for i in range(self.count)] + [n]


def problem(spec) -> str | None:
    """Why `shard=spec` is not a shard, or None (null: an unsharded run)."""
    if spec is None:
        return None
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if not match:
        return f"setting shard={spec!r} must be i/N, the i-th (from 0) of N shards, e.g. shard=0/4"
    index, count = int(match[1]), int(match[2])
    if not 1 <= count <= MAX_SHARDS:
        return f"setting shard={spec}: the number of shards must be in 1..{MAX_SHARDS}"
    if index >= count:
        return f"setting shard={spec}: shards are numbered 0..{count - 1}"
    return None


def parse(spec: str | None) -> Shard | None:
    reason = problem(spec)
    if reason:
        raise CausalError(reason)
    if spec is None:
        return None
    match = _SPEC.fullmatch(spec)
    return Shard(int(match[1]), int(match[2]))


def check_examples(shard: Shard | None, n: int) -> None:
    """A shard with no examples is a mistake in the sweep (more shards than examples), not an empty result."""
    if shard is not None and shard.count > n:  # some shard would have none, whichever this one is
        raise CausalError(f"setting shard={shard}: the experiment has {n} examples, too few for {shard.count} "
                          f"shards (some would have none); use at most {n} shards")


def own_part(dataset, shard: Shard | None):
    """A shard's Dataset: its examples only (the rest of the run's examples are other shards' results)."""
    if shard is None:
        return dataset
    part = dataset.isel(example=slice(*_ends(shard.examples(dataset.sizes["example"]))))
    part.attrs[SHARD_ATTR] = str(shard)
    return part


def _ends(examples: range) -> tuple[int, int]:
    return examples.start, examples.stop


def of(dataset) -> Shard | None:
    """The shard a Dataset holds, or None for a whole run."""
    return parse(dataset.attrs.get(SHARD_ATTR)) if dataset.attrs.get(SHARD_ATTR) else None


def merge(datasets: list, names: list[str] | None = None) -> list:
    """Runs of a sweep, with the shards of each run merged into one Dataset per run (unsharded runs as they are).

    The shards of one run are those whose overrides agree but for `shard`. `names` (each run's folder)
    label the error for a missing or doubled shard.
    """
    names = names or [f"run {i}" for i in range(len(datasets))]
    groups: dict[tuple, list[tuple[Shard, object, str]]] = {}
    out: list = []
    for dataset, name in zip(datasets, names):
        shard = of(dataset)
        if shard is None:
            out.append(dataset)
            continue
        others = tuple(sorted(o for o in dataset.attrs.get("overrides", []) if _key(o) != SHARD_ATTR))
        groups.setdefault(others, []).append((shard, dataset, name))
    swept = {o for others in groups for o in others if any(o not in group for group in groups)}
    for others, members in groups.items():
        out.append(_merged(tuple(o for o in others if o in swept), members))
    return out


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _merged(others: tuple, members: list):
    """One run from its shards; `others`: the overrides that tell this run from the sweep's other runs."""
    import xarray as xr

    counts = sorted({shard.count for shard, _, _ in members})
    where = f" of the run with {' '.join(others)}" if others else ""
    if len(counts) > 1:
        raise CausalError(f"the shards{where} split the examples differently ({' and '.join(f'N={c}' for c in counts)})"
                          f": {', '.join(f'{name} (shard={shard})' for shard, _, name in members)}")
    count = counts[0]
    by_index: dict[int, tuple] = {}
    for shard, dataset, name in members:
        if shard.index in by_index:
            raise CausalError(f"shard={shard}{where} is there twice: {by_index[shard.index][1]} and {name}")
        by_index[shard.index] = (dataset, name)
    missing = [f"shard={i}/{count}" for i in range(count) if i not in by_index]
    if missing:
        raise CausalError(f"{len(missing)} of {count} shards{where} missing: {', '.join(missing)} (no results "
                          f"beside {', '.join(name for _, name in by_index.values())}; run them again with the same "
                          "command: finished shards resume from checkpoints)")
    parts = [by_index[i][0] for i in range(count)]
    per_example = [name for name in parts[0].data_vars if "example" in parts[0][name].dims]
    merged = xr.concat(parts, dim="example", data_vars=per_example, coords="different", compat="equals",
                       join="outer", combine_attrs="drop_conflicts")
    attrs = dict(parts[0].attrs)
    attrs.pop(SHARD_ATTR, None)
    attrs["overrides"] = [o for o in attrs.get("overrides", []) if _key(o) != SHARD_ATTR]
    attrs["shards"] = count
    merged.attrs = attrs
    return merged
