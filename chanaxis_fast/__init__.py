"""chanaxis_fast: two-axis channel statistics and pruning criteria for CNNs.

The ops live in ``torch.ops.chanaxis_fast`` (C++ on the CPU, CUDA when compiled) with typed wrappers
in :mod:`chanaxis_fast.ops` and float64 pure-PyTorch references in :mod:`chanaxis_fast.reference`.
"""

import torch

from . import _C  # registers torch.ops.chanaxis_fast.*
from . import _fake  # noqa: F401  (fake kernels for torch.compile / opcheck)
from . import integrations, ops, reference
from .graph import ModelGraph, trace_model
from .metrics import (MetricSpec, MissingInputError, Scores, available_metrics, get_metric,
                      parse_metric, register_metric, score)
from .stats import ChannelStats, StatsFileError
from .calibration import Calibration, calibrate
from .errors import UserInputError
from .flops import FlopsCount, flops
from .prune import MaskPlan, apply_masks, keep_masked, plan
from .sweep import SweepResult, classifier_evaluator, classifier_finetuner, sweep
from .training import evaluate_classifier, finetune_classifier, train_classifier
from .lesion import lesion, pair_lesion, peer_replacement
from .lesion_study import LesionStudy, lesion_study
from .analysis import (criteria_similarity, cross_axis_alignment, hull_statistics, modularity,
                       modularity_graphs, pruned_overlap, pruned_set_overlap, weight_distribution)
from .tracking import AxisTracker, track_training

__version__ = "0.1.0"


def build_info():
    """What this build of the extension contains.

    Returns a dict: ``cuda_kernels`` (bool, whether the CUDA kernels were compiled),
    ``cuda_arch_list`` (the architectures they were compiled for), ``compiled_with_cuda`` (the CUDA
    version of the build), ``torch`` / ``torch_cuda`` (the running torch and its CUDA version),
    ``cuda_available`` (a GPU is usable now), ``cpu_capability`` and ``num_threads``.
    """
    info = dict(_C.build_flags())
    info["cuda_arch_list"] = [a for a in info["cuda_arch_list"].split(";") if a]
    info.update(
        version=__version__,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        num_threads=torch.get_num_threads(),
    )
    return info


__all__ = ["ChannelStats", "MetricSpec", "MissingInputError", "ModelGraph", "Scores",
           "StatsFileError", "available_metrics", "build_info", "get_metric", "ops", "parse_metric",
           "reference", "register_metric", "score", "trace_model"]
__all__ += ["Calibration", "calibrate"]
__all__ += ["criteria_similarity", "cross_axis_alignment", "hull_statistics", "modularity",
            "modularity_graphs", "pruned_overlap", "pruned_set_overlap", "weight_distribution"]
__all__ += ["FlopsCount", "MaskPlan", "SweepResult", "UserInputError", "apply_masks",
            "classifier_evaluator", "classifier_finetuner", "evaluate_classifier",
            "finetune_classifier", "flops", "keep_masked", "plan", "sweep", "train_classifier"]
__all__ += ["LesionStudy", "lesion", "lesion_study", "pair_lesion", "peer_replacement"]
__all__ += ["AxisTracker", "track_training"]
