"""Experiment infrastructure for demos and benchmarks: packaged datasets, small model factories,
training loops and a trained-weights cache. Kept apart from the merging core.

Submodules: :mod:`.data`, :mod:`.architectures`, :mod:`.train`, :mod:`.cache`, :mod:`.sources`
(the trained source models of the demo and the benchmarks).
"""
from .architectures import ARCHITECTURES, cnn1d, create, mlp, resnet20, torchvision_resnet18, vgg
from .cache import cache_dir, stable_hash
from .data import Dataset, known_datasets, load
from .train import cached_model, evaluate, predict, train_classifier

__all__ = [
    "ARCHITECTURES",
    "Dataset",
    "cache_dir",
    "cached_model",
    "cnn1d",
    "create",
    "evaluate",
    "known_datasets",
    "load",
    "mlp",
    "predict",
    "resnet20",
    "stable_hash",
    "torchvision_resnet18",
    "train_classifier",
    "vgg",
]
