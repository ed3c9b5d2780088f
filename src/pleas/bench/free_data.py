"""Calibration data for PLeaS-free: inputs of the task's shape that come from neither source model's data.

Each function returns ``n`` float32 inputs, roughly zero mean and unit variance, deterministic given
``seed``: images (n, 1, R, R) or MNIST-1D-shaped signals (n, 1, 40).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MergeInputError
from .. import datasets as data

#: Patch sides (pixels of the 427x640 photographs) that photo patches are cropped at, before resizing.
PATCH_SIDES = (24, 160)
#: MNIST-1D generation seed offset of the phase-shuffled signals (the task's models use offset 0).
MNIST1D_FREE_SEED = 1


def _check(n: int, resolution: int | None, images: bool) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MergeInputError(f"free calibration size n={n!r}; allowed: a positive integer")
    if images and resolution is None:
        raise MergeInputError("image calibration data needs a resolution")


def digits(n: int, resolution: int | None, seed: int) -> Tensor:
    """UCI digits (scikit-learn; all classes, training and test splits) resized to ``resolution``: (n, 1, R, R)."""
    _check(n, resolution, images=True)
    pool = torch.cat([data.load("digits", split=s, resolution=resolution).x for s in ("train", "test")])
    if n > len(pool):
        raise MergeInputError(f"free calibration of {n} samples asked for; the UCI digits hold {len(pool)}")
    return pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]].contiguous()


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[Tensor, ...]:
    """The photographs shipped with scikit-learn as grey-scale tensors (1, 1, H, W) in 0..1."""
    from sklearn.datasets import load_sample_images

    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return tuple(
        torch.from_numpy((np.asarray(image, dtype=np.float32) / 255.0) @ weights)[None, None]
        for image in load_sample_images().images
    )


def photo_patches(n: int, resolution: int | None, seed: int) -> Tensor:
    """Grey-scale patches of scikit-learn's sample photographs: square crops of a random side in
    :data:`PATCH_SIDES` at random positions of a random photograph, resized (antialiased) to
    ``resolution``, then standardised over the whole sample: (n, 1, R, R)."""
    _check(n, resolution, images=True)
    photos = _photos()
    rng = np.random.default_rng(seed)
    patches = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(PATCH_SIDES[0], PATCH_SIDES[1] + 1))
        top = int(rng.integers(photo.shape[-2] - side + 1))
        left = int(rng.integers(photo.shape[-1] - side + 1))
        crop = photo[..., top : top + side, left : left + side]
        patches.append(F.interpolate(crop, size=(resolution, resolution), mode="bilinear", align_corners=False,
                                     antialias=side > resolution))
    x = torch.cat(patches)
    return ((x - x.mean()) / x.std()).contiguous()


def phase_shuffled_mnist1d(n: int, resolution: int | None, seed: int) -> Tensor:
    """MNIST-1D training signals generated with another seed, each with its Fourier phases replaced by
    uniform random ones (the constant and Nyquist terms are kept): same power spectra, no class
    shapes. (n, 1, 40)."""
    _check(n, resolution, images=False)
    pool = data.load("mnist1d", split="train", seed=MNIST1D_FREE_SEED).x
    if n > len(pool):
        raise MergeInputError(f"free calibration of {n} samples asked for; the MNIST-1D pool holds {len(pool)}")
    generator = torch.Generator().manual_seed(seed)
    x = pool[torch.randperm(len(pool), generator=generator)[:n]].double()
    spectrum = torch.fft.rfft(x, dim=-1)
    phases = torch.rand(spectrum.shape, generator=generator, dtype=torch.float64) * (2 * torch.pi)
    shuffled_spectrum = spectrum.abs() * torch.exp(1j * phases)
    real_terms = [0, -1] if x.shape[-1] % 2 == 0 else [0]  # these must stay real: keep them as they are
    shuffled_spectrum[..., real_terms] = spectrum[..., real_terms]
    shuffled = torch.fft.irfft(shuffled_spectrum, n=x.shape[-1], dim=-1)
    return shuffled.float().contiguous()
