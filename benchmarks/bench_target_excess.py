"""Gaussian-MI ops against the pure-PyTorch way of computing them, at C = 512 channels.

  pure PyTorch : gather the [P, k, k] submatrices of cov_t, torch.linalg.det, log (the way one would
                 write it without the extension; R_X as a full [C, C] matrix)
  reference    : chanaxis_fast.reference (float64, clarity first; adds the clamps of the kernels)
  ours         : torch.ops.chanaxis_fast (closed-form determinants, one pass per row)

Cases: 50 partners per channel (P = 25,600 pairs), 100 triplets per channel drawn from its partners
(P = 51,200), R_X of the 25,600 pairs (pure PyTorch: the full [C, C] matrix, then gathered), the
fused per-channel target_excess and peer_overlap_mean. "max diff" is the largest
difference between ours and the pure-PyTorch result. Run: python benchmarks/bench_target_excess.py
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import chanaxis_fast  # noqa: E402
from chanaxis_fast import ops, reference  # noqa: E402
from chanaxis_fast.bench import layer_cov_t  # noqa: E402
from common import ms, print_table, timeit  # noqa: E402

JITTER = 1e-10


# ----------------------------------------------------------------------------- pure PyTorch
def mi_matrix(S):
    std = S.diagonal().sqrt()
    rho = (S / (std[:, None] * std[None, :])).clamp(-0.999, 0.999)
    return -0.5 * torch.log1p(-rho * rho)


def joint_mi(S, channels):
    P, k = channels.shape
    idx = torch.cat([channels, channels.new_full((P, 1), S.shape[0] - 1)], 1)
    M = S[idx[:, :, None], idx[:, None, :]] + JITTER * torch.eye(k + 1, dtype=S.dtype)
    return 0.5 * torch.log(M[:, k, k] * torch.linalg.det(M[:, :k, :k]) / torch.linalg.det(M))


def torch_pair_excess(S, pairs):
    single = mi_matrix(S)[:-1, -1]
    return (joint_mi(S, pairs) - torch.maximum(single[pairs[:, 0]], single[pairs[:, 1]])).clamp_min(0)


def torch_triplet_excess(S, triplets):
    pair_mis = torch.stack([joint_mi(S, triplets[:, [a, b]]) for a, b in ((0, 1), (0, 2), (1, 2))])
    return joint_mi(S, triplets) - pair_mis.amax(0)


def torch_target_excess(S, partners=50, top=10):
    C = S.shape[0] - 1
    R = mi_matrix(S[:C, :C])
    R.fill_diagonal_(-float("inf"))
    chosen = R.topk(partners, dim=1).indices
    pairs = torch.stack([torch.arange(C)[:, None].expand(C, partners), chosen], 2).reshape(-1, 2)
    return torch_pair_excess(S, pairs).reshape(C, partners).topk(top, dim=1).values.mean(1)


def torch_peer_overlap_mean(cov):
    R = mi_matrix(cov)
    return (R.sum(1) - R.diagonal()) / (R.shape[0] - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    C = args.channels
    S = layer_cov_t(C, n=4 * C)
    g = torch.Generator().manual_seed(1)
    partners = ops.target_excess(S, partners=50, top=10).partners  # [C, 50]
    pairs = torch.stack([torch.arange(C)[:, None].expand(C, 50), partners], 2).reshape(-1, 2)
    pick = torch.stack([torch.randperm(50, generator=g)[:2] for _ in range(C * 100)])
    owner = torch.arange(C).repeat_interleave(100)
    triplets = torch.stack([owner, partners[owner, pick[:, 0]], partners[owner, pick[:, 1]]], 1)

    cases = [
        (f"gaussian_mi_pairs P={pairs.shape[0]}",
         lambda: mi_matrix(S[:C, :C])[pairs[:, 0], pairs[:, 1]],
         lambda: reference.gaussian_mi_pairs(S[:C, :C], pairs),
         lambda: ops.gaussian_mi_pairs(S[:C, :C], pairs)),
        (f"pair_target_excess P={pairs.shape[0]}",
         lambda: torch_pair_excess(S, pairs),
         lambda: reference.pair_target_excess(S, pairs),
         lambda: ops.pair_target_excess(S, pairs)),
        (f"triplet_target_excess P={triplets.shape[0]}",
         lambda: torch_triplet_excess(S, triplets),
         lambda: reference.triplet_target_excess(S, triplets),
         lambda: ops.triplet_target_excess(S, triplets)),
        (f"target_excess C={C} (50 partners, top 10)",
         lambda: torch_target_excess(S),
         lambda: reference.target_excess(S).te,
         lambda: ops.target_excess(S).te),
        (f"peer_overlap_mean C={C}",
         lambda: torch_peer_overlap_mean(S[:C, :C]),
         lambda: reference.peer_overlap_mean(S[:C, :C]),
         lambda: ops.peer_overlap_mean(S[:C, :C])),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, CUDA kernels: "
          f"{chanaxis_fast.build_info()['cuda_kernels']}, float64 cov_t on the CPU")
    rows = []
    for name, pure, ref, ours in cases:
        diff = (ours() - pure()).abs().max().item()
        t_pure, t_ref, t_ours = (timeit(f, repeat=args.repeat) for f in (pure, ref, ours))
        rows.append([name, ms(t_pure), ms(t_ref), ms(t_ours), f"{t_pure / t_ours:.1f}x", f"{diff:.1e}"])
    print_table(["case", "pure PyTorch", "reference.py", "ours", "ratio", "max diff"], rows)


if __name__ == "__main__":
    main()
