"""The Convolution Weight Distribution Assumption check of seeds/002 §2.1.

CWDA: the filters ``F_j`` (j = 1..C_out, each a vector of D = C_in/groups * k^2 weights) of a
well-trained layer are i.i.d. ``N(0, Sigma_diag + eps * Sigma_block)`` with ``Sigma_diag`` diagonal
with nearly equal entries and ``Sigma_block`` block diagonal, one k^2 x k^2 block per input channel
(zero on its diagonal), eps small. The paper checks four necessary conditions: (1) the weights look
Gaussian, (2) the diagonal entries vary little, (3) the mean is near 0, (4) eps is small, i.e. the
second-moment matrix ``F^T F`` is dominated by its diagonal, with what remains inside the blocks.
"""

import math
import warnings
from typing import Optional, Sequence

import numpy as np
from torch import nn


def _filters(model: nn.Module, name: str, who: str):
    """(Tensor[C_out, D] float64 numpy, k^2) of a Conv2d or Linear module."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"{who}: the model has no module named {name!r}")
    mod = modules[name]
    if not isinstance(mod, (nn.Conv2d, nn.Linear)):
        raise ValueError(f"{who}: layer {name!r} is a {type(mod).__name__}, not a Conv2d or Linear")
    w = mod.weight.detach().to("cpu").double()
    k2 = int(np.prod(w.shape[2:])) if w.dim() == 4 else 1
    return w.reshape(w.shape[0], -1).numpy(), k2


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a * a))) if a.size else math.nan


def _layer_row(F: np.ndarray, k2: int, alpha: float) -> dict:
    from scipy import stats

    C, D = F.shape
    sd = F.std(1)
    live = F[sd > 0]  # all-zero filters (masked channels) say nothing about the distribution
    if len(live) and D >= 3:
        with warnings.catch_warnings():  # scipy warns that p may be inaccurate above 5000 values
            warnings.simplefilter("ignore", UserWarning)
            sw = np.array([stats.shapiro(f) for f in live])
        w_med, normal = float(np.median(sw[:, 0])), float(np.mean(sw[:, 1] >= alpha))
        skew = float(np.median(stats.skew(live, axis=1)))
        kurt = float(np.median(stats.kurtosis(live, axis=1)))
        mean_sd = float(np.median(np.abs(live.mean(1)) / live.std(1)))
    else:
        w_med = normal = skew = kurt = mean_sd = math.nan
    G = F.T @ F / C  # [D, D] second moments of the coordinates over the filters
    diag = G.diagonal().copy()
    inv = np.where(diag > 0, 1 / np.sqrt(np.where(diag > 0, diag, 1)), 0.0)
    corr = G * inv[:, None] * inv[None, :]
    block = np.arange(D) // k2
    same = block[:, None] == block[None, :]
    off_diag = ~np.eye(D, dtype=bool)
    within, off = _rms(corr[same & off_diag]), _rms(corr[~same])
    energy = float((G * G).sum())
    return {
        "filters": C, "params_per_filter": D, "kernel_size": k2,
        "shapiro_w_median": w_med, "normal_frac": normal, "skew_median": skew,
        "kurtosis_median": kurt, "mean_over_std": mean_sd,
        "diag_cv": float(diag.std() / diag.mean()) if diag.mean() > 0 else math.nan,
        "within_block_corr": within, "off_block_corr": off,
        "block_contrast": within / off if off > 0 else math.nan,
        "diag_energy": float((diag * diag).sum()) / energy if energy > 0 else math.nan,
        "corr_noise": 1 / math.sqrt(C),
    }


def weight_distribution(model: nn.Module, layers: Optional[Sequence[str]] = None, *,
                        alpha: float = 0.05):
    """Per layer, the four necessary conditions of CWDA (seeds/002 §2.1) on the layer's filters.

    A filter is one output channel's weights flattened in the module's order ``[C_in/groups, kh,
    kw]`` (D values); ``G = F^T F / C_out`` is the [D, D] second-moment matrix of the coordinates
    over the filters (the paper's ``F F^T`` with filters as columns) and ``R = G_ab /
    sqrt(G_aa G_bb)`` its normalised form. The blocks are the k^2 coordinates of one input channel.

    Args:
        model: the network.
        layers: names of Conv2d or Linear modules (default: every Conv2d with at least 4 outputs).
        alpha: significance level of the per-filter Shapiro-Wilk test.

    Returns:
        pandas DataFrame, one row per layer, columns:

        * ``layer``, ``filters`` (C_out), ``params_per_filter`` (D), ``kernel_size`` (k^2; 1 for Linear)
        * (1) Gaussian, per filter over its D weights (filters that are all zero are left out; NaN
          when D < 3): ``shapiro_w_median`` median Shapiro-Wilk W (1 = Gaussian, ``scipy.stats.shapiro``),
          ``normal_frac`` fraction of filters with p >= alpha, ``skew_median`` and
          ``kurtosis_median`` median skewness and excess (Fisher) kurtosis (0 for a Gaussian)
        * (3) mean: ``mean_over_std`` median over filters of |mean| / std of the filter's weights
          (about 0.67 / sqrt(D) for zero-mean Gaussian weights)
        * (2) variance: ``diag_cv`` coefficient of variation (std / mean) of the diagonal of G
        * (4) structure of G: ``within_block_corr`` root mean square of R over the off-diagonal
          entries inside the blocks (NaN when k^2 = 1), ``off_block_corr`` the same over the entries
          outside the blocks (NaN for a single block, e.g. depthwise), ``block_contrast`` their
          ratio (about 1 without structure, >> 1 when weights of one input channel co-vary),
          ``diag_energy`` = sum diag(G)^2 / sum G^2 (1 when the coordinates are uncorrelated),
          ``corr_noise`` = 1 / sqrt(C_out), the size of R's entries from sampling alone.
    """
    import pandas as pd

    who = "weight_distribution"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    if not 0 < alpha < 1:
        raise ValueError(f"{who}: alpha must be in (0, 1), got {alpha!r}")
    if layers is None:
        layers = [n for n, m in model.named_modules()
                  if isinstance(m, nn.Conv2d) and m.out_channels >= 4]
    elif isinstance(layers, str):
        raise TypeError(f"{who}: layers must be a list of module names, got the string {layers!r}")
    rows = []
    for name in layers:
        F, k2 = _filters(model, name, who)
        rows.append({"layer": name, **_layer_row(F, k2, alpha)})
    return pd.DataFrame(rows)
