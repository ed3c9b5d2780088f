"""Fold BatchNorm layers into the linear map that feeds them."""
from __future__ import annotations

import torch

from ..groups.analysis import ModelGraph


def norm_pairs(graph: ModelGraph) -> list[tuple]:
    """(linear map, norm) for every norm with running statistics whose only input is a linear map's output
    that nothing else reads: the pairs whose norm can be folded into the map."""
    maps = {layer.out_node: layer for layer in graph.layers}
    users = {n.name: len(n.users) for n in graph.program.nodes}
    pairs = []
    for norm in graph.norms:
        layer = maps.get(norm.in_node)
        if layer is not None and users[norm.in_node] == 1 and not layer.transposed:
            pairs.append((layer, norm))
    return pairs


def fold_batchnorm(graph: ModelGraph, params: dict) -> list[str]:
    """Fold every foldable norm of ``graph`` into its map, in place on ``params`` (the model's tensors).

    The map's weight (and bias, if it has one) absorbs the eval-mode scale gamma / sigma; the norm keeps
    only the shift, as its bias (weight 1, mean 0, var 1 - eps), so the function, the architecture and the
    state-dict keys are unchanged. The map's output is then the normalised pre-activation up to that
    shift. Returns the folded norms' names."""
    folded = []
    with torch.no_grad():
        for layer, norm in norm_pairs(graph):
            if norm.weight is None or norm.bias is None:
                continue  # no affine parameters to hold the shift
            gamma, beta = params[norm.weight], params[norm.bias]
            mean, var = params[norm.mean], params[norm.var]
            scale = gamma / torch.sqrt(var + norm.eps)
            w = params[layer.weight]
            w.mul_(scale.reshape(-1, *([1] * (w.dim() - 1))))
            if layer.bias is not None:
                params[layer.bias].mul_(scale)
            beta.sub_(mean * scale)
            gamma.fill_(1.0)
            mean.zero_()
            var.fill_(1.0 - norm.eps)
            folded.append(norm.name)
    return folded
