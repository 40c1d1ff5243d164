"""The two axes of METHOD §3 and their composites, from a calibration's channel statistics.

Local axis: input capture I_X, peer overlap (mean R_X), E_full, hull size, compact-hull score,
saturation. Target axis: task information I(T;Y), target-excess TE, and the layer summaries
mean S3 / mean S2. Composites combine per-layer min-max normalised inputs.

Everything is a function of each layer's covariance of ``[Y_1..Y_C, T]``; the hulls of all the
calibrated layers are computed in one call of the ``peer_hulls`` op and shared by the hull metrics.
"""

import hashlib

import torch
from torch import Tensor

from .. import ops
from ..stats import correlation_from_covariance
from .registry import (INT, INT_AT_LEAST_1, NONNEGATIVE, NUMBER, UNIT_INTERVAL, MissingInputError,
                       check_metric, minmax, register_metric)

_HULL = dict(max_size=INT_AT_LEAST_1, eps=UNIT_INTERVAL, ridge=NONNEGATIVE)
_SYNERGY = dict(partners=INT_AT_LEAST_1, triplets_per_channel=INT_AT_LEAST_1, seed=INT)


def _valid_spec(v) -> bool:
    try:
        check_metric(v)
        return True
    except ValueError:
        return False


_CLIP = 0.999  # METHOD §3: every correlation is clipped to [-0.999, 0.999] before a log


def _cov_t(ctx, layer, metric) -> Tensor:
    """float64 covariance of [Y_1..Y_C, T] (target last), or of the channels when there is no target."""
    return ctx.cached(("cov", layer), lambda: ctx.stats(layer, metric).covariance())


def _channel_cov(ctx, layer, metric) -> Tensor:
    C = ctx.num_channels(layer)
    return _cov_t(ctx, layer, metric)[:C, :C]


def _need_target(ctx, layer, metric) -> Tensor:
    stats = ctx.stats(layer, metric)
    if not stats.has_target:
        raise MissingInputError(f"metric {metric!r} needs the target column; calibrate with a target "
                                f"(target='logit_margin' or a callable)")
    return _cov_t(ctx, layer, metric)


# ----------------------------------------------------------------------------- local axis
@register_metric("input_capture", needs=("stats",), kind="local")
def input_capture(ctx, layer):
    """I_X(i) = 1/2 log(1 + J_i / s0), J_i = Var(Y_i), s0 = median_j J_j over the layer.

    When more than half of the channels are dead (median 0), s0 is the mean of J instead; a layer
    whose channels are all constant scores 0 everywhere.
    """
    J = _channel_cov(ctx, layer, "input_capture").diagonal().clamp_min(0)
    s0 = J.quantile(0.5)  # the median; torch.median would take the lower middle value of an even count
    if s0 <= 0:
        s0 = J.mean()
    return torch.zeros_like(J) if s0 <= 0 else 0.5 * torch.log1p(J / s0)


@register_metric("peer_overlap", needs=("stats",), kind="local", direction=-1)
def peer_overlap(ctx, layer):
    """mean R_X(i) = mean_{j != i} -1/2 log(1 - rho_ij^2) (higher = more redundant)."""
    return ops.peer_overlap_mean(_channel_cov(ctx, layer, "peer_overlap"))


def _hulls(ctx, layer, max_size, eps, ridge):
    """peer_hulls for every calibrated layer at once (one op call), cached per parameter set."""
    key = ("hulls", max_size, eps, ridge)

    def compute():
        names = list(ctx.calibration.stats) if ctx.calibration is not None else [layer]
        corrs = [correlation_from_covariance(_channel_cov(ctx, n, "hulls")) for n in names]
        return dict(zip(names, ops.peer_hulls(corrs, max_size=max_size, eps=eps, ridge=ridge)))

    hulls = ctx.cached(key, compute)
    if layer not in hulls:
        raise MissingInputError(f"hull metrics: the calibration has no statistics for layer {layer!r}")
    return hulls[layer]


