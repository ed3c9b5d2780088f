"""Declared method options: name, type, allowed range or values, default, and what it does.

Each method lists its options next to its code (scikit-learn's ``_parameter_constraints``, mergekit's
declared method parameters); they are validated once, when the method is configured, and an unknown or
misspelled name gets the list of the ones the method takes.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import MergeInputError

_MISSING = object()


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` is float, int, bool, str, or "any" (checked by ``check``); ``low``/``high``
    bound numbers (``low_open`` excludes ``low``, ``high_open`` excludes ``high``); ``choices`` lists allowed values."""

    name: str
    kind: Any
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    check: Callable[[Any], Any] | None = None
    allowed_text: str | None = None

    def allowed(self) -> str:
        if self.allowed_text is not None:
            return self.allowed_text
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind in (int, float):
            what = "an integer" if self.kind is int else "a number"
            lo = "" if self.low is None else f" {'>' if self.low_open else '>='} {self.low:g}"
            hi = "" if self.high is None else f"{' and' if lo else ''} {'<' if self.high_open else '<='} {self.high:g}"
            return what + lo + hi
        if self.kind is bool:
            return "True or False"
        return self.doc

    def validate(self, method: str, value: Any) -> Any:
        """``value`` checked (and converted, int to float) or a MergeInputError naming what is allowed."""
        def bad() -> MergeInputError:
            return MergeInputError(f"method {method!r}: {self.name}={value!r}; allowed: {self.allowed()}")

        if self.check is not None:
            try:
                return self.check(value)
            except (TypeError, ValueError) as exc:
                raise MergeInputError(f"method {method!r}: {self.name}={value!r}: {exc}") from exc
        if value is None and self.default is None:
            return None
        if self.choices is not None:
            if value not in self.choices:
                raise bad()
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad()
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad()
            if self.kind is int and not (isinstance(value, int) or float(value).is_integer()):
                raise bad()
            value = self.kind(value)
            if not math.isfinite(value):
                raise bad()
            if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
                raise bad()
            if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
                raise bad()
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise bad()
            return value
        return value


def validate_options(method: str, declared: tuple[Option, ...], given: dict[str, Any]) -> dict[str, Any]:
    """Every declared option's value: the given one (validated) or its default."""
    names = {o.name: o for o in declared}
    unknown = [k for k in given if k not in names]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], names, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        allowed = ", ".join(sorted(names)) if names else "none"
        raise MergeInputError(f"method {method!r} has no option {unknown[0]!r}{suggestion}; its options: {allowed}")
    return {o.name: o.validate(method, given[o.name]) if o.name in given else o.default for o in declared}
