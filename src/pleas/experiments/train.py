"""Training, evaluation and on-disk caching of small classifiers for experiments.

* :func:`train_classifier`: minibatch training with cross-entropy, deterministic given ``seed``.
* :func:`evaluate`: top-1 accuracy in eval mode.
* :func:`cached_model`: train once, store the state dict as safetensors under the cache directory
  (``$PLEAS_CACHE`` or ``~/.cache/pleas``), load it on later calls.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..cache import cache_dir, canonical_json, stable_hash
from ..files import atomic_write
from ..datasets import Dataset

_OPTIMIZERS = ("adam", "sgd")
_SCHEDULES = ("cosine", "constant")


def _select_output(out, output_index: int | None) -> Tensor:
    """The logits (N, num_classes) from a model's output, picking ``output_index`` from a tuple/list."""
    if isinstance(out, (tuple, list)):
        if output_index is None:
            raise ValueError(
                f"the model returned a {type(out).__name__} of {len(out)} outputs; pass output_index to pick the logits"
            )
        return out[output_index]
    if output_index is not None:
        raise ValueError(f"output_index={output_index} was given but the model returned a single tensor")
    return out


def _shift_augment(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each sample by a random integer offset in [-max_shift, max_shift] per spatial axis.

    x: (N, C, L) or (N, C, H, W); zero padding fills the uncovered border. Returns the same shape.
    """
    n, spatial = x.shape[0], x.shape[2:]
    pad = [max_shift] * (2 * len(spatial))
    padded = F.pad(x, pad)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, len(spatial)), generator=generator).tolist()
    out = torch.empty_like(x)
    for i, off in enumerate(offsets):
        window = tuple(slice(o, o + s) for o, s in zip(off, spatial))
        out[i] = padded[(i, slice(None)) + window]
    return out


def train_classifier(
    model: nn.Module,
    dataset: Dataset,
    *,
    seed: int,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    augment: bool = False,
    max_shift: int = 2,
    output_index: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place on ``dataset`` with cross-entropy; returns it in eval mode on ``device``.

    Args:
        model: maps x (B, *dataset.sample_shape) to logits (B, num_classes), or to a tuple whose
            ``output_index``-th element is the logits.
        dataset: training data; ``x`` float32 (N, ...), ``y`` int64 (N,).
        seed: seeds the shuffling, augmentation and any randomness inside the model (e.g. dropout).
            The global torch RNG is left as it was. Initial weights are the model's own; build it
            with ``architectures.create(..., seed=...)`` for a fully seeded run.
        epochs: passes over the data.
        batch_size: minibatch size; a final batch of a single sample is dropped (BatchNorm needs 2).
        lr: peak learning rate.
        optimizer: "adam" (Adam) or "sgd" (SGD with Nesterov ``momentum``).
        weight_decay: L2 penalty passed to the optimizer.
        schedule: "cosine" (per-step cosine decay to 0) or "constant".
        augment: if True, random translations of up to ``max_shift`` pixels / samples per axis.
        device: where to train, e.g. "cpu" or "cuda:0".
        progress: show a tqdm progress bar (``leave=False``).
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; allowed are {', '.join(map(repr, _OPTIMIZERS))}")
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed are {', '.join(map(repr, _SCHEDULES))}")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    if len(dataset) < 2:
        raise ValueError(f"dataset {dataset.name!r} has {len(dataset)} samples; training needs at least 2")

    device = torch.device(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)

    n = len(dataset)
    batches_per_epoch = n // batch_size + (1 if n % batch_size > 1 else 0)
    total_steps = max(1, epochs * batches_per_epoch)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total_steps)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    generator = torch.Generator().manual_seed(seed)
    x_all, y_all = dataset.x, dataset.y
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        bar = tqdm(total=total_steps if epochs else 0, desc=f"train {dataset.name}", leave=False, disable=not progress)
        try:
            for _ in range(epochs):
                order = torch.randperm(n, generator=generator)
                for b in range(batches_per_epoch):
                    idx = order[b * batch_size : (b + 1) * batch_size]
                    x = x_all[idx]
                    if augment:
                        x = _shift_augment(x, max_shift, generator)
                    x, y = x.to(device), y_all[idx].to(device)
                    logits = _select_output(model(x), output_index)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        finally:
            bar.close()
    return model.eval()


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 512,
    output_index: int | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """Logits (N, num_classes) of ``model`` on ``dataset`` in eval mode, on the CPU.

    ``device`` defaults to the device of the model's first parameter (CPU if it has none). The
    model's train/eval mode is restored afterwards.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        outs = [
            _select_output(model(dataset.x[i : i + batch_size].to(device)), output_index).cpu()
            for i in range(0, len(dataset), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0, dataset.num_classes)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 512,
    output_index: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``dataset`` (eval mode, no gradients)."""
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.name!r} is empty; accuracy needs at least one sample")
    logits = predict(model, dataset, batch_size=batch_size, output_index=output_index, device=device)
    return (logits.argmax(dim=1) == dataset.y).float().mean().item()


def model_path(key: dict) -> Path:
    """Where :func:`cached_model` stores the weights for ``key``: ``<cache>/models/<hash>.safetensors``."""
    return cache_dir("models") / f"{stable_hash(key)}.safetensors"


def cached_model(
    key: dict,
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], nn.Module | None],
    *,
    metadata: dict[str, str] | None = None,
) -> nn.Module:
    """A trained model, trained at most once per ``key`` and cached as safetensors.

    Args:
        key: JSON-serialisable dict that identifies the trained weights (architecture name and
            kwargs, dataset, classes, resolution, seed, epochs, ...). Its stable hash names the file.
        build: returns a fresh, untrained model of the right architecture (on the CPU).
        train: trains the model it is given (in place or by returning a new one).
        metadata: extra string entries stored in the file's header beside ``key`` (e.g. a model's
            config as JSON), written when the model is trained; an entry named "key" is replaced.

    Returns:
        The model in eval mode, on the CPU. On a cache hit, ``build()`` is called and the stored
        state dict loaded into it (strictly: every key must match); ``train`` is not called.
    """
    if not isinstance(key, dict):
        raise TypeError(f"key must be a dict describing the run, got {type(key).__name__}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str (safetensors headers hold strings only)")
    path = model_path(key)
    model = build()
    if path.exists():
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.eval()
    trained = train(model)
    model = model if trained is None else trained
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {**(metadata or {}), "key": canonical_json(key)}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return model.cpu().eval()
