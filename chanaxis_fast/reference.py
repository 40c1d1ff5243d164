"""Pure-PyTorch float64 references of every op, with the same signatures as :mod:`chanaxis_fast.ops`.

They favour clarity over speed and are what the kernels are tested against.
"""

from typing import Optional

import torch
from torch import Tensor

from .ops import Moments, TargetExcess


def _rows(x, target, positions, mode, channel_dim):
    """The batch as float64 rows [n, D]: one sample per row, target as the last column."""
    if x.dim() == 4 and channel_dim in (-1, 3):
        x = x.movedim(3, 1)
    x = x.double()
    t = None if target is None else target.double()
    if x.dim() == 2:
        y = x
    else:
        N, C, H, W = x.shape
        flat = x.reshape(N, C, H * W)
        if mode == "gap":
            y = flat.mean(2)
        else:
            if mode == "positions":
                flat = flat.gather(2, positions[:, None, :].expand(N, C, positions.shape[1]))
            per_image = flat.shape[2]
            y = flat.permute(0, 2, 1).reshape(N * per_image, C)
            if t is not None:
                t = t.repeat_interleave(per_image)
    if t is not None:
        y = torch.cat([y, t[:, None]], dim=1)
    return y


def channel_moments(
    x: Tensor,
    target: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
    *,
    mode: Optional[str] = None,
    channel_dim: int = 1,
    skip_nonfinite: bool = False,
) -> Moments:
    """Reference of :func:`chanaxis_fast.ops.channel_moments` (float64, on x's device)."""
    if mode is None:
        mode = "positions" if positions is not None else "all"
    y = _rows(x, target, positions, mode, channel_dim)
    if skip_nonfinite:
        y = y[torch.isfinite(y).all(dim=1)]
    count = y.shape[0]
    mean = y.mean(0) if count else y.new_zeros(y.shape[1])
    z = y - mean
    return Moments(torch.tensor(count, device=y.device), mean, z.T @ z)


# ----------------------------------------------------------------------------- Gaussian MI
_RHO_CLIP = 0.999  # METHOD.md §3


def _upper_symmetric(cov):
    """cov as float64, made symmetric from its upper triangle (what the kernels read)."""
    S = cov.double()
    return S.triu() + S.triu(1).T


def _mi_matrix(S):
    """-1/2 log(1 - rho^2) of every entry; rho = 0 where a variance is 0, clipped to +-0.999."""
    std = S.diagonal().sqrt()
    denom = std[:, None] * std[None, :]
    rho = torch.where(denom > 0, S / denom, torch.zeros_like(S)).clamp(-_RHO_CLIP, _RHO_CLIP)
    return -0.5 * torch.log1p(-rho * rho)


def _target_mi(S, channels, jitter):
    """I(T; Y_channels) for each row of channels [P, N]; T is the last index of S.

    1/2 log((S_TT + e) det(S_AA + e I) / det(S_TA,TA + e I)) with torch.linalg.det, written as
    1/2 log((S_TT + e) / v), v = det ratio clamped to [e, S_TT + e]; I = 0 when det(S_AA + e I) <= 0.
    """
    P, N = channels.shape
    t = S.shape[0] - 1
    idx = torch.cat([channels.sort(dim=1).values, channels.new_full((P, 1), t)], dim=1)
    M = S[idx[:, :, None], idx[:, None, :]] + jitter * torch.eye(N + 1, dtype=S.dtype, device=S.device)
    det_a = torch.linalg.det(M[:, :N, :N])
    det_ta = torch.linalg.det(M)
    var_t = M[:, N, N]
    v = torch.where(det_a > 0, det_ta / det_a, var_t)
    v = torch.minimum(torch.where(v >= jitter, v, torch.full_like(v, jitter)), var_t)
    return 0.5 * torch.log(var_t / v)


def gaussian_mi_pairs(cov: Tensor, pairs: Tensor) -> Tensor:
    """Reference of :func:`chanaxis_fast.ops.gaussian_mi_pairs`."""
    return _mi_matrix(_upper_symmetric(cov))[pairs[:, 0], pairs[:, 1]]


def peer_overlap_mean(cov: Tensor) -> Tensor:
    """Reference of :func:`chanaxis_fast.ops.peer_overlap_mean` (forms the [C, C] matrix)."""
    R = _mi_matrix(_upper_symmetric(cov))
    C = R.shape[0]
    if C == 1:
        return R.new_zeros(1)
    return (R.sum(1) - R.diagonal()) / (C - 1)


def pair_target_excess(cov_t: Tensor, pairs: Tensor, *, jitter: float = 1e-10) -> Tensor:
    """Reference of :func:`chanaxis_fast.ops.pair_target_excess`."""
    S = _upper_symmetric(cov_t)
    single = _mi_matrix(S)[:-1, -1]  # I(T; Y_i)
    best_single = torch.maximum(single[pairs[:, 0]], single[pairs[:, 1]])
    return (_target_mi(S, pairs, jitter) - best_single).clamp_min(0)


def triplet_target_excess(cov_t: Tensor, triplets: Tensor, *, jitter: float = 1e-10) -> Tensor:
    """Reference of :func:`chanaxis_fast.ops.triplet_target_excess`."""
    S = _upper_symmetric(cov_t)
    pair_mis = [_target_mi(S, triplets[:, [a, b]], jitter) for a, b in ((0, 1), (0, 2), (1, 2))]
    return _target_mi(S, triplets, jitter) - torch.stack(pair_mis).amax(0)


def target_excess(cov_t: Tensor, *, partners: int = 50, top: int = 10,
                  jitter: float = 1e-10) -> TargetExcess:
    """Reference of :func:`chanaxis_fast.ops.target_excess` (forms the [C, C] R_X matrix)."""
    S = _upper_symmetric(cov_t)
    C = S.shape[0] - 1
    K = min(partners, C - 1)
    R = _mi_matrix(S[:C, :C])
    R.fill_diagonal_(-float("inf"))
    # a stable descending sort keeps equal R_X in index order: ties go to the lower index
    chosen = torch.sort(R, dim=1, descending=True, stable=True).indices[:, :K]
    te = S.new_zeros(C)
    if K > 0:
        own = torch.arange(C, device=S.device)[:, None].expand(C, K)
        s2 = pair_target_excess(S, torch.stack([own, chosen], dim=2).reshape(-1, 2), jitter=jitter)
        te = s2.reshape(C, K).topk(min(top, K), dim=1).values.mean(1)
    padded = chosen.new_full((C, partners), -1)
    padded[:, :K] = chosen
    return TargetExcess(te, padded)
