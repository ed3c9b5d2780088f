"""Norm statistics after a merge (REPAIR-style): every running statistic a handler declared
(:class:`~pleas.ops.NormStats`) is set to the exact mean and variance of the merged model's own
activations, in graph order, each before the norm normalises with it."""
from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..capture import Program, Walk, fitting_batches


#: Weight, in samples, of the statistics a merge carried over when they are recomputed on data.
PRIOR_SAMPLES = 16
#: A channel whose variance on the data is below this share of the carried-over one is taken as flat.
FLAT = 1e-3


def set_norm_statistics(norm, xs: list[torch.Tensor], params: dict) -> None:
    """Set ``norm``'s running mean and (unbiased) variance to those of its inputs ``xs`` (one tensor per
    batch; sums in float64 across batches), shrunk toward the current ones by :data:`PRIOR_SAMPLES`.
    Fewer than two samples leave them as they are."""
    dims = [d for d in range(xs[0].dim()) if d != norm.dim]
    shape = [-1 if d == norm.dim else 1 for d in range(xs[0].dim())]
    # Sums of x - shift in float32 per batch (the shift, a rough per-channel mean, removes the
    # cancellation of E[x^2] - E[x]^2), added in float64: several times faster than var_mean.
    shift = xs[0].mean(dims).double()
    distributed.all_sum(shift)  # one shift for every rank of a process group, so their sums add up
    shift = (shift / distributed.world_size()).to(xs[0].dtype).reshape(shape)
    count, total, sq = 0, 0.0, 0.0
    for x in xs:
        d = x - shift
        total = total + d.sum(dims).double()
        sq = sq + torch.square(d).sum(dims).double()
        count += x.numel() // x.shape[norm.dim]
    count = int(distributed.sum_numbers(count)[0])
    distributed.all_sum(total, sq)
    if count < 2:
        return
    mean = total / count + shift.flatten().double()
    var = (sq - count * (total / count) ** 2).clamp_min(0) / (count - 1)
    # Shrunk toward the statistics the merge carried over from the sources, worth PRIOR_SAMPLES samples:
    # negligible with plenty of data, a floor under variances estimated from a handful of samples.
    prior_mean, prior_var = params[norm.mean].double(), params[norm.var].double()
    w = count / (count + PRIOR_SAMPLES)
    var = w * var + (1 - w) * prior_var
    flat = var < FLAT * prior_var  # (nearly) constant on the data: normalising by it would blow up new inputs
    if bool(flat.any()):
        var = torch.where(flat, prior_var, var)
        warnings.warn(f"pleas: {int(flat.sum())} of {len(var)} channels of {norm.name} barely vary on the calibration "
                      "data; they keep the variance the merge carried over from the sources", stacklevel=2)
    with torch.no_grad():
        params[norm.mean].copy_((w * mean + (1 - w) * prior_mean).to(params[norm.mean].dtype))
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
