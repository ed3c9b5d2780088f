"""Stage 1, capture: a model becomes a :class:`Program` once per merge, and every later stage reads it.

:func:`capture` chooses the front-end: torch.fx where it can trace the model, torch.export where it
cannot (Hugging Face transformers, code with data-dependent Python). ``frontend="fx"`` or ``"export"``
forces one. A model no front-end can capture can still be merged from a hand-written spec
(:meth:`pleas.PermutationSpec.from_json`) with the state-dict transforms.
"""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..errors import UnsupportedOpError
from .frontends import capture_export, capture_fx
from .program import Program, Walk, as_call, fitting_batches

FRONTENDS = ("auto", "fx", "export")

#: How many captures this process has made (tests count them: a merge captures each source model once).
CAPTURES = {"count": 0}


def default_extra(model: nn.Module) -> dict:
    """Fixed keyword arguments for capturing and running ``model``: ``use_cache=False`` for models whose
    ``forward`` takes it (Hugging Face decoders), so no key-value cache is built or returned."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def capture(model: nn.Module, example: Any, *, frontend: str = "auto", extra: dict | None = None,
            copy_model: bool = False) -> Program:
    """Capture ``model`` on the example batch ``example`` (a tensor, a tuple, or a dict of keyword inputs).

    The model is put in eval mode (with ``copy_model``, a copy is; the caller's model is never changed
    then). ``extra`` are keyword arguments passed on every call (default: :func:`default_extra`).
    """
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend={frontend!r}; allowed: {FRONTENDS}")
    if copy_model or any(m.training for m in model.modules()):
        model = copy.deepcopy(model).eval() if copy_model else model.eval()
    extra = default_extra(model) if extra is None else dict(extra)
    CAPTURES["count"] += 1
    if frontend == "export":
        return capture_export(model, example, extra)
    try:
        return capture_fx(model, example, extra)
    except UnsupportedOpError as fx_error:
        if frontend == "fx":
            raise
        try:
            return capture_export(model, example, extra)
        except UnsupportedOpError as export_error:
            raise UnsupportedOpError(f"{fx_error}; and {export_error}") from export_error


__all__ = ["FRONTENDS", "Program", "Walk", "as_call", "capture", "default_extra", "fitting_batches"]
