"""score() of every metric for torchvision resnet18 (CIFAR stem, random weights) from a saved calibration.

The calibration (random 32x32 images, every extra gathered) is made once and saved; the timed part
is Calibration.load + score(every metric), then each metric alone (first call, nothing cached).
Run: python benchmarks/bench_score.py [--images 256] [--rank-images 8]
"""

import argparse
import os
import sys
import tempfile
import time

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import chanaxis_fast as cf  # noqa: E402
from chanaxis_fast.cli import DEFAULT_METRICS  # noqa: E402
from common import print_table  # noqa: E402


def resnet18_cifar():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=100)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    for mod in m.modules():  # random but non-trivial BatchNorms
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.2, 0.2)
    return m.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rank-images", type=int, default=8, help="images for HRank/CHIP")
    args = parser.parse_args()
    model = resnet18_cifar()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (args.images,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    t0 = time.perf_counter()
    cal = cf.calibrate(model, loader, rank_images=args.rank_images, progress=False)
    t_cal = time.perf_counter() - t0
    path = os.path.join(tempfile.mkdtemp(), "resnet18.cal.pt")
    cal.save(path)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; resnet18 (CIFAR stem): "
          f"{len(cal.layers)} layers, {sum(cal.graph.layers[l].out_channels for l in cal.layers)} "
          f"channels; calibration of {args.images} images took {t_cal:.1f} s")

    t0 = time.perf_counter()
    cal = cf.Calibration.load(path)
    scores = cf.score(model, cal, DEFAULT_METRICS)
    total = time.perf_counter() - t0
    rows = []
    for spec in DEFAULT_METRICS:
        t0 = time.perf_counter()
        cf.score(model, cal, [spec])
        rows.append([spec, f"{time.perf_counter() - t0:.3f} s"])
    rows.append(["load + all metrics together", f"{total:.3f} s"])
    print_table(["metric", "time"], rows)
    bad = [m for m, v in scores.values.items() if not all(torch.isfinite(t).all() for t in v.values())]
    print(f"target < 5 s: {'met' if total < 5 else 'NOT met'}; non-finite metrics: {bad or 'none'}")


if __name__ == "__main__":
    main()
