"""Merging methods, registered by name."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from torch import nn

from ..errors import MergeInputError
from ..norms import reset_batchnorm_stats
from ..transform import GroupMap

if TYPE_CHECKING:
    from ..job import MergeJob

METHODS: dict[str, type["MergeMethod"]] = {}


class MergeMethod(ABC):
    """A merging method: ``plan`` chooses every group's map; ``finish`` post-processes the built model.

    ``max_budget`` bounds the sizes the method can produce (relative to one model; None: no bound
    of its own beyond the architecture's reachable range). ``uses_budget`` is False for methods of
    a fixed size.
    Variants are configured instances (options go to ``__init__``), not copies of the class.
    """

    name = ""
    max_budget: float | None = None
    uses_budget = True
    needs_base = False  # True: merges models fine-tuned from one shared base, given as the ``base`` option

    def __init__(self, **options):
        if options:
            raise MergeInputError(f"method {self.name!r} takes no options; got {sorted(options)}")

    @abstractmethod
    def plan(self, job: "MergeJob") -> dict[str, GroupMap]:
        """One map per group of ``job.spec``."""

    def finish(self, job: "MergeJob", model: nn.Module, maps: dict[str, GroupMap]) -> nn.Module:
        """Default: REPAIR-style BatchNorm statistics reset on the calibration data."""
        if job.reset_norms:
            reset_batchnorm_stats(model, job.data, progress=job.progress)
        return model


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make ``cls`` available to :func:`pleas.merge` as ``method=cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options) -> MergeMethod:
    """The method registered as ``name``, configured with ``options``."""
    if name not in METHODS:
        raise MergeInputError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name](**options)
