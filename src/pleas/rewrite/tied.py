"""Output layers tied to the input embedding (GPT-2, BERT): one tensor, two roles, two rewrites.

The embedding *produces* the residual units, so its columns are merged with ``merge`` (a merged unit
averages its sources, a unit kept from one model copies it). The output layer *reads* them, so its
columns should be rewritten with ``unmerge`` and the models' logits averaged: a unit kept from one model
contributes its column divided by n. A tied tensor can hold only the first, so left alone the merged
model's logits count every kept unit n times over: at 2x, the two models side by side, it returns the
*sum* of the sources' logits instead of their average.

The two rewrites differ by a scale per unit, ``s_j = (models reading unit j) / n``, exactly (for every
map whose merge rows average what the unmerge columns read: permutations, partial merges, ZipIt!'s
clusters, the ensemble). :func:`fold_tied_output_scales` folds it into the per-unit affine (a LayerNorm's
or RMSNorm's weight and bias) that feeds the output layer and nothing else, so the tensor stays tied
and the model keeps its size.
"""
from __future__ import annotations

import torch

from ..groups.analysis import ModelGraph
from ..groups.spec import PermutationSpec
from .maps import GroupMap


def tied_output_scales(spec: PermutationSpec, target: PermutationSpec, maps: dict[str, GroupMap],
                       n: int, key: str, axis: int) -> torch.Tensor | None:
    """(length,) float64: per entry of axis ``axis`` of the tied tensor ``key`` in the merged layout, how
    much its unmerge rewrite (an output layer's) differs from the merge rewrite it got (an embedding's);
    None where the axis is in no group being rewritten."""
    tgt = {g.name: g for g in target.groups}
    for g, m in spec.members_of(key):
        if m.axis != axis or m.role != "out" or g.name not in maps or g.name not in tgt:
            continue
        gm = maps[g.name]
        _, j, _ = gm.entries("unmerge")
        reads = torch.bincount(j, minlength=gm.width).double()  # stacked units (so models, at most one each) reading unit j
        rows, _, values = gm.entries("merge")
        averaged = torch.zeros(gm.width, dtype=torch.float64).index_add_(0, rows, values.double())  # 1 where a new unit averages
        index = next(tm for tm in tgt[g.name].members if tm.param == m.param and tm.axis == m.axis).index
        scale = torch.ones(int(index.max()) + 1, dtype=torch.float64)
        scale[index.reshape(-1)] = (reads / (n * averaged)).repeat_interleave(index.shape[1])
        return scale
    return None


def fold_tied_output_scales(graph: ModelGraph, spec: PermutationSpec, target: PermutationSpec,
                            maps: dict[str, GroupMap], n: int, state: dict[str, torch.Tensor]) -> list[str]:
    """Scale the affine that feeds each tied output layer (in ``state``, in place) so that the merged
    model averages the sources' logits. Returns a note per tied output layer it could not fix (its input
    is not a per-unit affine used by it alone)."""
    program = graph.program
    problems = []
    for layer in graph.layers:
        key = spec.aliases.get(layer.weight, layer.weight)
        in_axis = 0 if layer.transposed else 1
        scale = tied_output_scales(spec, target, maps, n, key, in_axis)  # an embedding table read as a map
        if scale is None or bool((scale == 1).all()):
            continue
        node = _affine_before(program, program.node(layer.in_node))
        path = program.owner.get(node.name, "")
        weight, bias = f"{path}.weight", f"{path}.bias"
        if not path or len(node.users) != 1 or weight not in state or state[weight].shape != scale.shape:
            problems.append(f"the output layer {layer.name} shares its weight with the embedding {key} and its input "
                            f"{node.name} is not a per-unit affine feeding it alone: its logits add the kept units "
                            "of the models instead of averaging them")
            continue
        for k in (weight, bias):
            if k in state:
                state[k] = (state[k].double() * scale).to(state[k].dtype)
    return problems


#: Ops that pass the stream through unchanged in its units (a slice of the positions whose logits are
#: kept, a view, a copy); the affine that feeds an output layer may sit behind a few of them.
_PASS_THROUGH = ("slice", "select", "view", "reshape", "contiguous", "clone", "alias", "_to_copy", "dropout",
                 "getitem", "flatten")


def _affine_before(program, node):
    """The node behind ``node``'s chain of pass-through ops, each used by the next alone."""
    for _ in range(8):
        if node.op != "call_function" or not any(p in str(node.target) for p in _PASS_THROUGH):
            return node
        source = node.args[0] if node.args else None
        if not hasattr(source, "users") or len(source.users) != 1:
            return node
        node = source
    return node
