"""Argument checks shared by the analyses: which scores, layers and statistics they may read."""

from typing import Dict, List, Mapping, Optional, Sequence, Union

from ..metrics import Scores, get_metric, parse_metric
from ..stats import ChannelStats


def need_scores(scores, who: str) -> Scores:
    """``scores`` itself when it is a Scores, else TypeError naming ``who``."""
    if not isinstance(scores, Scores):
        raise TypeError(f"{who}: scores must be a chanaxis_fast.Scores (from chanaxis_fast.score), "
                        f"got {type(scores).__name__}")
    return scores


def per_channel(scores: Scores, metric: str, who: str, arg: str) -> Dict[str, object]:
    """scores[metric], or a ValueError naming the argument and the metrics the scores hold."""
    if not isinstance(metric, str):
        raise TypeError(f"{who}: {arg} must be a metric label (str), got {type(metric).__name__}")
    if metric in scores.values:
        return scores.values[metric]
    if metric in scores.summaries:
        raise ValueError(f"{who}: {arg}={metric!r} is a per-layer summary, not a per-channel score; "
                         f"per-channel metrics in these scores: {', '.join(scores.metrics)}")
    raise ValueError(f"{who}: unknown metric {arg}={metric!r}; the scores hold: "
                     f"{', '.join(scores.metrics) or '(none)'}")


def direction(label: str) -> int:
    """+1 when a higher value of the metric behind ``label`` means keep, -1 when it means removable."""
    return get_metric(parse_metric(label)[0]).direction


def label_of(scores: Scores, name: str, who: str, summary: bool = False) -> Optional[str]:
    """The one label in ``scores`` of the registered metric ``name`` (any parameters), or None."""
    pool = scores.summaries if summary else scores.values
    found = [label for label in pool if parse_metric(label)[0] == name]
    if len(found) > 1:
        raise ValueError(f"{who}: the scores hold {name!r} with several parameter sets "
                         f"({', '.join(found)}); score one of them only")
    return found[0] if found else None


def select_layers(layer: Union[None, str, Sequence[str]], available: Sequence[str], who: str,
                  where: str) -> List[str]:
    """``layer`` (None: all, a name, or a list of names) checked against ``available``."""
    names = list(available) if layer is None else [layer] if isinstance(layer, str) else list(layer)
    for name in names:
        if name not in available:
            raise ValueError(f"{who}: layer {name!r} is not in the {where}; layers: "
                             f"{', '.join(available) or '(none)'}")
    return names


def stats_of(calibration, who: str) -> Mapping[str, ChannelStats]:
    """{layer: ChannelStats} of a Calibration, or the mapping itself."""
    stats = getattr(calibration, "stats", calibration)
    if not isinstance(stats, Mapping) or not all(isinstance(s, ChannelStats) for s in stats.values()):
        raise TypeError(f"{who}: calibration must be a chanaxis_fast.Calibration or a mapping "
                        f"{{layer: ChannelStats}}, got {type(calibration).__name__}")
    return stats
