"""The propagated refit: layers fitted in graph order, each on the activations the merged model itself
produces at its input (the layers before it already refitted, and norm statistics set on the way)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..capture import Program, Walk, fitting_batches
from ..capture.program import batch_size
from ..rewrite.maps import GroupMap
from ..norms.reset import set_norm_statistics
from ..statistics.passes import source_pass
from .layers import RefitLayer, row_limit
from .rows import merged_rows
from .rows_solve import plan_layer, solve_bytes, solve_layer_rows
from .solve import LayerStats, RefitOptions, solve_layer
from .stream import partners, rows_of

class TargetSampler:
    """Seeded samples of every layer's output in each source model, batch by batch: the propagated
    refit's targets. An observer of :func:`pleas.statistics.source_pass`, so the samples can be taken in
    a pass over the sources that happens anyway (the matching's), before the merge maps exist; they are
    combined into the merged layout only when used. ``columns`` sets each layer's samples per batch
    (``oversample`` per weight column of the merged layer). With ``targets="stream"``, the node each map's
    output is added to in a residual stream of ``program`` (the sources' capture) is sampled at the same rows
    (:mod:`.stream`)."""

    def __init__(self, layers: list, columns: dict[str, int], options: RefitOptions, n_batches: int,
                 program: Program):
        self.layers = layers  # the sources' LinearMaps
        self.stream = partners(program, layers) if options.targets == "stream" else {}  # {weight: node}
        self.nodes = sorted({layer.out_node for layer in layers} | set(self.stream.values()))
        self.limits = {layer.weight: row_limit(columns[layer.weight], options.oversample, options.min_rows, n_batches)
                       for layer in layers}
        self.seed = options.seed
        self.picks: dict[str, list] = {layer.weight: [] for layer in layers}
        self.shapes: dict[str, list] = {layer.weight: [] for layer in layers}  # output shape of every batch
        self.rows: dict[str, list] = {layer.weight: [] for layer in layers}
        self.partner_rows: dict[str, list] = {weight: [] for weight in self.stream}
        self.batches = 0

    @classmethod
    def for_budget(cls, graph, budget: float, options: RefitOptions, n_batches: int) -> "TargetSampler":
        """A sampler made before the merged model exists, from the sources' :class:`~pleas.groups.ModelGraph`:
        a merged layer's columns are taken as its source layer's times ``min(budget, 2)`` (exact at 1x)."""
        import math

        params = graph.program.gm.state_dict()
        grow = min(max(budget, 1.0), 2.0)
        columns = {layer.weight: math.ceil(layer.columns(params) * grow) for layer in graph.layers}
        return cls(list(graph.layers), columns, options, n_batches, graph.program)

    def update(self, taps: list[dict], index: int = 0) -> None:
        self.batches += 1
        gen = distributed.batch_generator(self.seed, index)
        for layer in self.layers:
            self.sample(layer, taps, gen)

    def sample(self, layer, taps: list[dict], gen: torch.Generator) -> None:
        """Draw one batch's samples of one source layer (``taps[i]``: model i's values of the batch) from
        ``gen``, the batch's generator: layers draw from it in the order of :attr:`layers`."""
        ys = [t[layer.out_node] for t in taps]
        pick = layer.pick(tuple(ys[0].shape), self.limits[layer.weight], gen)
        self.picks[layer.weight].append(pick)
        self.shapes[layer.weight].append(tuple(ys[0].shape))
        self.rows[layer.weight].append([layer.output_rows(y, pick) for y in ys])
        partner = self.stream.get(layer.weight)
        if partner is not None:
            found = [rows_of(t[partner], y.shape[-1], pick) if t[partner].numel() == y.numel() else None
                     for t, y in zip(taps, ys)]
            if any(r is None for r in found):  # not a residual stream after all (a broadcast add)
                del self.stream[layer.weight], self.partner_rows[layer.weight]
            else:
                self.partner_rows[layer.weight].append(found)

    def take(self, layer: RefitLayer, maps: dict[str, GroupMap], sizes: list[int]) -> tuple[list, torch.Tensor, torch.Tensor]:
        """The picks of ``layer`` for the first ``len(sizes)`` batches (of ``sizes`` inputs each), the
        combined targets Y~ of all of them as one block of rows, and the calibration input each row comes
        from (an index over all those batches); and forget them."""
        key = layer.source.weight
        n = len(sizes)
        picks, rows = self.picks.pop(key)[:n], self.rows.pop(key)[:n]
        offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
        shapes = self.shapes.pop(key)[:n]
        images = torch.cat([layer.source.images(shape, pick, size) + offset
                            for shape, pick, size, offset in zip(shapes, picks, sizes, offsets)])
        per_model = [torch.cat(r) for r in zip(*rows)]
        return picks, layer.targets(per_model, maps), images

    def take_stream(self, layer: RefitLayer, maps: dict[str, GroupMap], n: int) -> torch.Tensor | None:
        """The combined rows of the node ``layer``'s output is added to, at the same samples as
        :meth:`take`'s targets (the first ``n`` batches), or None for a map that writes into no stream."""
        found = self.partner_rows.pop(layer.source.weight, None)
        if found is None or len(found) < n:
            return None
        return layer.targets([torch.cat(r) for r in zip(*found[:n])], maps)


class StreamedTargets:
    """A :class:`TargetSampler` fed while the refit runs (``streaming=True``): the sources walk node by node
    over the refit's batches, just ahead of the merged model, and each layer's samples are drawn once its
    output exists and dropped when the layer has been refitted. The draws are the sampler's own, batch by
    batch in the same order, so the targets, and the merged weights, are those of a sampler fed by the
    matching's pass; but only the layers between the merged model and the sources are held at once,
    instead of every layer's targets. The price: the sources run once more."""

    def __init__(self, sampler: TargetSampler, sources: list[Program], batches: list, offset: int):
        self.sampler = sampler
        self.walks = [Walk(program, batches, keep=set(sampler.nodes)) for program in sources]
        self.nodes = [n for n in sources[0].nodes if n.op != "output"]
        self.cursor = 0
        self.gens = [distributed.batch_generator(sampler.seed, offset + i) for i in range(len(batches))]
        self.next = 0  # the next layer of ``sampler.layers`` to draw
        uses: dict[str, int] = {}
        for layer in sampler.layers:
            for name in (layer.out_node, sampler.stream.get(layer.weight)):
                if name is not None:
                    uses[name] = uses.get(name, 0) + 1
        self.uses = uses  # kept values still to be read, by node
        sampler.batches = len(batches)

    def _ready(self, name: str | None) -> bool:
        return name is None or name in self.walks[0].kept[0]

    def _draw(self) -> None:
        """Draw every layer, in the sampler's order, whose output (and stream partner) the walks computed."""
        sampler = self.sampler
        while self.next < len(sampler.layers):
            layer = sampler.layers[self.next]
            partner = sampler.stream.get(layer.weight)
            if not (self._ready(layer.out_node) and self._ready(partner)):
                return
            for b, gen in enumerate(self.gens):
                sampler.sample(layer, [walk.kept[b] for walk in self.walks], gen)
            for name in (layer.out_node, partner):
                if name is not None:
                    self.uses[name] -= 1
                    if not self.uses[name]:
                        for walk in self.walks:
                            for kept in walk.kept:
                                kept.pop(name, None)
            self.next += 1

    def _through(self, layer: RefitLayer) -> None:
        """Walk the sources until ``layer``'s samples are drawn."""
        rows = self.sampler.rows.get(layer.source.weight)
        self._draw()
        while rows is not None and not rows and self.cursor < len(self.nodes):
            node = self.nodes[self.cursor]
            self.cursor += 1
            for walk in self.walks:
                walk.advance(node)
            self._draw()

    def take(self, layer: RefitLayer, maps: dict[str, GroupMap], sizes: list[int]):
        self._through(layer)
        return self.sampler.take(layer, maps, sizes)

    def take_stream(self, layer: RefitLayer, maps: dict[str, GroupMap], n: int):
        return self.sampler.take_stream(layer, maps, n)


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
    offset, total_batches = distributed.offset_and_total(len(batches))  # over every rank's batches
    batches = fitting_batches(merged, batches, options.max_frontier_bytes)
    if samples is None:
        columns = {layer.source.weight: layer.merged.columns(params) for layer in layers}
        samples = TargetSampler([layer.source for layer in layers], columns, options, total_batches, sources[0])
        if not options.streaming:
            source_pass(sources, batches, [samples], progress=options.progress, desc="least-squares targets")
    if options.streaming:
        samples = StreamedTargets(samples, sources, batches, offset)
    by_node = {layer.merged.out_node: layer for layer in layers}
    merged_partners = partners(merged, [layer.merged for layer in layers]) if options.targets == "stream" else {}
    norms_at = {norm.node: norm for norm in norms} if options.reset_norms else {}
    nodes = merged.nodes
    position = {n.name: i for i, n in enumerate(nodes)}
    last = max([position[layer.merged.out_node] for layer in layers] + [position[n] for n in norms_at], default=-1)
    walk = Walk(merged, batches)
    sizes = [batch_size(b) for b in batches]
    first, total = distributed.offset_and_total(sum(sizes))  # this rank's inputs among every rank's
    held_images = _held_out(total, options.seed)
    held_images = None if held_images is None else held_images[first : first + sum(sizes)]
    entries, workspace, sparse = [], [None], []  # one Gram buffer for every layer
    bar = tqdm(total=len(layers), desc="least-squares refit", disable=not options.progress, leave=False)
    with torch.no_grad():
        for node in nodes:
            if position[node.name] > last:
                break  # nothing left to change
            layer = by_node.get(node.name)
            if layer is not None:
                xs = walk.values(layer.merged.in_node)
                reachable = layer.merged.reachable_columns(tuple(xs[0].shape), layer.merged.bias is not None)
                picks, yr, images = samples.take(layer, maps, sizes)
                yr = _stream_targets(layer, yr, samples.take_stream(layer, maps, len(sizes)),
                                     merged_partners.get(layer.merged.weight), walk, picks, position[node.name], position)
                xr, yr, blocks, order = merged_rows(layer, xs, picks, yr)
                own_out, own_in = layer.owners(params, maps, len(sources))
                columns = layer.merged.columns(params) if reachable is None else len(reachable)
                rows = distributed.sum_numbers(len(xr))[0]  # over every rank of a process group
                solver = plan_layer(columns, yr.shape[1], int(rows), options.max_solve_bytes, options.solver)
                if solver in ("rows", None) and distributed.active():
                    # the rows stay on their ranks; a Gram is a sum over them
                    fits = options.max_solve_bytes is None or \
                        solve_bytes("dense", columns, yr.shape[1], int(rows)) <= options.max_solve_bytes
                    solver = "dense" if fits else "float32"
                if solver in ("rows", None):  # the dual form on the rows themselves (no Gram; see rows_solve)
                    held = (held_images[images if order is None else images[order]]
                            if rows < HELD_OUT_BELOW * columns and held_images is not None else None)
                    if held is not None:
                        sparse.append(layer.name)
                    entries.append({**solve_layer_rows(layer.merged, xr, yr, params, own_out, own_in, options, held),
                                    "solver": "rows"})
                    bar.update()
                    walk.advance(node)
                    continue
                st = empty_stats(layer, params, workspace if solver == "dense" else None, reachable,
                                 torch.float64 if solver == "dense" else torch.float32)
                held = None
                if rows < HELD_OUT_BELOW * len(st.gram) and held_images is not None:
                    # fewer samples than the refit asks for: choose the ridge on held-out inputs' rows,
                    # summed apart from the rest and added to them for the final solve
                    sparse.append(layer.name)
                    mask = held_images[images if order is None else images[order]]
                    held = empty_stats(layer, params, None, reachable, st.gram.dtype)
                    held.update(*_subset(xr, yr, blocks, mask))
                    st.update(*_subset(xr, yr, blocks, ~mask))
                else:
                    st.update(xr, yr, blocks)
                st.reduce()
                if held is not None:
                    held.reduce()
                entries.append({**solve_layer(layer.merged, st, params, own_out, own_in, options, held),
                                "solver": solver})
                bar.update()
            elif node.name in norms_at:
                set_norm_statistics(norms_at[node.name], walk.values(norms_at[node.name].in_node), params)
            walk.advance(node)
    bar.close()
    warn_sparse(sparse, len(layers), total)
    return entries


def _stream_targets(layer: RefitLayer, y: torch.Tensor, sources: torch.Tensor | None, partner: str | None,
                    walk: Walk, picks: list, here: int, position: dict) -> torch.Tensor:
    """With ``targets="stream"``: the targets of a map that writes into a residual stream made the stream's
    (its sources' output plus their stream before the add, minus the merged model's stream before the add,
    at the same samples), when the merged model's stream before the add is computed before the map."""
    if sources is None or partner is None or position.get(partner, here) >= here:
        return y
    merged = [rows_of(v, y.shape[1], pick) for v, pick in zip(walk.values(partner), picks)]
    if any(r is None for r in merged):
        return y
    return y + (sources - torch.cat(merged).to(sources.dtype)).to(y.dtype)


#: A layer with fewer samples than this per column it can read chooses its ridge on held-out rows. Measured
#: with 32-1,000 calibration images on the benchmark's resnet18/resnet20 pairs, 4 (the refit's ``oversample``)
#: gained no accuracy over 1 and cost about a quarter of a resnet18 merge's time; under-determined layers
#: (below 1) need it: an untrained resnet18 on noise is 0.25 from the ensemble with it, 0.28 without.
HELD_OUT_BELOW = 1
#: Share of the calibration inputs whose rows are held out to choose a sparsely sampled layer's ridge.
HELD_OUT = 0.2


def _held_out(n: int, seed: int) -> torch.Tensor | None:
    """(n,) booleans: the calibration inputs held out (a seeded fifth, at least one; None below two inputs)."""
    if n < 2:
        return None
    gen = torch.Generator().manual_seed(seed + 7919)
    count = min(max(round(HELD_OUT * n), 1), n - 1)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:count]] = True
    return mask


