"""The table of op handlers: one small function per module type, torch function, or tensor method.

A handler receives a :class:`~pleas.graph.trace.TraceContext` for one traced node and returns the
:class:`~pleas.graph.axes.Features` of the node's output (or ``None`` for a value that carries no units).
Module handlers may also carry a ``resize`` function that updates a module's size attributes after its
tensors were replaced by tensors of other widths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

Handler = Callable[[Any], Any]
Resizer = Callable[[nn.Module], None]


@dataclass(frozen=True)
class ModuleHandler:
    trace: Handler
    resize: Resizer | None = None


MODULE_HANDLERS: dict[type, ModuleHandler] = {}
FUNCTION_HANDLERS: dict[Any, Handler] = {}
METHOD_HANDLERS: dict[str, Handler] = {}


def register_module_handler(module_type: type, trace: Handler, resize: Resizer | None = None) -> None:
    """Register how to trace (and optionally resize) a module type.

    Modules of a registered type are treated as leaves by the tracer: their ``forward`` is not traced
    into, so code that torch.fx cannot trace can be wrapped in a module with a handler. ``trace``
    receives a ``TraceContext`` and returns the output's ``Features`` (see the built-in handlers in
    ``pleas.graph.ops_*`` for examples). ``resize(module)`` is called on a rebuilt model whose tensors
    now have other widths, to update attributes such as ``in_features``.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    MODULE_HANDLERS[module_type] = ModuleHandler(trace, resize)


def register_function_handler(function: Any, trace: Handler) -> None:
    """Register a handler for a free function called in ``forward`` (e.g. ``torch.flatten``)."""
    FUNCTION_HANDLERS[function] = trace


def register_method_handler(name: str, trace: Handler) -> None:
    """Register a handler for a tensor method called in ``forward`` (e.g. ``"view"``)."""
    METHOD_HANDLERS[name] = trace


def module_handler(*types: type, resize: Resizer | None = None):
    """Decorator form of :func:`register_module_handler` for several types at once."""

    def wrap(fn: Handler) -> Handler:
        for t in types:
            register_module_handler(t, fn, resize)
        return fn

    return wrap


def function_handler(*functions: Any, methods: tuple[str, ...] = ()):
    """Decorator registering one handler for several functions and tensor-method names."""

    def wrap(fn: Handler) -> Handler:
        for f in functions:
            register_function_handler(f, fn)
        for name in methods:
            register_method_handler(name, fn)
        return fn

    return wrap


def find_module_handler(module: nn.Module) -> ModuleHandler | None:
    """The handler of ``type(module)``, or of a registered base class whose ``forward`` it keeps.

    A subclass that overrides ``forward`` may compute something else, so it does not inherit the
    handler: it is traced into instead (or fails with an error naming it).
    """
    cls = type(module)
    if cls in MODULE_HANDLERS:
        return MODULE_HANDLERS[cls]
    for base in cls.__mro__[1:]:
        if base in MODULE_HANDLERS and cls.forward is base.forward:
            return MODULE_HANDLERS[base]
    return None


def find_resizer(module: nn.Module) -> Resizer | None:
    """The ``resize`` of the nearest registered class in ``type(module)``'s MRO.

    Unlike tracing, resizing only depends on the attributes a class inherits, so a subclass with its
    own ``forward`` (timm's ``BatchNormAct2d``) still uses its base class's resize.
    """
    for base in type(module).__mro__:
        handler = MODULE_HANDLERS.get(base)
        if handler is not None and handler.resize is not None:
            return handler.resize
    return None
