"""Analyses of channel scores and statistics (METHOD §5).

* :func:`cross_axis_alignment`: Spearman of I_X with I(T;Y) per layer and pooled, bootstrap intervals.
* :func:`criteria_similarity`, :func:`pruned_set_overlap`, :func:`pruned_overlap`: how alike two
  criteria rank channels, and how much the channels they prune overlap (seeds/002 Fig. 4).
* :func:`modularity`, :func:`modularity_graphs`: communities of the R-graph against the S-graph.
* :func:`weight_distribution`: the CWDA conditions of seeds/002 on the filters.
* :func:`hull_statistics`: hull sizes, saturation, E_full and S3/S2 per layer.

Tables are pandas DataFrames, one row per layer.
"""

from .cwda import weight_distribution
from .hulls import hull_statistics
from .modularity import LayerGraphs, modularity, modularity_graphs
from .rankings import (CriteriaSimilarity, criteria_similarity, cross_axis_alignment,
                       pruned_overlap, pruned_set_overlap)

__all__ = ["CriteriaSimilarity", "LayerGraphs", "criteria_similarity", "cross_axis_alignment",
           "hull_statistics", "modularity", "modularity_graphs", "pruned_overlap",
           "pruned_set_overlap", "weight_distribution"]
