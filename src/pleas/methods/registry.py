"""Merging methods, one module each, registered by name; each a composition of stages with declared
options (:mod:`pleas.methods.stages`, :mod:`pleas.methods.options`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import MergeInputError
from .options import Option, validate_options

if TYPE_CHECKING:
    from ..setup import MergeSetup
    from .stages import Built

METHODS: dict[str, type["Method"]] = {}


@dataclass
class Outcome:
    """What a method returns: the merged model as the user gets it, the built network (``built``: maps
    and target layout), and entries for the report (``report``: the allocation used, refit fit errors)."""

    model: nn.Module
    built: "Built"
    report: dict[str, Any] = field(default_factory=dict)


class Method:
    """A merging method. ``options`` declares what it takes; a configured instance (``Method(**options)``)
    holds the validated values in ``self.opts``. ``run(setup)`` composes the stages.

    ``max_budget`` bounds the sizes the method can produce (relative to one model; None: no bound of its
    own beyond the architecture's reachable range). ``uses_budget`` is False for methods of a fixed size.
    ``needs_base`` is True for methods that merge models fine-tuned from one shared base (the ``base``
    option); ``shared_origin`` for those that assume one (unit i of every model is the same unit) without
    needing the base itself (Fisher averaging).
    """

    name = ""
    summary = ""
    options: tuple[Option, ...] = ()
    max_budget: float | None = None
    uses_budget = True
    needs_base = False
    shared_origin = False

    def __init__(self, **options: Any):
        self.opts = validate_options(self.name, self.options, options)

    def run(self, setup: "MergeSetup") -> Outcome:
        raise NotImplementedError


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to :func:`pleas.merge` as ``method=cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options: Any) -> Method:
    """The method registered as ``name``, configured with ``options``."""
    if not isinstance(name, str) or name not in METHODS:
        raise MergeInputError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name](**options)


def describe_methods() -> str:
    """Every registered method with its options (what ``pleas methods`` prints)."""
    lines = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        size = "fixed size" if not cls.uses_budget else (f"up to {cls.max_budget:g}x" if cls.max_budget else "1x and up")
        lines.append(f"{name} ({size}): {cls.summary}")
        for o in cls.options:
            lines.append(f"    {o.name} = {o.default!r}  [{o.allowed()}]  {o.doc}")
    return "\n".join(lines)
