"""The propagated refit: layers fitted in graph order, each on the activations the merged model itself
produces at its input (the layers before it already refitted, and norm statistics set on the way)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..capture import Program, Walk, fitting_batches
from ..rewrite.maps import GroupMap
from ..norms.reset import set_norm_statistics
from ..statistics.passes import source_pass
from .layers import RefitLayer, row_limit
from .rows import merged_rows
from .solve import LayerStats, RefitOptions, solve_layer

class TargetSampler:
    """Seeded samples of every layer's output in each source model, batch by batch: the propagated
    refit's targets. An observer of :func:`pleas.statistics.source_pass`, so the samples can be taken in
    a pass over the sources that happens anyway (the matching's), before the merge maps exist; they are
    combined into the merged layout only when used. ``columns`` sets each layer's samples per batch
    (``oversample`` per weight column of the merged layer)."""

    def __init__(self, layers: list, columns: dict[str, int], options: RefitOptions, n_batches: int):
        self.layers = layers  # the sources' LinearMaps
        self.nodes = sorted({layer.out_node for layer in layers})
        self.limits = {layer.weight: row_limit(columns[layer.weight], options.oversample, options.min_rows, n_batches)
                       for layer in layers}
        self.gen = torch.Generator().manual_seed(options.seed)
        self.picks: dict[str, list] = {layer.weight: [] for layer in layers}
        self.rows: dict[str, list] = {layer.weight: [] for layer in layers}
        self.batches = 0

    @classmethod
    def for_budget(cls, graph, budget: float, options: RefitOptions, n_batches: int) -> "TargetSampler":
        """A sampler made before the merged model exists, from the sources' :class:`~pleas.groups.ModelGraph`:
        a merged layer's columns are taken as its source layer's times ``min(budget, 2)`` (exact at 1x)."""
        import math

        params = graph.program.gm.state_dict()
        grow = min(max(budget, 1.0), 2.0)
        columns = {layer.weight: math.ceil(layer.columns(params) * grow) for layer in graph.layers}
        return cls(list(graph.layers), columns, options, n_batches)

    def update(self, taps: list[dict]) -> None:
        self.batches += 1
        for layer in self.layers:
            ys = [t[layer.out_node] for t in taps]
            pick = layer.pick(tuple(ys[0].shape), self.limits[layer.weight], self.gen)
            self.picks[layer.weight].append(pick)
            self.rows[layer.weight].append([layer.output_rows(y, pick) for y in ys])

    def take(self, layer: RefitLayer, maps: dict[str, GroupMap], n_batches: int) -> tuple[list, torch.Tensor]:
        """The picks of ``layer`` for the first ``n_batches`` batches and the combined targets Y~ of all
        of them as one block of rows (and forget them)."""
        key = layer.source.weight
        picks, rows = self.picks.pop(key)[:n_batches], self.rows.pop(key)[:n_batches]
        per_model = [torch.cat(r) for r in zip(*rows)]
        return picks, layer.targets(per_model, maps)


def refit_propagated(sources: list[Program], merged: Program, layers: list[RefitLayer], norms: list,
                     maps: dict[str, GroupMap], batches: list, params: dict, options: RefitOptions,
                     samples: TargetSampler | None = None) -> list[dict]:
    """Fit ``layers`` in graph order on the merged model's own activations, setting the statistics of
    ``norms`` (:class:`~pleas.ops.NormStats`) on the way when ``options.reset_norms``; ``params`` holds
    the merged model's tensors, changed in place.

    The targets Y~ do not depend on the merged model: a :class:`TargetSampler` takes them in a pass over
    the sources (the matching's, when the method passes ``samples``). Then the merged model runs once,
    node by node, over all the calibration batches at once (:class:`pleas.capture.Walk`): a layer is
    refitted when the walk reaches it, from the inputs the refitted layers before it produced, and a norm
    takes the exact statistics of its inputs before it normalises them. One pass of the sources and one
    of the merged model, whatever the depth."""
    batches = fitting_batches(merged, batches, options.max_frontier_bytes)
    if samples is None:
        columns = {layer.source.weight: layer.merged.columns(params) for layer in layers}
        samples = TargetSampler([layer.source for layer in layers], columns, options, len(batches))
        source_pass(sources, batches, [samples], progress=options.progress, desc="least-squares targets")
    by_node = {layer.merged.out_node: layer for layer in layers}
    norms_at = {norm.node: norm for norm in norms} if options.reset_norms else {}
    nodes = merged.nodes
    position = {n.name: i for i, n in enumerate(nodes)}
    last = max([position[layer.merged.out_node] for layer in layers] + [position[n] for n in norms_at], default=-1)
    walk = Walk(merged, batches)
    entries, workspace = [], [None]  # one Gram buffer for every layer
    bar = tqdm(total=len(layers), desc="least-squares refit", disable=not options.progress, leave=False)
    with torch.no_grad():
        for node in nodes:
            if position[node.name] > last:
                break  # nothing left to change
            layer = by_node.get(node.name)
            if layer is not None:
                xs = walk.values(layer.merged.in_node)
                reachable = layer.merged.reachable_columns(tuple(xs[0].shape), layer.merged.bias is not None)
                st = empty_stats(layer, params, workspace, reachable)
                picks, yr = samples.take(layer, maps, len(batches))
                xr, yr, blocks = merged_rows(layer, xs, picks, yr)
                st.update(xr, yr, blocks)
                own_out, own_in = layer.owners(params, maps, len(sources))
                entries.append(solve_layer(layer.merged, st, params, own_out, own_in, options))
                bar.update()
            elif node.name in norms_at:
                set_norm_statistics(norms_at[node.name], walk.values(norms_at[node.name].in_node), params)
            walk.advance(node)
    bar.close()
    return entries


def empty_stats(layer: RefitLayer, params: dict, workspace: list | None = None,
                index: torch.Tensor | None = None) -> LayerStats:
    """Zeroed sums for ``layer`` (over the columns ``index`` only, if given). With ``workspace`` (a
    one-element list), G and C are views of one float64 buffer kept across layers: zeroing memory already
    mapped is far cheaper than mapping a new Gram matrix per layer. Only for layers solved one at a time."""
    m = layer.merged
    p = m.columns(params)
    k = p if index is None else len(index)
    m_out = m.outputs(params)
    if workspace is None:
        gram, cross = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, m_out, dtype=torch.float64)
    else:
        need = k * k + k * m_out
        if workspace[0] is None or workspace[0].numel() < need:
            workspace[0] = torch.empty(need, dtype=torch.float64)
        buf = workspace[0][:need].zero_()
        gram, cross = buf[: k * k].view(k, k), buf[k * k :].view(k, m_out)
    return LayerStats(gram, cross, index=index, columns=p, initial=m.matrix(params).float())
