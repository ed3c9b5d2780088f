"""The methods for models fine-tuned from one shared base (task arithmetic, TIES): the base as an option,
and the merge they share: unit i of A is unit i of B (one origin, so no permutation is looked for), the
body is rewritten at 1x as base + combine(task vectors), and with ``heads="separate"`` each model keeps
its own head."""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import MergeInputError
from ..matching import Matching
from ..setup import architecture_difference, check_finite
from . import stages
from .options import Option
from .registry import Method, Outcome
from .task_vectors import task_vectors


def _base(value):
    """The base model's tensors: a private copy of an nn.Module's or a state dict's, or a checkpoint's."""
    if value is None:
        raise ValueError("needs base=<the model A and B were both fine-tuned from> (an nn.Module, its state dict, "
                         "or a checkpoint path)")
    if isinstance(value, (str, os.PathLike)):
        from ..io import load_checkpoint

        value = load_checkpoint(value)
    elif isinstance(value, nn.Module):
        value = value.state_dict()
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise TypeError(f"base must be an nn.Module, a state dict or a checkpoint path; got {type(value).__name__}")
    return {k: v.detach().clone() for k, v in value.items()}  # a private copy: the caller's is never touched


BASE = Option("base", "model", None, "the model both were fine-tuned from: an nn.Module, its state dict or a "
              "checkpoint path (required)", check=_base, allowed_text="an nn.Module, a state dict or a checkpoint path")
SCALE = Option("scale", float, 1.0, "multiplier of the combined task vector")  # any finite number


def identity_build(setup, base: dict[str, torch.Tensor]):
    """The base checked against the sources, and the sources rewritten unit i with unit i at 1x (the
    layout every same-base method fills in)."""
    difference = architecture_difference(base, setup.state_dicts[0], "base", "model_a", ordered=False)
    if difference:
        raise MergeInputError(f"base has a different architecture than model_a: {difference}")
    check_finite(base, "base")
    counts = {g.name: g.width for g in setup.spec}
    return stages.build(setup, stages.partial_maps(setup.spec, Matching.identity(setup.spec, setup.n), counts))


def same_base_merge(setup, base: dict[str, torch.Tensor], combine) -> Outcome:
    """base + combine(task vectors) for every tensor of the body, at 1x."""
    built = identity_build(setup, base)
    params = dict(built.model.named_parameters())
    sources = setup.state_dicts
    keys = [k for k, p in params.items() if p.shape == sources[0][k].shape]  # stacked separate heads stay as built
    delta = combine(task_vectors(base, sources, keys))
    with torch.no_grad():
        for k in keys:
            params[k].copy_((base[k].double() + delta[k]).to(params[k]))
    norms = stages.norm_decision(setup)
    stages.reset_norms(setup, built, norms)
    return Outcome(stages.finished(setup, built), built, norms)


class SameBaseMethod(Method):
    """A method for models fine-tuned from one shared base: at most 1x, and the ``base`` option required."""

    max_budget = 1.0
    needs_base = True

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["base"] is None:
            BASE.validate(self.name, None)
