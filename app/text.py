"""Small formatting helpers for command output (counts, byte sizes, aligned tables)."""

from __future__ import annotations

from collections.abc import Sequence

_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")


def plural(count: int, word: str, many: str | None = None) -> str:
    """'1 step', '2 steps'; many is the plural when it is not word + 's'."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def human_bytes(count: float) -> str:
    """Binary units with three significant digits: '512 bytes', '10.8 MiB'."""
    value, unit = float(count), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    if unit == 0:
        return plural(int(count), "byte")
    return f"{value:.3g} {_UNITS[unit]}"


def table(head: Sequence[str], rows: Sequence[Sequence[object]], indent: int = 2,
          left: int = 1) -> list[str]:
    """Lines of a table whose columns are two spaces apart, the first ``left`` of them
    left-aligned (labels) and the others right-aligned under their headers (figures)."""
    cells = [[str(c) for c in row] for row in [head, *rows]]
    widths = [max(len(row[c]) for row in cells) for c in range(len(head))]
    return [" " * indent + "  ".join(
        cell.ljust(w) if c < left else cell.rjust(w)
        for c, (cell, w) in enumerate(zip(row, widths, strict=True))
    ).rstrip() for row in cells]
