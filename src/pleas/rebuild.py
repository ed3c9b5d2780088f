"""Build a working ``nn.Module`` from a state dict whose group widths differ from the template's."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import SpecError
from .graph.registry import find_resizer


def build_model(template: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``template`` holding ``state_dict``, with module size attributes updated to match.

    Every entry of the template's state dict must be present. Modules whose tensors change shape get
    their size attributes (``in_features``, ``out_channels``, ``num_features``, ``normalized_shape``,
    ...) updated by their handler's ``resize``. The template is not modified.
    """
    expected = set(template.state_dict())
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise SpecError(
            f"state dict does not fit {type(template).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model = copy.deepcopy(template)
    resized: dict[str, nn.Module] = {}
    for name, tensor in state_dict.items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        old = getattr(module, attr)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(_own(tensor), requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = _own(tensor)
        if tuple(old.shape) != tuple(tensor.shape):
            resized[path] = module
    for path, module in resized.items():
        resize = find_resizer(module)
        if resize is not None:
            try:
                resize(module)
            except ValueError as exc:
                raise SpecError(f"cannot resize module {path!r}: {exc}") from exc
    return model


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A private, contiguous copy (strided views from the transforms make convolutions slow)."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)
