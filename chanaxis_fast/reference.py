"""Pure-PyTorch float64 references of every op, with the same signatures as :mod:`chanaxis_fast.ops`.

They favour clarity over speed and are what the kernels are tested against.
"""

from typing import Optional
from typing import List, Sequence, Union

import torch
from torch import Tensor

from .ops import Moments
from .ops import Hulls


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


def _peer_hulls_layer(corr: Tensor, max_size: int, eps: float, ridge: float) -> Hulls:
    P, A = _ridged(corr, ridge)
    C = P.shape[0]
    e_full = _full_explained_variance(A)
    size = torch.zeros(C, dtype=torch.long)
    members = torch.full((C, max_size), -1, dtype=torch.long)
    path = torch.full((C, max_size), float("nan"), dtype=torch.float64)
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
    if isinstance(corr, Tensor):
        return _peer_hulls_layer(corr, max_size, eps, ridge)
    return [_peer_hulls_layer(c, max_size, eps, ridge) for c in corr]


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
