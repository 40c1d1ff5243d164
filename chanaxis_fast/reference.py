"""Pure-PyTorch float64 references of every op, with the same signatures as :mod:`chanaxis_fast.ops`.

They favour clarity over speed and are what the kernels are tested against.
"""

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .ops import Hulls, Moments, PatchMoments, TargetExcess, default_mode, default_rank_rtol


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
    precision: str = "float64",
) -> Moments:
    """Reference of :func:`chanaxis_fast.ops.channel_moments` (float64, on x's device).

    ``precision="float32"``: centred in float64, the product of the centred rows rounded to
    float32 taken in float32 (one product for the whole batch), returned as float64.
    """
    if precision not in ("float64", "float32"):
        raise ValueError(f"channel_moments: precision must be 'float64' or 'float32', got {precision!r}")
    mode = default_mode(mode, positions)
    y = _rows(x, target, positions, mode, channel_dim)
    if skip_nonfinite:
        y = y[torch.isfinite(y).all(dim=1)]
    count = y.shape[0]
    mean = y.mean(0) if count else y.new_zeros(y.shape[1])
    z = y - mean
    if precision == "float32":
        z = z.float()
        return Moments(torch.tensor(count, device=y.device), mean, (z.T @ z).double())
    return Moments(torch.tensor(count, device=y.device), mean, z.T @ z)


# Must match csrc/common/hull.h: ties, collinear peers, rounding-level E_full.
_TIE_REL_TOL = 1e-12
_MIN_RESIDUAL = 1e-12
_REACH_TOL = 1e-12


def _ridged(corr: Tensor, ridge: float):
    """(P, A): the symmetrised float64 correlation matrix and A = P + ridge * I."""
    P = corr.double()
    P = (P + P.T) * 0.5
    return P, P + ridge * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)


def _full_explained_variance(A: Tensor) -> Tensor:
    """E_full(i) = A_ii - 1 / (A^-1)_ii (Schur complement), clipped to [0, 1], < 1e-12 -> 0."""
    if A.shape[0] == 1:
        return A.new_zeros(1)
    e = (A.diagonal() - 1.0 / torch.linalg.inv(A).diagonal()).clamp(0.0, 1.0)
    return torch.where(e < _REACH_TOL, torch.zeros_like(e), e)


def _hull_of_channel(A: Tensor, i: int, e_full: float, max_size: int, eps: float):
    """Greedy hull of channel i by brute force: at every step, E_i(S + {j}) of every candidate j
    from one batched torch.linalg.solve. Returns (members, E after each step, saturated)."""
    C = A.shape[0]
    members, path = [], []
    E = 0.0
    while True:
        if E >= (1.0 - eps) * e_full - _REACH_TOL:
            return members, path, False
        if len(members) == max_size:
            return members, path, True
        taken = set(members) | {i}
        cand = torch.tensor([j for j in range(C) if j not in taken], dtype=torch.long, device=A.device)
        if cand.numel() == 0:
            return members, path, False
        S = torch.tensor(members, dtype=torch.long, device=A.device)
        # Candidates that are linear combinations of S (residual variance <= 1e-12) add nothing.
        resid = A[cand, cand]
        if members:
            A_Sc = A[S][:, cand]
            resid = resid - (A_Sc * torch.linalg.solve(A[S][:, S], A_Sc)).sum(0)
        cand = cand[resid > _MIN_RESIDUAL]
        if cand.numel() == 0:
            return members, path, False
        idx = torch.cat([S.expand(cand.numel(), len(members)), cand[:, None]], dim=1)  # [n, k + 1]
        r = A[i][idx]
        E_new = (r * torch.linalg.solve(A[idx[:, :, None], idx[:, None, :]], r[..., None])[..., 0]).sum(1)
        gains = E_new - E
        best = gains.max()
        if not best > 0:
            return members, path, False
        pick = int((gains >= best - best * _TIE_REL_TOL).nonzero()[0, 0])  # lowest index among ties
        members.append(int(cand[pick]))
        E = float(E_new[pick])
        path.append(min(max(E, 0.0), 1.0))


def _peer_hulls_layer(corr: Tensor, max_size: int, eps: float, ridge: float, width: int) -> Hulls:
    P, A = _ridged(corr, ridge)
    C = P.shape[0]
    e_full = _full_explained_variance(A)
    size = torch.zeros(C, dtype=torch.long)
    members = torch.full((C, width), -1, dtype=torch.long)
    path = torch.full((C, width), float("nan"), dtype=torch.float64)
    saturated = torch.zeros(C, dtype=torch.bool)
    for i in range(C):
        m, p, s = _hull_of_channel(A, i, float(e_full[i]), max_size, eps)
        size[i] = len(m)
        members[i, :len(m)] = torch.tensor(m, dtype=torch.long)
        path[i, :len(p)] = torch.tensor(p, dtype=torch.float64)
        saturated[i] = s
    dev = corr.device
    return Hulls(e_full, size.to(dev), members.to(dev), path.to(dev), saturated.to(dev))


def peer_hulls(
    corr: Union[Tensor, Sequence[Tensor]],
    *,
    max_size: int = 10,
    eps: float = 0.05,
    ridge: float = 1e-3,
) -> Union[Hulls, List[Hulls]]:
    """Reference of :func:`chanaxis_fast.ops.peer_hulls`: one batched solve per step and channel."""
    single = isinstance(corr, Tensor)
    corr = [corr] if single else list(corr)
    if not corr:
        raise ValueError("peer_hulls: corr must be a matrix or a non-empty list of matrices, got an "
                         "empty list")
    width = min(max_size, max(1, max(c.shape[0] for c in corr) - 1))  # the op clamps max_size
    out = [_peer_hulls_layer(c, max_size, eps, ridge, width) for c in corr]
    return out[0] if single else out


