"""Synthetic routing with planted locality, for benchmarks and tests.

Each sample belongs to a domain; each domain prefers its own random subset of experts in every
layer. A route goes to a preferred expert with probability `locality`, else to any expert.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def planted_counts(rng: np.random.Generator, samples: int, experts: int, **options: Any
                   ) -> np.ndarray:
    """[layers, samples, experts] int64 route counts, each sample with tokens * top_k routes per
    layer: the first round of planted_rounds (options: its keywords, with its defaults)."""
    return next(planted_rounds(rng, samples, experts, **options))


def planted_rounds(
    rng: np.random.Generator,
    samples: int,
    experts: int,
    *,
    layers: int = 2,
    tokens: int = 1024,
    top_k: int = 2,
    domains: int = 4,
    locality: float = 0.5,
) -> Iterator[np.ndarray]:
    """Endless rounds of planted_counts as a job's training steps are alike: every round's
    domains prefer the same experts (drawn once, in the first round), each round has new samples
    (new domains, new routes). The first round is planted_counts with the same rng."""
    if not 0.0 <= locality <= 1.0:
        raise ValueError(f"locality must be in [0, 1], got {locality!r}")
    pref = max(1, experts // domains)
    probs: list[np.ndarray] = []
    while True:
        domain = rng.integers(0, domains, size=samples)
        out = np.empty((layers, samples, experts), dtype=np.int64)
        for layer in range(layers):
            if len(probs) == layer:  # the first round draws each layer's preferences
                p = np.full((domains, experts), (1.0 - locality) / experts)
                for d in range(domains):
                    p[d, rng.choice(experts, size=pref, replace=False)] += locality / pref
                probs.append(p)
            for i in range(samples):
                out[layer, i] = rng.multinomial(tokens * top_k, probs[layer][domain[i]])
        yield out
