"""Rank comparisons of channel scores: cross-axis alignment, criteria similarity, pruned-set overlap.

METHOD §5 and seeds/002 Fig. 4. All correlations are Spearman's (average ranks for ties, as
``scipy.stats.spearmanr``), computed over the channels of one layer.
"""

import math
import warnings
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ._checks import direction, need_scores, per_channel

_MIN_CHANNELS = 3  # a rank correlation of fewer channels says nothing; reported as NaN
_BOOT_CELLS = 2_000_000  # resampled values held at once by the bootstrap (memory bound)


def _values(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, float)


def _spearman(x: np.ndarray, y: np.ndarray):
    """(rho, p-value) of scipy.stats.spearmanr; NaN for fewer than 3 channels or a constant input."""
    from scipy import stats

    if len(x) < _MIN_CHANNELS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    r = stats.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def _boot_spearman(xs: List[np.ndarray], ys: List[np.ndarray], n_boot: int, rng) -> np.ndarray:
    """Spearman rho of ``n_boot`` stratified resamples: channels are drawn with replacement within
    each stratum (layer), as many as it has, and the strata pooled. NaN for a constant resample."""
    from scipy import stats

    sizes = [len(x) for x in xs]
    offsets = np.cumsum([0] + sizes[:-1])
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    out = np.empty(n_boot)
    chunk = max(1, _BOOT_CELLS // max(1, len(x_all)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = np.concatenate([o + rng.integers(0, n, (b, n)) for o, n in zip(offsets, sizes)], 1)
        rx = stats.rankdata(x_all[idx], axis=1)
        ry = stats.rankdata(y_all[idx], axis=1)
        with warnings.catch_warnings():  # a constant resample gives NaN, which nanquantile skips
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            out[start:start + b] = stats.pearsonr(rx, ry, axis=1).statistic
    return out


def cross_axis_alignment(scores, x: str = "input_capture", y: str = "task_information", *,
                         n_boot: int = 1000, ci: float = 0.95, seed: int = 0):
    """Spearman rho between two metrics (default I_X and I(T;Y)) per layer and pooled, with
    bootstrap confidence intervals (METHOD §5, cross-axis alignment).

    Args:
        scores: :class:`~chanaxis_fast.Scores` holding both metrics.
        x, y: metric labels, as in the scores (e.g. ``"input_capture"``).
        n_boot: bootstrap resamples (0: no intervals).
        ci: confidence level of the percentile interval, in (0, 1).
        seed: seeds the resampling (numpy ``default_rng``).

    Returns:
        pandas DataFrame, one row per layer of ``scores.layers`` and a last row ``"pooled"``, columns
        ``layer``, ``channels``, ``rho`` (Spearman, ``scipy.stats.spearmanr``), ``p_value`` (its
        two-sided p-value), ``ci_low``, ``ci_high`` (percentile bootstrap interval at level ``ci``).
        A layer resamples its channels with replacement; the pooled row is the Spearman rho of all
        channels of all layers together, resampled within each layer (stratified) so that every
        resample keeps the layer sizes. rho and p are NaN for a layer with fewer than 3 channels or
        a constant metric; resamples that come out constant are left out of the quantiles.
    """
    import pandas as pd

    who = "cross_axis_alignment"
    need_scores(scores, who)
    vx, vy = per_channel(scores, x, who, "x"), per_channel(scores, y, who, "y")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"{who}: n_boot must be an int >= 0, got {n_boot!r}")
    if not 0 < ci < 1:
        raise ValueError(f"{who}: ci must be in (0, 1), got {ci!r}")
    rng = np.random.default_rng(seed)
    q = [(1 - ci) / 2, (1 + ci) / 2]

    def row(name, xs, ys):
        rho, p = _spearman(np.concatenate(xs), np.concatenate(ys))
        lo = hi = math.nan
        if n_boot and not math.isnan(rho):
            boot = _boot_spearman(xs, ys, n_boot, rng)
            if np.isfinite(boot).any():
                lo, hi = np.nanquantile(boot, q)
        return {"layer": name, "channels": sum(len(a) for a in xs), "rho": rho, "p_value": p,
                "ci_low": float(lo), "ci_high": float(hi)}

    xs = [_values(vx[layer]) for layer in scores.layers]
    ys = [_values(vy[layer]) for layer in scores.layers]
    rows = [row(layer, [a], [b]) for layer, a, b in zip(scores.layers, xs, ys)]
    rows.append(row("pooled", xs, ys))
    return pd.DataFrame(rows)


