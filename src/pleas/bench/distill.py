"""Knowledge distillation: the baseline that tells whether merging is worth it.

A **student** of the merged size is trained on the merge's own calibration inputs (no labels) to
reproduce the **teacher**, the ensemble of the two source models: with separate heads each source's own
logits on its own head (``(A(x), B(x))``), with a shared head the mean of the two models' logits (what
``pleas.merge(..., method="ensemble")`` computes; a test checks that). Students start from

* ``kd-source``, at 1x: model A. Every tensor is A's; with separate heads the head layer holds A's head
  and B's head side by side (:func:`student_from_source`), so B's head reads A's features, which it was
  never trained on: on B's task this start is about as good as a random head until distillation has
  fitted it.
* ``kd-pleas``, at every budget: the PLeaS merge of that budget (the distillation continues where the
  merge stopped; its total cost is the merge's time plus the distillation's).

**Objective**: the squared error between the student's and the teacher's logits (summed over classes,
averaged over samples and heads). Matching logits is the large-temperature limit of Hinton et al.'s
softened KL objective and needs no temperature; Kim et al. (IJCAI 2021) find it at least as good as KL.
It is also what PLeaS's refit fits layer by layer, so merge and student chase the same target.

**Optimiser**: Adam, learning rate :data:`LR` reached by a linear warm-up over the first epoch, then
constant; minibatches of :data:`BATCH_SIZE` in a seeded order (a private generator: the global torch RNG
is not touched). Without the warm-up Adam's first steps, of about the learning rate in every weight,
wreck a trained start (a PLeaS merge of ResNet-20 fell from 0.96 to 0.22 in one epoch at 1e-3). The
learning rate and the warm-up were chosen from a few runs on seed pair 0 of the MNIST-halves ResNet-20
(1e-4, 3e-4, 1e-3, with and without warm-up) and resnet18 (the three rates with warm-up; 1e-3 still
wrecked the start there), by test accuracy: the baseline is tuned in its favour on those pairs. The teacher's logits are computed once (the inputs are not augmented); that pass is counted
in each student's time, and so is building the kd-source student.

**BatchNorm stays in eval mode**: its running statistics stay as the start left them (the merge's, reset
on the calibration data; A's own for kd-source) and its affine parameters are trained. So the function
trained is the function evaluated, a student that has not taken a step is exactly its start, and nothing
depends on how the calibration samples fall into batches. (Train-mode BatchNorm, tried on the ResNet-20
pairs at 1e-3: -2.4 to +0.9 points against eval mode after 20 epochs, and from one epoch to the next its
accuracy moved by up to 4 points.)

**Stopping**: the student is evaluated at the first step that ends at or after ``time_budget`` seconds
(PLeaS's wall time for the same merge; the overshoot is under one step and the seconds reported are the
real ones), and at convergence: when the epoch's mean loss has not fallen below ``(1 - min_decrease)``
times its best for ``patience`` epochs in a row, or after ``max_epochs`` epochs, whichever comes first
(the record says which, and the last epoch's relative loss decrease). Evaluation time is not counted. The
converged student is deterministic given the seed and the thread count; the student at the time budget
depends on how many steps fit in that time on this machine.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import MergeInputError

#: Adam's learning rate after the warm-up.
LR = 3e-4
#: Epochs of linear learning-rate warm-up.
WARMUP_EPOCHS = 1
#: Minibatch size.
BATCH_SIZE = 64
#: Convergence: stop after PATIENCE epochs in a row whose mean loss is not below (1 - MIN_DECREASE) x the best.
PATIENCE = 3
MIN_DECREASE = 0.02
#: Convergence: at most this many epochs (the benchmark caps each architecture lower, see bench.run).
MAX_EPOCHS = 60
#: The students, by record label.
STUDENTS = {"kd-source": "distilled from model A (1x)", "kd-pleas": "distilled from the PLeaS merge"}


@dataclass(frozen=True)
class DistillSettings:
    """How a student is trained (see the module docstring)."""

    lr: float = LR
    warmup_epochs: int = WARMUP_EPOCHS
    batch_size: int = BATCH_SIZE
    max_epochs: int = MAX_EPOCHS
    patience: int = PATIENCE
    min_decrease: float = MIN_DECREASE
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("warmup_epochs", 0), ("batch_size", 1), ("max_epochs", 1), ("patience", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MergeInputError(f"distillation {name}={value!r}; allowed: an integer >= {low}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise MergeInputError(f"distillation lr={self.lr!r}; allowed: a positive number")
        if isinstance(self.min_decrease, bool) or not isinstance(self.min_decrease, (int, float)) \
                or not 0 <= self.min_decrease < 1:
            raise MergeInputError(f"distillation min_decrease={self.min_decrease!r}; allowed: a number in [0, 1)")

    def to_json(self) -> dict:
        return asdict(self)


def _as_tuple(out: Any) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@torch.no_grad()
def teacher_logits(model_a: nn.Module, model_b: nn.Module, data: Tensor, heads: str, *,
                   batch_size: int = 256) -> tuple[Tensor, ...]:
    """The teacher's outputs on ``data`` (N, ...), in eval mode: ``(A(x), B(x))`` with
    ``heads="separate"``, ``((A(x) + B(x)) / 2,)`` with ``heads="shared"``. Each model's train/eval
    mode is restored."""
    if heads not in ("separate", "shared"):
        raise MergeInputError(f"heads={heads!r}; allowed: 'separate' or 'shared'")
    outputs = []
    for model in (model_a, model_b):
        was_training = model.training
        model.eval()
        try:
            outputs.append(torch.cat([model(x) for x in data.split(batch_size)]))
        finally:
            model.train(was_training)
    if heads == "separate":
        return tuple(outputs)
    return ((outputs[0] + outputs[1]) / 2,)


def student_from_source(template: nn.Module, model_a: nn.Module, model_b: nn.Module) -> nn.Module:
    """A copy of ``template`` (a 1x merge of A and B) holding model A's tensors, in eval mode.

    Each template entry takes A's entry of the same name (a separate-heads merge prefixes A's names with
    ``model.``). An entry whose first dimension holds A's and B's stacked (the head of a separate-heads
    merge, ``[A's classes | B's classes]``) takes A's and B's entries concatenated. Any other shape is an
    error: the template must have A's widths."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    student = copy.deepcopy(template)
    loaded = {}
    for name, target in student.state_dict().items():
        source = next((n for n in (name, name.removeprefix("model.")) if n in state_a), None)
        if source is None:
            raise MergeInputError(f"student entry {name!r} has no counterpart in model A's state dict")
        a, b = state_a[source], state_b[source]
        if a.shape == target.shape:
            loaded[name] = a.clone()
        elif a.dim() > 0 and a.shape[1:] == target.shape[1:] and a.shape[0] + b.shape[0] == target.shape[0]:
            loaded[name] = torch.cat([a, b])
        else:
            raise MergeInputError(f"student entry {name!r} has shape {tuple(target.shape)} and model A's "
                                  f"{tuple(a.shape)}: the template must be a 1x merge of A and B")
    student.load_state_dict(loaded)
    return student.eval()


