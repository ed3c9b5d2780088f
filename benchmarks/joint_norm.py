"""Where a side-by-side merge of the benchmark's Llama pair loses to the logit average (docs/transformers.md).

At 2x (both models side by side, budget in effective parameters) every RMSNorm normalises A's and B's stream
units together. As a diagnostic (not a model pleas returns), each norm can be swapped for one that normalises
each model's units separately, with the same weights: with all of them swapped, the unrefitted side-by-side
model (Git Re-Basin at 2x) should compute the logit average exactly, and leaving one norm joint shows what that
norm alone costs. Then PLeaS at 2x with 0, 50 and 100 distillation steps (the pleas option
``distill_steps``). Mean bits per byte over code and prose, as in ``pleas bench --part transformers``.

    OMP_NUM_THREADS=1 python benchmarks/joint_norm.py [--family llama] [--steps 0,50,100]
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

import pleas


class PerModelRMSNorm(nn.Module):
    """RMSNorm over each model's units separately (``parts``: index tensors), with the joint norm's weight."""

    def __init__(self, norm: nn.Module, parts: list[torch.Tensor]):
        super().__init__()
        self.weight, self.parts = norm.weight, parts
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        out = torch.empty_like(x)
        for part in self.parts:
            u = x[..., part]
            out[..., part] = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * out.to(h.dtype)


def norm_sites(model) -> list[tuple[str, nn.Module, str]]:
    sites = []
    for i, layer in enumerate(model.model.layers):
        sites += [(f"layer {i} input", layer, "input_layernorm"), (f"layer {i} post-attention", layer,
                                                                    "post_attention_layernorm")]
    return sites + [("final", model.model, "norm")]


def stream_owner(merged, a, b) -> list[torch.Tensor]:
    """Each model's stream units in an unrefitted side-by-side merge: the merged embedding's columns are
    copies of A's or B's."""
    e = merged.model.embed_tokens.weight.detach()
    da = torch.cdist(e.T, a.model.embed_tokens.weight.detach().T).min(1).values
    db = torch.cdist(e.T, b.model.embed_tokens.weight.detach().T).min(1).values
    if float(torch.minimum(da, db).max()) > 1e-5:
        raise RuntimeError("the merged embedding's columns are not copies of the sources'")
    owner = (db < da).long()
    return [torch.nonzero(owner == k).squeeze(1) for k in (0, 1)]


def per_model_norms(model, parts, sites: set[str]):
    out = copy.deepcopy(model)
    for name, parent, attr in norm_sites(out):
        if name in sites:
            setattr(parent, attr, PerModelRMSNorm(getattr(parent, attr), parts))
    return out


def main() -> None:
    from pleas.bench.transformers import LM_CALIBRATION, LM_EVAL_WINDOWS
    from pleas.datasets import BYTE_DOMAINS, byte_windows
    from pleas.experiments import lm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama")
    parser.add_argument("--steps", default="0,50,100")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pa, pb = lm.lm_pair(args.family)
    a, b = pa.model, pb.model
    ids = byte_windows(LM_CALIBRATION, lm.LM_LENGTH, seed=0)

    def score(model) -> float:
        return sum(lm.bits_per_byte(model, d, count=LM_EVAL_WINDOWS) for d in BYTE_DOMAINS) / len(BYTE_DOMAINS)

    def merge(method, **options):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            result = pleas.merge(a, b, ids, method=method, budget=2.0, budget_metric="effective_params",
                                 progress=False, **options)
            return result.model, time.perf_counter() - start

    reference = sum(lm.logit_average_bits_per_byte(a, b, d, count=LM_EVAL_WINDOWS) for d in BYTE_DOMAINS) / 2
    print(f"{args.family}: logit average {reference:.4f} mean bits per byte")
    side, _ = merge("rebasin")
    parts = stream_owner(side, a, b)
    names = [n for n, _, _ in norm_sites(side)]
    print(f"side by side, no refit, joint norms          {score(side):.4f}")
    print(f"side by side, no refit, every norm per model {score(per_model_norms(side, parts, set(names))):.4f}")
    for name in names:
        alone = score(per_model_norms(side, parts, set(names) - {name}))
        print(f"  only the {name:24s} norm joint: {alone:.4f} ({alone - reference:+.3f})")
    for steps in (int(s) for s in args.steps.split(",")):
        model, seconds = merge("pleas", distill_steps=steps)
        value = score(model)
        print(f"PLeaS 2x, {steps:3d} distillation steps: {value:.4f} ({value - reference:+.3f}), {seconds:.1f} s")


if __name__ == "__main__":
    main()
