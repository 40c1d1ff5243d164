"""Data-based baselines (METHOD §4): Taylor, activation mean / RMS, SFVR, HRank and CHIP.

Each reads what :func:`chanaxis_fast.calibrate` gathered; a calibration without the needed extra
raises :class:`MissingInputError` naming the ``extras=`` entry that provides it.
"""

import torch
from torch import Tensor

from .registry import MissingInputError, register_metric


def _calibration(ctx, metric: str, extra: str, what: str):
    cal = ctx._need_calibration(metric, what)
    if extra not in cal.extras:
        raise MissingInputError(f"metric {metric!r} needs {what}, which this calibration did not gather; "
                                f"calibrate with extras including {extra!r} (extras='all' gathers every "
                                f"baseline input)")
    return cal


def _per_layer(cal, table: dict, layer: str, metric: str) -> Tensor:
    if layer not in table:
        raise MissingInputError(f"metric {metric!r}: layer {layer!r} was not calibrated; calibrated "
                                f"layers: {', '.join(cal.layers)}")
    return table[layer].detach().to("cpu", torch.float64)


@register_metric("taylor", needs=("grads",), kind="baseline")
def taylor(ctx, layer):
    """taylor(i) = sum_d |w_id * dL/dw_id|, L = the cross-entropy summed over the calibration set
    (first-order Taylor, Molchanov et al. 2019)."""
    cal = _calibration(ctx, "taylor", "taylor", "cross-entropy gradients")
    g = _per_layer(cal, cal.grads, layer, "taylor")
    w = ctx.weight(layer)
    return (w * g).abs().reshape(w.shape[0], -1).sum(1)


@register_metric("activation_mean", needs=("stats",), kind="baseline")
def activation_mean(ctx, layer):
    """activation_mean(i) = mean_r Y_i[r], over the calibration rows at the read-out point."""
    s = ctx.stats(layer, "activation_mean")
    return s.mean[: ctx.num_channels(layer)].cpu()


@register_metric("activation_rms", needs=("stats",), kind="baseline")
def activation_rms(ctx, layer):
    """activation_rms(i) = sqrt(mean_r Y_i[r]^2) = sqrt(mean_i^2 + population variance of Y_i)."""
    s = ctx.stats(layer, "activation_rms")
    C = ctx.num_channels(layer)
    mean = s.mean[:C].cpu()
    var = s.comoment.diagonal()[:C].cpu() / max(1, s.count)
    return (mean * mean + var.clamp_min(0)).sqrt()


@register_metric("sfvr", needs=("patches",), kind="baseline")
def sfvr(ctx, layer):
    """SFVR(i) = sum over the consumers c of the layer and their outputs j of Var(M_ji) / Var(Y_j)
    (He et al. 2020).

    ``M_ji`` is the contribution of input channel i to output j of consumer c (pre-BN),
    ``Var(M_ji) = k_ji^T C_i k_ji`` with ``C_i`` the patch covariance of input channel i and
    ``k_ji`` the kernel (or, for a Linear after flatten, the weights of the channel's H*W features).
    Combination: the sum runs over every consumer of the layer's channel space, so a channel read
    by several convs (e.g. a residual stream, a concat) adds their ratios, and the producers coupled
    by residual adds / depthwise convs get the same score, that of their shared channel (a depthwise
    consumer adds the constant Var(M_ii) / Var(Y_i) = 1 per output). Grouped consumers count only
    the outputs of the channel's group; outputs with zero variance are left out.
    """
    cal = _calibration(ctx, "sfvr", "sfvr", "consumer patch statistics")
    g = ctx.graph
    if layer not in cal.stats:
        raise MissingInputError(f"metric 'sfvr': layer {layer!r} was not calibrated; calibrated "
                                f"layers: {', '.join(cal.layers)}")
    if g.is_opaque(layer):
        raise MissingInputError(f"metric 'sfvr': layer {layer!r}'s channels reach an op the graph "
                                f"tracer does not model, so its consumers are unknown")
    consumers = g.consumers(layer)
    if not consumers:
        raise MissingInputError(f"metric 'sfvr': layer {layer!r} has no Conv2d/Linear consumer")
    C = ctx.num_channels(layer)
    total = torch.zeros(C, dtype=torch.float64)
    for c, off, e in consumers:
        if c not in cal.patches:
            raise MissingInputError(f"metric 'sfvr': the calibration has no patch statistics of "
                                    f"consumer {c!r}")
        cov = cal.patches[c].covariance()[off:off + C].cpu()     # [C, F, F]
        var_y = cal.outputs[c].variance()[:, 0].cpu()            # [C_out]
        W = ctx.weight(c)
        node = g.layers[c]
        ch = torch.arange(off, off + C)
        if node.kind == "conv":
            cout_g, cin_g = node.out_channels // node.groups, node.in_channels // node.groups
            js = (ch // cin_g)[:, None] * cout_g + torch.arange(cout_g)          # [C, cout_g]
            K = W[js, (ch % cin_g)[:, None]].reshape(C, cout_g, -1)             # [C, cout_g, k^2]
        else:
            js = torch.arange(node.out_channels).expand(C, -1)
            K = W.reshape(node.out_channels, -1, e)[:, ch].permute(1, 0, 2)      # [C, C_out, e]
        var_m = torch.einsum("cjf,cfg,cjg->cj", K, cov, K)
        vy = var_y[js]
        total += torch.where(vy > 0, var_m / torch.where(vy > 0, vy, 1.0), 0.0).sum(1)
    return total


@register_metric("hrank", needs=("hrank",), kind="baseline")
def hrank(ctx, layer):
    """hrank(i) = mean over the first rank_images images of rank(F_i), F_i the channel's H x W
    feature map at the read-out point (HRank, Lin et al. 2020)."""
    cal = _calibration(ctx, "hrank", "hrank", "feature-map ranks")
    return _per_layer(cal, cal.hrank, layer, "hrank")


@register_metric("chip", needs=("chip",), kind="baseline")
def chip(ctx, layer):
    """chip(i) = mean over the first rank_images images of ||A||_* - ||A with row i zeroed||_*, A the
    C x HW feature matrix at the read-out point (CHIP, Sui et al. 2021)."""
    cal = _calibration(ctx, "chip", "chip", "nuclear-norm drops")
    return _per_layer(cal, cal.chip, layer, "chip")
