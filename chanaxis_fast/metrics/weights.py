"""Weight-only baselines of METHOD §4: L1/L2 filter norms, Torch-Pruning's group magnitude, GM/FPGM,
Fermat, BN scale and random scores.

None of them needs a calibration: ``score(model, graph=trace_model(model, x), metrics=[...])``.

How ``l1``, ``l2`` and ``magnitude`` map onto Torch-Pruning (``tp``, checked against tp 1.6.1):

- ``l1``  == ``tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)`` on
  the group rooted at the layer (``DG.get_pruning_group(layer, tp.prune_conv_out_channels, ...)``).
- ``l2``  == the square root of the same with ``p=2`` (tp sums ``|w|^p`` and takes no root).
- ``magnitude(p, group_reduction, normalizer, bias)`` == ``MagnitudeImportance(p, group_reduction,
  normalizer, bias)`` on the group ``DG.get_all_groups()`` yields for the layer (and
  ``normalizer="lamp"`` == ``LAMPImportance``), with the group read off our :class:`ModelGraph`
  (:func:`channel_group`); checked on ResNet-18, ResNet-50 and VGG-16-BN for every reduction and
  normaliser. Differences, on purpose:
  * depthwise convs tied to the group count with their filters; tp 1.6.1 leaves them out (their
    pruning function is not the one its importance looks for) but keeps their BatchNorm;
  * a grouped conv consumer contributes, for input channel c, only the weights that read c; tp
    sums over every output channel at c's position within a group;
  * a Linear after flatten reads channel c as H*W features; tp scores each feature (its column
    ``sum |w|^p``) and folds them into the group reduction by writing to the channel's index once
    per feature (``scatter_add_`` for sum/mean, ``index_select`` + ``scatter_`` for max/prod/gate).
    ``scatter_`` with repeated indices keeps the last write on the CPU, so for max, prod and gate
    tp uses only the channel's *last* feature (flatten index ``c*H*W + H*W - 1``, the bottom-right
    position), and for sum and mean the sum over all of them. ``flatten="torch_pruning"`` (the
    default) reproduces exactly that; ``flatten="sum"`` uses the summed H*W features for every
    reduction, like any other consumer slice (the arbitrary last-feature choice is tp's, not a
    method);
  * degenerate inputs give no NaN: a zero mean/sum/max leaves the scores as they are, the std of
    a single channel is 0, LAMP gives 0 where the remaining sum is 0;
  * what our tracer does not record is not in the group: BatchNorms not applied right after a
    conv/linear (e.g. pre-activation ResNets), LayerNorm/GroupNorm/PReLU parameters, tp's
    ``sentinel_*`` normaliser and ``group_reduction=None``.
"""

import dataclasses
import hashlib
import math
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..graph import ModelGraph
from .registry import (INT_AT_LEAST_1, INT_OR_NONE, POSITIVE, MissingInputError, one_of,
                       register_metric)

GROUP_REDUCTIONS = ("mean", "sum", "max", "prod", "first", "gate")
NORMALIZERS = ("mean", "sum", "max", "standardization", "gaussian", "lamp", None)
FLATTEN_MODES = ("torch_pruning", "sum")


# ------------------------------------------------------------------ per-layer filter criteria

def _filters(ctx, layer: str) -> Tensor:
    """[C_out, C_in/groups * kh * kw] (conv) or [C_out, C_in] (linear), float64."""
    return ctx.weight(layer).flatten(1)


@register_metric("l1", kind="baseline")
def l1(ctx, layer):
    """l1(i) = sum_d |W[i, d]|, the L1 norm of each filter (Li et al. 2017).

    Equals Torch-Pruning's ``MagnitudeImportance(p=1, group_reduction="first", normalizer=None)``
    on the group rooted at the layer. Bias not included.
    """
    return _filters(ctx, layer).abs().sum(1)


@register_metric("l2", kind="baseline")
def l2(ctx, layer):
    """l2(i) = sqrt(sum_d W[i, d]^2), the L2 norm of each filter.

    Its square equals Torch-Pruning's ``MagnitudeImportance(p=2, group_reduction="first",
    normalizer=None)`` on the group rooted at the layer. Bias not included.
    """
    return _filters(ctx, layer).norm(dim=1)


def _pairwise_distances(X: Tensor) -> Tensor:
    """Euclidean distances between the rows of X [n, d] (float64), exact zeros on the diagonal."""
    sq = (X * X).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (X @ X.T)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2.sqrt_()


@register_metric("fpgm", kind="baseline")
def fpgm(ctx, layer):
    """fpgm(i) = sum_j ||W_i - W_j||_2, the summed L2 distance of each filter to the other filters
    of its layer (GM / FPGM, He et al. 2019). Filters far from the others are kept.

    Distances come from the Gram matrix in float64 (absolute error ~1e-8 * ||W_i|| per pair).
    Not Torch-Pruning's ``FPGMImportance``, which compares ``|W|^p`` element-wise and reduces over
    the group.
    """
    return _pairwise_distances(_filters(ctx, layer)).sum(1)


