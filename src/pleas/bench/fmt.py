"""Number formats and Markdown tables of the benchmark report."""
from __future__ import annotations

from typing import Sequence

from .aggregate import Stat


def spread(stat: Stat | None, digits: int = 3) -> str:
    """``0.963 ± 0.004`` (mean ± sample std over seed pairs), ``0.963`` for one pair, ``-`` if missing."""
    if stat is None:
        return "-"
    if stat.n < 2:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def value(stat: Stat | None, digits: int = 2) -> str:
    """The mean alone, or ``-``."""
    return "-" if stat is None else f"{stat.mean:.{digits}f}"


def points(diff: float) -> str:
    """An accuracy difference in percentage points with its sign: ``+1.2`` / ``-0.4``."""
    return f"{100 * diff:+.1f}"


def percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def seconds(value: float) -> str:
    """Seconds: ``42 s``, ``4.2 s``, ``0.42 s``, ``0.042 s``."""
    for limit, digits in ((10, 0), (1, 1), (0.1, 2)):
        if value >= limit:
            return f"{value:.{digits}f} s"
    return f"{value:.3f} s"


def budget(b: float | None) -> str:
    return "-" if b is None else f"{b:g}x"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
