"""Tracing models into permutation groups. Importing this package registers the built-in handlers."""
from . import ops_elementwise, ops_layers, ops_norm, ops_shape  # noqa: F401  (registration)
from .axes import Features, Segment
from .registry import (
    find_module_handler,
    register_function_handler,
    register_method_handler,
    register_module_handler,
)
from .trace import ParamRef, TraceContext, build_spec, trace_graph

__all__ = [
    "Features",
    "ParamRef",
    "Segment",
    "TraceContext",
    "build_spec",
    "find_module_handler",
    "register_function_handler",
    "register_method_handler",
    "register_module_handler",
    "trace_graph",
]
