"""Mixing sources by weight into one deterministic order of records.

Each source is walked in a seeded random order (a new order each time it is used up, when the mix asks
for more than it holds). Sources are interleaved by largest deficit: at every step the source furthest
behind its share goes next, so any prefix of the mix, and hence every shard, holds the sources in
their proportions, not just the whole.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Pick:
    source: int  # index into the config's sources
    index: int  # record index within that source
    epoch: int  # how many times the source had been used up before this pick


def mix_size(sizes: list[int], weights: list[float]) -> int:
    """The largest mix in which no source repeats."""
    total = sum(weights)
    return int(min(n * total / w for n, w in zip(sizes, weights) if w > 0) + 1e-9)


def mix(sizes: list[int], weights: list[float], num_samples: int | None, seed: int) -> list[Pick]:
    if any(n == 0 for n in sizes):
        raise ValueError(f"a source has no records (sizes {sizes})")
    num = mix_size(sizes, weights) if num_samples is None else num_samples
    total = sum(weights)
    taken = [0] * len(sizes)
    orders: list[list[int]] = [[] for _ in sizes]
    picks = []
    for k in range(num):
        s = max(range(len(sizes)), key=lambda j: ((k + 1) * weights[j] / total - taken[j], -j))
        epoch, pos = divmod(taken[s], sizes[s])
        if pos == 0:
            orders[s] = list(range(sizes[s]))
            random.Random(f"{seed}:{s}:{epoch}").shuffle(orders[s])
        picks.append(Pick(s, orders[s][pos], epoch))
        taken[s] += 1
    return picks
