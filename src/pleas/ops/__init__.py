"""Op handlers, one per op, in one table (:mod:`pleas.ops.registry`). Importing this package registers
the built-in ones: layers (Linear, Conv, Embedding), norms, elementwise ops, shape ops and attention."""
from . import attention, elementwise, layers, norms, shape  # noqa: F401  (registration)
from .context import OpContext, ParamRef
from .linear_maps import ConvMap, LinearMap, NormStats
from .registry import (
    find_module_handler,
    register_function_handler,
    register_method_handler,
    register_module_handler,
    register_resizer,
)

__all__ = [
    "ConvMap", "LinearMap", "NormStats", "OpContext", "ParamRef", "find_module_handler",
    "register_function_handler", "register_method_handler", "register_module_handler", "register_resizer",
]
