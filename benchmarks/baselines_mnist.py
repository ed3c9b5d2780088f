"""Baselines on real data: two models trained on MNIST digits 0-4 and 5-9 from different seeds,
merged with separate heads by every registered method at a few budgets; accuracy per task.

Usage: python benchmarks/baselines_mnist.py [--arch mlp|resnet20]
Source models are trained once and cached (PLEAS_CACHE, default ~/.cache/pleas).
"""
import argparse
import time

import torch

import pleas
from pleas.demo import ARCHS, source_models
from pleas.experiments import train

parser = argparse.ArgumentParser()
parser.add_argument("--arch", default="mlp", choices=sorted(ARCHS))
parser.add_argument("--calibration", type=int, default=1000)
args = parser.parse_args()

config = ARCHS[args.arch]
models, trains, tests = source_models(config, config.epochs, print)
tasks = list(models)
g = torch.Generator().manual_seed(0)
calib = torch.cat([trains[n].x[torch.randperm(len(trains[n]), generator=g)[: args.calibration // 2]] for n in tasks])

print(f"{'method':10s} {'budget':>6s} {'size':>6s} {'acc A':>6s} {'acc B':>6s} {'mean':>6s} {'sec':>6s}")
for name in tasks:
    acc = train.evaluate(models[name], tests[name])
    print(f"{'source ' + name:10s} {'1.0':>6s} {1.0:6.2f} {acc if name == 'A' else float('nan'):6.3f} "
          f"{acc if name == 'B' else float('nan'):6.3f}")
runs = [("ensemble", None, {}), ("average", 1.0, {}), ("rebasin", 1.0, {"matching": "weight"}),
        ("rebasin", 1.0, {}), ("zipit", 1.0, {}), ("regmean", 1.0, {}), ("pleas", 1.0, {}),
        ("rebasin", 1.5, {}), ("zipit", 1.5, {}), ("pleas", 1.5, {})]
for method, budget, opts in runs:
    start = time.perf_counter()
    r = pleas.merge(models["A"], models["B"], calib, method=method, budget=budget or 1.0, heads="separate",
                    progress=False, **opts)
    sec = time.perf_counter() - start
    acc_a = train.evaluate(r.model, tests["A"], output_index=0)
    acc_b = train.evaluate(r.model, tests["B"], output_index=1)
    label = method + ("-w" if opts.get("matching") == "weight" else "")
    print(f"{label:10s} {budget or '-':>6} {r.report['size']['relative_dense']:6.2f} {acc_a:6.3f} {acc_b:6.3f} "
          f"{(acc_a + acc_b) / 2:6.3f} {sec:6.2f}")