def distill_loss(outputs: tuple[Tensor, ...], targets: tuple[Tensor, ...]) -> Tensor:
    """Squared logit error summed over classes, averaged over samples and heads."""
    if len(outputs) != len(targets):
        raise MergeInputError(f"the student has {len(outputs)} heads, the teacher {len(targets)}")
    return sum(((o - t) ** 2).sum(dim=1).mean() for o, t in zip(outputs, targets)) / len(outputs)


class _Clock:
    """Seconds since creation plus ``offset``, without the time spent inside :meth:`pause`."""

    def __init__(self, offset: float):
        self._origin = time.perf_counter() - offset
        self._paused = 0.0

    def __call__(self) -> float:
        return time.perf_counter() - self._origin - self._paused

    def pause(self, fn: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        try:
            return fn()
        finally:
            self._paused += time.perf_counter() - began


@torch.no_grad()
def _mean_loss(student: nn.Module, data: Tensor, targets: tuple[Tensor, ...], batch_size: int) -> float:
    total = 0.0
    for idx in torch.arange(len(data)).split(batch_size):
        total += distill_loss(_as_tuple(student(data[idx])), tuple(t[idx] for t in targets)).item() * len(idx)
    return total / len(data)


def distill(student: nn.Module, data: Tensor, targets: tuple[Tensor, ...], *,
            evaluate: Callable[[nn.Module], dict], time_budget: float | None = None, start_seconds: float = 0.0,
            settings: DistillSettings = DistillSettings(), progress: bool = False) -> dict:
    """Train ``student`` in place to map ``data`` (N, ...) to ``targets`` (the teacher's logits: one
    tensor (N, classes) per head) and evaluate it with ``evaluate(student)`` (a JSON-ready dict) at the
    start, at ``time_budget`` seconds and at convergence (see the module docstring).

    ``start_seconds`` is time already spent for this student (the teacher's pass): the clock starts
    there. Evaluations, and the mean loss over ``data`` at the start, are not timed.

    Returns ``{"start", "at_budget", "converged"}`` checkpoints, each ``{"seconds", "steps", "epochs",
    "loss", **evaluate(student)}`` (``loss``: the mean over ``data`` at the start, the last step's at the
    budget, the last epoch's mean at convergence). ``at_budget`` is None without a budget, and the
    converged checkpoint when convergence came first (then ``budget_reached`` is False). Also
    ``"stopped"`` ("plateau" or "max_epochs"), ``"last_decrease"`` (the last epoch's relative loss
    decrease), ``"epoch_losses"`` and ``"settings"``.
    """
    n = len(data)
    if n < 1 or any(len(t) != n for t in targets):
        raise MergeInputError(f"distillation needs as many targets as inputs; got {n} inputs and "
                              f"{[len(t) for t in targets]} targets")
    if time_budget is not None and not time_budget >= 0:
        raise MergeInputError(f"time_budget={time_budget!r}; allowed: seconds >= 0, or None")
    clock = _Clock(start_seconds)
    batches = -(-n // settings.batch_size)
    steps, epoch_losses = 0, []

    def checkpoint(loss: float) -> dict:
        seconds = clock()
        return {"seconds": seconds, "steps": steps, "epochs": steps / batches, "loss": loss,
                **clock.pause(lambda: evaluate(student))}

    def budget_passed() -> bool:
        return time_budget is not None and record["at_budget"] is None and clock() >= time_budget

    student.eval()  # frozen BatchNorm statistics: see the module docstring
    params = list(student.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    warmup = settings.warmup_epochs * batches
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    generator = torch.Generator().manual_seed(settings.seed)
    record: dict[str, Any] = {"at_budget": None, "settings": settings.to_json()}
    record["start"] = checkpoint(clock.pause(lambda: _mean_loss(student, data, targets, settings.batch_size)))
    if budget_passed():
        record["at_budget"] = record["start"]
    best, stale, stopped = float("inf"), 0, "max_epochs"
    bar = tqdm(total=settings.max_epochs, desc="distill", unit="epoch", leave=False, disable=not progress)
    try:
        for _ in range(settings.max_epochs):
            total = 0.0
            for idx in torch.randperm(n, generator=generator).split(settings.batch_size):
                loss = distill_loss(_as_tuple(student(data[idx])), tuple(t[idx] for t in targets))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                steps += 1
                total += loss.item() * len(idx)
                if budget_passed():
                    record["at_budget"] = checkpoint(loss.item())
            epoch_losses.append(total / n)
            bar.update(1)
            bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}", refresh=False)
            if epoch_losses[-1] < (1 - settings.min_decrease) * best:
                best, stale = epoch_losses[-1], 0
            else:
                stale += 1
                if stale >= settings.patience:
                    stopped = "plateau"
                    break
    finally:
        bar.close()
    student.eval()
    record["converged"] = checkpoint(epoch_losses[-1])
    record.update(stopped=stopped, epoch_losses=epoch_losses, budget_reached=record["at_budget"] is not None,
                  last_decrease=(1 - epoch_losses[-1] / epoch_losses[-2]) if len(epoch_losses) > 1 else None)
    if time_budget is not None and record["at_budget"] is None:
        record["at_budget"] = record["converged"]
    return record


@dataclass(frozen=True)
class Teacher:
    """The teacher's logits on the calibration inputs and the seconds their pass took."""

    logits: tuple[Tensor, ...]
    seconds: float

    @classmethod
    def of(cls, model_a: nn.Module, model_b: nn.Module, data: Tensor, heads: str, *, batch_size: int = 256) -> "Teacher":
        start = time.perf_counter()
        logits = teacher_logits(model_a, model_b, data, heads, batch_size=batch_size)
        return cls(logits, time.perf_counter() - start)


def train_students(merged: nn.Module, model_a: nn.Module, model_b: nn.Module, data: Tensor, teacher: Teacher, *,
                   time_budget: float, evaluate: Callable[[nn.Module], dict], with_source: bool,
                   settings: DistillSettings = DistillSettings(), progress: bool = False) -> dict[str, dict]:
    """Distil the teacher into ``kd-source`` (only ``with_source``: ``merged`` must then be a 1x merge;
    built from a copy of it, before it is trained) and into ``kd-pleas``, which is ``merged`` itself,
    trained in place. Each gets ``time_budget`` seconds for its result at the budget; its clock starts
    at the teacher's seconds (plus, for kd-source, the time to build it). Returns {label: :func:`distill`
    record, with ``wall_seconds``: the wall time of building and training it, evaluations included}."""
    starts: dict[str, tuple[nn.Module, float]] = {}
    if with_source:
        began = time.perf_counter()
        student = student_from_source(merged, model_a, model_b)
        starts["kd-source"] = (student, time.perf_counter() - began)
    starts["kd-pleas"] = (merged, 0.0)
    records = {}
    for label, (student, built) in starts.items():
        began = time.perf_counter()
        records[label] = distill(student, data, teacher.logits, evaluate=evaluate, time_budget=time_budget,
                                 start_seconds=teacher.seconds + built, settings=settings, progress=progress)
        records[label]["wall_seconds"] = built + time.perf_counter() - began
    return records
