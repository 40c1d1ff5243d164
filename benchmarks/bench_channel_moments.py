"""channel_moments against the best pure-PyTorch ways of computing the same statistics.

  float64 ref : channel-major rows [C, n] (transpose + reshape, + gather), .double(), centre,
                Z Z^T (the faster of the two matmul layouts here)                  (float64-accurate)
  cov fp32    : torch.cov of the float32 rows                                      (float32-accurate)
  ours        : torch.ops.chanaxis_fast.channel_moments                            (float64-accurate)

GFLOP/s counts 2 flops for each of the n * C (C + 1) / 2 useful multiply-adds (the symmetric
product). "err" is the largest error of the covariance relative to its largest entry, against the
float64 reference.

Second table, precision="float32" (issue 9): data with mean 1e4 and std 1 (float32 input), every
time measured side by side in one run:
  cov fp32    : torch.cov of the float32 rows
  ours fp32   : channel_moments(..., precision="float32")
  ours fp64   : channel_moments(..., precision="float64")
and the relative errors ||cov - truth||_F / ||truth||_F against the float64 reference of the same
input, with the one-pass float32 formula (X^T X - n m m^T) for comparison.
Run: python benchmarks/bench_channel_moments.py [--quick] [--precision-only]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import chanaxis_fast  # noqa: E402
from common import ms, print_table, timeit  # noqa: E402


def rows_of(x, positions=None):
    N, C, H, W = x.shape
    flat = x.reshape(N, C, H * W)
    if positions is not None:
        flat = flat.gather(2, positions[:, None, :].expand(N, C, positions.shape[1]))
    return flat.permute(0, 2, 1).reshape(-1, C)


def float64_reference(x, positions=None):
    N, C, H, W = x.shape
    flat = x.transpose(0, 1).reshape(C, N, H * W)
    if positions is not None:
        flat = flat.gather(2, positions[None].expand(C, N, positions.shape[1]))
    z = flat.reshape(C, -1).double()
    z = z - z.mean(1, keepdim=True)
    return z @ z.T / (z.shape[1] - 1)


def cov_float32(x, positions=None):
    return torch.cov(rows_of(x, positions).T)


def ours(x, positions=None, precision="float64"):
    m = chanaxis_fast.ops.channel_moments(x, positions=positions, precision=precision)
    return m.comoment / (m.count - 1)


def one_pass_float32(x):
    r = rows_of(x)
    mu = r.mean(0)
    return (r.T @ r - r.shape[0] * torch.outer(mu, mu)) / (r.shape[0] - 1)


def precision_table(repeat):
    g = torch.Generator().manual_seed(1)
    cases = [("C=256, 128x256x8x8", (128, 256, 8, 8)), ("C=512, 128x512x4x4", (128, 512, 4, 4)),
             ("C=512, 256x512x8x8", (256, 512, 8, 8)), ("C=1024, 64x1024x4x4", (64, 1024, 4, 4))]
    rows = []
    for name, shape in cases:
        x = (torch.randn(shape, generator=g) + 1e4).float()
        truth = float64_reference(x)
        rel = lambda c: ((c.double() - truth).norm() / truth.norm()).item()
        t_cov = timeit(lambda: cov_float32(x), repeat=repeat)
        t_32 = timeit(lambda: ours(x, precision="float32"), repeat=repeat)
        t_64 = timeit(lambda: ours(x), repeat=repeat)
        rows.append([name, ms(t_cov), ms(t_32), ms(t_64), f"{t_cov / t_32:.2f}x", f"{t_64 / t_32:.2f}x",
                     f"{rel(cov_float32(x)):.1e}", f"{rel(one_pass_float32(x)):.1e}",
                     f"{rel(ours(x, precision='float32')):.1e}", f"{rel(ours(x)):.1e}"])
    print(f"\nprecision=\"float32\": data with mean 1e4, std 1 (float32), {torch.get_num_threads()} "
          "threads; errors relative, Frobenius")
    print_table(["case", "cov fp32", "ours fp32", "ours fp64", "cov/ours32", "ours64/ours32",
                 "err cov fp32", "err one-pass fp32", "err ours fp32", "err ours fp64"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--precision-only", action="store_true", help="only the float32 table")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeat = 3 if args.quick else 7
    if args.precision_only:
        precision_table(repeat)
        return
    g = torch.Generator().manual_seed(0)
    cases = [
        ("all 128x64x32x32", torch.randn(128, 64, 32, 32, generator=g), None),
        ("all 128x256x8x8", torch.randn(128, 256, 8, 8, generator=g), None),
        ("all 128x512x4x4", torch.randn(128, 512, 4, 4, generator=g), None),
        ("80k sampled rows, C=512", torch.randn(5000, 512, 4, 4, generator=g),
         torch.randint(0, 16, (5000, 16), generator=g)),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, input float32 on the CPU")
    rows = []
    for name, x, pos in cases:
        C = x.shape[1]
        n = x.shape[0] * (x.shape[2] * x.shape[3] if pos is None else pos.shape[1])
        flops = n * C * (C + 1)
        truth = float64_reference(x, pos)
        scale = truth.abs().max()
        t_ref = timeit(lambda: float64_reference(x, pos), repeat=repeat)
        t_cov = timeit(lambda: cov_float32(x, pos), repeat=repeat)
        t_ours = timeit(lambda: ours(x, pos), repeat=repeat)
        err_cov = ((cov_float32(x, pos).double() - truth).abs().max() / scale).item()
        err_ours = ((ours(x, pos) - truth).abs().max() / scale).item()
        rows.append([name, n, ms(t_ref), ms(t_cov), ms(t_ours), f"{t_ref / t_ours:.2f}x",
                     f"{t_cov / t_ours:.2f}x", f"{flops / t_ours / 1e9:.1f}",
                     f"{err_cov:.1e}", f"{err_ours:.1e}"])
    print_table(["case", "rows n", "float64 ref", "cov fp32", "ours", "vs ref", "vs cov",
                 "ours GFLOP/s", "err cov", "err ours"], rows)
    precision_table(repeat)


if __name__ == "__main__":
    main()
