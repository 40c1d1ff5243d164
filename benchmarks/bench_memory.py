"""Peak memory of calibrate() against the number of images (issue 9: independent of it).

Each run is a fresh subprocess: the built-in ResNetMini (16/32/64 channels, 28 x 28 single-channel
images, random weights), a dataset that draws image i from a generator seeded by i (so the data
themselves take no memory), batch 100, every extra (sfvr, taylor, hrank, chip; 64 rank images).
The child reports its peak resident set size (``resource.getrusage``, ru_maxrss) after the model
and one batch went through a plain forward (the baseline: torch, the model, the allocator's
working set) and after calibrate; "calibrate's peak" is the increase. Both image counts are
measured side by side in one run.

Run: python benchmarks/bench_memory.py [--images 1000 10000] [--extras all|none] [--mode sample]
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from chanaxis_fast import calibrate
from chanaxis_fast.zoo import ResNetMini

images, extras, mode = int(sys.argv[2]), sys.argv[3], sys.argv[4]
extras = None if extras == "none" else extras


class Generated(torch.utils.data.Dataset):
    def __len__(self):
        return images

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(1, 28, 28, generator=g), int(torch.randint(0, 10, (), generator=g))


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


torch.manual_seed(0)
model = ResNetMini().eval()
loader = torch.utils.data.DataLoader(Generated(), batch_size=100)
with torch.no_grad():
    model(next(iter(loader))[0])
base = peak_mib()
t0 = time.perf_counter()
calibrate(model, loader, extras=extras, mode=mode, rank_images=64, progress=False)
print(json.dumps(dict(images=images, base=base, peak=peak_mib(), seconds=time.perf_counter() - t0)))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--extras", default="all", choices=["all", "none"])
    parser.add_argument("--mode", default="sample", choices=["sample", "all", "gap"])
    args = parser.parse_args()
    rows, peaks = [], []
    for n in args.images:
        p = subprocess.run([sys.executable, "-c", CHILD, ROOT, str(n), args.extras, args.mode],
                           capture_output=True, text=True, check=True)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        peaks.append(r["peak"] - r["base"])
        rows.append([str(n), f"{r['base']:.0f} MiB", f"{r['peak']:.0f} MiB", f"{peaks[-1]:.0f} MiB",
                     f"{r['seconds']:.1f} s"])
    print(f"ResNetMini 28 x 28, batch 100, mode={args.mode}, extras={args.extras}; peak RSS per run")
    print_table(["images", "before calibrate", "peak", "calibrate's peak", "time"], rows)
    if len(peaks) > 1:
        print(f"calibrate's peak, {args.images[-1]} vs {args.images[0]} images: "
              f"{peaks[-1] / peaks[0]:.2f}x; whole process: {rows[-1][2]} vs {rows[0][2]}")


if __name__ == "__main__":
    main()
