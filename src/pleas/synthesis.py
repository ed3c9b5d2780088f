"""Calibration inputs synthesised from the source models themselves (DeepInversion, Yin et al., CVPR 2020).

Every BatchNorm layer of a trained model stores the running mean and variance of its input over the
model's training data. :func:`synthesize` optimises a batch of noise with Adam so that, at every such
layer, the batch's per-channel mean and variance match the stored ones,

    loss = bn * sum_l (||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2)
           + tv * TV(x) + l2 * mean(x^2) [+ targets * CE(model(x), random labels)],

where TV is the mean squared difference between neighbouring entries along every axis after the channel
one (a smoothness prior). Merging with such inputs needs no data at all: ``pleas merge ... --data
synthetic:N``. :func:`statistics_gap` measures how well a batch matches a model's stored statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import MergeInputError

#: How several source models share the synthesis: "joint" (the default) matches every batch to every
#: model's statistics at once; "share" gives each model its own part of the ``n`` inputs, matched to its
#: statistics alone (like task calibration data, half from each domain). Measured on the mnist-halves /
#: resnet20 pair of the benchmark (1000 inputs, 100 steps; docs/free-data.md): PLeaS at 1x reaches 0.930
#: mean accuracy on joint inputs, 0.813 on shared ones (0.964 on the task's data), at twice the cost.
MODES = ("share", "joint")
#: The options of :func:`synthesize` a caller may set by name (the command line's ``--synthesis``).
OPTIONS = ("steps", "lr", "batch_size", "bn", "tv", "l2", "targets", "mode")


@dataclass(frozen=True)
class SynthesisOptions:
    """The optimisation: ``steps`` Adam steps at learning rate ``lr`` per batch of at most ``batch_size``
    inputs; the loss weights ``bn`` (statistics), ``tv`` (total variation), ``l2`` (input energy) and
    ``targets`` (cross-entropy toward random labels of the model's outputs; 0 turns it off)."""

    steps: int = 200
    lr: float = 0.1
    batch_size: int = 256
    bn: float = 1.0
    tv: float = 1e-3
    l2: float = 1e-4
    targets: float = 0.0


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that hold running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None]


