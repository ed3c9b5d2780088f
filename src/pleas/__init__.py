"""pleas: merge neural networks trained from different initialisations into one model of any size
between 1x and 2x, with Permutations and Least Squares (PLeaS, CVPR 2025) and the methods it is
measured against.

A merge runs in stages, each a package: :mod:`pleas.capture` (the model captured once), :mod:`pleas.groups`
(permutation groups, read off the capture by the op handlers of :mod:`pleas.ops`), :mod:`pleas.statistics`,
:mod:`pleas.matching`, :mod:`pleas.budget`, :mod:`pleas.rewrite` (maps, state-dict rewrite, rebuilt model),
:mod:`pleas.refit` and :mod:`pleas.norms`; :mod:`pleas.methods` composes them (docs/architecture.md).
"""
from .api import estimate_memory, merge
from .calibration import PerModel, per_model
from .capture import Program, capture
from .errors import MergeInputError, PleasError, SpecError, UnsupportedOpError
from .factory import create_model
from .groups import Group, Member, ModelGraph, PermutationSpec, Site, analyze
from .rewrite import (GroupMap, build_model, duplication_map, permutation_map, permute_state_dict,
                    transform_state_dicts)
from .rewrite.heads import ModelEnsemble, SeparateHeads
from .ops import register_function_handler, register_method_handler, register_module_handler, register_resizer
from .result import MergeResult
from .synthesis import synthesize
from .version import __version__


def build_spec(model, example_input, *, frontend: str = "auto") -> PermutationSpec:
    """The permutation groups of ``model`` (not modified): captured once on ``example_input`` (a tensor,
    a tuple, or a dict of keyword inputs) with torch.fx or, where it cannot trace, torch.export."""
    return analyze(capture(model, example_input, frontend=frontend, copy_model=True)).spec.require_groups()


__all__ = [
    "Group", "GroupMap", "Member", "MergeInputError", "MergeResult", "ModelEnsemble", "ModelGraph", "PerModel", "PermutationSpec",
    "PleasError",
    "Program", "SeparateHeads", "Site", "SpecError", "UnsupportedOpError", "__version__", "analyze", "build_model",
    "estimate_memory",
    "build_spec", "capture", "create_model", "duplication_map", "merge", "per_model", "permutation_map",
    "permute_state_dict",
    "register_function_handler", "register_method_handler", "register_module_handler", "register_resizer",
    "synthesize", "transform_state_dicts",
]
