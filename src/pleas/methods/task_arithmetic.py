"""``task_arithmetic``: for models fine-tuned from one shared base: theta_0 + scale * (tau_A + tau_B),
with tau_k = theta_k - theta_0 (Ilharco et al. 2023). Unit i of A is unit i of B (they share an origin,
so no permutation is looked for); ``scale=0.5`` gives the plain average of A and B."""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..errors import MergeInputError
from ..job import architecture_difference, check_finite
from ..plans import partial_merge_map
from ..task_vectors import arithmetic, task_vectors
from .registry import MergeMethod, register_method


class SameBase(MergeMethod):
    """The methods for models with one origin. ``base``: the model A and B were both fine-tuned from,
    as an ``nn.Module``, its state dict, or a checkpoint path (see :func:`pleas.io.load_checkpoint`).
    The body is merged at 1x; with ``heads="separate"`` each model keeps its own head."""

    max_budget = 1.0
    needs_base = True

    def __init__(self, *, base=None, scale: float = 1.0):
        if base is None:
            raise MergeInputError(f"method {self.name!r} needs base=<the model A and B were both fine-tuned from> "
                                  "(an nn.Module, its state dict, or a checkpoint path)")
        if isinstance(base, (str, os.PathLike)):
            from ..io import load_checkpoint

            base = load_checkpoint(base)
        elif isinstance(base, nn.Module):
            base = base.state_dict()
        if not isinstance(base, dict) or not all(isinstance(v, torch.Tensor) for v in base.values()):
            raise MergeInputError(f"base must be an nn.Module, a state dict or a checkpoint path; got {type(base).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise MergeInputError(f"scale={scale!r}; allowed: a finite number (the task vectors' multiplier)")
        self.base = {k: v.detach().clone() for k, v in base.items()}  # a private copy: the caller's is never touched
        self.scale = float(scale)

    def combine(self, vectors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return arithmetic(vectors, self.scale)

    def plan(self, job):
        self._check_base(job.state_dicts[0])
        return {g.name: partial_merge_map(torch.arange(g.width), torch.ones(g.width), g.width) for g in job.spec}

    def finish(self, job, model, maps):
        params = dict(getattr(model, "model", model).named_parameters())  # SeparateHeads wraps the network
        sources = job.state_dicts
        keys = [k for k, p in params.items() if p.shape == sources[0][k].shape]  # stacked separate heads stay as built
        delta = self.combine(task_vectors(self.base, sources, keys))
        with torch.no_grad():
            for k in keys:
                params[k].copy_((self.base[k].double() + delta[k]).to(params[k]))
        return super().finish(job, model, maps)

    def _check_base(self, source: dict[str, torch.Tensor]) -> None:
        difference = architecture_difference(self.base, source, "base", "model_a", ordered=False)
        if difference:
            raise MergeInputError(f"base has a different architecture than model_a: {difference}")
        check_finite(self.base, "base")


@register_method
class TaskArithmetic(SameBase):
    name = "task_arithmetic"
