"""How well the sources' stored norm statistics describe the calibration data.

A merge resets running statistics on the calibration data (REPAIR) only when that data is the kind the
sources were trained on: their stored statistics then agree with the data's, and the reset corrects what
merging did to the variances. When the stored statistics disagree with the data (models that never saw
such inputs, calibration data from another domain: PLeaS-free), the stored ones, carried through the
merge, describe the inputs the merged model will serve better than the calibration data does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class NormObserver:
    """Per-channel count, sum and sum of squares of every norm's input in every source model (float64),
    an observer of :func:`pleas.statistics.source_pass`."""

    def __init__(self, norms: list):
        self.norms = norms
        self.nodes = sorted({norm.in_node for norm in norms})
        self.sums: dict[tuple[int, str], list] = {}

    def update(self, taps: list[dict]) -> None:
        for k, t in enumerate(taps):
            for norm in self.norms:
                x = t[norm.in_node]
                dims = [d for d in range(x.dim()) if d != norm.dim]
                entry = self.sums.setdefault((k, norm.name), [0, 0.0, 0.0])
                entry[0] += x.numel() // x.shape[norm.dim]
                entry[1] = entry[1] + x.double().sum(dims)
                entry[2] = entry[2] + torch.square(x.double()).sum(dims)

    def moments(self, k: int, norm) -> tuple[torch.Tensor, torch.Tensor, int]:
        count, total, sq = self.sums[(k, norm.name)]
        mean = total / count
        return mean, (sq / count - mean * mean).clamp_min(0), count


@dataclass
class Agreement:
    """How far the calibration data's statistics are from the stored ones, over every channel of every
    norm of every source: the median |log(variance ratio)| and the median |mean shift| in stored
    standard deviations."""

    log_variance_ratio: float
    mean_shift: float

    #: Beyond either, the data is not what the sources were trained on, for the typical channel: a
    #: variance off by 1.5x, a mean shifted by a tenth of a standard deviation. Measured on the demo pair:
    #: its own MNIST data 1.1x and 0.02 (at 500 images and at 64), UCI digits 1.8x and 0.18, Gaussian
    #: noise 1.8x and 0.27; an untrained resnet18 on Gaussian noise 26x and 0.28.
    LIMITS = (math.log(1.5), 0.1)

    @property
    def agrees(self) -> bool:
        return self.log_variance_ratio <= self.LIMITS[0] and self.mean_shift <= self.LIMITS[1]

    def describe(self) -> str:
        return (f"typical channel: variance {math.exp(self.log_variance_ratio):.2g}x off, mean shifted by "
                f"{self.mean_shift:.2g} standard deviations")


def agreement(observer: NormObserver, state_dicts: list[dict]) -> Agreement:
    """Compare each source's stored running statistics with the calibration data's (``observer``)."""
    ratios, shifts = [], []
    for k, sd in enumerate(state_dicts):
        for norm in observer.norms:
            if (k, norm.name) not in observer.sums:
                continue
            mean, var, _ = observer.moments(k, norm)
            stored_mean, stored_var = sd[norm.mean].double(), sd[norm.var].double()
            eps = norm.eps
            ratios.append(torch.log((var + eps) / (stored_var + eps)).abs())
            shifts.append((mean - stored_mean).abs() / torch.sqrt(stored_var + eps))
    if not ratios:
        return Agreement(0.0, 0.0)
    return Agreement(float(torch.cat(ratios).median()), float(torch.cat(shifts).median()))
