"""Models fine-tuned from one base (issue #18): the same-base methods against PLeaS.

A ResNet-20 "pretrained" on the ten UCI digits (scikit-learn's 8x8 scans, at 16x16; 8 epochs, seed 0) is
fine-tuned N times on MNIST, each copy on the digits of one task only ({0,1}, {2,3}, ..., {8,9} for N = 5;
seeds 1-5, 2 epochs, learning rate 3e-4): each learns MNIST's style on its digits and forgets the others.
The N fine-tunes are merged at 1x by every method, with the base where a method takes one, on 200
unlabeled training images per task. A task is scored by the ten-way argmax on its digits' test split (the
merged model must tell every digit from every other); the table gives each task and the mean.

Usage: python benchmarks/same_base.py [--tasks 5] [--json same_base.json]
"""
import argparse
import copy
import json
import time
import warnings

import torch

import pleas
from pleas import datasets
from pleas.experiments import train

parser = argparse.ArgumentParser()
parser.add_argument("--tasks", type=int, default=5, choices=(2, 5))
parser.add_argument("--per-task", type=int, default=200)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--json")
args = parser.parse_args()
torch.set_num_threads(args.threads)

TASKS = {5: [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)], 2: [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]}[args.tasks]
KWARGS = {"in_channels": 1, "num_classes": 10, "width": 1}
pretrain = datasets.load("digits", split="train", resolution=16)
full_train = datasets.load("mnist", split="train", resolution=16)
full_test = datasets.load("mnist", split="test", resolution=16)


def subset(data, digits):
    return data.subset(torch.nonzero(torch.isin(data.y, torch.tensor(digits))).squeeze(1))


base = train.cached_model({"arch": "resnet20", "kwargs": KWARGS, "dataset": "digits", "res": 16, "seed": 0,
                           "epochs": 8, "role": "same-base pretrained"},
                          lambda: pleas.models.create("resnet20", seed=0, **KWARGS),
                          lambda m: train.train_classifier(m, pretrain, seed=0, epochs=8, progress=False))
tuned = []
for k, digits in enumerate(TASKS):
    key = {"arch": "resnet20", "kwargs": KWARGS, "res": 16, "seed": k + 1, "epochs": 2, "lr": 3e-4,
           "role": "same-base fine-tune of the digits model", "digits": list(digits)}
    tuned.append(train.cached_model(key, lambda: copy.deepcopy(base),
                                    lambda m, d=digits, s=k + 1: train.train_classifier(
                                        m, subset(full_train, d), seed=s, epochs=2, lr=3e-4, progress=False)))
tests = [subset(full_test, d) for d in TASKS]
gen = torch.Generator().manual_seed(0)
data = torch.cat([subset(full_train, d).x[torch.randperm(len(subset(full_train, d)), generator=gen)[:args.per_task]]
                  for d in TASKS])


def scores(model):
    out = []
    for test in tests:
        with torch.no_grad():
            logits = model(test.x)
        out.append(float((logits.argmax(1) == test.y).float().mean()))
    return out


rows = []


def show(label, accs, seconds=None):
    rows.append({"row": label, "accuracies": accs, "mean": sum(accs) / len(accs), "seconds": seconds})
    print(f"{label:34s} " + " ".join(f"{a:.3f}" for a in accs) + f"  mean {sum(accs) / len(accs):.3f}"
          + (f"  {seconds:.1f} s" if seconds is not None else ""), flush=True)


show("base (before fine-tuning)", scores(base))
show("fine-tunes (each on its task)", [scores(m)[k] for k, m in enumerate(tuned)])
runs = [("average", {}), ("task_arithmetic", {"base": base, "scale": 0.3}), ("ties", {"base": base}),
        ("dare", {"base": base}), ("dare", {"base": base, "combine": "ties"}),
        ("adamerging", {"base": base}), ("adamerging", {"base": base, "granularity": "layer"}),
        ("fisher", {}), ("regmean", {}), ("rebasin", {}), ("pleas", {}), ("pleas", {"matching": "identity"})]
for method, options in runs:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        result = pleas.merge(tuned, data, method=method, progress=False, **options)
        seconds = time.perf_counter() - start
    label = method + "".join(f" {k}={v}" for k, v in options.items() if k != "base")
    show(label, scores(result.model), seconds)
if args.json:
    with open(args.json, "w") as fh:
        json.dump(rows, fh, indent=1)
