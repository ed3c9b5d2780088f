"""What the benchmark measures besides accuracy: the forward floor and peak memory.

* :func:`forward_floor`: seconds for models A and B to run once over the calibration data (eval mode,
  no gradients, the merge's batch size): the least any data-dependent merge must spend.
* :class:`PeakMemory`: the process's resident-memory high-water mark while a block runs. On Linux the
  kernel's mark (``VmHWM``) is reset before the block (``/proc/self/clear_refs``), so the peak is that
  of the block alone, with every allocation counted (torch's, numpy's, Python's). Elsewhere, or where the
  reset is not allowed, it falls back to ``getrusage``'s lifetime peak, which only shows a block's use
  when the block sets a new lifetime record; ``exact`` tells which one was measured. Before the block,
  garbage is collected and, with glibc, freed heap memory is returned to the system (``malloc_trim``), so
  memory that earlier work freed but the allocator kept does not hide the block's own growth.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@torch.no_grad()
def _run_once(models: Iterable[nn.Module], data: Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for model in models:
        for batch in data.split(batch_size):
            model(batch)
    return time.perf_counter() - start


def forward_floor(models: list[nn.Module], data: Tensor, *, batch_size: int = 256, repeats: int = 3) -> float:
    """Median seconds, over ``repeats`` timed runs after one warm-up run, for every model in ``models``
    to run once over ``data`` (N, ...) in batches of ``batch_size`` (eval mode, no gradients; each
    model's train/eval mode is restored)."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        _run_once(models, data, batch_size)
        return statistics.median(_run_once(models, data, batch_size) for _ in range(repeats))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    """glibc's ``malloc_trim``, or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free memory back to the system (glibc only)."""
    gc.collect()
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


class PeakMemory:
    """Context manager: ``peak_mb`` is the resident-memory peak (MiB) during the block, ``extra_mb`` that
    peak minus the resident memory at its start (what the block added), ``exact`` whether the peak was
    the block's own (Linux) or the process's lifetime peak (see the module docstring)."""

    def __enter__(self) -> "PeakMemory":
        release_free_memory()
        self.exact = False
        try:
            _CLEAR_REFS.write_text("5")  # reset VmHWM to the current resident size (Linux >= 4.0)
            self.exact = _status_kib("VmHWM") is not None
        except OSError:
            pass
        self._start_kib = _status_kib("VmRSS") if self.exact else _maxrss_kib()
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM") if self.exact else _maxrss_kib()
        self.peak_mb = (peak or 0) / 1024
        self.extra_mb = max(0, (peak or 0) - (self._start_kib or 0)) / 1024
