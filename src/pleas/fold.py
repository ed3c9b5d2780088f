"""Fold BatchNorm layers into the convolution or Linear layer that feeds them."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .graph import trace_graph


def layer_norm_pairs(model: nn.Module) -> list[tuple[str, nn.Module, nn.modules.batchnorm._BatchNorm]]:
    """(name, layer, norm) for every BatchNorm of ``model`` (called once, with running statistics)
    whose only input is a Conv/Linear whose output nothing else reads: the pairs whose norm can be
    folded into, or its statistics rescaled with, the layer."""
    gm = trace_graph(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        layer, bn = modules[src.target], modules[node.target]
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or bn.running_var is None:
            continue
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) != 1:
            continue
        pairs.append((node.target, layer, bn))
    return pairs


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` in which every BatchNorm fed only by a Conv/Linear is folded into it.

    The layer's weight (and bias, if it has one) absorbs the eval-mode scale gamma / sigma; the
    BatchNorm keeps only the shift, as its bias (weight 1, mean 0, var 1 - eps), so the function,
    the architecture and the state-dict keys are unchanged. The layer's output is then the
    normalised pre-activation up to that shift. Returns the copy and the folded norm names.
    """
    model = copy.deepcopy(model).eval()
    folded = []
    for name, layer, bn in layer_norm_pairs(model):
        _fold(layer, bn)
        folded.append(name)
    return model, folded


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    if bn.weight is None:
        return  # no affine parameters to hold the shift
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    layer.weight.mul_(scale.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    if layer.bias is not None:
        layer.bias.mul_(scale)
    bn.bias.sub_(bn.running_mean * scale)
    bn.weight.fill_(1.0)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
