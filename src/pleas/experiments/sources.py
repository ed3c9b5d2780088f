"""Trained source models for the demo and the benchmarks: what each is trained on, how, and where its
weights are cached.

A :class:`SourceRecipe` names everything that determines a trained model (architecture and its
arguments, dataset, class subset, resolution, seed, epochs); :func:`train_source` trains it once
(:func:`pleas.experiments.train.cached_model`) and loads it from the cache afterwards.
:func:`domain_models` gives the two-domain pair of the benchmarks: a model trained on MNIST and one on
the UCI digits, one 10-class label space.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .. import datasets as data
from .. import models as architectures
from ..datasets import Dataset
from . import train

#: The two domains of :func:`domain_models`: (model name, dataset), one label space (digits 0-9).
DOMAINS = (("A", "mnist"), ("B", "digits"))
#: Architecture, arguments, resolution and epochs of the two-domain models.
DOMAIN_ARCH = "resnet20"
DOMAIN_KWARGS = {"in_channels": 1, "num_classes": 10, "width": 1}
DOMAIN_RESOLUTION = 16
DOMAIN_EPOCHS = 12


@dataclass(frozen=True)
class SourceRecipe:
    """How one source model is trained (Adam, cosine schedule, the defaults of
    :func:`~pleas.experiments.train.train_classifier`).

    arch: a name in :data:`~pleas.models.ARCHITECTURES`; kwargs: its arguments.
    dataset: a name of :func:`~pleas.datasets.load`; classes: the labels kept (relabelled
    ``0 .. len-1``), or None for all; resolution: image side after resizing, None for none.
    seed: initialisation and training seed; epochs: passes over the training split.
    """

    arch: str
    kwargs: dict = field(hash=False)
    dataset: str
    classes: tuple[int, ...] | None
    resolution: int | None
    seed: int
    epochs: int

    def cache_key(self) -> dict:
        """The key of the cached weights. Its layout is the one earlier versions wrote (``classes`` for
        class subsets; ``dataset`` unless the data is a class subset of MNIST), so cached weights stay valid."""
        key = {"arch": self.arch, "kwargs": dict(self.kwargs), "seed": self.seed, "epochs": self.epochs,
               "res": self.resolution}
        if self.classes is not None:
            key["classes"] = list(self.classes)
        if self.classes is None or self.dataset != "mnist":
            key["dataset"] = self.dataset
        return key

    def load_split(self, split: str) -> Dataset:
        """The ``"train"`` or ``"test"`` split this model is trained / evaluated on."""
        classes = list(self.classes) if self.classes is not None else None
        return data.load(self.dataset, split=split, classes=classes, resolution=self.resolution)

    def describe(self) -> str:
        """E.g. ``resnet20 on mnist classes 0-4 at 16x16, seed 0, 8 epochs``."""
        what = self.dataset
        if self.classes is not None:
            what += f" classes {self.classes[0]}-{self.classes[-1]}" if _is_range(self.classes) else f" classes {list(self.classes)}"
        if self.resolution is not None:
            what += f" at {self.resolution}x{self.resolution}"
        return f"{self.arch} on {what}, seed {self.seed}, {self.epochs} epochs"


def _is_range(classes: tuple[int, ...]) -> bool:
    return len(classes) > 1 and list(classes) == list(range(classes[0], classes[-1] + 1))


@dataclass
class Source:
    """A trained source model with its data. ``train_seconds`` is 0 when the weights came from the cache."""

    model: nn.Module
    train_set: Dataset
    test_set: Dataset
    train_seconds: float


def train_source(recipe: SourceRecipe, *, name: str = "", log: Callable[[str], None] | None = None) -> Source:
    """Train the model of ``recipe`` (or load it from the cache). ``log`` hears about training that is
    about to happen, as ``training model <name> (<recipe>); cached for later runs``."""
    train_set, test_set = recipe.load_split("train"), recipe.load_split("test")
    key = recipe.cache_key()
    if log is not None and not train.model_path(key).exists():
        log(f"training model {name + ' ' if name else ''}({recipe.describe()}); cached for later runs")
    start = time.perf_counter()
    trained: list[bool] = []

    def fit(model: nn.Module) -> nn.Module:
        trained.append(True)
        return train.train_classifier(model, train_set, seed=recipe.seed, epochs=recipe.epochs, progress=False)

    model = train.cached_model(
        key, lambda: architectures.create(recipe.arch, seed=recipe.seed, **recipe.kwargs), fit
    )
    return Source(model, train_set, test_set, time.perf_counter() - start if trained else 0.0)


def domain_models(seeds: tuple[int, int] = (0, 1), *, log: Callable[[str], None] | None = None):
    """ResNet-20s trained on MNIST (model A, seed ``seeds[0]``) and on the UCI digits (model B,
    ``seeds[1]``), 10 classes, 16x16, 12 epochs, cached. Returns (models, train sets, test sets), each
    a dict keyed by "A" and "B"."""
    models, trains, tests = {}, {}, {}
    for (name, dataset), seed in zip(DOMAINS, seeds):
        recipe = SourceRecipe(DOMAIN_ARCH, DOMAIN_KWARGS, dataset, None, DOMAIN_RESOLUTION, seed, DOMAIN_EPOCHS)
        source = train_source(recipe, name=name, log=log)
        models[name], trains[name], tests[name] = source.model, source.train_set, source.test_set
    return models, trains, tests
