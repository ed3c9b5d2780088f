"""Functions run in each rank of the process groups that tests/test_distributed.py launches (a module of
its own so that every spawned process can import them by name; tests/ is on their path)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

import pleas
from pleas import distributed
from pleas.errors import PleasError
from toy_models import VGGBN, randomise_norm_stats

#: Calibration batch size: the data holds 5 batches, so 2 ranks get 2 and 3 of them.
BATCH = 16
#: (method, budget) pairs checked against the one-process merge.
CASES = (("pleas", 1.5), ("regmean", 1.0), ("zipit", 1.5))


def models(seed_b: int = 1) -> list:
    out = []
    for seed in (0, seed_b):
        torch.manual_seed(seed)
        out.append(randomise_norm_stats(VGGBN(), seed=seed).eval())
    return out


def data() -> torch.Tensor:
    return torch.randn(5 * BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def merge(method: str, budget: float, x: torch.Tensor, seed_b: int = 1, dtype: torch.dtype = torch.float64):
    """Merged in float64 by default: every product then runs in float64 and the ranks' merge differs from
    one process's by float64 round-off alone (a float32 merge computes large products in float32, and a
    BLAS may sum a row's products in another order for another number of rows: float32 round-off)."""
    a, b = models(seed_b)
    return pleas.merge(a, b, x, method=method, budget=budget, batch_size=BATCH, progress=False, dtype=dtype)


def merge_shards(out_dir: str) -> None:
    """Every case on this rank's shard; each rank saves its merged weights and reports."""
    rank = distributed.rank()
    x = distributed.shard(data(), BATCH)
    for method, budget in CASES:
        result = merge(method, budget, x)
        torch.save({"state": result.model.state_dict(), "report": {k: result.report[k] for k in
                    ("calibration_samples", "processes", "norm_stats")}},
                   Path(out_dir) / f"{method}-rank{rank}.pt")


def faulty(out_dir: str, fault: str) -> None:
    """A merge where rank 1 is at fault: its shard is empty ("empty"), its model B differs ("models"), or
    it dies before the merge ("dies"). Each rank writes the error it saw."""
    rank = distributed.rank()
    x = distributed.shard(data(), BATCH)
    if rank == 1 and fault == "empty":
        x = x[:0]
    if rank == 1 and fault == "dies":
        os._exit(3)
    try:
        merge("pleas", 1.0, x, seed_b=2 if (rank == 1 and fault == "models") else 1)
    except PleasError as exc:
        (Path(out_dir) / f"error-rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        raise
    (Path(out_dir) / f"merged-rank{rank}.txt").write_text("merged")
