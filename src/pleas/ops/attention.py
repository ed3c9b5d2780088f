"""Attention: the scaled dot product of queries and keys, weighting the values.

Permuting the units of the query/key head dimensions together, and those of the values together with the
output projection's input, is a symmetry of attention, and so is permuting whole heads; rotary position
embeddings leave only the latter. Until pleas merges attention heads, the units that attention reads are
fixed (not permuted): correct, and every other group of a transformer (the residual stream, MLPs) is
still found and merged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import function_handler

aten = torch.ops.aten


@function_handler(F.scaled_dot_product_attention, aten.scaled_dot_product_attention,
                  aten._scaled_dot_product_flash_attention_for_cpu)
def scaled_dot_product_attention(ctx):
    """softmax(q k^T / sqrt(d) + mask) v: q, k and v's units are fixed; the output carries none."""
    for i, name in ((0, "query"), (1, "key"), (2, "value")):
        ctx.fix(ctx.units(ctx.arg(i, name)), "read by attention (heads are not permuted yet)")
    return None
