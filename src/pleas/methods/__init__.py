"""Merging methods, one module each, registered by name: compositions of the stages in
:mod:`pleas.methods.stages`, each with its options declared next to its code."""
from . import (adamerging, average, dare, ensemble, fisher, pleas, rebasin, regmean, task_arithmetic, ties,  # noqa: F401
               zipit)  # (registration)
from .options import Option
from .registry import METHODS, Method, Outcome, describe_methods, get_method, register_method

__all__ = ["METHODS", "Method", "Option", "Outcome", "describe_methods", "get_method", "register_method"]
