"""Synthetic routing with planted locality, for benchmarks and tests.

Each sample belongs to a domain; each domain prefers its own random subset of experts in every
layer. A route goes to a preferred expert with probability `locality`, else to any expert.
"""

from __future__ import annotations

import numpy as np


def planted_counts(
    rng: np.random.Generator,
    samples: int,
    experts: int,
    *,
    layers: int = 2,
    tokens: int = 1024,
    top_k: int = 2,
    domains: int = 4,
    locality: float = 0.5,
) -> np.ndarray:
    """[layers, samples, experts] int64 route counts; each sample has tokens * top_k routes
    per layer."""
    if not 0.0 <= locality <= 1.0:
        raise ValueError(f"locality must be in [0, 1], got {locality!r}")
    domain = rng.integers(0, domains, size=samples)
    pref = max(1, experts // domains)
    out = np.empty((layers, samples, experts), dtype=np.int64)
    for layer in range(layers):
        probs = np.full((domains, experts), (1.0 - locality) / experts)
        for d in range(domains):
            probs[d, rng.choice(experts, size=pref, replace=False)] += locality / pref
        for i in range(samples):
            out[layer, i] = rng.multinomial(tokens * top_k, probs[domain[i]])
    return out
