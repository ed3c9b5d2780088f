"""The teacher-forced refit: every layer fitted independently on the permuted ensemble's inputs and
outputs, from one pass over the sources (docs/algorithm.md section 4, as in the paper)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..capture import Program
from ..rewrite.maps import GroupMap
from .layers import RefitLayer, row_limit
from .propagated import empty_stats
from .rows import teacher_rows
from .solve import LayerStats, RefitOptions, solve_layer


def _chunks(layers: list[RefitLayer], params: dict, limit: int):
    """Split layers into passes whose Gram matrices fit in ``limit`` bytes (one layer at least)."""
    chunk, used = [], 0
    for layer in layers:
        p = layer.merged.columns(params)
        size = 8 * p * p
        if chunk and used + size > limit:
            yield chunk
            chunk, used = [], 0
        chunk.append(layer)
        used += size
    if chunk:
        yield chunk


def collect(sources: list[Program], layers: list[RefitLayer], maps: dict[str, GroupMap], batches: list,
            params: dict, options: RefitOptions) -> dict[str, LayerStats]:
    """Stream every layer's G and C on the permuted ensemble's inputs and outputs."""
    nodes = sorted({n for layer in layers for n in (layer.source.in_node, layer.source.out_node)})
    stats = {layer.name: empty_stats(layer, params) for layer in layers}
    offset, total = distributed.offset_and_total(len(batches))
    with torch.no_grad():
        for i, batch in enumerate(tqdm(batches, desc="least-squares statistics", disable=not options.progress,
                                       leave=False)):
            gen = distributed.batch_generator(options.seed, offset + i)
            taps = [program.run(batch, nodes)[1] for program in sources]
            for layer in layers:
                st = stats[layer.name]
                limit = row_limit(st.columns, options.oversample, options.min_rows, total)
                x, y, blocks = teacher_rows(layer, [t[layer.source.in_node] for t in taps],
                                            [t[layer.source.out_node] for t in taps], maps, limit, gen)
                st.update(x, y, blocks)
    for name in sorted(stats):
        stats[name].reduce()
    return stats


def refit_teacher(sources: list[Program], layers: list[RefitLayer], maps: dict[str, GroupMap], batches: list,
                  params: dict, options: RefitOptions) -> list[dict]:
    """Fit every layer on the permuted ensemble's activations, in as few passes as the Grams allow."""
    entries = []
    for chunk in _chunks(layers, params, options.max_gram_bytes):
        stats = collect(sources, chunk, maps, batches, params, options)
        for layer in chunk:
            own_out, own_in = layer.owners(params, maps, len(sources))
            entries.append(solve_layer(layer.merged, stats[layer.name], params, own_out, own_in, options))
    return entries
