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
from pleas.experiments import architectures, data, train

parser = argparse.ArgumentParser()
parser.add_argument("--arch", default="resnet20")
parser.add_argument("--budgets", default="1.0,1.5")
parser.add_argument("--calibration", type=int, default=1000)
args = parser.parse_args()
res = 16 if args.arch == "resnet20" else 28
kwargs = {"in_channels": 1, "num_classes": 5, "width": 1} if args.arch == "resnet20" else {
    "in_features": 784, "num_classes": 5, "hidden": 128, "depth": 3}
epochs = 8 if args.arch == "resnet20" else 20
models, tests, trains = [], [], []
for classes, seed in (([0, 1, 2, 3, 4], 0), ([5, 6, 7, 8, 9], 1)):
    tr = data.load("mnist", split="train", classes=classes, resolution=res)
    trains.append(tr)
    tests.append(data.load("mnist", split="test", classes=classes, resolution=res))
    key = {"arch": args.arch, "kwargs": kwargs, "classes": classes, "seed": seed, "epochs": epochs, "res": res}
    models.append(train.cached_model(key, lambda s=seed: architectures.create(args.arch, seed=s, **kwargs),
                                     lambda m, ds=tr, s=seed: train.train_classifier(m, ds, seed=s, epochs=epochs, progress=False)))
g = torch.Generator().manual_seed(0)
calib = torch.cat([t.x[torch.randperm(len(t), generator=g)[: args.calibration // 2]] for t in trains])

variants = {
    "ridge 1e-4": {"ridge": 1e-4, "inputs": "teacher"},
    "ridge 1e-2": {"ridge": 1e-2, "inputs": "teacher"},
    "ridge 1e-1": {"ridge": 1e-1, "inputs": "teacher"},
    "no mask": {"mask": False, "inputs": "teacher"},
    "adam 300": {"refit": "adam", "inputs": "teacher"},
    "teacher": {"inputs": "teacher"},
    "propagated": {"inputs": "propagated"},
    "propagated r1e-2": {"inputs": "propagated", "ridge": 1e-2},
    "bn folded": {"fold_bn": True, "inputs": "teacher"},
    "bn folded, prop.": {"fold_bn": True, "inputs": "propagated"},
}
print(f"{'variant':18s} {'budget':>6s} {'acc A':>6s} {'acc B':>6s} {'mean':>6s} {'sec':>6s}")
for budget in [float(b) for b in args.budgets.split(",")]:
    for name, opts in variants.items():
        start = time.perf_counter()
        r = pleas.merge(*models, calib, method="pleas", budget=budget, heads="separate", progress=False, **opts)
        sec = time.perf_counter() - start
        acc = [train.evaluate(r.model, t, output_index=i) for i, t in enumerate(tests)]
        print(f"{name:18s} {budget:6.2f} {acc[0]:6.3f} {acc[1]:6.3f} {sum(acc) / 2:6.3f} {sec:6.2f}", flush=True)