def geometric_median(points: Tensor, tol: float = 1e-10, max_iter: int = 1000) -> Tensor:
    """Geometric median of the rows of ``points`` [n, d]: ``argmin_y sum_i ||x_i - y||_2``.

    Weiszfeld iterations from the centroid, with Vardi & Zhang's step when the iterate sits on
    data points (those points are left out of the weighted mean and the step is shortened, so no
    division by zero). Before each step the filter nearest to the iterate is tested for
    optimality (``||sum_{j: x_j != x_k} (x_j - x_k)/||x_j - x_k|| || <= #{j: x_j == x_k}``) and
    returned exactly if it is the median, which plain Weiszfeld only approaches slowly.
    Stops when a step moves the estimate by less than ``tol`` times the mean distance of the
    points to their centroid, or after ``max_iter`` steps. Points closer than 1e-12 times that
    scale count as coincident. Float64.
    """
    X = points.to(torch.float64)
    if X.dim() != 2 or X.shape[0] == 0:
        raise ValueError(f"geometric_median: points must be [n, d] with n >= 1, got {tuple(X.shape)}")
    y = X.mean(0)
    scale = float((X - y).norm(dim=1).mean())
    if scale == 0.0:
        return X[0].clone()
    tiny = 1e-12 * scale
    not_median = set()  # points already tested (the test depends on the point only)
    for _ in range(max_iter):
        dist = (X - y).norm(dim=1)
        k = int(dist.argmin())
        if k not in not_median:
            dk = (X - X[k]).norm(dim=1)
            same = dk <= tiny
            pull = ((X[~same] - X[k]) / dk[~same, None]).sum(0).norm()
            if pull <= same.sum():
                return X[k].clone()
            not_median.add(k)
        on = dist <= tiny
        off_data = not bool(on.any())
        w = 1.0 / dist if off_data else 1.0 / dist[~on]  # (no copy of X when no point is hit)
        T = (w[:, None] * (X if off_data else X[~on])).sum(0) / w.sum()
        if not off_data:  # Vardi-Zhang: the iterate is a (non-optimal) data point
            R = float(((X[~on] - y) * w[:, None]).sum(0).norm())
            g = min(1.0, float(on.sum()) / R)
            y_new = (1.0 - g) * T + g * y
        else:
            y_new = T
        step = float((y_new - y).norm())
        y = y_new
        if step <= tol * scale:
            break
    return y


@register_metric("fermat", kind="baseline", checks=dict(tol=POSITIVE, max_iter=INT_AT_LEAST_1))
def fermat(ctx, layer, tol=1e-10, max_iter=1000):
    """fermat(i) = ||W_i - GM(W)||_2, the L2 distance of each filter to the layer's geometric
    median (Fermat point; He et al. 2019, Huang et al. 2021). Filters far from the median are kept.

    The median comes from :func:`geometric_median` (Weiszfeld / Vardi-Zhang; defaults
    ``tol=1e-10`` relative to the filters' spread, ``max_iter=1000``).
    """
    W = _filters(ctx, layer)
    return (W - geometric_median(W, tol=tol, max_iter=max_iter)).norm(dim=1)


@register_metric("bn_scale", needs=("bn",), kind="baseline")
def bn_scale(ctx, layer):
    """bn_scale(i) = |gamma_i| of the BatchNorm right after the layer (network slimming, Liu et al.
    2017).

    MissingInputError when the layer has no BatchNorm after it (or a BatchNorm without affine
    parameters).
    """
    bn = ctx.bn(layer, "bn_scale")
    if bn.weight is None:
        raise MissingInputError(f"metric 'bn_scale': the BatchNorm after {layer!r} has no scale "
                                f"(affine=False)")
    return bn.weight.detach().to("cpu", torch.float64).abs()


