"""Norm statistics after a merge (REPAIR-style): every running statistic a handler declared
(:class:`~pleas.ops.NormStats`) is set to the exact mean and variance of the merged model's own
activations, in graph order, each before the norm normalises with it."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..capture import Program, Walk, fitting_batches


def set_norm_statistics(norm, xs: list[torch.Tensor], params: dict) -> None:
    """Set ``norm``'s running mean and (unbiased) variance to those of its inputs ``xs`` (one tensor per
    batch; sums in float64 across batches). Fewer than two samples leave them as they are."""
    dims = [d for d in range(xs[0].dim()) if d != norm.dim]
    shape = [-1 if d == norm.dim else 1 for d in range(xs[0].dim())]
    # Sums of x - shift in float32 per batch (the shift, a rough per-channel mean, removes the
    # cancellation of E[x^2] - E[x]^2), added in float64: several times faster than var_mean.
    shift = xs[0].mean(dims).reshape(shape)
    count, total, sq = 0, 0.0, 0.0
    for x in xs:
        d = x - shift
        total = total + d.sum(dims).double()
        sq = sq + torch.square(d).sum(dims).double()
        count += x.numel() // x.shape[norm.dim]
    if count < 2:
        return
    mean = total / count
    var = (sq - count * mean**2).clamp_min(0) / (count - 1)
    with torch.no_grad():
        params[norm.mean].copy_((mean + shift.flatten().double()).to(params[norm.mean].dtype))
        params[norm.var].copy_(var.to(params[norm.var].dtype))


def reset_statistics(program: Program, norms: list, batches: list, params: dict, *, progress: bool = True,
                     max_bytes: int = 4 << 30) -> int:
    """Walk the merged model over the calibration batches (as many as fit in ``max_bytes`` at once) and
    set every norm's statistics on the way. Returns the number of norms reset."""
    if not norms:
        return 0
    batches = fitting_batches(program, list(batches), max_bytes)
    at = {norm.node: norm for norm in norms}
    position = {n.name: i for i, n in enumerate(program.nodes)}
    last = max(position[name] for name in at)
    walk = Walk(program, batches)
    with torch.no_grad():
        for node in tqdm(program.nodes[: last + 1], desc="norm statistics", disable=not progress, leave=False):
            if node.name in at:
                set_norm_statistics(at[node.name], walk.values(at[node.name].in_node), params)
            walk.advance(node)
    return len(norms)
