"""Trained source models for the demo and the benchmarks: what each is trained on, how, and where its
weights are cached.

A :class:`SourceRecipe` names everything that determines a trained model (architecture and its
arguments, dataset, class subset, resolution, seed, epochs); :func:`train_source` trains it once
(:func:`pleas.experiments.train.cached_model`) and loads it from the cache afterwards.
:func:`domain_models` gives the two-domain pair of the benchmarks: a model trained on MNIST and one on
the UCI digits, one 10-class label space. :func:`vit_models` gives a pair of small vision transformers
on the MNIST halves (digits 0-4 and 5-9, separate heads). The byte-level language models are in
:mod:`pleas.experiments.lm`.
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
#: The ViT pair of :func:`vit_models`: timm's VisionTransformer (:func:`pleas.models.vit`) on 16x16 MNIST
#: (4x4 patches: 16 tokens and a class token), one 5-class head per half, like the image tasks' CNNs.
VIT_ARCH = "vit"
VIT_RESOLUTION = 16
VIT_KWARGS = {"in_channels": 1, "num_classes": 5, "img_size": VIT_RESOLUTION, "patch_size": 4, "embed_dim": 64,
              "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}
VIT_EPOCHS = 40
#: The halves of :func:`vit_models`: (model name, digits), the same as the "mnist-halves" task's.
HALVES = (("A", (0, 1, 2, 3, 4)), ("B", (5, 6, 7, 8, 9)))


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


def vit_recipe(half: int, seed: int, epochs: int = VIT_EPOCHS) -> SourceRecipe:
    """The recipe of the ViT on half ``half`` of :data:`HALVES` (0: digits 0-4, 1: digits 5-9): the one a
    benchmark task's ``ArchSetup("vit", VIT_KWARGS, VIT_RESOLUTION, ...)`` on "mnist-halves" builds, so
    both share the cached weights."""
    return SourceRecipe(VIT_ARCH, VIT_KWARGS, "mnist", HALVES[half][1], VIT_RESOLUTION, seed, epochs)


def vit_models(seeds: tuple[int, int] = (0, 1), *, epochs: int = VIT_EPOCHS,
               log: Callable[[str], None] | None = None) -> tuple[Source, Source]:
    """Small ViTs (:data:`VIT_KWARGS`: 16x16 inputs, 4x4 patches, width 64, 4 blocks of 4 heads, a
    5-class head) trained on MNIST digits 0-4 (model A, seed ``seeds[0]``) and 5-9 (model B,
    ``seeds[1]``) for ``epochs`` epochs with :func:`train_source`'s recipe (Adam, lr 1e-3, cosine,
    batch 128, no augmentation), cached (:func:`vit_recipe`)."""
    return tuple(  # type: ignore[return-value]
        train_source(vit_recipe(half, seed, epochs), name=HALVES[half][0], log=log) for half, seed in enumerate(seeds)
    )
