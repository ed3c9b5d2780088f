"""Time spec construction (trace + shape propagation + grouping) on torchvision models.

Usage: python benchmarks/spec_speed.py   (prints seconds per model; the target is < 10 s for resnet50)
"""
import time

import torch
import torchvision

import pleas

for name in ("resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "densenet121"):
    model = torchvision.models.get_model(name, weights=None)
    start = time.perf_counter()
    spec = pleas.build_spec(model, torch.randn(2, 3, 224, 224))
    seconds = time.perf_counter() - start
    print(f"{name:14s} groups={len(spec):4d} spec_seconds={seconds:6.2f}")
