"""Rotating a group of units (the residual stream of an RMSNorm transformer) instead of permuting it.

A rotation R of a group's units is a symmetry when every op that touches them is linear in them or
invariant under rotations: linear maps (rows of a writer become R W, columns of a reader W R^T),
embeddings, residual adds and an RMSNorm *without* its weight (||R x|| = ||x||). An RMSNorm's weight
is a per-unit scale, which a rotation does not commute with, so it is first folded into the maps that
read the norm's output (their columns scaled by it) and set to one: the model computes the same
function and its norms no longer mind the basis.

LayerNorm subtracts the mean over the units, which a rotation does not keep: a group normalised by one
cannot be rotated in the same class of model (that would need the norm rewritten as an RMSNorm) and
:func:`rotatable` says so.
"""
from __future__ import annotations

import torch

from ..errors import MergeInputError
from ..groups.analysis import ModelGraph
from ..groups.spec import Group, PermutationSpec
from .maps import GroupMap
from .tied import _affine_before
from .transform import transform_state_dicts


def stream_group(spec: PermutationSpec, model: torch.nn.Module) -> Group:
    """The residual stream: the group that an input embedding writes."""
    embeddings = {f"{path}.weight" for path, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    for g in spec:
        if any(m.param in embeddings and m.role == "out" for m in g.members):
            return g
    raise MergeInputError("residual='orthogonal' needs a residual stream written by an nn.Embedding (a language "
                          "model); this model has none")


def norm_readers(graph: ModelGraph, group: Group, state: dict[str, torch.Tensor]) -> dict[str, list]:
    """Each per-unit scale on the group (a 1-D member that is not a bias) mapped to the linear maps that
    read its module's output. Raises MergeInputError where the group cannot be rotated: a norm with a
    bias (LayerNorm), a scale whose output is read by something other than linear maps."""
    program = graph.program
    scales = [m for m in group.members if state[m.param].dim() == 1 and m.role == "out"]
    writers = {layer.bias for layer in graph.layers if layer.bias}
    readers: dict[str, list] = {}
    for m in scales:
        if m.param in writers:
            continue  # a linear map's bias: rotated with its rows
        path = m.param.rsplit(".", 1)[0]
        if f"{path}.bias" in state:
            raise MergeInputError(
                f"residual='orthogonal': {path} is a LayerNorm (it has a bias and subtracts the mean over the units), "
                "which no rotation of the stream commutes with; use residual='permutation' for this model")
        readers[m.param] = []
    for layer in graph.layers:
        node = _affine_before(program, program.node(layer.in_node))
        path = program.owner.get(node.name, "")
        if f"{path}.weight" in readers:
            readers[f"{path}.weight"].append(layer)
    for key, layers in readers.items():
        if not layers:
            raise MergeInputError(f"residual='orthogonal': the output of {key.rsplit('.', 1)[0]} is not read by linear "
                                  "maps alone, so its weight cannot be folded away")
    return readers


def fold_norm_weights(readers: dict[str, list], spec: PermutationSpec, state: dict[str, torch.Tensor]) -> None:
    """Scale the columns of each norm's readers by its weight and set the weight to one (in ``state``)."""
    for key, layers in readers.items():
        scale = state[key].double()
        for layer in layers:
            if spec.aliases.get(layer.weight) or layer.weight in spec.aliases.values():
                raise MergeInputError(f"residual='orthogonal': {layer.weight} is tied to another tensor, so the weight "
                                      f"of {key.rsplit('.', 1)[0]} cannot be folded into it alone")
            w = state[layer.weight]
            axis = 0 if layer.transposed else 1
            shape = [1] * w.dim()
            shape[axis] = -1
            state[layer.weight] = (w.double() * scale.reshape(shape)).to(w.dtype)
        state[key] = torch.ones_like(state[key])


def rotate_group(spec: PermutationSpec, group: Group, rotation: torch.Tensor, state: dict[str, torch.Tensor],
                 unit_scales: list[str]) -> dict[str, torch.Tensor]:
    """``state`` with the group's units rotated (unit i becomes sum_j rotation[i, j] unit j); the per-unit
    scales ``unit_scales`` (already folded to ones) stay ones."""
    rotation = rotation.double()
    out = transform_state_dicts(spec, [state], {group.name: GroupMap(rotation, rotation.T.contiguous())}, target=spec)
    for key in unit_scales:
        out[key] = torch.ones_like(state[key])
    return out
