"""Statistics summed across processes with torch.distributed.

Every statistic a merge gathers from calibration data is a sum over samples: matching moments, the refit's
Grams and cross-terms, norm statistics. When a default process group is initialised (``torchrun``, or
``pleas merge --nproc K``), each rank passes its own shard of the calibration data, the sums are
all-reduced in float64, and every rank solves the same problems and returns the same merged model. Seeded
sampling is keyed by the global index of a batch, so K ranks whose shards are consecutive runs of whole
batches pick the same samples as one process over all of them, and the merged weights agree with the
one-process merge to the round-off of summing in another order.

Outside a process group (or in one of one process), every function here is the identity on local values.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import socket

import torch
import torch.distributed as dist

from .errors import MergeInputError, PleasError

#: How long a collective waits for the other ranks before failing (``pleas merge --nproc``).
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("PLEAS_DIST_TIMEOUT", 300)))


def join_from_environment() -> None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) with no process group yet, join the
    one torchrun describes (gloo, :data:`TIMEOUT`), so that a merge script runs unchanged on K processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)


def active() -> bool:
    """Whether this process is one of several in an initialised default process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def all_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (one reduction for all of them, in float64)."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat)
    at = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[at : at + n].view(t.shape).to(t.dtype))
        at += n


def sum_numbers(*values: float) -> list[float]:
    """The sums of plain numbers over the ranks."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def offset_and_total(count: int) -> tuple[int, int]:
    """This rank's offset in the ranks' concatenated items (rank 0's first) and their total, for a local
    ``count`` of them (batches, samples): global indices of the local items are ``offset + i``."""
    if not active():
        return 0, count
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, int(count))
    return sum(counts[: dist.get_rank()]), sum(counts)


def same_everywhere(value: str, what: str) -> None:
    """Fail on every rank, naming the ranks that differ, unless ``value`` is the same on all of them."""
    if not active():
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise MergeInputError(f"{what} differ between ranks: rank(s) {differ} against rank 0; every rank must pass "
                              "the same models and options, and its own shard of the calibration data")


def raise_if_any(error: PleasError | None) -> None:
    """Raise on every rank when any rank met an error (its own, or one naming the rank that failed), so
    no rank waits for the others in a collective; outside a process group, raise ``error`` if there is one."""
    if not active():
        if error is not None:
            raise error
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise MergeInputError(f"rank {r} of the process group failed: {e}")


def check_shards(samples: int) -> None:
    """Fail on every rank when any rank's calibration shard is empty."""
    if not active():
        return
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, int(samples))
    empty = [r for r, c in enumerate(counts) if c == 0]
    if empty:
        raise MergeInputError(f"the calibration shard of rank(s) {empty} is empty (samples per rank: {counts}); "
                              "allowed: at least one sample on every rank")


def fingerprint(state_dicts: list[dict]) -> str:
    """A digest of the models' tensor names, shapes and values (float64 sums per tensor)."""
    h = hashlib.sha256()
    for sd in state_dicts:
        for name, t in sd.items():
            if isinstance(t, torch.Tensor):
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                if t.is_floating_point() and t.numel():  # float64 sums without a float64 copy of the tensor
                    total = float(t.sum(dtype=torch.float64))
                    size = float(torch.linalg.vector_norm(t, dtype=torch.float64))
                    # to 9 digits, the sum relative to the norm: equal on any CPU whatever the summation order
                    h.update(f"{size:.9e}{total / max(size, 1e-300):.9f}".encode())
    return h.hexdigest()


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The generator of global batch ``index``'s seeded samples: the same on whichever rank holds it."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63 - 1))


def free_port() -> int:
    """A free TCP port on the loopback interface, for a local process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local(rank_: int, size: int, port: int, timeout: datetime.timedelta = TIMEOUT) -> None:
    """Join a gloo process group of ``size`` processes on this machine (``pleas merge --nproc``)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank_, world_size=size,
                            timeout=timeout)


def shard(data: torch.Tensor, batch_size: int, rank_: int | None = None, size: int | None = None) -> torch.Tensor:
    """This rank's shard of ``data``: a consecutive run of whole batches of ``batch_size`` (rank 0's
    first), so that K ranks see the batches one process would, and sample alike (module docstring)."""
    rank_ = rank() if rank_ is None else rank_
    size = world_size() if size is None else size
    batches = -(-data.shape[0] // batch_size)
    lo, hi = rank_ * batches // size, (rank_ + 1) * batches // size
    return data[lo * batch_size : hi * batch_size]


def _rank_main(rank_: int, size: int, port: int, timeout: float, fn, args: tuple) -> None:
    if "OMP_NUM_THREADS" not in os.environ:  # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    init_local(rank_, size, port, datetime.timedelta(seconds=timeout))
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch(nproc: int, fn, args: tuple = (), timeout: datetime.timedelta = TIMEOUT) -> None:
    """Run ``fn(*args)`` in ``nproc`` processes on this machine that form one gloo process group (with
    ``timeout`` on every collective), and wait for them. ``fn`` must be importable by name (a module's
    top-level function). A rank's error is raised here as a :class:`PleasError` naming the rank (the
    other ranks are stopped); so is a rank that dies."""
    import torch.multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise MergeInputError(f"nproc={nproc!r}; allowed: a positive integer")
    if nproc == 1:
        fn(*args)
        return
    try:
        mp.spawn(_rank_main, args=(nproc, free_port(), timeout.total_seconds(), fn, args), nprocs=nproc, join=True)
    except mp.ProcessRaisedException as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else str(exc)
        name, _, message = last.partition(": ")
        kind = MergeInputError if name.endswith("MergeInputError") else PleasError
        raise kind(f"rank {exc.error_index} of {nproc} failed: {message or last}") from None
    except mp.ProcessExitedException as exc:
        raise PleasError(f"rank {exc.error_index} of {nproc} died (exit code {exc.exit_code}) before the merge "
                         "finished; no output was written") from None