@register_metric("e_full", needs=("stats",), kind="local", direction=-1, checks=dict(ridge=NONNEGATIVE))
def e_full(ctx, layer, ridge=1e-3):
    """E_full(i) = r_i^T (P_-i + ridge I)^-1 r_i clipped to [0, 1]: the variance of channel i
    explained by all its peers (P_-i the peers' correlation matrix, r_i their correlations with i).

    Computed for every channel from one factorisation; below 1e-12 it is reported as 0 (constant
    channels, one-channel layers, channels uncorrelated with every peer).
    """
    return _hulls(ctx, layer, 10, 0.05, ridge).e_full


@register_metric("hull_size", needs=("stats",), kind="local", checks=_HULL)
def hull_size(ctx, layer, max_size=10, eps=0.05, ridge=1e-3):
    """|H_i| = the size of the greedy hull: peers are added one at a time (largest gain in E_i(S))
    until E_i(S) >= (1 - eps) * E_full(i) or |S| = max_size; 0 when E_full(i) = 0.

    A higher value means that more peers are needed to stand in for the channel (keep).
    """
    return _hulls(ctx, layer, max_size, eps, ridge).hull_size.double()


@register_metric("compact_hull", needs=("stats",), kind="local", direction=-1, checks=_HULL)
def compact_hull(ctx, layer, max_size=10, eps=0.05, ridge=1e-3):
    """h_i = E_full(i) / max(1, |H_i|): replaceable by few peers (higher = more removable)."""
    return _hulls(ctx, layer, max_size, eps, ridge).compact_score


@register_metric("saturated", needs=("stats",), kind="local", checks=_HULL)
def saturated(ctx, layer, max_size=10, eps=0.05, ridge=1e-3):
    """saturated(i) = 1 if |H_i| = max_size and E_i(H_i) < (1 - eps) * E_full(i), else 0."""
    return _hulls(ctx, layer, max_size, eps, ridge).saturated.double()


# ----------------------------------------------------------------------------- target axis
@register_metric("task_information", needs=("stats", "target"), kind="target")
def task_information(ctx, layer):
    """I(T; Y_i) = -1/2 log(1 - rho_Ti^2), rho clipped to [-0.999, 0.999]; 0 for a constant channel."""
    cov = _need_target(ctx, layer, "task_information")
    C = ctx.num_channels(layer)
    rho = correlation_from_covariance(cov)[C, :C].clamp(-_CLIP, _CLIP)
    return -0.5 * torch.log1p(-rho * rho)


def _target_excess(ctx, layer, partners, top):
    cov = _need_target(ctx, layer, "target_excess")
    return ctx.cached(("te", layer, partners, top),
                      lambda: ops.target_excess(cov, partners=partners, top=top))


@register_metric("target_excess", needs=("stats", "target"), kind="target",
                 checks=dict(partners=INT_AT_LEAST_1, top=INT_AT_LEAST_1))
def target_excess(ctx, layer, partners=50, top=10):
    """TE(i) = mean of the `top` largest S2(i, j) over the `partners` peers j of highest R_X(i, j),
    S2(i, j) = max(0, I(T; Y_i, Y_j) - max(I(T; Y_i), I(T; Y_j))).

    With fewer than `partners` peers all C - 1 are used, with fewer than `top` values all of them;
    TE = 0 in a one-channel layer.
    """
    return _target_excess(ctx, layer, partners, top).te


def _layer_seed(seed, layer):
    return int.from_bytes(hashlib.sha256(f"{seed}:{layer}".encode()).digest()[:7], "little")


