"""Pure-PyTorch float64 references of every op, with the same signatures as :mod:`chanaxis_fast.ops`.

They favour clarity over speed and are what the kernels are tested against.
"""

from typing import Optional

import torch
from torch import Tensor

from .ops import Moments


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
