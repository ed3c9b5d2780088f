"""Experiment infrastructure for demos and benchmarks: training loops and the trained source models of
the demo and the benchmarks, cached. Kept apart from the merging core, which it uses like any user
(the small architectures are :mod:`pleas.models`, the packaged datasets :mod:`pleas.datasets`).

Submodules: :mod:`.train`, :mod:`.sources`, :mod:`.lm` (byte-level language models; needs transformers).
"""
from ..cache import cache_dir, stable_hash
from ..datasets import Dataset, known_datasets, load
from ..models import ARCHITECTURES, cnn1d, create, mlp, resnet20, torchvision_resnet18, vgg
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