def _check(models: list, n, shape, options: SynthesisOptions, mode: str) -> list[nn.Module]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MergeInputError(f"synthesize: n={n!r}; allowed: a positive integer (the number of inputs)")
    if not isinstance(shape, tuple) or not shape or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise MergeInputError(f"synthesize: shape={shape!r}; allowed: the shape of one input as positive integers, "
                              "e.g. (1, 32, 32) for one-channel 32x32 images")
    if mode not in MODES:
        raise MergeInputError(f"synthesize: mode={mode!r}; allowed: {MODES}")
    for name in ("steps", "batch_size"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MergeInputError(f"synthesize: {name}={value!r}; allowed: a positive integer")
    for name in ("lr", "bn", "tv", "l2", "targets"):
        value = getattr(options, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise MergeInputError(f"synthesize: {name}={value!r}; allowed: a finite number >= 0")
    if not models:
        raise MergeInputError("synthesize needs at least one model")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise MergeInputError(f"synthesize: model {i} must be an nn.Module, got {type(model).__name__}")
        if not _norms(model):
            raise MergeInputError(
                f"synthesize: model {i} ({type(model).__name__}) has no BatchNorm layer with running statistics; "
                "synthesis matches the per-layer mean and variance a model stores of its training data, so it "
                "needs BatchNorm layers (BatchNorm1d/2d/3d with track_running_stats=True). For models without "
                "them, pass calibration data from their domain (or from another one: PLeaS-free)")
    return list(models)


class _Recorder:
    """Forward pre-hooks on a model's BatchNorm layers that keep (batch mean, batch variance, stored mean,
    stored variance) of every layer's input, per channel, differentiable in the input."""

    def __init__(self, model: nn.Module):
        self.stats: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self.handles = [m.register_forward_pre_hook(self._hook) for m in _norms(model)]

    def _hook(self, module, inputs):
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        self.stats.append((mean, var, module.running_mean.detach(), module.running_var.detach()))

    def take(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        stats, self.stats = self.stats, []
        return stats

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return getattr(out, "logits", None)


def total_variation(x: Tensor) -> Tensor:
    """Mean squared difference between neighbouring entries along every axis after the channel one."""
    terms = [torch.diff(x, dim=d).pow(2).mean() for d in range(2, x.dim()) if x.shape[d] > 1]
    return torch.stack(terms).sum() if terms else x.new_zeros(())


def _batch(models: list[nn.Module], recorders: list[_Recorder], count: int, shape: tuple[int, ...],
           options: SynthesisOptions, generator: torch.Generator, device, dtype, bar) -> Tensor:
    """One batch of ``count`` inputs optimised against every model in ``models``."""
    x = torch.randn((count, *shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    labels = None
    optimiser = torch.optim.Adam([x], lr=options.lr)
    for _ in range(options.steps):
        optimiser.zero_grad(set_to_none=True)
        loss = options.tv * total_variation(x) + options.l2 * x.pow(2).mean()
        for k, (model, recorder) in enumerate(zip(models, recorders)):
            out = model(x)
            stats = recorder.take()
            loss = loss + options.bn * sum(torch.linalg.vector_norm(m - rm) + torch.linalg.vector_norm(v - rv)
                                           for m, v, rm, rv in stats)
            logits = _first_tensor(out)
            if options.targets > 0 and logits is not None and logits.dim() == 2:
                if labels is None:
                    labels = [torch.randint(logits.shape[1], (count,), generator=generator) for _ in models]
                loss = loss + options.targets * F.cross_entropy(logits, labels[k].to(logits.device))
        (grad,) = torch.autograd.grad(loss, [x])
        x.grad = grad
        optimiser.step()
        bar.update(1)
    return x.detach()


def synthesize(model_or_models: nn.Module | list[nn.Module] | tuple | dict, n: int, *, shape: tuple[int, ...],
               steps: int = SynthesisOptions.steps, lr: float = SynthesisOptions.lr,
               batch_size: int = SynthesisOptions.batch_size, bn: float = SynthesisOptions.bn,
               tv: float = SynthesisOptions.tv, l2: float = SynthesisOptions.l2,
               targets: float = SynthesisOptions.targets, mode: str = "joint", seed: int = 0,
               device: str | torch.device = "cpu", progress: bool = True) -> Tensor:
    """``n`` calibration inputs of per-sample ``shape`` synthesised from the BatchNorm statistics of
    ``model_or_models`` (one model, a list, or a dict of named models): (n, *shape) float32 on the CPU.

    Each batch of at most ``batch_size`` inputs starts as Gaussian noise (seeded by ``seed`` and the
    batch's index) and takes ``steps`` Adam steps on the loss of :mod:`pleas.synthesis`. With several
    models and ``mode="joint"`` (default) every batch matches every model's statistics (each step runs
    every model); with ``mode="share"`` model i synthesises inputs ``i * n // k`` to ``(i + 1) * n // k``
    alone, matched to its own statistics (:data:`MODES`).
    The models are used in eval mode and left as they were (mode and weights). Deterministic given
    ``seed`` (on one device and thread count, up to floating-point round-off).

    Raises:
        MergeInputError: a model without BatchNorm running statistics (synthesis has nothing to match),
            or an invalid ``n``, ``shape`` or option.
    """
    models = list(model_or_models.values()) if isinstance(model_or_models, dict) else \
        list(model_or_models) if isinstance(model_or_models, (list, tuple)) else [model_or_models]
    options = SynthesisOptions(steps, lr, batch_size, bn, tv, l2, targets)
    shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else shape
    models = _check(models, n, shape, options, mode)
    if mode == "share":
        bounds = [i * n // len(models) for i in range(len(models) + 1)]
        plan = [([k], bounds[k + 1] - bounds[k]) for k in range(len(models))]
    else:
        plan = [(list(range(len(models))), n)]
    jobs = [(ks, min(batch_size, total - start)) for ks, total in plan for start in range(0, total, batch_size)]
    dtypes = {p.dtype for m in models for p in m.parameters() if p.dtype.is_floating_point}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    modes = [[mod.training for mod in m.modules()] for m in models]
    flags = [[p.requires_grad for p in m.parameters()] for m in models]
    recorders = [_Recorder(m) for m in models]
    bar = tqdm(total=len(jobs) * steps, desc="synthesis", disable=not progress, leave=False)
    try:
        for m in models:
            m.eval().requires_grad_(False)
        parts = []
        with torch.enable_grad():
            for index, (ks, count) in enumerate(jobs):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
                if count > 0:
                    parts.append(_batch([models[k] for k in ks], [recorders[k] for k in ks], count, shape, options,
                                        generator, device, dtype, bar))
    finally:
        bar.close()
        for r in recorders:
            r.close()
        for m, training, required in zip(models, modes, flags):
            for mod, t in zip(m.modules(), training):
                mod.training = t
            for p, r in zip(m.parameters(), required):
                p.requires_grad_(r)
    x = torch.cat(parts).to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise MergeInputError("synthesize: the optimisation diverged (non-finite inputs); lower lr")
    return x.contiguous()


def statistics_gap(model: nn.Module, x: Tensor, *, batch_size: int = 1024) -> list[dict]:
    """Per BatchNorm layer of ``model`` (eval mode, not changed), how far the per-channel statistics of
    ``x`` at its input are from the stored ones: ``{"layer", "mean_shift", "log_variance_ratio"}``,
    each the largest over channels (mean shift in stored standard deviations, |log(var / stored var)|),
    over all of ``x`` (sums over batches of ``batch_size``)."""
    norms = dict((m, name) for name, m in model.named_modules() if m in set(_norms(model)))
    sums: dict = {}

    def hook(module, inputs):
        t = inputs[0].double()
        dims = [d for d in range(t.dim()) if d != 1]
        entry = sums.setdefault(module, [0, 0.0, 0.0])
        entry[0] += t.numel() // t.shape[1]
        entry[1] = entry[1] + t.sum(dims)
        entry[2] = entry[2] + t.pow(2).sum(dims)

    training = [mod.training for mod in model.modules()]
    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
        for mod, t in zip(model.modules(), training):
            mod.training = t
    gaps = []
    for module, name in norms.items():
        count, total, sq = sums[module]
        mean = total / count
        var = (sq / count - mean * mean).clamp_min(0)
        stored_mean, stored_var = module.running_mean.double(), module.running_var.double()
        eps = module.eps
        gaps.append({"layer": name,
                     "mean_shift": float(((mean - stored_mean).abs() / torch.sqrt(stored_var + eps)).max()),
                     "log_variance_ratio": float(torch.log((var + eps) / (stored_var + eps)).abs().max())})
    return gaps


#: The ``--data`` prefix of synthesised calibration data on the command line (``synthetic:N``).
PREFIX = "synthetic:"


def synthetic_count(spec: str) -> int | None:
    """N of a ``"synthetic:N"`` calibration spec; None for any other spec. A bad N is a clear error."""
    text = str(spec)
    if not text.startswith(PREFIX):
        return None
    value = text[len(PREFIX):]
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise MergeInputError(f"--data {text!r}: {value!r} is not a number of inputs; allowed: synthetic:N with N a "
                              "positive integer, e.g. synthetic:512")
    return n
