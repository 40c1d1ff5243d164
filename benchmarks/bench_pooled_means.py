"""pooled_means (mode "gap"'s float64 mean of every read-out map) against the ways PyTorch
computes it, on ResNet / MobileNet-sized read-outs.

  double().mean : x.double().mean(2), the reference (a float64 copy of the whole map first)
  blockwise     : the same a few images at a time (what calibrate ran before the op; what
                  devices without a kernel run)
  ours          : torch.ops.chanaxis_fast.pooled_means (each row read once, widened as summed)

GB/s counts the float32 values read by ours. CUDA rows (CUDA events) when a GPU is present.
Run: python benchmarks/bench_pooled_means.py [--threads N] [--repeat R]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import chanaxis_fast  # noqa: E402,F401
from chanaxis_fast import ops, reference  # noqa: E402
from common import ms, op_bench_setup, print_table, timeit  # noqa: E402

SHAPES = [(128, 64, 32 * 32), (128, 256, 8 * 8), (128, 512, 4 * 4), (16, 96, 112 * 112),
          (16, 576, 14 * 14)]  # N, C, H * W


def main():
    args, devices = op_bench_setup(__doc__, repeat=7)
    rows = []
    for device in devices:
        for N, C, S in SHAPES:
            g = torch.Generator().manual_seed(N * C + S)
            x = torch.randn(N, C, S, generator=g).relu().to(device)
            t_ref = timeit(lambda: reference.pooled_means(x), repeat=args.repeat, device=device)
            t_blk = timeit(lambda: ops._pooled_means_blocks(x), repeat=args.repeat, device=device)
            t_ours = timeit(lambda: ops.pooled_means(x), repeat=args.repeat, device=device)
            err = float(((ops.pooled_means(x) - reference.pooled_means(x)).abs()
                         / reference.pooled_means(x).abs().clamp_min(1e-300)).max())
            rows.append([device, f"{N} x {C} x {S}", ms(t_ref), ms(t_blk), ms(t_ours),
                         f"{t_ref / t_ours:.1f}x", f"{t_blk / t_ours:.1f}x",
                         f"{4 * x.numel() / t_ours / 1e9:.1f}", f"{err:.1e}"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_table(["device", "x", "double().mean", "blockwise", "ours", "vs mean", "vs blockwise",
                 "GB/s", "max rel diff"], rows)


if __name__ == "__main__":
    main()
