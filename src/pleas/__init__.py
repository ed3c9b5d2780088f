"""pleas: merge two neural networks trained from different initialisations into one model of any size
between 1x and 2x, with Permutations and Least Squares (PLeaS, CVPR 2025) and the methods it is
measured against."""
from .api import MergeResult, merge
from .errors import MergeInputError, PleasError, SpecError, UnsupportedOpError
from .graph import (
    build_spec,
    register_function_handler,
    register_method_handler,
    register_module_handler,
)
from .factory import create_model
from .rebuild import build_model
from .spec import Group, Member, PermutationSpec, Site
from .transform import GroupMap, duplication_map, permutation_map, permute_state_dict, transform_state_dicts

__version__ = "0.1.0"

__all__ = [
    "Group",
    "GroupMap",
    "MergeResult",
    "Member",
    "MergeInputError",
    "PermutationSpec",
    "PleasError",
    "Site",
    "SpecError",
    "UnsupportedOpError",
    "build_model",
    "build_spec",
    "create_model",
    "duplication_map",
    "merge",
    "permutation_map",
    "permute_state_dict",
    "register_function_handler",
    "register_method_handler",
    "register_module_handler",
    "transform_state_dicts",
]
