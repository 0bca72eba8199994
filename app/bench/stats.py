"""Summaries of repeated timings that stay honest for few repeats."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Below this many values a 99th percentile is just the maximum under another name.
MIN_P99 = 100


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """{"median", "p99" (None for fewer than MIN_P99 values), "max", "n"} of values [n]."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no timings to summarize")
    p99 = float(np.percentile(arr, 99)) if arr.size >= MIN_P99 else None
    return {"median": float(np.median(arr)), "p99": p99, "max": float(arr.max()), "n": arr.size}


def tail(stats: dict[str, float | int | None], digits: int = 3) -> str:
    """'p99 1.234' with enough values, else 'max of 3: 1.234'."""
    if stats["p99"] is not None:
        return f"p99 {stats['p99']:.{digits}f}"
    return f"max of {stats['n']}: {stats['max']:.{digits}f}"