def _synergy(ctx, layer, partners, triplets_per_channel, seed):
    """(mean S2 over every (i, partner) pair, mean S3 over sampled triplets of partners)."""
    def compute():
        cov = _need_target(ctx, layer, "synergy")
        C = ctx.num_channels(layer)
        if C < 3:
            return 0.0, 0.0
        part = _target_excess(ctx, layer, partners, 10).partners.cpu()
        K = int((part[0] >= 0).sum())  # every row has min(partners, C - 1) partners
        i = torch.arange(C).repeat_interleave(K)
        pairs = torch.stack([i, part[:, :K].reshape(-1)], 1)
        s2 = ops.pair_target_excess(cov, pairs.to(cov.device)).mean().item()
        g = torch.Generator().manual_seed(_layer_seed(seed, layer))
        # two distinct partners of i: a, then b from the remaining K - 1
        a = torch.randint(0, K, (C, triplets_per_channel), generator=g)
        b = (a + 1 + torch.randint(0, K - 1, (C, triplets_per_channel), generator=g)) % K
        rows = torch.arange(C)[:, None].expand(C, triplets_per_channel)
        trip = torch.stack([rows, part.gather(1, a), part.gather(1, b)], -1).reshape(-1, 3)
        s3 = ops.triplet_target_excess(cov, trip.to(cov.device)).mean().item()
        return s2, s3

    return ctx.cached(("synergy", layer, partners, triplets_per_channel, seed), compute)


@register_metric("s2_mean", needs=("stats", "target"), kind="target", summary=True,
                 checks=_SYNERGY)
def s2_mean(ctx, layer, partners=50, triplets_per_channel=20, seed=0):
    """Layer summary mean S2 = mean over every channel i and each of its `partners` peers j of
    highest R_X(i, j) of S2(i, j) (0 for a layer of fewer than 3 channels)."""
    return _synergy(ctx, layer, partners, triplets_per_channel, seed)[0]


@register_metric("s3_mean", needs=("stats", "target"), kind="target", summary=True,
                 checks=_SYNERGY)
def s3_mean(ctx, layer, partners=50, triplets_per_channel=20, seed=0):
    """Layer summary mean S3 = mean of S3(i, j, k) = I(T; Y_i, Y_j, Y_k) - max over its pairs of
    I(T; pair), over `triplets_per_channel` seeded triplets per channel i with j != k drawn from
    i's `partners` top-R_X peers (default, not in the paper)."""
    return _synergy(ctx, layer, partners, triplets_per_channel, seed)[1]


@register_metric("synergy_ratio", needs=("stats", "target"), kind="target", summary=True,
                 checks=_SYNERGY)
def synergy_ratio(ctx, layer, partners=50, triplets_per_channel=20, seed=0):
    """Layer summary synergy_ratio = mean S3 / mean S2 (0 when mean S2 < 1e-12)."""
    s2, s3 = _synergy(ctx, layer, partners, triplets_per_channel, seed)
    return 0.0 if s2 < 1e-12 else s3 / s2


# ----------------------------------------------------------------------------- composites
@register_metric("magnitude_ix", needs=("stats",), kind="composite",
                 checks=dict(alpha=NUMBER, magnitude=("a metric spec such as 'l2'", _valid_spec)))
def magnitude_ix(ctx, layer, alpha=0.5, magnitude="l2"):
    """magnitude_ix = norm(magnitude) + alpha * norm(I_X), norm = per-layer min-max; the paper's
    grid: alpha in {0.25, 0.5, 0.75, 1}; ``magnitude`` is any metric spec (default "l2")."""
    return minmax(ctx.metric(magnitude, layer)) + alpha * minmax(ctx.metric("input_capture", layer))


@register_metric("ix_rx", needs=("stats",), kind="composite", checks=dict(beta=NUMBER))
def ix_rx(ctx, layer, beta=0.3):
    """ix_rx = norm(I_X) - beta * norm(mean R_X), norm = per-layer min-max; the paper's grid:
    beta in {0.15, 0.3, 0.5, 0.7}."""
    return minmax(ctx.metric("input_capture", layer)) - beta * minmax(ctx.metric("peer_overlap", layer))


@register_metric("two_axis", needs=("stats", "target"), kind="composite",
                 checks=dict(alpha=NUMBER, beta=NUMBER))
def two_axis(ctx, layer, alpha=1.0, beta=0.5):
    """two_axis = alpha * norm(I_X) - beta * norm(I(T;Y)), norm = per-layer min-max (METHOD §3)."""
    return (alpha * minmax(ctx.metric("input_capture", layer))
            - beta * minmax(ctx.metric("task_information", layer)))
