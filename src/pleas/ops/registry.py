"""The table of op handlers: one function per module type, torch function, ATen op or tensor method.

A handler receives an :class:`~pleas.ops.context.OpContext` for one captured node and returns what the
node's value carries: :class:`~pleas.groups.units.Units` (which entries hold which hidden units), a
:class:`~pleas.ops.context.ParamRef` (a parameter used as a tensor), ``None`` (a value without units), or
a tuple of these. Through the context it also declares everything else pleas needs of the op: which
parameter axes index units (permutation groups), the op as a linear map of its input (least-squares
refit), norm statistics to reset, and its cost in multiply-adds. Stages read those declarations; none
keeps its own list of layer types. Module handlers may also carry a ``resize`` that updates a module's
size attributes after its tensors were replaced by tensors of other widths.
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
#: Resizers of module types whose calls the capture does not keep as one node (torch.export inlines
#: every module): looked up by type when a model is rebuilt at other widths.
RESIZERS: dict[type, Resizer] = {}


def register_module_handler(module_type: type, trace: Handler, resize: Resizer | None = None) -> None:
    """Register how to handle (and optionally resize) a module type.

    Under torch.fx, modules of a registered type are leaves of the capture: their ``forward`` is not
    traced into, so code that torch.fx cannot trace can be wrapped in a module with a handler. ``trace``
    receives an ``OpContext`` and returns the output's units (see the built-in handlers in
    ``pleas.ops`` for examples). ``resize(module)`` is called on a rebuilt model whose tensors now have
    other widths, to update attributes such as ``in_features``.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    MODULE_HANDLERS[module_type] = ModuleHandler(trace, resize)
    if resize is not None:
        RESIZERS[module_type] = resize


def register_function_handler(function: Any, trace: Handler) -> None:
    """Register a handler for a free function (``torch.flatten``) or an ATen op (``torch.ops.aten.mm``;
    an op packet covers all of its overloads)."""
    FUNCTION_HANDLERS[function] = trace


def register_method_handler(name: str, trace: Handler) -> None:
    """Register a handler for a tensor method called in ``forward`` (e.g. ``"view"``)."""
    METHOD_HANDLERS[name] = trace


def register_resizer(module_type: type, resize: Resizer) -> None:
    """Register how a module type updates its size attributes after its tensors changed width."""
    RESIZERS[module_type] = resize


def module_handler(*types: type, resize: Resizer | None = None):
    """Decorator form of :func:`register_module_handler` for several types at once."""

    def wrap(fn: Handler) -> Handler:
        for t in types:
            register_module_handler(t, fn, resize)
        return fn

    return wrap


def function_handler(*functions: Any, methods: tuple[str, ...] = ()):
    """Decorator registering one handler for several functions, ATen ops and tensor-method names."""

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


def find_function_handler(target: Any) -> Handler | None:
    """The handler of a called function or ATen op (an overload falls back to its op packet)."""
    handler = FUNCTION_HANDLERS.get(target)
    if handler is None and hasattr(target, "overloadpacket"):
        handler = FUNCTION_HANDLERS.get(target.overloadpacket)
    return handler


def find_resizer(module: nn.Module) -> Resizer | None:
    """The ``resize`` of the nearest registered class in ``type(module)``'s MRO.

    Unlike tracing, resizing only depends on the attributes a class inherits, so a subclass with its
    own ``forward`` (timm's ``BatchNormAct2d``) still uses its base class's resize.
    """
    for base in type(module).__mro__:
        if base in RESIZERS:
            return RESIZERS[base]
    return None
