"""``regmean``: RegMean (Jin et al., ICLR 2023), as published: every linear map (a Linear; a convolution as
a linear map of its unfolded patches) merged in closed form as

    W = (sum_i G~_i)^-1  sum_i G~_i W_i,        G_i = X_i^T X_i,   G~_i = alpha G_i + (1 - alpha) diag(G_i),

with X_i the layer's inputs *inside model i itself*, on model i's own data (``pleas.per_model(data_a,
data_b)``, or one shared set), and W_i stored (in, out); ``alpha`` scales the Grams' off-diagonal entries.
Every other tensor is averaged, biases included (RegMean merges the weights of linear layers only), and
units are paired by index: RegMean aligns nothing. With ``reset_norms`` (pleas' default for every method)
BatchNorm statistics are then recomputed on the calibration data, as for the other baselines here.

A weight used by several calls, and separate heads (stacked, not merged), are left as averaged/built. The
Grams are estimated from a seeded sample of max(4 P, 4096) input rows per layer (conv positions), the
same sampler the PLeaS refit uses, instead of every position.
"""
from __future__ import annotations

from collections import Counter

import torch

from ..matching import Matching
from ..refit.layers import row_limit
from ..statistics import gram, source_pass
from . import stages
from .options import Option
from .registry import Method, Outcome, register_method


class GramObserver:
    """Sums X^T X of the inputs of every linear map of one model, over seeded samples of each batch."""

    def __init__(self, layers: list, params: dict, n_batches: int, seed: int):
        self.layers = layers
        self.nodes = sorted({layer.in_node for layer in layers} | {layer.out_node for layer in layers})
        self.columns = {layer.weight: layer.columns(params) - (layer.bias is not None) for layer in layers}
        self.grams = {w: torch.zeros(p, p, dtype=torch.float64) for w, p in self.columns.items()}
        self.limits = {w: row_limit(p, 4, 4096, n_batches) for w, p in self.columns.items()}
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, taps: list[dict]) -> None:
        t = taps[0]
        for layer in self.layers:
            pick = layer.pick(tuple(t[layer.out_node].shape), self.limits[layer.weight], self.gen)
            self.grams[layer.weight] += gram(layer.input_rows(t[layer.in_node], pick).float())


def regmean_weight(grams: list[torch.Tensor], weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """(out, in): W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T for weights W_i (out, in) and Grams G_i (in, in)."""
    tilde = [alpha * g + (1 - alpha) * torch.diag(g.diagonal()) for g in grams]
    lhs = sum(tilde)
    rhs = sum(t @ w.T for t, w in zip(tilde, weights))
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol).T
    return torch.linalg.lstsq(lhs, rhs).solution.T  # columns no sample reached: least-norm solution


@register_method
class RegMean(Method):
    name = "regmean"
    summary = "RegMean: each linear map merged in closed form from each model's own input Grams; no alignment"
    options = (Option("alpha", float, 0.9, "scale of the Grams' off-diagonal entries (1: the plain closed form)",
                      low=0.0, high=1.0),)
    max_budget = 1.0

    def run(self, setup):
        counts = {g.name: g.width for g in setup.spec}
        built = stages.build(setup, stages.partial_maps(setup.spec, Matching.identity(setup.spec), counts))
        uses = Counter(layer.weight for layer in setup.graph.layers)
        layers = [layer for layer in setup.graph.layers if uses[layer.weight] == 1]
        sources = setup.state_dicts
        grams = []
        for i, program in enumerate(setup.programs):
            observer = GramObserver(layers, sources[i], len(setup.batches_of(i)), setup.seed + i)
            source_pass([program], setup.batches_of(i), [observer], progress=setup.progress,
                        desc=f"RegMean Grams of model {i}")
            grams.append(observer.grams)
        params = built.tensors(setup)
        merged = 0
        for layer in layers:
            if tuple(params[layer.weight].shape) != tuple(sources[0][layer.weight].shape):
                continue  # separate heads: stacked, not merged
            ws = [layer.matrix(sd)[:, : observer.columns[layer.weight]] for sd in sources]
            w = regmean_weight([g[layer.weight] for g in grams], ws, self.opts["alpha"])
            current = layer.matrix(params)
            current[:, : w.shape[1]] = w
            layer.set_matrix(params, current)
            merged += 1
        stages.reset_norms(setup, built)
        return Outcome(stages.finished(setup, built), built, {"regmean_layers": merged})
