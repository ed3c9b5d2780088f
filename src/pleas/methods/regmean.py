"""``regmean``: RegMean (Jin et al., ICLR 2023), as published: every linear map (a Linear; a convolution as
a linear map of its unfolded patches) merged in closed form as

    W = (sum_i G~_i)^-1  sum_i G~_i W_i,        G_i = X_i^T X_i,   G~_i = alpha G_i + (1 - alpha) diag(G_i),

with X_i the layer's inputs *inside model i itself*, on model i's own data (``pleas.per_model(data_a,
data_b)``, or one shared set), and W_i stored (in, out); ``alpha`` scales the Grams' off-diagonal entries.
Every other tensor is averaged, biases included (RegMean merges the weights of linear layers only), and
units are paired by index: RegMean aligns nothing. Norm statistics are then set as for every other method
here (``norm_stats``).

A weight used by several calls, and separate heads (stacked, not merged), are left as averaged/built. The
Grams are estimated from a seeded sample of max(4 P, 4096) input rows per layer (conv positions), the
same sampler the PLeaS refit uses, instead of every position.
"""
from __future__ import annotations

from collections import Counter

import torch

from .. import distributed
from ..matching import Matching
from ..refit.layers import row_limit, working_dtype
from ..refit.solve import LayerStats
from ..statistics import source_pass
from . import stages
from .options import Option
from .registry import Method, Outcome, register_method


class GramObserver:
    """Sums X^T X of the inputs of every linear map of one model, over seeded samples of each batch
    (a convolution's kernel taps that only ever read padding are left out, and each block of rows is
    multiplied over the taps it reads: :class:`pleas.refit.LayerStats`)."""

    def __init__(self, layers: list, params: dict, n_batches: int, seed: int):
        self.layers = layers
        self.nodes = sorted({layer.in_node for layer in layers} | {layer.out_node for layer in layers})
        self.columns = {layer.weight: layer.columns(params) - (layer.bias is not None) for layer in layers}
        self.stats: dict[str, LayerStats] = {}
        self.limits = {w: row_limit(p, 4, 4096, n_batches) for w, p in self.columns.items()}
        self.seed = seed

    def update(self, taps: list[dict], index: int = 0) -> None:
        t = taps[0]
        gen = distributed.batch_generator(self.seed, index)
        for layer in self.layers:
            x = t[layer.in_node]
            p = self.columns[layer.weight]
            if layer.weight not in self.stats:
                index = layer.reachable_columns(tuple(x.shape), False)
                k = p if index is None else len(index)
                self.stats[layer.weight] = LayerStats(torch.zeros(k, k, dtype=torch.float64),
                                                      torch.zeros(k, 0, dtype=torch.float64), index=index, columns=p)
            pick = layer.pick(tuple(t[layer.out_node].shape), self.limits[layer.weight], gen)
            rows = working_dtype(layer.input_rows(x, pick))
            blocks = layer.row_blocks(tuple(x.unsqueeze(2).shape if x.dim() == 3 else x.shape), pick, False)
            self.stats[layer.weight].update(rows, rows.new_zeros(len(rows), 0), blocks)

    def reduce(self) -> None:
        """Sum the Grams over the ranks of a process group (:mod:`pleas.distributed`)."""
        for weight in sorted(self.stats):
            self.stats[weight].reduce()

    def gram(self, weight: str) -> torch.Tensor:
        """G over every column of the layer (columns no sample reached: zero)."""
        st = self.stats[weight]
        if st.index is None:
            return st.gram
        p = self.columns[weight]
        full = torch.zeros(p, p, dtype=torch.float64)
        full[st.index[:, None], st.index] = st.gram
        return full


def regmean_weight(grams: list[torch.Tensor], weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """(out, in): W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T for weights W_i (out, in) and Grams G_i (in, in).
    Input columns no sample reached (a kernel tap that only reads padding) have no data to weigh the
    models by: they keep the plain average."""
    tilde = [alpha * g + (1 - alpha) * torch.diag(g.diagonal()) for g in grams]
    lhs = sum(tilde)
    seen = (lhs.diagonal() > 0).nonzero().squeeze(1)
    out = sum(weights) / len(weights)
    if len(seen) == 0:
        return out
    lhs = lhs[seen[:, None], seen]
    rhs = sum(t[seen] @ w.T for t, w in zip(tilde, weights))
    chol, info = torch.linalg.cholesky_ex(lhs)
    solution = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.lstsq(lhs, rhs).solution
    out[:, seen] = solution.T
    return out


@register_method
class RegMean(Method):
    name = "regmean"
    summary = "RegMean: each linear map merged in closed form from each model's own input Grams; no alignment"
    options = (Option("alpha", float, 0.9, "scale of the Grams' off-diagonal entries (1: the plain closed form)",
                      low=0.0, high=1.0),)
    max_budget = 1.0

    def run(self, setup):
        counts = {g.name: g.width for g in setup.spec}
        built = stages.build(setup, stages.partial_maps(setup.spec, Matching.identity(setup.spec, setup.n), counts))
        uses = Counter(layer.weight for layer in setup.graph.layers)
        layers = [layer for layer in setup.graph.layers if uses[layer.weight] == 1]
        sources = setup.state_dicts
        grams = []
        for i, program in enumerate(setup.programs):
            observer = GramObserver(layers, sources[i], distributed.offset_and_total(len(setup.batches_of(i)))[1],
                                    setup.seed + i)
            source_pass([program], setup.batches_of(i), [observer], progress=setup.progress,
                        desc=f"RegMean Grams of model {i}")
            grams.append(observer)
        params = built.tensors(setup)
        merged = 0
        for layer in layers:
            if tuple(params[layer.weight].shape) != tuple(sources[0][layer.weight].shape):
                continue  # separate heads: stacked, not merged
            ws = [layer.matrix(sd)[:, : observer.columns[layer.weight]] for sd in sources]
            w = regmean_weight([g.gram(layer.weight) for g in grams], ws, self.opts["alpha"])
            current = layer.matrix(params)
            current[:, : w.shape[1]] = w
            layer.set_matrix(params, current)
            merged += 1
        norms = stages.norm_decision(setup)
        stages.reset_norms(setup, built, norms)
        return Outcome(stages.finished(setup, built), built, {"regmean_layers": merged, **norms})
