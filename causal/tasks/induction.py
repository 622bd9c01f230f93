"""Repeated random tokens: the second copy is predictable only by induction (Olsson et al. 2022)."""
from __future__ import annotations

from typing import Literal

import torch

from causal.data.examples import Examples
from causal.data.load import register_generator
from causal.data.params import Count, Seed


@register_generator
def induction(tokenizer, n: Count = 64, length: Count = 10, seed: Seed = 0,
              fresh: Literal["second", "first"] = "second") -> Examples:
    """BOS + random tokens repeated once (`clean`); `corrupt` replaces one half with fresh tokens.

    `fresh=second` (default) keeps the first half, so the corrupt prompt has nothing to
    repeat; `fresh=first` keeps the second half, so what changes is the earlier copy the
    induction heads look back at (their keys). Tokens are drawn from the vocabulary minus
    special tokens; BOS is prepended when the tokenizer has one, as induction models are
    trained with it.
    """
    gen = torch.Generator().manual_seed(seed)
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)] = False
    ordinary = keep.nonzero()[:, 0]
    first = ordinary[torch.randint(0, len(ordinary), (n, length), generator=gen)]
    other = ordinary[torch.randint(0, len(ordinary), (n, length), generator=gen)]
    prefix = [[tokenizer.bos_token_id]] * n if tokenizer.bos_token_id is not None else [[]] * n
    prefix = torch.tensor(prefix, dtype=torch.long).view(n, -1)
    return Examples({
        "clean": torch.cat([prefix, first, first], 1).tolist(),
        "corrupt": torch.cat([prefix, first, other] if fresh == "second" else [prefix, other, first], 1).tolist(),
    })
