"""The inputs of the data-based baselines (METHOD §4) that :func:`~chanaxis_fast.calibrate` gathers
in the same forward pass as the channel statistics, one module per extra:

- ``"sfvr"`` (:mod:`.sfvr`): for every conv/linear *consumer* of a calibrated layer, the
  per-input-channel covariance of its input patches (:class:`~chanaxis_fast.patch_stats.PatchStats`,
  ``C_in x k^2 x k^2``) and the variance of each of its (pre-BN) output channels, at the consumer's
  own sampled output positions ("sample") or at every output position ("all" and "gap").
- ``"taylor"`` (:mod:`.taylor`): the gradient of the cross-entropy with ``reduction="sum"`` with
  respect to every calibrated layer's weight, summed over the calibration batches.
- ``"hrank"`` and ``"chip"`` (:mod:`.ranks`): per channel, the mean over the first ``rank_images``
  images of the matrix rank of its H x W feature map (HRank), and of the nuclear-norm drop
  ``||A||_* - ||A with row c zeroed||_*`` of the image's C x HW feature matrix (CHIP).
"""

from typing import List

from torch import Tensor

from ..errors import UserInputError

EXTRAS = ("sfvr", "taylor", "hrank", "chip")


def parse_extras(extras) -> List[str]:
    """``extras`` as :func:`~chanaxis_fast.calibrate` takes it -> the list of extras, in EXTRAS order."""
    if extras is None or extras == "none":
        return []
    if extras == "all":
        return list(EXTRAS)
    if isinstance(extras, str):
        extras = [extras]
    extras = list(extras)
    for e in extras:
        if e not in EXTRAS:
            raise UserInputError(f"calibrate: unknown extra {e!r}; choose from {', '.join(EXTRAS)} "
                             f"(or 'all' / None)")
    return [e for e in EXTRAS if e in extras]


def channels_first(x: Tensor, channel_dim: int) -> Tensor:
    """[N, C, S] view/copy of a read-out with channels at ``channel_dim`` (S = 1 without spatial dims)."""
    if channel_dim % x.dim() != 1:
        x = x.movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)
