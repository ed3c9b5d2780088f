"""Speed of a whole PLeaS merge against the forward floor on torchvision resnet18.

Forward floor: the time for A and B to run once over the calibration data (eval, no_grad), the median
of three warm runs (``pleas.bench.measure.forward_floor``). The merge is timed warm too (after one
small merge has loaded every code path): the median of ``--repeats`` merges and the phases of the
median one. ``--in-channels 1 --heads separate`` is the benchmark suite's resnet18 (MNIST halves), untrained;
``--suite-task mnist-halves`` (or ``domains``) takes the suite's own trained pair 0 and its calibration
draw instead (trained, or taken from the cache, as ``pleas bench`` does).
Usage: python benchmarks/speed_resnet18.py [--images 4000] [--batch 256] [--repeats 3] [--profile]
       [--suite-task mnist-halves|domains]
"""
import argparse
import json
import resource
import time

import torch
import torchvision

import pleas
from pleas.bench.measure import forward_floor

parser = argparse.ArgumentParser()
parser.add_argument("--images", type=int, default=4000)
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--in-channels", type=int, default=3)
parser.add_argument("--heads", default="shared", choices=["shared", "separate"])
parser.add_argument("--method", default="pleas")
parser.add_argument("--profile", action="store_true")
parser.add_argument("--sort", default="cumulative", help="profile order: cumulative or tottime")
parser.add_argument("--options", default="{}", help='method options as JSON, e.g. {"inputs": "teacher"}')
parser.add_argument("--suite-task", default=None, choices=["mnist-halves", "domains"],
                    help="the benchmark suite's trained resnet18 pair 0 of this task and its calibration data")
args = parser.parse_args()


def resnet18(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    if args.in_channels != 3:
        model.conv1 = torch.nn.Conv2d(args.in_channels, 64, 7, 2, 3, bias=False)
    return model.eval()


if args.suite_task:
    from pleas.bench import tasks as task_defs

    task = task_defs.TASKS[args.suite_task]
    pair = task_defs.source_models(task, "resnet18", 0, task.archs["resnet18"].epochs, print)
    a, b = pair[0].model.eval(), pair[1].model.eval()
    data = task_defs.task_calibration(pair[0], pair[1], args.images, seed=0)
    args.heads = task.heads
else:
    a, b = resnet18(0), resnet18(1)
    data = torch.randn(args.images, args.in_channels, 32, 32)
options = json.loads(args.options)


def merge(x):
    return pleas.merge(a, b, x, method=args.method, budget=1.0, heads=args.heads, batch_size=args.batch,
                       progress=False, **options)


floor = forward_floor([a, b], data, batch_size=args.batch)
print(f"forward floor (A and B once over {args.images} images, median of 3 warm runs): {floor:.3f} s")
merge(data[:64])  # warm-up: imports and first calls
if args.profile:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
runs = []
for _ in range(args.repeats):
    start = time.perf_counter()
    result = merge(data)
    runs.append((time.perf_counter() - start, result.report["seconds"]))
if args.profile:
    prof.disable()
    pstats.Stats(prof).sort_stats(args.sort).print_stats(30)
total, phases = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
print(f"{args.method} {options} merge at 1x: {total:.2f} s (median of {args.repeats}: "
      f"{', '.join(f'{t:.2f}' for t, _ in runs)}) = {total / floor:.2f} x the forward floor")
for k, v in phases.items():
    print(f"  {k:8s} {v:7.2f} s  ({v / floor:.2f} floors)")
print(f"peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
      f"(data {data.numel() * 4 / 2**30:.2f} GiB)")
