"""Wall time and total CPU time of a PLeaS merge on 1, 2 and 4 processes (torch.distributed, gloo on
loopback), each passing its own run of whole calibration batches (``pleas.distributed.shard``).

Models: two torchvision resnet18s (10 classes, seeds 0 and 1, untrained) on random 32x32 images. Each
rank uses cores / ranks torch threads (at least one). CPU time counts every rank (the launcher's children).
Usage: python benchmarks/distributed.py [--images 2000] [--ranks 1,2,4] [--batch 250]
"""
import argparse
import os
import resource
import time
import warnings

import torch
import torchvision

import pleas
from pleas import distributed


def models():
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(torchvision.models.resnet18(num_classes=10).eval())
    return out


def merge_rank(images: int, batch: int, out: str) -> None:
    warnings.simplefilter("ignore")
    a, b = models()
    x = distributed.shard(torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(0)), batch)
    start = time.perf_counter()
    result = pleas.merge(a, b, x, budget=1.0, batch_size=batch, progress=False)
    if distributed.rank() == 0:
        torch.save({"seconds": time.perf_counter() - start, "weights": result.model.state_dict()}, out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--ranks", default="1,2,4")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"PLeaS merge of two resnet18s at 1x, {args.images} calibration images of 32x32 in batches of "
          f"{args.batch}, {cores} cores")
    print("| ranks | threads per rank | merge (s, rank 0) | wall incl. start-up (s) | CPU, all ranks (s) | "
          "max weight difference vs 1 rank |")
    print("|---|---|---|---|---|---|")
    reference = None
    for k in [int(r) for r in args.ranks.split(",")]:
        out = f"/tmp/pleas-distributed-bench-{k}.pt"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        if k == 1:  # in a child process too, so that start-up and CPU are counted alike
            distributed.launch(1, _spawned_single, (args.images, args.batch, out))
        else:
            distributed.launch(k, merge_rank, (args.images, args.batch, out))
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        saved = torch.load(out, weights_only=False)
        os.remove(out)
        if reference is None:
            reference = saved["weights"]
        diff = max(float((saved["weights"][n].double() - v.double()).abs().max()) for n, v in reference.items()
                   if v.is_floating_point())
        threads = max(1, cores // k)
        print(f"| {k} | {threads} | {saved['seconds']:.2f} | {wall:.2f} | {cpu:.2f} | {diff:.2g} |", flush=True)


def _spawned_single(images: int, batch: int, out: str) -> None:
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=merge_rank, args=(images, batch, out))
    process.start()
    process.join()


if __name__ == "__main__":
    main()
