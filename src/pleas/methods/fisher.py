"""``fisher``: Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022) of models that share an origin:
every parameter entry is the average of the models' entries weighted by each model's diagonal Fisher
information, theta = sum_k F_k theta_k / sum_k F_k (unit i of every model with unit i, as weight averaging).

F_k is estimated on model k's calibration data (its own with ``pleas.per_model``) as the mean over samples
of the squared gradient of log p(y | x) with y drawn from the model's own prediction (one draw per sample
and output position, seeded), per-sample gradients by ``torch.func``. ``samples`` caps the samples used per
model. Entries where every model's Fisher is zero are plain averages (``floor`` is added to every
Fisher, relative to its mean, as in the paper's implementation). Outputs must be class scores on their
last dimension; buffers (norm statistics) are averaged. Separate heads keep their own weights."""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from ..capture import as_call
from ..capture.program import batch_size
from ..errors import MergeInputError
from ..matching import Matching
from . import stages
from .options import Option
from .registry import Method, Outcome, register_method


def diagonal_fisher(model: torch.nn.Module, batches: list, keys: list[str], samples: int, seed: int) -> dict:
    """Mean over at most ``samples`` samples of (d/dtheta log p(y|x))^2, y ~ p(.|x), for the parameters
    ``keys`` of ``model`` (float64)."""
    params = {k: p.detach() for k, p in model.named_parameters() if k in keys}
    generator = torch.Generator().manual_seed(seed)

    def log_likelihood(p, x_args, x_kwargs, y):
        out = functional_call(model, p, tuple(a.unsqueeze(0) for a in x_args),
                              {k: v.unsqueeze(0) for k, v in x_kwargs.items()})
        logits = getattr(out, "logits", out)
        if isinstance(logits, tuple) or not isinstance(logits, torch.Tensor):
            raise MergeInputError("fisher needs a model whose output is one tensor of class scores")
        log_p = torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1])
        return log_p.gather(1, y.reshape(-1, 1)).sum()

    per_sample = vmap(grad(log_likelihood), in_dims=(None, 0, 0, 0))
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    seen = 0
    for batch in batches:
        if seen >= samples:
            break
        args, kwargs = as_call(batch)
        take = min(batch_size(batch), samples - seen)
        args = tuple(a[:take] for a in args)
        kwargs = {k: v[:take] for k, v in kwargs.items()}
        with torch.no_grad():
            out = model(*args, **kwargs)
            logits = getattr(out, "logits", out)
            probs = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1])
            y = torch.multinomial(probs, 1, generator=generator).reshape(*logits.shape[:-1])
        grads = per_sample(params, args, kwargs, y)
        for k, g in grads.items():
            total[k] += g.double().square().sum(0)
        seen += take
    return {k: t / max(seen, 1) for k, t in total.items()}


@register_method
class Fisher(Method):
    name = "fisher"
    summary = "Fisher-weighted averaging of models that share an origin (diagonal Fisher from the calibration data)"
    options = (Option("samples", int, 256, "calibration samples per model for the Fisher estimate", low=1),
               Option("floor", float, 1e-6, "added to every Fisher entry, relative to its model's mean Fisher, so that "
                      "entries no sample moves are averaged", low=0.0, low_open=True))
    max_budget = 1.0
    shared_origin = True

    def run(self, setup):
        o = self.opts
        counts = {g.name: g.width for g in setup.spec}
        built = stages.build(setup, stages.partial_maps(setup.spec, Matching.identity(setup.spec, setup.n), counts))
        params = dict(built.model.named_parameters())
        keys = [k for k, p in params.items() if p.shape == setup.state_dicts[0][k].shape and p.is_floating_point()]
        fishers = []
        for i, source in enumerate(setup.models):
            f = diagonal_fisher(source, setup.batches_of(i), keys, o["samples"], setup.seed + i)
            scale = sum(float(t.sum()) for t in f.values()) / max(sum(t.numel() for t in f.values()), 1)
            fishers.append({k: t + o["floor"] * max(scale, 1e-30) for k, t in f.items()})
        sources = setup.state_dicts
        with torch.no_grad():
            for k in keys:
                weight = sum(f[k] for f in fishers)
                value = sum(f[k] * sd[k].double() for f, sd in zip(fishers, sources)) / weight
                params[k].copy_(value.to(params[k].dtype))
        norms = stages.norm_decision(setup)
        stages.reset_norms(setup, built, norms)
        return Outcome(stages.finished(setup, built), built, dict(norms))
