"""End-to-end distillation of a merged model toward its sources' ensemble, on the calibration inputs.

The closed-form refit fits each linear map alone; what no linear map can undo (a norm over the widened units
of a side-by-side merge, whose per-token scale mixes both models) stays. A few steps of gradient descent on
the whole merged model, toward the same teacher the refit fits (with a shared head the mean of the sources'
outputs, with separate heads each source's own), take it out: the pleas option ``distill_steps``.

* **Loss**: ``"kl"`` (the teacher's softmax over the last axis against the student's: a language model's
  next-token distribution, a classifier's classes) or ``"mse"`` (squared error summed over the last axis:
  any output, features included), averaged over the other axes and over the output's tensors.
* **What moves**: every floating-point parameter, except that entries the merge left exactly zero stay zero
  (the zero blocks of an effective-size budget: the model's size does not change).
* **Steps**: Adam, the learning rate reached by a linear warm-up over the first tenth of the steps (Adam's
  first steps, of about the learning rate in every weight, otherwise wreck a fitted start), minibatches of
  ``batch_size`` samples in a seeded order; the model in eval mode throughout (norm statistics and dropout
  as the merge left them), so that the function trained is the one evaluated.
* **Several processes**: each rank draws from its own shard and the gradients are averaged over the ranks
  (:mod:`pleas.distributed`), so every rank holds the same weights after every step.
* **Safety**: a non-finite loss, or a final loss above the starting one, restores the merged weights and
  says so in the report and a warning.
* **Memory**: about four more copies of the merged weights (the gradients, Adam's two moments, the start
  kept for the undo), and the teacher's outputs for every calibration sample while they fit in
  :data:`TEACHER_CACHE_BYTES` (else the sources run again at every step).

Written here rather than with a trainer library: the loop is a few lines over the calibration batches the
merge already holds, and a trainer would bring its own data, device and logging conventions.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..capture.program import _head, as_call, batch_size as samples_in, take

LOSSES = ("kl", "mse")


def output_tensors(out: Any) -> list[Tensor]:
    """The floating-point tensors of a model's output, in order (a tensor; a tuple, list or dict of them,
    nested; a Hugging Face ``ModelOutput``: its ``logits`` or features; caches and other objects skipped)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


def _run(model: nn.Module, batch: Any) -> list[Tensor]:
    args, kwargs = as_call(batch)
    return output_tensors(model(*args, **kwargs))


#: The teacher's outputs for every calibration sample are kept when they fit in this many bytes (a language
#: model's logits are samples x tokens x vocabulary); above it they are computed again for every step.
TEACHER_CACHE_BYTES = 512 << 20


@torch.no_grad()
def _teach(sources: list[nn.Module], batch: Any, separate: bool) -> list[Tensor]:
    per = [_run(m, batch) for m in sources]
    return [t for p in per for t in p] if separate else [sum(ts) / len(ts) for ts in zip(*per)]


def teacher(sources: list[nn.Module], batches: list, separate: bool, max_bytes: int = TEACHER_CACHE_BYTES):
    """``teach(i, idx)``: the teacher's output tensors for samples ``idx`` of batch ``i`` (every source's own
    with ``separate`` heads, else their mean), from a cache of every batch's when that fits in ``max_bytes``."""
    one = _teach(sources, _head(batches[0], 1), separate)
    per_sample = sum(t.numel() * t.element_size() for t in one)
    if per_sample * sum(samples_in(b) for b in batches) > max_bytes:
        return lambda i, idx: _teach(sources, take(batches[i], idx), separate)
    cached = [_teach(sources, b, separate) for b in batches]
    return lambda i, idx: [t[idx] for t in cached[i]]


def loss_of(student: list[Tensor], teacher: list[Tensor], kind: str) -> Tensor:
    if len(student) != len(teacher) or any(s.shape != t.shape for s, t in zip(student, teacher)):
        raise ValueError(f"the merged model's outputs {[tuple(s.shape) for s in student]} do not match the "
                         f"teacher's {[tuple(t.shape) for t in teacher]}")
    parts = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        if kind == "kl":
            log_t = t.log_softmax(-1)
            parts.append((log_t.exp() * (log_t - s.log_softmax(-1))).sum(-1).mean())
        else:
            parts.append(((s - t) ** 2).sum(-1).mean())
    return sum(parts) / len(parts)


