"""The layers a refit fits: each linear map of the merged model, paired with its twin in the sources,
and where its input and output units sit on both sides."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from ..groups.analysis import ModelGraph
from ..groups.spec import PermutationSpec
from ..rewrite.maps import GroupMap, unit_owners
from ..rewrite.transform import rewrite_axis
from ..ops.linear_maps import LinearMap


@dataclass
class RefitLayer:
    """One linear map: ``merged`` in the merged model's capture, ``source`` in the sources' (node names
    differ where the captures do), and the (group, source member, target member) triples of its weight's
    output axis (``out``) and input axis (``inn``)."""

    merged: LinearMap
    source: LinearMap
    out: list
    inn: list

    @property
    def name(self) -> str:
        return self.merged.name

    def owners(self, params: dict, maps: dict[str, GroupMap], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, m_out) and (n, P): which source models own each output row and input column."""
        layer = self.merged
        m_out = layer.outputs(params)
        taps = layer.taps(params)
        n_in = (layer.columns(params) - (layer.bias is not None)) // taps
        own_out = unit_owners([(g, tm) for g, _, tm in self.out], m_out, maps, n, side="out")
        own_in = unit_owners([(g, tm) for g, _, tm in self.inn], n_in, maps, n, side="in").repeat_interleave(taps, 1)
        if layer.bias is not None:
            own_in = torch.cat([own_in, torch.ones(n, 1, dtype=torch.bool)], 1)
        return own_out, own_in

    def targets(self, rows: list[torch.Tensor], maps: dict[str, GroupMap]) -> torch.Tensor:
        """Y~ from each source's output rows (samples, units): the permuted ensemble's outputs, in the
        merged layout (docs/algorithm.md section 4), float32 (float64 for float64 models)."""
        return _combine(rows, -1, self.out, maps)

    def inputs(self, rows: list[torch.Tensor], dim: int, maps: dict[str, GroupMap]) -> torch.Tensor:
        """X~ from each source's input rows, whose dimension ``dim`` holds the input units (float32 or float64)."""
        return _combine(rows, dim, self.inn, maps)


def working_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the refit's working precision: float64 stays float64 (a float64 merge keeps every product
    in float64), anything else becomes float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _combine(rows: list[torch.Tensor], dim: int, items: list, maps: dict[str, GroupMap]) -> torch.Tensor:
    items = [it for it in items if it[0].name in maps]
    n = len(rows)
    if not items:
        return sum(working_dtype(r) for r in rows) / n
    dim = dim % rows[0].dim()
    return sum(rewrite_axis(working_dtype(r), dim, items, k, n, maps, role="out") for k, r in enumerate(rows))


def _on_axis(spec: PermutationSpec, weight: str, axis: int) -> dict[tuple[str, int], tuple]:
    return {(g.name, m.axis): (g, m) for g, m in spec.members_of(weight) if m.axis == axis}


def refit_layers(source: ModelGraph, merged: ModelGraph, spec: PermutationSpec, target: PermutationSpec) -> list[RefitLayer]:
    """The merged model's linear maps in graph order, each paired with the source map of the same weight.
    A weight used by several ops (a module called twice, an output layer tied to the input embedding) is
    left as merged."""
    uses = Counter(layer.weight for layer in merged.layers)
    sources = {layer.weight: layer for layer in source.layers}
    out = []
    for layer in merged.layers:
        if uses[layer.weight] != 1 or layer.weight not in sources or layer.weight in spec.aliases:
            continue
        out_axis, in_axis = (1, 0) if layer.transposed else (0, 1)
        if any(m.axis == in_axis and m.role == "out" for _, m in spec.members_of(layer.weight)):
            continue  # also an embedding table (a tied input and output embedding): it stays as merged
        triples = {}
        for side, axis in (("out", out_axis), ("in", in_axis)):
            src, tgt = _on_axis(spec, layer.weight, axis), _on_axis(target, layer.weight, axis)
            triples[side] = [(g, m, tgt[key][1]) for key, (g, m) in src.items() if key in tgt]
        out.append(RefitLayer(layer, sources[layer.weight], triples["out"], triples["in"]))
    return out


def weight_columns(layer: LinearMap, params: dict) -> int:
    return layer.columns(params)


def row_limit(columns: int, oversample: int, min_rows: int, n_batches: int) -> int:
    """Samples a layer keeps per batch: max(oversample x columns, min_rows) over the whole data."""
    return math.ceil(max(oversample * columns, min_rows) / max(n_batches, 1))
