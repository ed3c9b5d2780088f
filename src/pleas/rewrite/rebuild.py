"""Build a working ``nn.Module`` from a state dict whose group widths differ from the template's, and
find where a rewritten model's units sit by capturing it."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import SpecError
from ..groups.spec import PermutationSpec
from ..ops.registry import find_resizer
from . import views
from .layout import axis_length


def build_model(template: nn.Module, state_dict: dict[str, torch.Tensor], *, take: bool = False) -> nn.Module:
    """A copy of ``template`` holding ``state_dict``, with module size attributes updated to match.

    Every entry of the template's state dict must be present. Modules whose tensors change shape get
    their size attributes (``in_features``, ``out_channels``, ``num_features``, ``normalized_shape``,
    ...) updated by their type's resizer. Tied tensors stay tied. The template is not modified. A Hugging
    Face model at other widths is its class built from a config with those widths (:mod:`.hf`). With
    ``take``, contiguous tensors of ``state_dict`` are used as they are instead of copied (the caller
    hands them over: no second copy of the merged model exists while it is built).
    """
    from . import hf

    expected = set(template.state_dict())
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if hf.is_hf(template) and not missing and not unexpected and any(
            tuple(t.shape) != tuple(state_dict[k].shape) for k, t in template.state_dict().items()):
        return hf.rebuild(template, state_dict)  # its class builds every layer from the config
    if missing or unexpected:
        raise SpecError(
            f"state dict does not fit {type(template).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model = copy.deepcopy(template, _placeholders(template))  # every state-dict tensor is replaced below
    resized: dict[str, nn.Module] = {}
    placed: dict[int, torch.Tensor] = {}  # the template's tensor -> its replacement (tied tensors stay tied)
    originals = {name: t for name, t in template.state_dict(keep_vars=True).items()}
    for name, tensor in state_dict.items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        old = getattr(module, attr)
        key = id(originals[name])
        if key in placed:
            new = placed[key]
        elif attr in module._parameters:
            new = nn.Parameter(_own(tensor, take), requires_grad=old.requires_grad)
        else:
            new = _own(tensor, take)
        placed[key] = new
        if attr in module._parameters:
            module._parameters[attr] = new
        else:
            module._buffers[attr] = new
        if tuple(originals[name].shape) != tuple(tensor.shape):
            resized[path] = module
    for path, module in _with_parents(model, resized).items():
        resize = find_resizer(module)
        if resize is not None:
            try:
                resize(module)
            except ValueError as exc:
                raise SpecError(f"cannot resize module {path!r}: {exc}") from exc
    return model


def tensor_memo(model: nn.Module, stand_in) -> dict[int, torch.Tensor]:
    """A ``copy.deepcopy`` memo giving each state-dict tensor of ``model`` the tensor ``stand_in(t)``
    (wrapped in a new Parameter for a Parameter, with its ``requires_grad``; tied tensors share one): the
    copy gets the model's modules with these tensors in place of copies of its own."""
    memo: dict[int, torch.Tensor] = {}
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in memo:
            new = stand_in(t)
            memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return memo


def _placeholders(template: nn.Module) -> dict[int, torch.Tensor]:
    """Empty stand-ins of each tensor's dtype (:func:`tensor_memo`): the copy gets the template's modules
    without a second copy of its weights, all of which :func:`build_model` replaces."""
    return tensor_memo(template, lambda t: torch.empty(0, dtype=t.dtype, device=t.device))


def _with_parents(model: nn.Module, resized: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The resized modules and every module above them (a container may keep a width of its own: a
    vision transformer's hidden size), deepest first."""
    out = dict(resized)
    for path in list(resized):
        parts = path.split(".")
        for i in range(len(parts) - 1, -1, -1):
            parent = ".".join(parts[:i])
            out.setdefault(parent, model.get_submodule(parent))
    return dict(sorted(out.items(), key=lambda kv: -kv[0].count(".") - (kv[0] != "")))


def _own(tensor: torch.Tensor, take: bool = False) -> torch.Tensor:
    """A private, contiguous copy (strided views from the transforms make convolutions slow); with
    ``take``, a contiguous tensor itself."""
    if take and tensor.is_contiguous():
        return tensor.detach()
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def skeleton(template: nn.Module, spec: PermutationSpec, widths: dict[str, int]) -> nn.Module:
    """The template's architecture at new group widths, holding zeros."""
    state = {}
    for key, t in template.state_dict().items():
        source = spec.aliases.get(key, key)  # a tied tensor takes the shape of the one the spec describes
        shape = list(views.dense(spec, key, t).shape)
        for axis in range(len(shape)):
            shape[axis] = axis_length(spec, source, axis, shape[axis], widths)
        state[key] = torch.zeros(views.stored_numel(spec, key, tuple(shape)), dtype=t.dtype).reshape(
            _stored_shape(spec, key, tuple(shape)))
    return build_model(template, state)


def _stored_shape(spec: PermutationSpec, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    view = spec.views.get(key)
    if view is None:
        return shape
    return (shape[0], shape[1] // view[1], *shape[2:])


def target_spec(template: nn.Module, spec: PermutationSpec, widths: dict[str, int], example: Any) -> PermutationSpec:
    """Where the units of ``template`` at new widths sit, read off a capture of that architecture (for
    layouts :func:`~pleas.rewrite.layout.resized` cannot compute: interleaved groups). The groups must come
    back with the same names and the asked widths."""
    return target_graph(template, spec, widths, example).spec


def target_graph(template: nn.Module, spec: PermutationSpec, widths: dict[str, int], example: Any):
    """:func:`target_spec` with the whole analysis of the capture it reads the spec off (a
    :class:`~pleas.groups.ModelGraph`, whose program a model of those widths can run with its own tensors)."""
    from ..capture import capture
    from ..groups.analysis import analyze

    model = skeleton(template, spec, widths)
    graph = analyze(capture(model, example))
    found = graph.spec
    want = {g.name: widths.get(g.name, g.width) for g in spec.groups + spec.outputs}
    got = {g.name: g.width for g in found.groups + found.outputs}
    if want != got:
        diff = {k: (want.get(k), got.get(k)) for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)}
        raise SpecError(f"the architecture at the new widths has other groups than asked (asked, found): "
                        f"{dict(list(diff.items())[:5])}; its code ties some widths together")
    return graph