def _mean_loss(model: nn.Module, batches: list, teach, kind: str) -> float:
    """The loss averaged over every calibration sample (of every rank)."""
    total = 0.0
    with torch.no_grad():
        for i, b in enumerate(batches):
            every = torch.arange(samples_in(b))
            total += float(loss_of(_run(model, b), teach(i, every), kind)) * len(every)
    total, count = distributed.sum_numbers(total, sum(samples_in(b) for b in batches))
    return total / max(count, 1)


def distill(model: nn.Module, sources: list[nn.Module], batches: list, *, steps: int, lr: float = 3e-4,
            batch_size: int = 32, loss: str = "kl", separate: bool = False, seed: int = 0,
            seconds: float | None = None, warmup: int | None = None, keep_zeros: bool = True,
            progress: bool = True) -> dict:
    """Train ``model`` in place for ``steps`` Adam steps toward the ensemble of ``sources`` on the samples
    of ``batches`` (see the module docstring). Returns the report entry: steps taken, loss before and after
    (the mean over every calibration sample), seconds, and ``restored`` when the steps were undone.

    ``seconds`` also stops the steps once that much wall time has passed since the call (the teacher's
    pass included, the loss bookkeeping not): a time-matched comparison, not deterministic. ``warmup``:
    steps of learning-rate warm-up (default a tenth of ``steps``; 0 for none). ``keep_zeros=False`` lets
    exact zeros move (a dense start, such as a source model)."""
    if loss not in LOSSES:
        raise ValueError(f"distill loss={loss!r}; allowed: {LOSSES}")
    began = time.perf_counter()
    teach = teacher(sources, batches, separate)
    params = [p for p in model.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    start = [p.detach().clone() for p in params]
    frozen = [p == 0 if keep_zeros else torch.zeros_like(p, dtype=torch.bool) for p in start]
    sizes = [samples_in(b) for b in batches]
    chunks = [(i, idx) for i, n in enumerate(sizes) for idx in torch.arange(n).split(batch_size)]
    generator = torch.Generator().manual_seed(seed)
    warmup = max(steps // 10, 1) if warmup is None else warmup
    optimiser = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min((s + 1) / warmup, 1.0) if warmup else 1.0)
    model.eval()
    counted = time.perf_counter()
    before = _mean_loss(model, batches, teach, loss)
    bookkeeping = time.perf_counter() - counted
    taken = 0
    finite = True
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = torch.zeros_like(p)
        order: list[int] = []
        with torch.enable_grad():
            for _ in tqdm(range(steps), desc="distillation", disable=not progress, leave=False):
                if seconds is not None:
                    late = torch.tensor([float(time.perf_counter() - began - bookkeeping >= seconds)])
                    distributed.all_sum(late)  # every rank stops at the same step
                    if late.item():
                        break
                if not order:
                    order = torch.randperm(len(chunks), generator=generator).tolist()
                i, idx = chunks[order.pop()]
                value = loss_of(_run(model, take(batches[i], idx)), teach(i, idx), loss)
                bad = torch.tensor([0.0 if torch.isfinite(value) else 1.0])
                optimiser.zero_grad(set_to_none=False)
                if not bad.item():
                    value.backward()
                grads = [p.grad for p in params]
                distributed.all_sum(*grads, bad)  # every rank stops together
                if bad.item():
                    finite = False
                    break
                with torch.no_grad():
                    for g, keep in zip(grads, frozen):
                        g.div_(distributed.world_size()).masked_fill_(keep, 0.0)
                optimiser.step()
                schedule.step()
                with torch.no_grad():
                    for p, keep in zip(params, frozen):
                        p.masked_fill_(keep, 0.0)
                taken += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
    after = _mean_loss(model, batches, teach, loss) if finite else math.inf
    entry = {"steps": taken, "loss": loss, "lr": lr, "batch_size": batch_size, "loss_before": before,
             "loss_after": after, "seconds": time.perf_counter() - began}
    if not finite or not after <= before:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        entry["restored"] = "a non-finite loss" if not finite else f"the loss rose from {before:.4g} to {after:.4g}"
        warnings.warn(f"pleas: distillation undone ({entry['restored']}); the merge is returned as it was: "
                      "lower distill_lr", stacklevel=3)
    return entry
