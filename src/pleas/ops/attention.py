"""Attention: the scaled dot product of queries and keys, weighting the values.

Attention mixes tokens within each head, so a permutation of hidden units is a symmetry only if it moves
whole heads: every query, key and value dimension of head h, and the output projection's input columns of
head h, go to the same new head. pleas makes each head one unit: the handlers tie every dimension of a
head's queries, keys and values together (dimension d of a head is a *copy* of the head's unit), so heads
permute, merge (dimension by dimension) and are kept apart like any other unit, and a widened model has
more heads of the same size. Grouped-query attention needs nothing special: the key and value heads are
expanded to the query heads before the product, and tying them ties each key/value head to its group of
query heads. Rotary position embeddings multiply the dimensions of a head by position-dependent factors,
which pins each unit to its position inside the head (:func:`pleas.ops.elementwise.binary`); whole heads
still move, since every head has every position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .units import Units
from .registry import function_handler

aten = torch.ops.aten


def _heads(u: Units | None, ndim: int) -> Units | None:
    """Units of a (..., heads, tokens, dims) tensor, left-padded to ``ndim`` dimensions."""
    if u is None:
        return None
    pad = ndim - u.ndim
    return Units(u.ids.reshape((1,) * pad + u.ids.shape), tuple(d + pad for d in u.dims))


def head_units(ctx, q: Units, k: Units, v: Units | None) -> Units | None:
    """Tie queries, keys and values head by head, and every dimension of a head to its first: one unit per
    head. Returns the values' units (what the attention output carries)."""
    if any(d >= q.ndim - 2 and d != q.ndim - 1 for u in (q, k) for d in u.dims) or \
            (v is not None and any(d == v.ndim - 2 for d in v.dims)):
        raise ctx.fail("attention over a dimension that carries units (tokens must carry none)")
    table = ctx.table
    table.union(q.ids, k.ids)  # the score sums q . k over a head's dimensions
    table.union(q.ids, q.ids[..., :1])  # one unit per head: its dimensions are copies of it
    if v is None:
        return None
    table.union(v.ids, q.ids[..., :1])  # head h of the values is weighted by head h's attention
    table.union(v.ids, v.ids[..., :1])
    return v


@function_handler(F.scaled_dot_product_attention, aten.scaled_dot_product_attention,
                  aten._scaled_dot_product_flash_attention_for_cpu)
def scaled_dot_product_attention(ctx):
    """softmax(q k^T / sqrt(d) + mask) v over (batch, heads, tokens, dims): the output carries v's units."""
    ndim = ctx.ndim()
    q, k, v = (_heads(ctx.units(ctx.arg(i, name)), ndim) for i, name in ((0, "query"), (1, "key"), (2, "value")))
    if q is None or k is None:
        for u in (q, k, v):
            ctx.fix(u, "attention whose queries or keys carry no units")
        return None
    out = head_units(ctx, q, k, v)
    if isinstance(ctx.node.target, torch._ops.OpOverload) and ctx.node.target.overloadpacket is \
            aten._scaled_dot_product_flash_attention_for_cpu:
        return (out, None)
    return out


def _register_optional() -> None:
    """timm's attention builds and adds its mask in functions torch.fx keeps whole: the mask carries no
    units (it depends on the scores only through their dtype and length), and adding it to the scores
    keeps theirs (a mask over tokens is the same for every head)."""
    try:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
    except ImportError:
        return
    function_handler(resolve_self_attn_mask)(lambda ctx: None)
    function_handler(maybe_add_mask)(lambda ctx: ctx.value(ctx.arg(0, "scores")))


_register_optional()
