"""Speed of a whole PLeaS merge against the forward floor on torchvision resnet18.

Forward floor: the time for A and B to run once over the calibration data (eval, no_grad).
Usage: python benchmarks/speed_resnet18.py [--images 4000] [--batch 256] [--profile]
"""
import argparse
import json
import time

import torch
import torchvision

import pleas

parser = argparse.ArgumentParser()
parser.add_argument("--images", type=int, default=4000)
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--method", default="pleas")
parser.add_argument("--profile", action="store_true")
parser.add_argument("--sort", default="cumulative", help="profile order: cumulative or tottime")
parser.add_argument("--options", default="{}", help='method options as JSON, e.g. {"inputs": "teacher"}')
args = parser.parse_args()

torch.manual_seed(0)
a = torchvision.models.resnet18(num_classes=10).eval()
torch.manual_seed(1)
b = torchvision.models.resnet18(num_classes=10).eval()
data = torch.randn(args.images, 3, 32, 32)

start = time.perf_counter()
with torch.no_grad():
    for m in (a, b):
        for x in data.split(args.batch):
            m(x)
floor = time.perf_counter() - start
print(f"forward floor (A and B once over {args.images} images): {floor:.2f} s")

if args.profile:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
start = time.perf_counter()
options = json.loads(args.options)
result = pleas.merge(a, b, data, method=args.method, budget=1.0, batch_size=args.batch, progress=False, **options)
total = time.perf_counter() - start
if args.profile:
    prof.disable()
    pstats.Stats(prof).sort_stats(args.sort).print_stats(30)
print(f"{args.method} {options} merge at 1x: {total:.2f} s = {total / floor:.2f} x the forward floor")
for k, v in result.report["seconds"].items():
    print(f"  {k:8s} {v:7.2f} s")
import resource  # noqa: E402

print(f"peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
      f"(data {data.numel() * 4 / 2**30:.2f} GiB)")
