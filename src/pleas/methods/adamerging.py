"""``adamerging``: AdaMerging (Yang et al., ICLR 2024) for models fine-tuned from one shared base:
theta = theta_0 + sum_k lambda_k tau_k, with the coefficients learned by minimising the entropy of the
merged model's predictions on the unlabeled calibration data (Adam, all coefficients starting at
``init``). ``granularity="task"`` learns one lambda per model, ``"layer"`` one per model and tensor (the
paper's layer-wise AdaMerging). The merged model's outputs must be class scores on their last dimension
(with ``heads="separate"``, the entropy of every head is summed).

The paper trains 500 steps at learning rate 1e-3 from 0.3; ``steps`` defaults to fewer, since the
calibration sets here are small (every step sees one batch, cycling through them)."""
from __future__ import annotations

import torch
from torch.func import functional_call

from ..capture import as_call
from ..errors import MergeInputError
from . import stages
from .options import Option
from .registry import Outcome, register_method
from .same_base import BASE, SameBaseMethod, identity_build
from .task_vectors import task_vectors


def entropy(outputs) -> torch.Tensor:
    """Mean Shannon entropy of the softmax over the last dimension, summed over a tuple of outputs."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    total = 0.0
    for out in outputs:
        logits = getattr(out, "logits", out)
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise MergeInputError("adamerging needs outputs of class scores (a tensor, or a tuple of them with "
                                  f"heads='separate'); got {type(out).__name__}")
        log_p = torch.log_softmax(logits, -1)
        total = total + (-(log_p.exp() * log_p).sum(-1)).mean()
    return total


@register_method
class AdaMerging(SameBaseMethod):
    name = "adamerging"
    summary = "AdaMerging for models fine-tuned from one base: task-vector coefficients learned by entropy minimisation"
    options = (BASE,
               Option("granularity", str, "task", "one coefficient per model ('task') or per model and tensor "
                      "('layer')", choices=("task", "layer")),
               Option("steps", int, 100, "Adam steps on the entropy of the merged model's predictions", low=1),
               Option("lr", float, 1e-3, "Adam learning rate of the coefficients", low=0.0, low_open=True),
               Option("init", float, 0.3, "starting value of every coefficient"))

    def run(self, setup):
        o, base = self.opts, self.opts["base"]
        built = identity_build(setup, base)
        model = stages.finished(setup, built)
        prefix = next(name for name, m in model.named_modules() if m is built.model)
        prefix = f"{prefix}." if prefix else ""
        params = dict(built.model.named_parameters())
        keys = [k for k, p in params.items() if p.shape == setup.state_dicts[0][k].shape]
        vectors = task_vectors(base, setup.state_dicts, keys)
        shape = (setup.n, 1) if o["granularity"] == "task" else (setup.n, len(keys))
        coefficients = torch.full(shape, o["init"], dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.Adam([coefficients], lr=o["lr"])

        def merged() -> dict[str, torch.Tensor]:
            out = {}
            for i, k in enumerate(keys):
                lam = coefficients[:, 0 if o["granularity"] == "task" else i]
                delta = sum(lam[m] * vectors[m][k] for m in range(setup.n))
                out[prefix + k] = (base[k].double() + delta).to(params[k].dtype)
            return out

        for step in range(o["steps"]):
            args, kwargs = as_call(setup.batches[step % len(setup.batches)])
            loss = entropy(functional_call(model, merged(), args, kwargs))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            final = merged()
            for k in keys:
                params[k].copy_(final[prefix + k])
        norms = stages.norm_decision(setup)
        stages.reset_norms(setup, built, norms)
        report = {"coefficients": coefficients.detach().tolist(), **norms}
        return Outcome(stages.finished(setup, built), built, report)
