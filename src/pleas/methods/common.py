"""Options shared by the methods that align and partially merge (``rebasin``, ``pleas``)."""
from __future__ import annotations

from ..errors import MergeInputError
from .options import Option
from .stages import ALLOCATIONS


def _counts(value):
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError("expected a dict {group name: number of merged pairs}")
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"merge_counts[{k!r}]={v!r} is not a non-negative integer")
    return dict(value)


ALIGN_OPTIONS = (
    Option("allocation", str, None, "how the budget is spread over groups (default: uniform for dense budgets, "
           "downstream for effective ones)", choices=(None, *ALLOCATIONS)),
    Option("merge_counts", dict, None, "k_g per group, given directly instead of an allocation", check=_counts,
           allowed_text="a dict {group name: merged pairs}"),
)


def check_effective(setup, what: str) -> None:
    if setup.effective_budget and setup.budget != 1.0:
        raise MergeInputError(what)
