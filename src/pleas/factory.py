"""Resolve an architecture name to a freshly built model (no weights are ever downloaded)."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .errors import MergeInputError


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name`` with random weights.

    ``name`` is ``"module.path:factory"`` (any importable callable), ``"torchvision:resnet18"``,
    ``"timm:resnet18"``, ``"pleas:resnet20"`` (the small models of :mod:`pleas.models`), or a bare
    name looked up in that order: pleas, torchvision, timm. ``kwargs`` go to the factory.
    """
    if ":" in name:
        source, _, attr = name.partition(":")
        if source == "torchvision":
            return _torchvision(attr, kwargs)
        if source == "timm":
            return _timm(attr, kwargs)
        if source == "pleas":
            return _pleas(attr, kwargs)
        try:
            factory = getattr(importlib.import_module(source), attr)
        except (ImportError, AttributeError) as exc:
            raise MergeInputError(f"cannot import architecture factory {name!r}: {exc}") from exc
        return factory(**kwargs)
    for build in (_pleas, _torchvision, _timm):
        try:
            return build(name, kwargs)
        except LookupError:
            continue
    raise MergeInputError(
        f"unknown architecture {name!r}: not a pleas, torchvision or timm model name; "
        "use 'module.path:factory' for your own"
    )


def _pleas(name: str, kwargs: dict) -> nn.Module:
    from . import models as architectures

    factory = getattr(architectures, name, None)
    if name.startswith("_") or not callable(factory) or name == "create":
        raise LookupError(name)
    return factory(**kwargs)


def _torchvision(name: str, kwargs: dict) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise LookupError(name) from exc
    if name not in torchvision.models.list_models():
        raise LookupError(name)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _timm(name: str, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise LookupError(name) from exc
    if not timm.is_model(name):
        raise LookupError(name)
    return timm.create_model(name, pretrained=False, **kwargs)
