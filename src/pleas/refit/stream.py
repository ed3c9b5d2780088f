"""Residual streams in a captured graph: which linear maps write into one, and what else is added there.

A map whose output reaches an add through ops that keep its elements in order (views, dropout in eval
mode, identities) writes into a residual stream: ``stream = partner + W x``. Its refit can then be fitted
to the stream rather than to its own output (``targets="stream"``): the target becomes the sources'
output plus the sources' partner minus the merged model's partner, so the map also corrects the error
the merged stream carries from the layers before it (the merged stream after the add then tracks the
sources' stream, not only the map's own contribution)."""
from __future__ import annotations

import torch
from torch import fx

#: Ops a map's output may pass through on its way to the add: they keep every element and its order.
PASS_THROUGH = frozenset({"view", "reshape", "_unsafe_view", "flatten", "unflatten", "contiguous", "clone", "alias",
                          "dropout", "identity"})
ADDS = frozenset({"add", "iadd", "add_"})
#: Longest chain of pass-through ops followed.
MAX_CHAIN = 8


def op_name(program, node: fx.Node) -> str:
    """A node's op as a short lower-case name: 'view' for aten.view.default, 'dropout' for nn.Dropout."""
    if node.op == "call_module":
        return type(program.module(node.target)).__name__.lower()
    if node.op not in ("call_function", "call_method"):
        return ""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):  # torch.export's aten ops: the schema's name, 'aten::view'
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", "")


def residual_partner(program, out_node: str) -> str | None:
    """The node added to ``out_node``'s value at the residual add it reaches, or None when its output
    does not reach an add of two tensors through :data:`PASS_THROUGH` ops alone (or is used elsewhere)."""
    node = program.node(out_node)
    for _ in range(MAX_CHAIN):
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        name = op_name(program, user)
        if name in ADDS:
            args = [a for a in user.args if isinstance(a, fx.Node)]
            if len(user.args) != 2 or len(args) != 2 or user.kwargs.get("alpha", 1) != 1:
                return None
            other = args[1] if args[0] is node else args[0]
            return None if other is node else other.name
        if name not in PASS_THROUGH:
            return None
        node = user
    return None


def partners(program, layers: list) -> dict[str, str]:
    """{weight: partner node} of the dense maps in ``layers`` (:class:`~pleas.ops.LinearMap`) whose
    units are the last dimension of their output and that write into a residual stream."""
    found = {}
    for layer in layers:
        if layer.kind != "dense" or layer.out_dim != -1:
            continue
        partner = residual_partner(program, layer.out_node)
        if partner is not None:
            found[layer.weight] = partner
    return found


def rows_of(value: torch.Tensor, units: int, pick) -> torch.Tensor | None:
    """The partner's value at the picked rows of a map with ``units`` outputs (its elements are in the
    order of the map's output), or None when its size does not match (a broadcast add)."""
    if value.numel() % units or value.shape[-1] != units:
        return None
    return value.reshape(-1, units)[pick]
