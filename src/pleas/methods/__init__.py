"""Merging methods, one module each, registered by name: compositions of the stages in
:mod:`pleas.methods.stages`, each with its options declared next to its code."""
from . import average, ensemble, pleas, rebasin, regmean, task_arithmetic, ties, zipit  # noqa: F401  (registration)
from .options import Option
from .registry import METHODS, Method, Outcome, describe_methods, get_method, register_method

__all__ = ["METHODS", "Method", "Option", "Outcome", "describe_methods", "get_method", "register_method"]