class CriteriaSimilarity(NamedTuple):
    """Direction-aware Spearman matrices between criteria (see :func:`criteria_similarity`).

    metrics: the metric labels, in the order of the rows and columns
    per_layer: {layer: DataFrame [M, M]} indexed and labelled by the metrics
    mean: DataFrame [M, M], the mean over layers of the per-layer matrices (NaN entries skipped)
    """

    metrics: List[str]
    per_layer: Dict[str, object]
    mean: object


def criteria_similarity(scores, metrics: Optional[Sequence[str]] = None) -> CriteriaSimilarity:
    """Per-layer Spearman matrix between criteria, and its mean over layers (seeds/002 Fig. 4).

    Direction-aware: the correlation of criteria a and b is ``spearman(d_a * a, d_b * b)``, with
    ``d`` the metric's registered direction (+1: higher = keep, -1: higher = removable), so +1 means
    that the two criteria rank the channels in the same order for pruning and -1 in the opposite
    order; a criterion and its negation read -1. A label such as ``"magnitude(p=1)"`` takes the
    direction of its registered name (:func:`chanaxis_fast.metrics.parse_metric`).

    Args:
        scores: :class:`~chanaxis_fast.Scores`.
        metrics: labels of per-channel metrics in ``scores`` (default: all of them).

    Returns:
        :class:`CriteriaSimilarity` ``(metrics, per_layer, mean)``. An entry is NaN in a layer where
        either criterion is constant or the layer has fewer than 3 channels (the diagonal too), and
        in ``mean`` where it is NaN in every layer.
    """
    import pandas as pd

    who = "criteria_similarity"
    need_scores(scores, who)
    if isinstance(metrics, str):
        raise TypeError(f"{who}: metrics must be a list of metric labels, got the string {metrics!r}")
    metrics = list(scores.metrics if metrics is None else metrics)
    if not metrics:
        raise ValueError(f"{who}: no metrics to compare (the scores hold no per-channel metric, or "
                         f"metrics is empty)")
    dup = sorted({m for m in metrics if metrics.count(m) > 1})
    if dup:
        raise ValueError(f"{who}: metrics lists {', '.join(map(repr, dup))} more than once")
    values = [per_channel(scores, m, who, "metrics") for m in metrics]
    d = np.array([direction(m) for m in metrics], dtype=float)
    per_layer = {}
    for layer in scores.layers:
        frame = pd.DataFrame({i: _values(v[layer]) for i, v in enumerate(values)})
        corr = frame.corr(method="spearman", min_periods=_MIN_CHANNELS).to_numpy() * np.outer(d, d)
        per_layer[layer] = pd.DataFrame(corr, index=metrics, columns=metrics)
    stack = np.stack([m.to_numpy() for m in per_layer.values()]
                     or [np.full((len(metrics), len(metrics)), np.nan)])
    count = np.isfinite(stack).sum(0)
    mean = np.where(count > 0, np.nansum(stack, 0) / np.maximum(count, 1), np.nan)
    return CriteriaSimilarity(metrics, per_layer, pd.DataFrame(mean, index=metrics, columns=metrics))


def _index_set(indices, who: str, arg: str, layer) -> set:
    if isinstance(indices, torch.Tensor):
        if indices.is_floating_point() or indices.is_complex() or indices.dim() > 1:
            raise ValueError(f"{who}: {arg}[{layer!r}] must be a 1-D integer tensor, got "
                             f"{indices.dtype} of shape {tuple(indices.shape)}")
        indices = indices.tolist()
    out = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"{who}: {arg}[{layer!r}] must hold channel indices (ints >= 0), got {i!r}")
        out.add(int(i))
    return out


