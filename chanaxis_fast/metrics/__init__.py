"""Channel metrics: the two axes, their composites and the classic criteria, in one registry.

Importing this package registers every built-in metric.
"""

from .registry import (MetricContext, MetricSpec, MissingInputError, Scores, available_metrics,
                       check_metric, get_metric, minmax, parse_metric, register_metric, score)

__all__ = ["MetricContext", "MetricSpec", "MissingInputError", "Scores", "available_metrics",
           "check_metric", "get_metric", "minmax", "parse_metric", "register_metric", "score"]

# importing these registers the built-in metrics
from . import activations  # noqa: E402,F401  (data-based baselines)
from . import axes  # noqa: E402,F401  (the two axes and their composites)
from . import weights  # noqa: E402,F401  (weight-based baselines)
