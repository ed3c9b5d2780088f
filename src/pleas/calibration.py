"""Calibration data: whatever the user passes, as a re-iterable stream of input batches."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from .errors import MergeInputError


class Calibration:
    """Re-iterable input batches from a tensor, a DataLoader, or any iterable of tensors or (x, y) pairs.

    Labels are dropped. A one-shot iterator (a generator) is read once and kept in memory, because
    merging passes over the data several times. Batches are moved to ``device`` and ``dtype``.
    """

    def __init__(self, data: Any, *, batch_size: int = 256, device: str | torch.device = "cpu", dtype=torch.float32):
        if data is None:
            raise MergeInputError("calibration data is None; pass a tensor, a DataLoader, or an iterable of batches")
        self.device, self.dtype = torch.device(device), dtype
        if isinstance(data, torch.Tensor):
            if data.dim() == 0 or data.shape[0] == 0:
                raise MergeInputError(f"calibration tensor of shape {tuple(data.shape)} holds no samples")
            self._source: Iterable = list(data.split(batch_size))
        elif isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
            raise MergeInputError(
                f"calibration data of type {type(data).__name__} is not supported; pass a tensor, a DataLoader, "
                "or an iterable of tensors or (inputs, labels) pairs"
            )
        elif iter(data) is data:
            self._source = list(data)
        else:
            self._source = data
        first = next(iter(self), None)
        if first is None:
            raise MergeInputError("calibration data is empty: it yielded no batch")
        self.sample_shape = tuple(first.shape[1:])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i, item in enumerate(self._source):
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, torch.Tensor):
                raise MergeInputError(f"calibration batch {i} is a {type(x).__name__}, not a tensor")
            if x.dim() == 0 or x.shape[0] == 0:
                raise MergeInputError(f"calibration batch {i} of shape {tuple(x.shape)} is empty")
            if not torch.isfinite(x).all():
                raise MergeInputError(f"calibration batch {i} contains NaN or infinite values")
            yield x.to(self.device, self.dtype)

    def __len__(self) -> int:
        return len(self._source)
