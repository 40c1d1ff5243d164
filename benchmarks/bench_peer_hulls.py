"""peer_hulls and explained_variance against the pure-PyTorch reference.

The reference greedy (chanaxis_fast.reference) takes, for every channel and step, E_i(S + {j}) of all
candidates j from one batched torch.linalg.solve. For large C it is timed on an evenly spaced subset
of channels and extrapolated linearly in the number of channels (each channel's greedy is
independent); its E_full factorisation is timed in full. The hulls of the timed channels are
checked to be identical (members, sizes, saturation; E path to 1e-10).

Both sides run on one thread by default (--threads): the 2 cores of the development machines are
shared, and OpenMP threads that wait for a descheduled partner make multi-threaded timings there
meaningless (10-40x slower at random).

    python benchmarks/bench_peer_hulls.py [--sizes 64 256 512 1024] [--ref-channels 512] [--threads 1]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from chanaxis_fast import ops, reference  # noqa: E402
from chanaxis_fast.reference import _full_explained_variance, _hull_of_channel, _ridged  # noqa: E402
from chanaxis_fast.bench import correlation  # noqa: E402
from common import timeit  # noqa: E402


def bench_hulls(C, ref_channels, device, max_size=10, eps=0.05, ridge=1e-3):
    P = correlation(C).to(device)
    ours = timeit(lambda: ops.peer_hulls(P, max_size=max_size, eps=eps, ridge=ridge), repeat=3)
    h = ops.peer_hulls(P, max_size=max_size, eps=eps, ridge=ridge)

    t0 = time.perf_counter()
    _, A = _ridged(P.cpu(), ridge)
    e_full = _full_explained_variance(A)
    t_full = time.perf_counter() - t0
    channels = torch.linspace(0, C - 1, min(C, ref_channels)).round().long().unique().tolist()
    identical = torch.allclose(e_full, h.e_full.cpu(), rtol=0, atol=1e-10)
    t0 = time.perf_counter()
    hulls = [_hull_of_channel(A, i, float(e_full[i]), max_size, eps) for i in channels]
    t_greedy = time.perf_counter() - t0
    for i, (members, path, saturated) in zip(channels, hulls):
        k = len(members)
        identical &= int(h.hull_size[i]) == k and bool(h.saturated[i]) == saturated
        identical &= h.hull_members[i, :k].tolist() == members
        identical &= torch.allclose(h.hull_ev[i, :k].cpu(), torch.tensor(path, dtype=torch.float64), rtol=0, atol=1e-10)
    ref = t_full + t_greedy * C / len(channels)
    sizes = h.hull_size.double()
    return dict(C=C, timed=len(channels), ref=ref, ours=ours, identical=identical,
                mean_size=sizes.mean().item(), saturated=h.saturated.double().mean().item())


def bench_explained_variance(C, device, K=10, ref_rows=512, ridge=1e-3):
    """E of every channel's first K hull members: B = C rows of K peers."""
    P = correlation(C).to(device)
    h = ops.peer_hulls(P, max_size=K, eps=0.0, ridge=ridge)
    targets = torch.arange(C, device=device)
    peers = h.hull_members
    ours = timeit(lambda: ops.explained_variance(P, targets, peers, ridge=ridge), repeat=5)
    e = ops.explained_variance(P, targets, peers, ridge=ridge)
    rows = torch.linspace(0, C - 1, min(C, ref_rows)).round().long().unique()
    t0 = time.perf_counter()
    r = reference.explained_variance(P.cpu(), targets.cpu()[rows], peers.cpu()[rows], ridge=ridge)
    ref = (time.perf_counter() - t0) * C / len(rows)
    agree = torch.allclose(e.cpu()[rows], r, rtol=0, atol=1e-10)

    # What one would write with torch alone: gather the [B, K, K] systems, one batched solve.
    def batched_solve():
        A = P.double() + ridge * torch.eye(C, dtype=torch.float64, device=device)
        idx = peers.clamp_min(0)
        valid = (peers >= 0).double()
        M = A[idx[:, :, None], idx[:, None, :]] * valid[:, :, None] * valid[:, None, :]
        M = M + torch.diag_embed(1.0 - valid)
        rhs = A[targets[:, None], idx] * valid
        return (rhs * torch.linalg.solve(M, rhs[..., None])[..., 0]).sum(1).clamp(0, 1)

    torch_batched = timeit(batched_solve, repeat=5)
    agree &= torch.allclose(batched_solve(), e, rtol=0, atol=1e-10)
    return dict(C=C, B=C, K=K, ref=ref, timed=len(rows), batched=torch_batched, ours=ours, agree=agree)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512, 1024])
    parser.add_argument("--ref-channels", type=int, default=512,
                        help="time the reference on at most this many channels per layer and extrapolate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print("peer_hulls (max_size=10, eps=0.05, ridge=1e-3); reference = one batched solve per channel and step")
    print(f"{'C':>6} {'ref chans':>9} {'reference s':>12} {'ours s':>9} {'ratio':>8} {'mean |H|':>9} {'saturated':>9} {'identical':>9}")
    for C in args.sizes:
        r = bench_hulls(C, args.ref_channels, args.device)
        print(f"{r['C']:>6} {r['timed']:>9} {r['ref']:>12.3f} {r['ours']:>9.4f} {r['ref'] / r['ours']:>7.0f}x "
              f"{r['mean_size']:>9.2f} {r['saturated']:>9.2f} {str(r['identical']):>9}", flush=True)
    print("\nexplained_variance (B = C rows of K = 10 hull peers); reference = one solve per row (python loop)")
    print(f"{'C':>6} {'B':>6} {'ref rows':>8} {'reference s':>12} {'torch batched s':>15} {'ours s':>9} {'vs ref':>8} {'vs batched':>10} {'agree':>6}")
    for C in args.sizes:
        r = bench_explained_variance(C, args.device)
        print(f"{r['C']:>6} {r['B']:>6} {r['timed']:>8} {r['ref']:>12.3f} {r['batched']:>15.4f} {r['ours']:>9.5f} "
              f"{r['ref'] / r['ours']:>7.0f}x {r['batched'] / r['ours']:>9.1f}x {str(r['agree']):>6}", flush=True)
    print("\nreference times with fewer timed channels (rows) than C are extrapolated linearly")


if __name__ == "__main__":
    main()