def pruned_set_overlap(sets_a: Mapping[str, Sequence[int]], sets_b: Mapping[str, Sequence[int]]):
    """Jaccard overlap of two pruned channel sets per layer and pooled.

    Args:
        sets_a, sets_b: {layer: channel indices} over the same layers, e.g. ``plan.pruned`` of two
            pruning plans ({layer: LongTensor}); any sequence of ints per layer (read as a set).

    Returns:
        pandas DataFrame, one row per layer (in the order of ``sets_a``) and a last row
        ``"pooled"``, columns ``layer``, ``size_a``, ``size_b``, ``intersection``, ``union``,
        ``jaccard`` = intersection / union. The pooled row counts (layer, channel) pairs over all
        layers. Two empty sets are identical: their Jaccard is 1.
    """
    import pandas as pd

    who = "pruned_set_overlap"
    for arg, sets in (("sets_a", sets_a), ("sets_b", sets_b)):
        if not isinstance(sets, Mapping):
            raise TypeError(f"{who}: {arg} must be a mapping {{layer: indices}}, got {type(sets).__name__}")
    if set(sets_a) != set(sets_b):
        raise ValueError(f"{who}: sets_a and sets_b must cover the same layers; only in sets_a: "
                         f"{sorted(set(sets_a) - set(sets_b))}, only in sets_b: "
                         f"{sorted(set(sets_b) - set(sets_a))}")

    def row(layer, a, b, inter, union):
        return {"layer": layer, "size_a": a, "size_b": b, "intersection": inter, "union": union,
                "jaccard": inter / union if union else 1.0}

    rows = []
    for layer in sets_a:
        a = _index_set(sets_a[layer], who, "sets_a", layer)
        b = _index_set(sets_b[layer], who, "sets_b", layer)
        rows.append(row(layer, len(a), len(b), len(a & b), len(a | b)))
    rows.append(row("pooled", *(sum(r[k] for r in rows)
                                for k in ("size_a", "size_b", "intersection", "union"))))
    return pd.DataFrame(rows)


def _lowest(scores, metric: str, ratio: float, who: str, arg: str) -> Dict[str, torch.Tensor]:
    """Per layer, the floor(C * ratio) channels of lowest ``direction * value`` (the pruning
    protocol's ranking under uniform allocation); ties go to the lower channel index."""
    values = per_channel(scores, metric, who, arg)
    sign = direction(metric)
    out = {}
    for layer in scores.layers:
        v = values[layer].detach().cpu().double()
        if not torch.isfinite(v).all():
            raise ValueError(f"{who}: {arg}={metric!r} has NaN/Inf scores in layer {layer!r}, "
                             f"which rank no channel")
        k = math.floor(len(v) * ratio)
        out[layer] = torch.sort(sign * v, stable=True).indices[:k]
    return out


def pruned_overlap(scores, metric_a: str, metric_b: str, ratio: float):
    """Jaccard overlap of the channels two criteria prune at ``ratio`` (seeds/002's similarity of
    pruned networks), each layer pruned uniformly as the pruning protocol does.

    Per layer the pruned set of a metric is the ``floor(C * ratio)`` channels of lowest
    ``direction * value`` (ties to the lower index), with no per-layer cap.

    Returns:
        the DataFrame of :func:`pruned_set_overlap` (columns ``layer``, ``size_a``, ``size_b``,
        ``intersection``, ``union``, ``jaccard``; last row ``"pooled"``).
    """
    who = "pruned_overlap"
    need_scores(scores, who)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"{who}: ratio must be a number in [0, 1], got {ratio!r}")
    return pruned_set_overlap(_lowest(scores, metric_a, ratio, who, "metric_a"),
                              _lowest(scores, metric_b, ratio, who, "metric_b"))
