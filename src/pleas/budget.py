"""From a size budget to per-group merge counts k_g."""
from __future__ import annotations

from typing import Callable

from .errors import MergeInputError
from .spec import PermutationSpec


def uniform_merge_counts(
    spec: PermutationSpec, size: Callable[[dict[str, int]], int], target: float, *, steps: int = 50
) -> dict[str, int]:
    """One merge fraction f for every group (k_g = round(f * d_g)), the least merging whose dense
    size ``size(widths)`` is at most ``target``. ``size`` maps group widths (m_g = 2 d_g - k_g) to a
    parameter count; it decreases as f grows, so f is found by bisection."""

    def counts(f: float) -> dict[str, int]:
        return {g.name: round(f * g.width) for g in spec}

    def size_at(f: float) -> int:
        return size({g.name: 2 * g.width - k for g, k in zip(spec, counts(f).values())})

    if size_at(1.0) > target:
        raise MergeInputError(
            f"budget unreachable: merging every unit gives {size_at(1.0)} parameters, more than the {int(target)} asked"
        )
    if size_at(0.0) <= target:
        return counts(0.0)
    lo, hi = 0.0, 1.0  # size_at(lo) > target >= size_at(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if size_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return counts(hi)
