"""Merging methods, one module each, registered by name."""
from . import average, ensemble, pleas, rebasin, regmean, task_arithmetic, ties, zipit  # noqa: F401  (registration)
from .registry import METHODS, MergeMethod, get_method, register_method

__all__ = ["METHODS", "MergeMethod", "get_method", "register_method"]
