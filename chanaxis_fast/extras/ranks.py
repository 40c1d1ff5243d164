"""HRank's and CHIP's inputs, from the feature maps of the first ``rank_images`` images.

- HRank: the matrix rank of each channel's H x W feature map (:func:`chanaxis_fast.ops.map_ranks`:
  ``torch.linalg.matrix_rank``'s definition and tolerance, decided on the map's exact singular
  values). Cost: ``rank_images * C`` small bidiagonalisations per layer, about ``(8/3) n^3`` flops
  for an ``n x n`` map and no library call per map: 3-4x faster than ``matrix_rank`` on the 4 x 4
  to 56 x 56 maps of a ResNet.
- CHIP: ``||A||_* - ||A with row c zeroed||_*``, ``A`` the C x HW feature matrix of one image at
  the read-out. Cost per image and layer: one eigendecomposition of an ``m x m`` Gram matrix,
  ``m = min(C, HW)``, and ``C`` secular equations of ``O(m^2)`` each (see :func:`chip_drops`),
  instead of ``C`` SVDs of ``m x m``: 19x faster over the 20 convs of a CIFAR ResNet-18, 59x on
  one 256 x 784 map (benchmarks/bench_chip.py, AVX-512), yet still about 9 forward passes per
  image there.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops
from ..finite import finite_rows


def chip_drops(A: Tensor) -> Tensor:
    """CHIP's per-channel drop ``||A||_* - ||A with row c zeroed||_*`` for a batch of matrices.

    A: Tensor[k, C, S] (one C x S feature matrix per image), computed in float64 -> [k, C], by
    :func:`chanaxis_fast.ops.chip_drops` (one Gram eigendecomposition per image, then each
    channel's secular equation; :func:`chanaxis_fast.reference.chip_drops` is the one-SVD-per-channel
    reference).
    """
    return ops.chip_drops(A)


def feature_maps(x: Tensor, channel_dim: int) -> Tensor:
    """[N, C, H, W] feature maps of a read-out (no spatial dims: 1 x 1; one: L x 1)."""
    if channel_dim % x.dim() != 1:
        x = x.movedim(channel_dim, 1)
    if x.dim() == 4:
        return x
    return x.reshape(x.shape[0], x.shape[1], -1, 1) if x.dim() != 2 else x[:, :, None, None]


def rank_sums(layer: str, x: Tensor, channel_dim: int, extras: Sequence[str], skip_nonfinite: bool
              ) -> Tuple[Optional[Tensor], Optional[Tensor], int]:
    """``(hrank, chip, k)``: per channel, the sums over the ``k`` (finite) images of ``x`` of the
    feature-map ranks (None unless "hrank" in extras) and of the CHIP drops (None unless "chip")."""
    maps = feature_maps(x, channel_dim)
    ok = finite_rows(maps)
    if not bool(ok.all()):
        if not skip_nonfinite:
            raise ValueError(f"calibrate: NaN/Inf in the read-out of layer {layer!r} (pass "
                             f"skip_nonfinite=True to drop such images)")
        maps = maps[ok]
    k, C = maps.shape[:2]
    hr = ch = None
    if "hrank" in extras:
        hr = ops.map_ranks(maps).sum(0).double() if k else maps.new_zeros(C, dtype=torch.float64)
    if "chip" in extras:
        ch = chip_drops(maps.reshape(k, C, -1)).sum(0) if k else maps.new_zeros(C, dtype=torch.float64)
    return hr, ch, k
