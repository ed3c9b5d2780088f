"""The benchmark's tasks and architectures, and the source models and calibration data of each.

A task is a pair of domains (what model A and model B learn), whether the merged model keeps a head
per source (``"separate"``) or one for both (``"shared"``), and the data PLeaS-free calibrates on. Each
task lists the architectures it is run with (:class:`ArchSetup`: factory, arguments, input resolution,
training epochs). Seed pair ``p`` trains model A with seed ``2p`` and model B with ``2p + 1``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..demo import ARCHS as DEMO_ARCHS
from ..demo import ArchConfig
from ..errors import MergeInputError
from ..experiments import sources
from ..experiments.sources import Source, SourceRecipe, train_source
from . import free_data


@dataclass(frozen=True)
class Domain:
    """What one source model learns: ``label`` names it in tables (e.g. "0-4", "MNIST")."""

    label: str
    dataset: str
    classes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ArchSetup:
    """An architecture as trained for one task: ``factory`` is a name in
    :data:`pleas.experiments.ARCHITECTURES`; ``resolution`` the image side (None for 1-D signals)."""

    factory: str
    kwargs: dict = field(hash=False)
    resolution: int | None
    epochs: int
    quick_epochs: int

    @classmethod
    def from_demo(cls, config: ArchConfig) -> "ArchSetup":
        """The demo's recipe for this architecture (same weights, same cache files)."""
        return cls(config.name, config.kwargs, config.resolution, config.epochs, config.quick_epochs)


@dataclass(frozen=True)
class Task:
    """Two domains merged with ``heads`` ("separate" or "shared"), with architectures by name.

    ``free_data(n, resolution, seed)`` returns PLeaS-free's calibration inputs (N, ...): data from
    neither domain; ``free_data_text`` says what they are.
    """

    name: str
    title: str
    heads: str
    domains: tuple[Domain, Domain]
    archs: dict[str, ArchSetup] = field(hash=False)
    free_data: Callable[[int, int | None, int], Tensor] = field(hash=False)
    free_data_text: str = ""


_MNIST_HALVES = (Domain("0-4", "mnist", (0, 1, 2, 3, 4)), Domain("5-9", "mnist", (5, 6, 7, 8, 9)))
_DOMAIN_RESNET20 = ArchSetup(sources.DOMAIN_ARCH, sources.DOMAIN_KWARGS, sources.DOMAIN_RESOLUTION,
                             sources.DOMAIN_EPOCHS, 2)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "mnist-halves",
            "MNIST digits 0-4 (model A) vs 5-9 (model B), separate heads",
            "separate",
            _MNIST_HALVES,
            {
                "mlp": ArchSetup.from_demo(DEMO_ARCHS["mlp"]),
                "resnet20": ArchSetup.from_demo(DEMO_ARCHS["resnet20"]),
                "resnet18": ArchSetup("torchvision_resnet18", {"in_channels": 1, "num_classes": 5}, 32, 6, 1),
            },
            free_data.digits,
            "UCI digits (scikit-learn, all 10 classes) resized to the input resolution",
        ),
        Task(
            "domains",
            "MNIST (model A) vs UCI digits (model B), one shared 10-class head",
            "shared",
            (Domain("MNIST", "mnist"), Domain("UCI digits", "digits")),
            {
                "resnet20": _DOMAIN_RESNET20,
                "resnet18": ArchSetup("torchvision_resnet18", {"in_channels": 1, "num_classes": 10}, 32, 8, 1),
            },
            free_data.photo_patches,
            "grey-scale patches of the two photographs shipped with scikit-learn (china.jpg, flower.jpg), "
            "random positions and scales, resized to the input resolution: neither domain has natural images",
        ),
        Task(
            "mnist1d-halves",
            "MNIST-1D signals, classes 0-4 (model A) vs 5-9 (model B), separate heads",
            "separate",
            (Domain("0-4", "mnist1d", (0, 1, 2, 3, 4)), Domain("5-9", "mnist1d", (5, 6, 7, 8, 9))),
            {
                "mlp": ArchSetup("mlp", {"in_features": 40, "num_classes": 5, "hidden": 128, "depth": 3}, None, 20, 2),
                "cnn1d": ArchSetup.from_demo(DEMO_ARCHS["cnn1d"]),
            },
            free_data.phase_shuffled_mnist1d,
            "MNIST-1D signals of another generation seed with their Fourier phases randomised: "
            "each keeps its power spectrum, none keeps the shape of its class",
        ),
    )
}


def all_archs() -> list[str]:
    """Every architecture name used by some task, in first-use order."""
    return list(dict.fromkeys(a for task in TASKS.values() for a in task.archs))


def select(tasks: list[str] | None, archs: list[str] | None) -> list[tuple[str, str]]:
    """The (task, arch) pairs to run: every configured pair of the named tasks and architectures
    (None: all). Unknown names, or a selection that matches no configured pair, are errors."""
    unknown = [t for t in tasks or [] if t not in TASKS]
    if unknown:
        raise MergeInputError(f"unknown task(s) {unknown}; allowed: {list(TASKS)}")
    unknown = [a for a in archs or [] if a not in all_archs()]
    if unknown:
        raise MergeInputError(f"unknown architecture(s) {unknown}; allowed: {all_archs()}")
    pairs = [(t, a) for t in (tasks or list(TASKS)) for a in TASKS[t].archs if archs is None or a in archs]
    if not pairs:
        configured = ", ".join(f"{t}/{a}" for t in TASKS for a in TASKS[t].archs)
        raise MergeInputError(f"no configured task/architecture pair matches tasks={tasks} archs={archs}; "
                              f"configured: {configured}")
    return pairs


def pair_seeds(pair: int) -> tuple[int, int]:
    """Training seeds of models A and B in seed pair ``pair``: (2p, 2p + 1)."""
    return 2 * pair, 2 * pair + 1


def source_models(task: Task, arch: str, pair: int, epochs: int,
                  log: Callable[[str], None] | None = None) -> tuple[Source, Source]:
    """Models A and B of ``task`` with architecture ``arch`` and seed pair ``pair``, trained for
    ``epochs`` on first use and cached."""
    setup = task.archs[arch]
    return tuple(  # type: ignore[return-value]
        train_source(SourceRecipe(setup.factory, setup.kwargs, domain.dataset, domain.classes, setup.resolution,
                                  seed, epochs), name=name, log=log)
        for name, domain, seed in zip("AB", task.domains, pair_seeds(pair))
    )


def calibration_cap(a: Source, b: Source) -> int:
    """The largest calibration size :func:`task_calibration` can draw: A gives ``n // 2`` samples and B
    ``(n + 1) // 2``, each at most its training split."""
    return min(2 * len(a.train_set) + 1, 2 * len(b.train_set))


def task_calibration(a: Source, b: Source, n: int, seed: int) -> Tensor:
    """``n`` calibration inputs from the task's own training data: half from each model's training
    split (first half from A's), sampled without replacement with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for i, source in enumerate((a, b)):
        count = (n + i) // 2
        if count > len(source.train_set):
            raise MergeInputError(f"calibration={n} needs {count} samples of {source.train_set.name!r}, "
                                  f"which has {len(source.train_set)} training samples")
        parts.append(source.train_set.x[torch.randperm(len(source.train_set), generator=generator)[:count]])
    return torch.cat(parts)
