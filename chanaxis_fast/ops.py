"""Typed wrappers of the ``torch.ops.chanaxis_fast`` ops.

Each wrapper only normalises its arguments (views, defaults) and calls the op; the op checks them
and raises ``RuntimeError`` naming the argument. Results are float64 whatever the input dtype.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

_ops = torch.ops.chanaxis_fast


class Moments(NamedTuple):
    """Sufficient statistics of one batch of rows ``[Y_1..Y_C, T]``.

    count: int64 []            number of rows (samples) used
    mean: float64 [D]          per-column means, D = C (+1 with a target, as the last column)
    comoment: float64 [D, D]   centred co-moment sum_r (z_r - mean)(z_r - mean)^T
    """

    count: Tensor
    mean: Tensor
    comoment: Tensor


def channel_moments(
    x: Tensor,
    target: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
    *,
    mode: Optional[str] = None,
    channel_dim: int = 1,
    skip_nonfinite: bool = False,
) -> Moments:
    """Count, means and centred co-moment matrix of a batch of channel activations.

    Args:
        x: Tensor[N, C, H, W] (any strides, channels_last included), Tensor[N, H, W, C] with
            ``channel_dim=-1``, or Tensor[N, C]. float16, bfloat16, float32 or float64.
        target: optional Tensor[N], one scalar per image (e.g. the logit margin); it is repeated
            at each of the image's rows and appended as the last column.
        positions: optional int64 Tensor[N, P] of flat positions ``h * W + w`` into each image.
        mode: ``"all"`` (every position is a row; the default without ``positions``),
            ``"positions"`` (the given positions; the default with them) or ``"gap"`` (one
            global-average-pooled row per image).
        channel_dim: 1 for [N, C, ...], -1 (or 3) for channels-last [N, H, W, C].
        skip_nonfinite: by default NaN/Inf values raise an error; with True, every row holding a
            NaN/Inf (in any channel or its target) is dropped and ``count`` says how many remain.

    Returns:
        :class:`Moments` ``(count, mean, comoment)``, float64 on x's device. Each batch is centred
        on its own means before the product (two passes), so huge means cost no accuracy; a
        channel that is constant over the batch has exactly zero co-moments.
    """
    if mode is None:
        mode = "positions" if positions is not None else "all"
    return Moments(*_ops.channel_moments(x, target, positions, mode, channel_dim, skip_nonfinite))
