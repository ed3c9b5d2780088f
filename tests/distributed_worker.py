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
#: (method, budget, options) checked against the one-process merge. PLeaS's refit solves a layer with
#: fewer samples than columns from its rows in one process but from a Gram (a sum over the ranks) in
#: several: the one-process merge is asked for the Gram too (the two agree to about 1e-8 relative,
#: tests/test_memory.py).
CASES = (("pleas", 1.5, {"solver": "dense"}), ("pleas", 1.5, {"solver": "dense", "streaming": True}),
         ("regmean", 1.0, {}), ("zipit", 1.5, {}))


def label(method: str, options: dict) -> str:
    """A case's name (its saved files')."""
    return method + ("-streaming" if options.get("streaming") else "")


def models(seed_b: int = 1) -> list:
    out = []
    for seed in (0, seed_b):
        torch.manual_seed(seed)
        out.append(randomise_norm_stats(VGGBN(), seed=seed).eval())
    return out


def data() -> torch.Tensor:
    return torch.randn(5 * BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def merge(method: str, budget: float, x: torch.Tensor, seed_b: int = 1, dtype: torch.dtype = torch.float64,
          **options):
    """Merged in float64 by default: every product then runs in float64 and the ranks' merge differs from
    one process's by float64 round-off alone (a float32 merge computes large products in float32, and a
    BLAS may sum a row's products in another order for another number of rows: float32 round-off)."""
    a, b = models(seed_b)
    return pleas.merge(a, b, x, method=method, budget=budget, batch_size=BATCH, progress=False, dtype=dtype,
                       **options)


def merge_shards(out_dir: str) -> None:
    """Every case on this rank's shard; each rank saves its merged weights and reports."""
    rank = distributed.rank()
    x = distributed.shard(data(), BATCH)
    for method, budget, options in CASES:
        result = merge(method, budget, x, **options)
        torch.save({"state": result.model.state_dict(), "report": {k: result.report[k] for k in
                    ("calibration_samples", "processes", "norm_stats")}},
                   Path(out_dir) / f"{label(method, options)}-rank{rank}.pt")
    # distillation: each rank steps on its own shard with the gradients averaged over both
    result = merge("pleas", 1.0, x, distill_steps=3, distill_loss="mse", distill_lr=1e-4)
    torch.save({"state": result.model.state_dict(), "distill": result.report["distill"]},
               Path(out_dir) / f"distill-rank{rank}.pt")


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
