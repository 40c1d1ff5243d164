"""SFVR's inputs: per consumer of a calibrated layer, the covariance of each input channel's
patches and the variance of each output channel, at the consumer's own output positions.

Cost per image: a gather of ``P * C_in * k^2`` input values and ``C_in`` small ``k^2 x k^2``
products per consumer (``P`` = 16 positions; every output position in "all"/"gap" mode).
"""

from typing import Callable, Dict, Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..graph import ModelGraph
from ..patch_stats import PatchStats
from . import channels_first

_CHUNK = 1 << 23  # float64 elements per working block of the patch gather (64 MiB)

# index(N, S, device) -> int64 [N, n]: the flat output positions of each image's rows
IndexFn = Callable[[int, int, torch.device], Tensor]


def new_consumer_stats(graph: ModelGraph, layers: Iterable[str], device
                       ) -> Tuple[Dict[str, PatchStats], Dict[str, PatchStats]]:
    """Empty ``(patches, outputs)`` for every conv/linear consumer of ``layers``."""
    patches, outputs = {}, {}
    for l in layers:
        for c, _, e in graph.consumers(l):
            if c in patches:
                continue
            node = graph.layers[c]
            k2 = node.kernel_size[0] * node.kernel_size[1] if node.kind == "conv" else e
            patches[c] = PatchStats(node.in_channels // (1 if node.kind == "conv" else e), k2, device=device)
            outputs[c] = PatchStats(node.out_channels, 1, device=device)
    return patches, outputs


def conv_pad(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The input as the conv sees it after padding (so that patches can be cut with padding 0)."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    if isinstance(conv.padding, str):
        return F.pad(x, conv._reversed_padding_repeated_twice)
    ph, pw = conv.padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def input_stats(x: Tensor, mod: nn.Module, node, index: IndexFn, *, skip_nonfinite: bool,
                who: str) -> PatchStats:
    """The patch statistics of one batch of a consumer's input ``x`` (detached)."""
    N = x.shape[0]
    ps = PatchStats()
    if node.kind == "conv":
        xp = conv_pad(x, mod)
        (kh, kw), (sh, sw), (dh, dw) = mod.kernel_size, mod.stride, mod.dilation
        Ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        Wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        idx = index(N, Ho * Wo, x.device)
        n = idx.shape[1]
        step = max(1, _CHUNK // max(1, x.shape[1] * n * kh * kw))
        ar_h = torch.arange(kh, device=x.device) * dh
        ar_w = torch.arange(kw, device=x.device) * dw
        for i0 in range(0, N, step):
            ids = idx[i0:i0 + step]
            ih = (ids // Wo * sh)[..., None] + ar_h               # [b, n, kh]
            iw = (ids % Wo * sw)[..., None] + ar_w                # [b, n, kw]
            img = torch.arange(i0, i0 + ids.shape[0], device=x.device)[:, None, None, None]
            p = xp[img, :, ih[..., :, None], iw[..., None, :]]    # [b, n, kh, kw, C_in]
            ps.update(p.permute(4, 0, 1, 2, 3).reshape(p.shape[-1], -1, kh * kw),
                      skip_nonfinite=skip_nonfinite, who=who)
    else:
        e = node.input_expand
        if x.dim() == 2:   # after flatten / pooling: each channel's e features are its patch
            ps.update(x.reshape(N, -1, e).permute(1, 0, 2), skip_nonfinite=skip_nonfinite, who=who)
        else:              # channels-last [N, ..., C_in]: one feature per position
            flat = x.reshape(N, -1, x.shape[-1])
            idx = index(N, flat.shape[1], x.device)
            g = flat.gather(1, idx[..., None].expand(N, idx.shape[1], flat.shape[2]))
            ps.update(g.reshape(-1, g.shape[-1]).T[..., None], skip_nonfinite=skip_nonfinite, who=who)
    return ps


def output_stats(out: Tensor, node, index: IndexFn, *, skip_nonfinite: bool, who: str) -> PatchStats:
    """The per-channel variance statistics of one batch of a consumer's (pre-BN) output."""
    flat = channels_first(out, node.channel_dim)
    N, C, S = flat.shape
    idx = index(N, S, flat.device)
    rows = flat.gather(2, idx[:, None, :].expand(N, C, idx.shape[1]))
    return PatchStats().update(rows.permute(1, 0, 2).reshape(C, -1, 1), skip_nonfinite=skip_nonfinite,
                               who=who)