def _layer_seed(seed: int, layer: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@register_metric("random", kind="baseline", checks=dict(seed=INT_OR_NONE))
def random_scores(ctx, layer, seed=None):
    """random(i) = u_i ~ Uniform[0, 1), seeded, one draw per channel.

    ``seed`` defaults to the ``seed`` option of :func:`score` (``score(..., seed=3)``), else 0. Each
    layer draws from its own generator seeded with ``sha256(f"{seed}:{layer}")``, so scores are
    reproducible across runs and processes and differ between layers.
    """
    if seed is None:
        seed = ctx.options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"metric 'random': seed must be an int, got {seed!r}")
    gen = torch.Generator().manual_seed(_layer_seed(seed, layer))
    return torch.rand(ctx.num_channels(layer), generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------ Torch-Pruning group magnitude

@dataclasses.dataclass
class ChannelGroup:
    """The parameters removed with a channel of ``root``'s channel space, as Torch-Pruning groups
    them for out-channel pruning.

    ``members``: layers whose output channels are the space (``graph.coupled``), execution order;
    ``root``: the member the space is entered through from furthest upstream (its input comes from
    the earliest layer, the model input first; ties in execution order) — the stem or the stage's
    shortcut projection on a ResNet, the root ``DG.get_all_groups()`` picks there;
    ``consumers``: (layer, channel offset, features per channel) reading the space, depthwise
    members excluded (their input slice is their filter).
    """

    root: str
    members: List[str]
    consumers: List[Tuple[str, int, int]]


def channel_group(graph: ModelGraph, layer: str) -> ChannelGroup:
    """The :class:`ChannelGroup` of ``layer``'s output channels."""
    members = graph.coupled(layer)

    def entry(name):
        orders = [graph.layers[p].order for p, _ in graph.producers(name)]
        return (min(orders, default=-1), graph.layers[name].order)

    root = min(members, key=entry)
    consumers = [(c, off, exp) for c, off, exp in graph.consumers(layer)
                 if not (c in members and graph.layers[c].depthwise)]
    return ChannelGroup(root, members, consumers)


def _abs_pow(t: Tensor, p: float) -> Tensor:
    """|t|^p, with the common p = 1, 2 as one pass (a VGG classifier holds 100 M weights)."""
    if p == 2:
        return t.square()
    return t.abs() if p == 1 else t.abs().pow_(p)


def _consumer_importance(ctx, consumer: str, offset: int, expand: int, C: int, p: float) -> Tensor:
    """The consumer's ``sum |w|^p`` over the weights reading each of the C channels (placed at
    ``offset``): Tensor[C], or Tensor[C, expand] for a Linear after flatten (one column per feature,
    features ``(offset + c) * expand ... + expand - 1``), reduced later as :func:`_reduce` says."""
    node = ctx.graph.layers[consumer]
    w = ctx.weight(consumer)
    if node.kind == "linear":
        cols = _abs_pow(w[:, offset * expand:(offset + C) * expand], p).sum(0)
        return cols.reshape(C, expand) if expand > 1 else cols
    g = node.groups
    cin_g, cout_g = w.shape[1], w.shape[0] // g
    ch = torch.arange(offset, offset + C)
    wg = w.reshape(g, cout_g, cin_g, -1)
    return _abs_pow(wg[ch // cin_g, :, ch % cin_g, :].flatten(1), p).sum(1)


def _group_importances(ctx, group: ChannelGroup, p: float, bias: bool) -> List[Tensor]:
    """Per-dependency local importances in Torch-Pruning's order on ResNets and VGGs: the root's
    filters (then its bias) and BatchNorm (gamma, then beta), the other members' BatchNorms, the
    consumers' input slices in reverse execution order, the other members' filters in reverse
    execution order. So 'gate', the last, is the earliest non-root member, or for an uncoupled
    layer its first consumer: tp's depth-first walk of the autograd graph follows each op's last
    input first, so where branches merge as ``main + shortcut`` (torchvision's ResNets: conv1
    before downsample) it reaches the shortcut's consumer first and the main branch's last.
    Each is Tensor[C], or Tensor[C, H*W] for a Linear consumer after flatten."""
    C = ctx.num_channels(group.root)
    out: List[Tensor] = []

    def add_param(t):
        if t is not None:
            out.append(_abs_pow(t.detach().to("cpu", torch.float64), p))

    def add_layer(name):
        out.append(_abs_pow(ctx.weight(name).flatten(1), p).sum(1))
        if bias:
            add_param(ctx.module(name).bias)

    def add_bn(name):
        bn_name = ctx.graph.layers[name].bn
        bn = ctx.module(bn_name) if bn_name is not None else None
        if bn is not None and bn.weight is not None:
            add_param(bn.weight)
            if bias:
                add_param(bn.bias)

    others = [m for m in group.members if m != group.root]
    add_layer(group.root)
    add_bn(group.root)
    for name in others:
        add_bn(name)
    for name, offset, expand in reversed(group.consumers):
        out.append(_consumer_importance(ctx, name, offset, expand, C, p))
    for name in reversed(others):
        add_layer(name)
    return out


def _reduce(imps: List[Tensor], how: str, flatten: str) -> Tensor:
    """Reduce the group's local importances over the dependencies; a flatten consumer's
    Tensor[C, H*W] counts as the sum of its features, or (``flatten="torch_pruning"`` with max,
    prod or gate) as its last feature, as Torch-Pruning's ``scatter_`` leaves it."""
    last_feature = flatten == "torch_pruning" and how in ("max", "prod", "gate")
    imps = [t if t.dim() == 1 else (t[:, -1] if last_feature else t.sum(1)) for t in imps]
    if how == "first":
        return imps[0]
    if how == "gate":
        return imps[-1]
    stacked = torch.stack(imps)
    if how == "mean":
        return stacked.mean(0)
    if how == "sum":
        return stacked.sum(0)
    if how == "max":
        return stacked.amax(0)
    return stacked.prod(0)


def _lamp(x: Tensor) -> Tensor:
    """x_i / sum_{j: x_j >= x_i} x_j, over the ascending order (ties: sort order, as in LAMP)."""
    xs, order = x.sort()
    tail = xs.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(x)
    out[order] = torch.where(tail > 0, xs / tail.where(tail > 0, torch.ones_like(tail)), 0.0)
    return out


def _normalize(x: Tensor, how: Optional[str]) -> Tensor:
    if how is None:
        return x
    if how in ("mean", "sum", "max"):
        d = float(getattr(x, how)())
        return x / d if d != 0.0 else x
    if how == "standardization":
        return (x - x.min()) / (x.max() - x.min() + 1e-8)
    if how == "gaussian":
        std = x.std() if x.numel() > 1 else x.new_zeros(())
        return (x - x.mean()) / (std + 1e-8)
    return _lamp(x)


@register_metric("magnitude", kind="baseline",
                 checks=dict(p=POSITIVE, group_reduction=one_of(*GROUP_REDUCTIONS),
                             normalizer=one_of(*NORMALIZERS), flatten=one_of(*FLATTEN_MODES)))
def magnitude(ctx, layer, p=2, group_reduction="mean", normalizer="mean", bias=False,
              flatten="torch_pruning"):
    """magnitude(i) = normalizer(reduce over the group's dependencies d of sum |w_d,i|^p), the
    p-th powers summed over each dependency's slice w_d,i of channel i: Torch-Pruning's group
    magnitude importance (``MagnitudeImportance``), on our graph.

    For the :func:`channel_group` of the layer, one local importance per dependency,
    ``sum |w|^p`` over each channel's slice (no p-th root): the members' filters (and, with
    ``bias=True``, their biases), the members' BatchNorm ``|gamma|^p`` (and ``|beta|^p``) when
    affine, the consumers' input slices. Reduced over the group with ``group_reduction``: mean,
    sum, max, prod, first (the root's filters), gate (the last dependency in tp's order: the
    earliest non-root member's filters, or for an uncoupled layer the slice of the consumer that
    runs first). Then ``normalizer`` over the channels: mean (x/mean), sum (x/sum), max (x/max),
    standardization ((x-min)/(max-min+1e-8)), gaussian ((x-mean)/(std+1e-8), unbiased std), lamp
    (x_i / sum of the scores >= x_i), or None. Every member of the group gets the same scores.

    A Linear consumer after flatten reads channel i as H*W features f = i*H*W ... i*H*W + H*W - 1.
    ``flatten="torch_pruning"`` (default) does what tp 1.6.1 does on the CPU: mean and sum add
    all H*W feature slices; max, prod and gate use only the last one, f = i*H*W + H*W - 1 (tp
    writes each feature's value to the channel with ``scatter_``, which keeps the last write).
    ``flatten="sum"``: the sum over the H*W feature slices for every reduction.

    Defaults: ``p=2, group_reduction="mean", normalizer="mean", bias=False`` (tp's defaults).
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"metric 'magnitude': p must be > 0 (a finite number), got {p!r}")
    if group_reduction not in GROUP_REDUCTIONS:
        raise ValueError(f"metric 'magnitude': unknown group_reduction {group_reduction!r}; "
                         f"valid: {', '.join(GROUP_REDUCTIONS)}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"metric 'magnitude': unknown normalizer {normalizer!r}; valid: "
                         f"{', '.join(str(n) for n in NORMALIZERS)}")
    if flatten not in FLATTEN_MODES:
        raise ValueError(f"metric 'magnitude': unknown flatten {flatten!r}; valid: "
                         f"{', '.join(FLATTEN_MODES)}")
    group = ctx.cached(("channel_group", layer), lambda: channel_group(ctx.graph, layer))

    def local_importances():  # shared by every reduction and normaliser of one scoring
        if ctx.graph.is_opaque(group.root):
            warnings.warn(f"metric 'magnitude': the channels of {group.root!r} reach an op the "
                          f"tracer does not model; its group holds only the layers the graph follows")
        return _group_importances(ctx, group, float(p), bool(bias))

    def compute():
        imps = ctx.cached(("magnitude_local", group.root, float(p), bool(bias)), local_importances)
        return _normalize(_reduce(imps, group_reduction, flatten), normalizer)

    key = ("magnitude", group.root, float(p), group_reduction, normalizer, bool(bias), flatten)
    return ctx.cached(key, compute).clone()  # one tensor per member, not shared
