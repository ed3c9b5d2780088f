"""PLeaS with ``targets="stream"`` against ``targets="output"`` on the benchmark's transformer pairs
(docs/refit-choices.md): mean bits per byte over code and prose of the byte-level GPT-2 and Llama pairs, and
mean accuracy of the ViT pair (MNIST 0-4 / 5-9, separate heads), at budgets in effective parameters, with the
calibration data of ``pleas bench --part transformers`` (the models are trained on first use and cached).

    OMP_NUM_THREADS=1 python benchmarks/stream_targets.py [--pairs gpt2,llama,vit] [--budgets 1,1.25,1.5,2]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import pleas


def lm_pair(family: str):
    from pleas.bench.transformers import LM_CALIBRATION, LM_EVAL_WINDOWS
    from pleas.datasets import BYTE_DOMAINS, byte_windows
    from pleas.experiments import lm

    a, b = lm.lm_pair(family)
    ids = byte_windows(LM_CALIBRATION, lm.LM_LENGTH, seed=0)

    def score(model):
        return sum(lm.bits_per_byte(model, d, count=LM_EVAL_WINDOWS) for d in BYTE_DOMAINS) / len(BYTE_DOMAINS)

    reference = sum(lm.logit_average_bits_per_byte(a.model, b.model, d, count=LM_EVAL_WINDOWS)
                    for d in BYTE_DOMAINS) / len(BYTE_DOMAINS)
    return a.model, b.model, ids, {}, score, f"logit average {reference:.3f} bits per byte"


def vit_pair():
    from pleas.bench.tasks import task_calibration
    from pleas.bench.transformers import VIT_CALIBRATION
    from pleas.experiments import sources, train

    a, b = sources.vit_models(log=lambda *_: None)
    data = task_calibration(a, b, VIT_CALIBRATION, seed=0)

    def score(model):
        return (train.evaluate(model, a.test_set, output_index=0) + train.evaluate(model, b.test_set, output_index=1)) / 2

    return a.model, b.model, data, {"heads": "separate"}, score, "mean accuracy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="gpt2,llama,vit")
    parser.add_argument("--budgets", default="1,1.25,1.5,2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    budgets = [float(b) for b in args.budgets.split(",")]
    print(f"{'pair':6s} {'targets':8s} " + " ".join(f"{b:>7g}x" for b in budgets) + "   seconds per merge")
    for name in args.pairs.split(","):
        a, b, data, extra, score, what = vit_pair() if name == "vit" else lm_pair(name)
        print(f"{name}: {what}")
        for targets in ("output", "stream"):
            cells, seconds = [], []
            for budget in budgets:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    start = time.perf_counter()
                    result = pleas.merge(a, b, data, method="pleas", budget=budget, budget_metric="effective_params",
                                         targets=targets, progress=False, **extra)
                    seconds.append(time.perf_counter() - start)
                cells.append(score(result.model))
            print(f"{name:6s} {targets:8s} " + " ".join(f"{c:8.3f}" for c in cells) + "   "
                  + " ".join(f"{s:.1f}" for s in seconds), flush=True)


if __name__ == "__main__":
    main()
