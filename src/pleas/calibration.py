"""Calibration data: whatever the user passes, as a re-iterable stream of input batches."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from .errors import MergeInputError


def _split(data: Any, batch_size: int) -> list:
    if isinstance(data, torch.Tensor):
        return list(data.split(batch_size))
    n = next(v.shape[0] for v in data.values() if isinstance(v, torch.Tensor))
    return [{k: v[i : i + batch_size] if isinstance(v, torch.Tensor) else v for k, v in data.items()}
            for i in range(0, n, batch_size)]


def _samples(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 0
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return tensors[0].shape[0] if tensors and tensors[0].dim() else 0


class Calibration:
    """Re-iterable input batches from a tensor (N, ...), a dict of model inputs as a tokenizer returns them
    ({"input_ids": (N, T), "attention_mask": (N, T)}), a DataLoader, or any iterable of tensors, dicts or
    (inputs, labels) pairs.

    Labels are dropped. A one-shot iterator (a generator) is read once and kept in memory, because
    merging passes over the data several times. Floating-point inputs are moved to ``device`` and
    ``dtype``; integer inputs (token ids, masks) only to ``device``, never cast to float.
    """

    def __init__(self, data: Any, *, batch_size: int = 256, device: str | torch.device = "cpu", dtype=torch.float32):
        if data is None:
            raise MergeInputError("calibration data is None; pass a tensor, a DataLoader, or an iterable of batches")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MergeInputError(f"batch_size={batch_size!r}; allowed: a positive integer")
        self.device, self.dtype = torch.device(device), dtype
        if isinstance(data, torch.Tensor) or (isinstance(data, dict) and data
                                              and all(isinstance(v, torch.Tensor) for v in data.values())):
            if _samples(data) == 0:
                shape = tuple(data.shape) if isinstance(data, torch.Tensor) else {k: tuple(v.shape) for k, v in data.items()}
                raise MergeInputError(f"calibration data of shape {shape} holds no samples")
            self._source: Iterable = _split(data, batch_size)
        elif isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
            raise MergeInputError(
                f"calibration data of type {type(data).__name__} is not supported; pass a tensor, a dict of tensors, "
                "a DataLoader, or an iterable of tensors or (inputs, labels) pairs"
            )
        elif iter(data) is data:
            self._source = list(data)
        else:
            self._source = data
        first = next(iter(self), None)
        if first is None:
            raise MergeInputError("calibration data is empty: it yielded no batch")
        self.first = first

    def _convert(self, x: torch.Tensor, i: int, name: str = "") -> torch.Tensor:
        if x.is_floating_point():
            if not torch.isfinite(x).all():
                raise MergeInputError(f"calibration batch {i}{name} contains NaN or infinite values")
            return x.to(self.device, self.dtype)
        if x.dtype.is_complex:
            raise MergeInputError(f"calibration batch {i}{name} has dtype {x.dtype}; allowed: real numbers or ids")
        return x.to(self.device)

    def __iter__(self) -> Iterator:
        for i, item in enumerate(self._source):
            x = item[0] if isinstance(item, (tuple, list)) else item
            if isinstance(x, dict):
                if not any(isinstance(v, torch.Tensor) for v in x.values()):
                    raise MergeInputError(f"calibration batch {i} is a dict without tensors")
                if _samples(x) == 0:
                    raise MergeInputError(f"calibration batch {i} is empty")
                yield {k: self._convert(v, i, f" ({k!r})") if isinstance(v, torch.Tensor) else v for k, v in x.items()}
                continue
            if not isinstance(x, torch.Tensor):
                raise MergeInputError(f"calibration batch {i} is a {type(x).__name__}, not a tensor")
            if x.dim() == 0 or x.shape[0] == 0:
                raise MergeInputError(f"calibration batch {i} of shape {tuple(x.shape)} is empty")
            yield self._convert(x, i)

    def __len__(self) -> int:
        return len(self._source)

    def samples(self) -> int:
        """The number of calibration samples."""
        return sum(_samples(b) for b in self)

    def batches(self) -> list:
        """Every batch, converted, as a list."""
        return list(self)


class PerModel:
    """Calibration data given per source model: ``pleas.merge(a, b, per_model(data_a, data_b))``. Methods
    that gather statistics of each model alone (RegMean's Grams) use each model's own data; the others use
    all of it together. Each part is anything :class:`Calibration` accepts."""

    def __init__(self, *parts: Any, names: tuple[str, ...] | None = None):
        if len(parts) < 2:
            raise MergeInputError(f"per_model needs one calibration set per source model; got {len(parts)}")
        self.parts = parts
        self.names = names  # the models' names, when given as a dict

    def ordered(self, labels: list[str]) -> "PerModel":
        """The parts in the order of the models named ``labels`` (data given by name must name every model,
        and only those)."""
        if self.names is None:
            return self
        missing = [n for n in labels if n not in self.names]
        extra = [n for n in self.names if n not in labels]
        if missing or extra:
            raise MergeInputError(f"per_model data names {list(self.names)}, the models are {labels}: "
                                  + "; ".join(filter(None, [missing and f"no data for {missing}",
                                                            extra and f"no model named {extra}"])))
        by_name = dict(zip(self.names, self.parts))
        return PerModel(*(by_name[n] for n in labels))


def per_model(*parts: Any) -> PerModel:
    """Calibration data given per source model: in the order of the models, or one dict keyed by the names
    of models given as a dict (``merge({"a": ma, "b": mb, ...}, per_model({"a": da, "b": db, ...}))``)."""
    if len(parts) == 1 and isinstance(parts[0], dict):
        named = parts[0]
        return PerModel(*named.values(), names=tuple(str(k) for k in named))
    return PerModel(*parts)