def _subset(x: torch.Tensor, y: torch.Tensor, blocks: list | None, mask: torch.Tensor):
    """The rows of (x, y) where ``mask`` holds, with the row blocks renumbered for them."""
    keep = mask.nonzero().squeeze(1)
    if blocks is None:
        return x[keep], y[keep], None
    position = torch.cumsum(mask.long(), 0) - 1
    out = []
    for rows, cols in blocks:
        rows = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        rows = rows[mask[rows]]
        if len(rows):
            out.append((position[rows], cols))
    return x[keep], y[keep], out


def warn_sparse(layers: list[str], total: int, samples: int) -> None:
    """One warning for the layers that saw fewer samples than the columns they read (:data:`HELD_OUT_BELOW`)."""
    if not layers:
        return
    import warnings

    warnings.warn(
        f"pleas: {len(layers)} of {total} layers saw fewer calibration samples than the input columns they read "
        f"({samples} inputs; e.g. {layers[0]!r}): their ridge was chosen on held-out calibration inputs, and a "
        "layer whose fit was worse there kept its partial-merge weights (report['refit']). More calibration "
        "data gives a better merge.", stacklevel=2)


def empty_stats(layer: RefitLayer, params: dict, workspace: list | None = None,
                index: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> LayerStats:
    """Zeroed sums for ``layer`` (over the columns ``index`` only, if given). With ``workspace`` (a
    one-element list), G and C are views of one float64 buffer kept across layers: zeroing memory already
    mapped is far cheaper than mapping a new Gram matrix per layer. Only for layers solved one at a time."""
    m = layer.merged
    p = m.columns(params)
    k = p if index is None else len(index)
    m_out = m.outputs(params)
    if workspace is None:
        gram, cross = torch.zeros(k, k, dtype=dtype), torch.zeros(k, m_out, dtype=torch.float64)
    else:
        need = k * k + k * m_out
        if workspace[0] is None or workspace[0].numel() < need:
            workspace[0] = torch.empty(need, dtype=torch.float64)
        buf = workspace[0][:need].zero_()
        gram, cross = buf[: k * k].view(k, k), buf[k * k :].view(k, m_out)
    return LayerStats(gram, cross, index=index, columns=p, initial=m.matrix(params).float())
