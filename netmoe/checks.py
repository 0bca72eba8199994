"""Argument checks every package shares; pure Python and numpy, so the client needs nothing of
the server's (OR-Tools) to use them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """value as an int, or ValueError naming name and value unless it is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        kind = "a positive" if minimum == 1 else f"an integer >= {minimum},"
        raise ValueError(f"{name} must be {kind} integer, got {value!r}")
    return int(value)


def shown(values: Sequence[object], limit: int = 8) -> str:
    """A list for an error message, capped: at most ``limit`` values, then "..." and how many
    there are, so an error or a plan never echoes an unbounded request field back."""
    if len(values) <= limit:
        return str(list(values))
    head = ", ".join(str(v) for v in values[:limit])
    return f"[{head}, ...] ({len(values)} values)"
