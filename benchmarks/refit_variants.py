"""Which least-squares refit generalises best? On the demo task (ResNet-20 on MNIST digits 0-4 vs 5-9,
different seeds, separate heads) at 1x and 1.5x: closed form with several ridge strengths, without the
zero-block mask, Adam steps from the initialisation (as the reference implementation), inputs propagated
through the merged model, and BatchNorm folded into the convolutions.

Usage: python benchmarks/refit_variants.py [--arch resnet20|mlp] [--budgets 1.0,1.5]
"""
import argparse
import time

import torch

import pleas
from pleas.demo import ARCHS, source_models
from pleas.experiments import train

parser = argparse.ArgumentParser()
parser.add_argument("--arch", default="resnet20", choices=sorted(ARCHS))
parser.add_argument("--budgets", default="1.0,1.5")
parser.add_argument("--calibration", type=int, default=1000)
args = parser.parse_args()
config = ARCHS[args.arch]
sources, trains, tests = source_models(config, config.epochs, print)
models, tests = [sources["A"], sources["B"]], [tests["A"], tests["B"]]
g = torch.Generator().manual_seed(0)
calib = torch.cat([t.x[torch.randperm(len(t), generator=g)[: args.calibration // 2]] for t in trains.values()])

variants = {
    "teacher, ridge 1e-4": {"inputs": "teacher", "ridge": 1e-4},
    "teacher, ridge 1e-3": {"inputs": "teacher", "ridge": 1e-3},
    "teacher, ridge 1e-2": {"inputs": "teacher", "ridge": 1e-2},
    "teacher, ridge 1e-1": {"inputs": "teacher", "ridge": 1e-1},
    "teacher, no mask": {"inputs": "teacher", "mask": False},
    "teacher, adam 300": {"inputs": "teacher", "refit": "adam"},
    "teacher, bn folded": {"inputs": "teacher", "fold_bn": True},
    "propagated, ridge 1e-3": {"inputs": "propagated", "ridge": 1e-3},
    "propagated, ridge 1e-2": {"inputs": "propagated", "ridge": 1e-2},
    "propagated, bn folded": {"inputs": "propagated", "fold_bn": True},
    "propagated, adam 300": {"inputs": "propagated", "refit": "adam"},
}
print(f"{'variant':24s} {'budget':>6s} {'acc A':>6s} {'acc B':>6s} {'mean':>6s} {'sec':>6s}")
for budget in [float(b) for b in args.budgets.split(",")]:
    for name, opts in variants.items():
        start = time.perf_counter()
        r = pleas.merge(*models, calib, method="pleas", budget=budget, heads="separate", progress=False, **opts)
        sec = time.perf_counter() - start
        acc = [train.evaluate(r.model, t, output_index=i) for i, t in enumerate(tests)]
        print(f"{name:24s} {budget:6.2f} {acc[0]:6.3f} {acc[1]:6.3f} {sum(acc) / 2:6.3f} {sec:6.2f}", flush=True)
