"""Per-layer statistics of the replaceability hulls and of triplet synergy (METHOD §3, §5)."""

import math

import numpy as np

from ..calibration import Calibration
from ..metrics import Scores, parse_metric, score
from ._checks import label_of

_QUANTILES = {"min": 0.0, "q25": 0.25, "median": 0.5, "q75": 0.75, "max": 1.0}


def hull_statistics(source):
    """Hull sizes, saturation, E_full and S3/S2 of every layer.

    Args:
        source: :class:`~chanaxis_fast.Scores` holding ``e_full``, ``hull_size`` and ``saturated``
            (any one parameter set of each, e.g. ``hull_size(max_size=5)``) and optionally the
            summary ``synergy_ratio``; or a :class:`~chanaxis_fast.Calibration`, which is scored
            with those four metrics at their defaults first (``synergy_ratio`` only with a target).

    Returns:
        pandas DataFrame, one row per layer, columns ``layer``, ``channels``, ``hull_size_mean``,
        ``size_0`` .. ``size_K`` (number of channels with that hull size; K = the hull_size
        metric's ``max_size``, 10 by default), ``saturated_frac`` (fraction of saturated hulls),
        ``e_full_min``, ``e_full_q25``, ``e_full_median``, ``e_full_q75``, ``e_full_max``,
        ``e_full_mean`` (over the layer's channels; quantiles interpolate linearly), ``s3_s2``
        (mean S3 / mean S2, NaN when the scores have no ``synergy_ratio``).
    """
    import pandas as pd

    who = "hull_statistics"
    if isinstance(source, Calibration):
        # the hull and synergy metrics read only the statistics: no model is needed
        source = score(None, source, ["e_full", "hull_size", "saturated", "synergy_ratio"],
                       missing="skip")
    elif not isinstance(source, Scores):
        raise TypeError(f"{who}: source must be a chanaxis_fast.Scores or Calibration, got "
                        f"{type(source).__name__}")
    labels = {name: label_of(source, name, who) for name in ("e_full", "hull_size", "saturated")}
    missing = [name for name, label in labels.items() if label is None]
    if missing:
        raise ValueError(f"{who}: the scores lack {', '.join(missing)}; score them (e.g. "
                         f"chanaxis_fast.score(model, calibration, {missing!r})) or pass the calibration")
    max_size = int(parse_metric(labels["hull_size"])[1].get("max_size", 10))
    synergy = label_of(source, "synergy_ratio", who, summary=True)
    rows = []
    for layer in source.layers:
        size = source[labels["hull_size"]][layer].cpu().numpy().astype(np.int64)
        e = source[labels["e_full"]][layer].cpu().double().numpy()
        row = {"layer": layer, "channels": len(size), "hull_size_mean": float(size.mean())}
        counts = np.bincount(size, minlength=max_size + 1)
        row.update({f"size_{k}": int(c) for k, c in enumerate(counts)})
        row["saturated_frac"] = float(source[labels["saturated"]][layer].double().mean())
        row.update({f"e_full_{k}": float(np.quantile(e, q)) for k, q in _QUANTILES.items()})
        row["e_full_mean"] = float(e.mean())
        row["s3_s2"] = float(source.summaries[synergy][layer]) if synergy else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
