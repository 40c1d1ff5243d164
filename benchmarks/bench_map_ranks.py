"""map_ranks (HRank's feature-map ranks) against torch.linalg.matrix_rank, on post-ReLU maps of
the sizes a ResNet produces (56 x 56 down to 4 x 4).

  matrix_rank : torch.linalg.matrix_rank of the float32 maps (one LAPACK / cuSOLVER SVD per map,
                batched), what HRank calls
  reference   : chanaxis_fast.reference.map_ranks (matrix_rank in float64)
  ours        : torch.ops.chanaxis_fast.map_ranks (float64 Householder bidiagonalisation and Sturm
                counts per map, no library call; csrc/common/rank.h)

"same ranks" compares ours with the float64 reference (they can differ only where a singular
value lies within rounding of the tolerance). CUDA rows (CUDA events) when a GPU is present.
Run: python benchmarks/bench_map_ranks.py [--threads N] [--repeat R]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import chanaxis_fast  # noqa: E402,F401
from chanaxis_fast import ops, reference  # noqa: E402
from common import ms, op_bench_setup, print_table, timeit  # noqa: E402

SHAPES = [(16, 64, 56), (16, 64, 32), (16, 128, 16), (16, 256, 8), (16, 512, 4)]  # N, C, H = W


def main():
    args, devices = op_bench_setup(__doc__, repeat=5)
    rows = []
    for device in devices:
        for N, C, H in SHAPES:
            g = torch.Generator().manual_seed(N * C * H)
            maps = torch.randn(N, C, H, H, generator=g).relu().to(device)
            t_ref = timeit(lambda: torch.linalg.matrix_rank(maps), repeat=args.repeat, device=device)
            t_ours = timeit(lambda: ops.map_ranks(maps), repeat=args.repeat, device=device)
            same = bool(torch.equal(ops.map_ranks(maps).cpu(), reference.map_ranks(maps.cpu())))
            rows.append([device, f"{N} x {C} x {H} x {H}", ms(t_ref), ms(t_ours),
                         f"{t_ref / t_ours:.2f}x", "yes" if same else "NO"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_table(["device", "maps", "matrix_rank", "ours", "ratio", "same ranks"], rows)


if __name__ == "__main__":
    main()
