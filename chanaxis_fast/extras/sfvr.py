"""SFVR's inputs: per consumer of a calibrated layer, the covariance of each input channel's
patches and the variance of each output channel, at the consumer's own output positions.

Cost per image: ``P * C_in * k^2`` input values (``P`` = 16 positions; every output position in
"all"/"gap" mode) and ``C_in`` small ``k^2 x k^2`` co-moments per consumer. On the CPU the
``patch_moments`` kernel (:func:`chanaxis_fast.ops.patch_moments`) reads every patch where it
lies, plane after plane, and reduces it in float64 without a gathered copy; on a GPU the patches
are gathered from the unpadded input (zero padding masked) feature-major, ``[C_in, k^2, rows]``
in float64, and reduced by batched matmuls. On resnet18 with the CIFAR stem (batch 128, 2
threads) ``extras=["sfvr"]`` cost 3.1x a plain forward with a strided gather, 1.9x with the
feature-major one, about 1.4x with the first kernel and 1.3x since its sums run in registers
(A/B runs on one machine).
"""

from typing import Callable, Dict, Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..graph import ModelGraph
from ..patch_stats import PatchStats
from . import channels_first

# On the CPU the patch statistics come from the patch_moments kernel (no gathered copy); the
# gather below serves GPUs (and the tests, which compare the two).
USE_KERNEL = True
_CHUNK = 1 << 18  # float64 elements per working block of the patch gather (2 MiB)

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
        (kh, kw), (sh, sw), (dh, dw) = mod.kernel_size, mod.stride, mod.dilation
        if mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
            src, (ph, pw) = x, mod.padding  # zero padding: masked below, no padded copy
        else:
            src, ph, pw = conv_pad(x, mod), 0, 0
        C, Hs, Ws = src.shape[1:]
        Ho = (Hs + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (Ws + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        idx = index(N, Ho * Wo, x.device)
        if src.device.type == "cpu" and USE_KERNEL:  # every patch read where it lies, no copy
            try:
                m = ops.patch_moments(src, idx, (kh, kw), stride=(sh, sw), padding=(ph, pw),
                                      dilation=(dh, dw), out_width=Wo, skip_nonfinite=skip_nonfinite)
            except RuntimeError as e:
                if "NaN/Inf" not in str(e):
                    raise
                raise ValueError(f"{who}: NaN/Inf values in the data (pass skip_nonfinite=True to drop "
                                 f"them)") from None
            ps._fold(m.count, m.mean, m.comoment, who)
            return ps
        n, k2 = idx.shape[1], kh * kw
        flat_src = src.reshape(N, C, Hs * Ws)
        step = max(1, _CHUNK // max(1, C * n * k2))
        off_h = (torch.arange(kh, device=x.device) * dh - ph)[:, None]   # [kh, 1]
        off_w = (torch.arange(kw, device=x.device) * dw - pw)[None, :]   # [1, kw]
        for i0 in range(0, N, step):
            ids = idx[i0:i0 + step]
            b = ids.shape[0]
            ih = (ids // Wo * sh)[..., None, None] + off_h                 # [b, n, kh, 1]
            iw = (ids % Wo * sw)[..., None, None] + off_w                  # [b, n, 1, kw]
            at = (ih.clamp(0, Hs - 1) * Ws + iw.clamp(0, Ws - 1)).reshape(b, n * k2)
            p = flat_src[i0:i0 + b].gather(2, at[:, None, :].expand(b, C, n * k2))  # [b, C_in, n k2]
            if ph or pw:
                inside = ((ih >= 0) & (ih < Hs) & (iw >= 0) & (iw < Ws)).reshape(b, 1, n * k2)
                if not bool(inside.all()):
                    p = torch.where(inside, p, torch.zeros((), dtype=p.dtype, device=p.device))
            # [C_in, k2, b, n] -> float64 [C_in, k2, b n] in one copy
            cols = p.view(b, C, n, k2).permute(1, 3, 0, 2).to(torch.float64,
                                                               memory_format=torch.contiguous_format)
            ps.update_columns(cols.reshape(C, k2, b * n), skip_nonfinite=skip_nonfinite, who=who)
    else:
        e = node.input_expand
        if x.dim() == 2:   # after flatten / pooling: each channel's e features are its patch
            ps.update(x.reshape(N, -1, e).permute(1, 0, 2), skip_nonfinite=skip_nonfinite, who=who)
        else:              # channels-last [N, ..., C_in]: one feature per position
            flat = x.reshape(N, -1, x.shape[-1])
            idx = index(N, flat.shape[1], x.device)
            g = flat.gather(1, idx[..., None].expand(N, idx.shape[1], flat.shape[2]))
            ps.update_columns(g.reshape(-1, g.shape[-1]).T[:, None, :], skip_nonfinite=skip_nonfinite, who=who)
    return ps


def output_stats(out: Tensor, node, index: IndexFn, *, skip_nonfinite: bool, who: str) -> PatchStats:
    """The per-channel variance statistics of one batch of a consumer's (pre-BN) output."""
    flat = channels_first(out, node.channel_dim)
    N, C, S = flat.shape
    idx = index(N, S, flat.device)
    rows = flat.gather(2, idx[:, None, :].expand(N, C, idx.shape[1]))  # [N, C, n]
    return PatchStats().update_columns(rows.permute(1, 0, 2).reshape(C, 1, -1),
                                       skip_nonfinite=skip_nonfinite, who=who)
