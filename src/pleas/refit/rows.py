"""Design rows and targets of one layer: X~ (samples, P) and Y~ (samples, m_out), float32 (float64 for
float64 models, so that a float64 merge runs every product in float64)."""
from __future__ import annotations

import torch

from ..rewrite.maps import GroupMap
from .layers import RefitLayer, working_dtype


def _with_bias(x: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if bias else x


def teacher_rows(layer: RefitLayer, xs: list, ys: list, maps: dict[str, GroupMap], limit: int,
                 gen: torch.Generator):
    """Rows of the permuted ensemble at most ``limit`` seeded random samples of one batch: X~ from the
    sources' inputs ``xs``, Y~ from their outputs ``ys``, and the row blocks of a conv. Samples are
    picked before the sources' copies are combined (the merge is linear along the units), so full
    activations are combined only when the patches would repeat their entries anyway."""
    src = layer.source
    bias = src.bias is not None
    pick = src.pick(tuple(ys[0].shape), limit, gen)
    y = layer.targets([src.output_rows(t, pick) for t in ys], maps)
    if src.kind == "conv":
        xs4 = [x.unsqueeze(2) if x.dim() == 3 else x for x in xs]  # Conv1d as a Conv2d of height 1
        if len(pick[0]) * src.kernel[0] * src.kernel[1] >= xs4[0][:, 0].numel():
            x = src.patches(layer.inputs(xs4, 1, maps), pick)
        else:
            x = layer.inputs([src.patches(t, pick) for t in xs4], 1, maps)
        merged_shape = (xs4[0].shape[0], x.shape[1], *xs4[0].shape[2:])  # the merged layout's channels
        blocks = src.row_blocks(merged_shape, pick, bias)
        x = x.flatten(1)
    else:
        blocks = None
        x = layer.inputs([src.input_rows(t, pick) for t in xs], -1, maps)
    return _with_bias(working_dtype(x), bias), y, blocks


def merged_rows(layer: RefitLayer, xs: list, picks: list, y: torch.Tensor):
    """X at the picked samples of every batch of the merged model's own input activations ``xs``, as one
    block of rows (samples, P) float32, the targets ``y`` of those samples (reordered with X), a conv's
    row blocks over all of them (one product per block for the whole calibration set instead of one per
    batch), and the order the rows were put in (None: as picked). A conv's rows are written grouped by
    tap block (targets reordered alike), so each block's rows are one slice."""
    m = layer.merged
    bias = m.bias is not None
    if m.kind != "conv":
        x = working_dtype(torch.cat([m.input_rows(x, pick) for x, pick in zip(xs, picks)]))
        return _with_bias(x, bias), y, None, None
    xs = [x.unsqueeze(2) if x.dim() == 3 else x for x in xs]  # Conv1d as a Conv2d of height 1
    c = xs[0].shape[1]
    joined = tuple(torch.cat([p[i] for p in picks]) for i in range(3))
    blocks = m.row_blocks(tuple(xs[0].shape), joined, bias)
    dest, order = None, None
    if blocks is not None:
        order = torch.cat([rows for rows, _ in blocks])
        dest = torch.empty_like(order)
        dest[order] = torch.arange(len(order))
        y = y[order]
        edges = [0, *torch.tensor([len(rows) for rows, _ in blocks]).cumsum(0).tolist()]
        blocks = [(slice(lo, hi), cols) for lo, hi, (_, cols) in zip(edges[:-1], edges[1:], blocks)]
    p = c * m.kernel[0] * m.kernel[1]
    out = torch.empty(len(joined[0]), p + int(bias), dtype=working_dtype(xs[0][:0]).dtype)
    patches = out[:, :p].unflatten(1, (c, *m.kernel))
    at = 0
    for x, pick in zip(xs, picks):
        rows = m.patches(working_dtype(x), pick)
        if dest is None:
            patches[at : at + len(rows)] = rows
        else:
            patches.index_copy_(0, dest[at : at + len(rows)], rows)
        at += len(rows)
    if bias:
        out[:, p] = 1.0
    return out, y, blocks, order
