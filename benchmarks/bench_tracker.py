"""The axis tracker's cost per measurement against one training epoch, in the default setting:
ResNetMini 16/32/64 on Fashion-MNIST, 2,000 calibration images, 6 depth-spaced layers.

The epoch is timed on ``--train-batches`` batches of 128 images (Adam, train mode) and scaled to
the 469 batches of a Fashion-MNIST epoch (all 60,000 images) unless ``--train-batches 469``; each
measurement (with and without the modularity analysis) is timed ``--repeat`` times, at
initialisation and after the training batches, and the median is reported, split into its parts.
Run: python benchmarks/bench_tracker.py [--train-batches 40] [--repeat 3]
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from chanaxis_fast import AxisTracker  # noqa: E402
from chanaxis_fast.data import load_fashion_mnist, seeded_subset  # noqa: E402
from chanaxis_fast.training import train_classifier  # noqa: E402
from chanaxis_fast.zoo import ResNetMini  # noqa: E402
from common import print_table  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-batches", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    train = load_fashion_mnist("train")
    calib = DataLoader(seeded_subset(train, 2000, 0), batch_size=250)
    loader = DataLoader(train, batch_size=128, shuffle=True)
    epoch_batches = math.ceil(len(train) / 128)
    torch.manual_seed(0)
    model = ResNetMini(1, 10)
    trackers = {True: AxisTracker(calib), False: AxisTracker(calib, modularity=False)}

    def measure_all(step):
        for _ in range(args.repeat):
            for tracker in trackers.values():
                tracker.measure(model, step, replace=True)
                times[tracker.modularity].append(tracker.records[step]["seconds"])

    times = {True: [], False: []}
    measure_all(0)
    t0 = time.perf_counter()
    train_classifier(model, loader, max_batches=args.train_batches, seed=0)
    epoch = (time.perf_counter() - t0) / args.train_batches * epoch_batches
    measure_all(1)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}; one epoch = {epoch_batches} batches of 128, "
          f"timed on {args.train_batches} and scaled")
    rows = [["training epoch", f"{epoch:.1f} s", "", "", "", "1"]]
    for modularity in (False, True):
        med = {k: statistics.median(t[k] for t in times[modularity])
               for k in ("calibrate", "score", "modularity", "total")}
        rows.append([f"measurement, modularity={modularity}", f"{med['total']:.2f} s",
                     f"{med['calibrate']:.2f} s", f"{med['score']:.2f} s", f"{med['modularity']:.2f} s",
                     f"{med['total'] / epoch:.4f}"])
    print_table(["what", "time", "calibrate", "score + analyses", "modularity", "x epoch"], rows)


if __name__ == "__main__":
    main()
