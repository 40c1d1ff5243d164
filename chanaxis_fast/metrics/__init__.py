"""Channel metrics: the two axes, their composites and the classic criteria, in one registry.

Importing this package registers every built-in metric.
"""

from .registry import (MetricContext, MetricSpec, MissingInputError, Scores, available_metrics,
                       get_metric, minmax, parse_metric, register_metric, score)

__all__ = ["MetricContext", "MetricSpec", "MissingInputError", "Scores", "available_metrics",
           "get_metric", "minmax", "parse_metric", "register_metric", "score"]

from . import weights  # noqa: E402,F401  (registers l1, l2, magnitude, fpgm, fermat, bn_scale, random)