def explained_variance(corr: Tensor, targets: Tensor, peers: Tensor, *, ridge: float = 1e-3) -> Tensor:
    """Reference of :func:`chanaxis_fast.ops.explained_variance`: one solve per row."""
    _, A = _ridged(corr, ridge)
    out = []
    for t, row in zip(targets.tolist(), peers.tolist()):
        kept = []
        for p in row:
            if p < 0:
                continue
            resid = A[p, p]
            if kept:
                resid = resid - A[p, kept] @ torch.linalg.solve(A[kept][:, kept], A[kept, p])
            if resid > _MIN_RESIDUAL:
                kept.append(p)
        E = A[t, kept] @ torch.linalg.solve(A[kept][:, kept], A[kept, t]) if kept else 0.0
        out.append(min(max(float(E), 0.0), 1.0))
    return torch.tensor(out, dtype=torch.float64, device=corr.device)
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
    padded = chosen.new_full((C, min(partners, max(1, C - 1))), -1)  # the op clamps partners
    padded[:, :K] = chosen
    return TargetExcess(te, padded)


# ----------------------------------------------------------------------------- CHIP
_CHIP_BLOCK = 1 << 23  # float64 elements of the reduced matrices in one batched SVD (64 MiB)


def map_ranks(x: Tensor, rtol: Optional[float] = None) -> Tensor:
    """Reference of :func:`chanaxis_fast.ops.map_ranks`: ``torch.linalg.matrix_rank`` of the float64
    maps (one LAPACK SVD each) with the op's default tolerance."""
    if rtol is None:
        rtol = default_rank_rtol(x)
    return torch.linalg.matrix_rank(x.to(torch.float64), rtol=rtol)


def chip_drops(A: Tensor) -> Tensor:
    """Reference of :func:`chanaxis_fast.ops.chip_drops`: one small SVD per channel (float64).

    The C reduced problems are ``m x m`` with ``m = min(C, S)`` and exact (no Gram matrix):
    - C <= S: ``A = U diag(s) V^T`` and ``A_c = (P_c U diag(s)) V^T``, so
      ``||A_c||_* = ||P_c U diag(s)||_*`` (C x C, ``P_c`` zeroes row c);
    - C > S: ``A = Q R`` and ``A_c^T A_c = R^T (I - q q^T) R`` with ``q`` row c of Q, so
      ``||A_c||_* = ||(I - b q q^T) R||_*`` with ``b = 1 / (1 + sqrt(1 - |q|^2))``
      (``(I - b q q^T)^2 = I - q q^T``), an S x S matrix.
    """
    if A.dim() == 2:
        return chip_drops(A[None])[0]
    A = A.to(torch.float64)
    k, C, S = A.shape
    out = A.new_empty(k, C)
    m = min(C, S)
    chunk = max(1, _CHIP_BLOCK // max(1, m * m))
    for i in range(k):
        if C <= S:
            U, s, _ = torch.linalg.svd(A[i], full_matrices=False)
            base, full = U * s[None, :], s.sum()
        else:
            Q, base = torch.linalg.qr(A[i])
            full = torch.linalg.svdvals(base).sum()
        for c0 in range(0, C, chunk):
            cs = torch.arange(c0, min(C, c0 + chunk), device=A.device)
            if C <= S:
                B = base.expand(len(cs), C, C).clone()
                B[torch.arange(len(cs), device=A.device), cs, :] = 0
            else:
                q = Q[cs]                                           # [c, S]
                b = 1.0 / (1.0 + (1.0 - (q * q).sum(1)).clamp_min(0).sqrt())
                B = base - b[:, None, None] * q[:, :, None] * A[i, cs][:, None, :]
            out[i, cs] = full - torch.linalg.svdvals(B).sum(-1)
    return out


def patch_moments(x: Tensor, positions: Tensor, kernel, *, stride=1, padding=0, dilation=1,
                  out_width: int, skip_nonfinite: bool = False) -> PatchMoments:
    """Reference of :func:`chanaxis_fast.ops.patch_moments`: ``F.unfold`` of the float64 input,
    the columns at the positions, per channel mean and centred product."""
    import torch.nn.functional as F

    from .ops import _pair

    kh, kw = _pair(kernel)
    N, C = x.shape[:2]
    cols = F.unfold(x.double(), (kh, kw), dilation=_pair(dilation), padding=_pair(padding),
                    stride=_pair(stride))                                  # [N, C k2, L]
    if cols.shape[2] % out_width:
        raise ValueError(f"patch_moments: out_width {out_width} does not divide the {cols.shape[2]} positions")
    P, k2 = positions.shape[1], kh * kw
    cols = cols.view(N, C, k2, -1).gather(3, positions[:, None, None, :].expand(N, C, k2, P))
    rows = cols.permute(1, 0, 3, 2).reshape(C, N * P, k2)                  # [C, rows, k2]
    finite = torch.isfinite(rows).all(2)                                   # [C, rows]
    if not skip_nonfinite and not bool(finite.all()):
        raise ValueError("patch_moments: x has NaN/Inf values")
    rows = torch.where(finite[..., None], rows, torch.zeros((), dtype=rows.dtype))
    count = finite.sum(1)
    mean = rows.sum(1) / count.clamp_min(1)[:, None]
    z = (rows - mean[:, None, :]) * finite[..., None]
    return PatchMoments(count, mean, z.transpose(1, 2) @ z)


def pooled_means(x: Tensor) -> Tensor:
    """Reference of :func:`chanaxis_fast.ops.pooled_means`: the float64 mean of every row of
    x [N, C, S]."""
    return x.double().mean(2)
