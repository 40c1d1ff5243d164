"""Any chanaxis_fast score as a Torch-Pruning importance criterion, so that it drives physical
channel removal with Torch-Pruning's pruners.

    import torch_pruning as tp
    from chanaxis_fast.integrations.torch_pruning import Importance

    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=Importance(scores, "e_full"),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()

How our groups map onto Torch-Pruning's: a Torch-Pruning group is rooted at one conv/linear
layer and holds every layer whose output channels are removed with it (residual streams,
depthwise convs) plus their BatchNorms and consumers. Its importance here is, per channel, the
mean of ``direction * score`` over those of its out-channel layers that the scores hold (the
group score of :func:`chanaxis_fast.plan`; depthwise convs count, as in our groups), so
Torch-Pruning removes the lowest, exactly the
channels a uniform :func:`~chanaxis_fast.plan` masks at the same per-layer counts (Torch-Pruning
removes ``C - int(C * (1 - ratio))`` channels of a group, ``floor(C * ratio)`` when ``C * ratio``
is an integer). A group none of whose layers was scored gets ``None``: Torch-Pruning leaves it.
"""

from typing import Optional

import torch

from ..prune import metric_direction


class Importance:
    """``Importance(scores, metric)(group) -> Tensor[len(group idxs)]``: a Torch-Pruning
    importance from a :class:`~chanaxis_fast.Scores` metric (higher = keep, as Torch-Pruning
    expects, whatever the metric's own direction). ``model``: only needed when the groups do not
    carry their DependencyGraph's module names (they do in Torch-Pruning 1.6)."""

    def __init__(self, scores, metric: str, model: Optional[torch.nn.Module] = None):
        from ..metrics import Scores
        from ..errors import UserInputError

        if not isinstance(scores, Scores):
            raise UserInputError(f"Importance: scores must be a chanaxis_fast.Scores, got {type(scores).__name__}")
        if metric not in scores.values:
            raise UserInputError(f"Importance: the scores hold no metric {metric!r}; they hold: "
                                 f"{', '.join(scores.values)}")
        self.values = scores.values[metric]
        self.direction = metric_direction(metric)
        self.names = None if model is None else {m: n for n, m in model.named_modules()}

    def _name(self, group, module) -> Optional[str]:
        if self.names is not None:
            return self.names.get(module)
        dg = getattr(group, "_DG", None)
        return None if dg is None else dg._module2name.get(module)

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        import torch_pruning as tp

        out_fns = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels,
                   tp.prune_linear_out_channels)
        rows = []  # per out-channel layer, its scores at the group's channels (aligned with idxs)
        for dep, idxs in group:
            if dep.handler not in out_fns:
                continue
            name = self._name(group, dep.target.module)
            if name in self.values:
                rows.append(self.values[name].double()[list(idxs)])
        if not rows:
            return None
        return (self.direction * torch.stack(rows).mean(0)).float()
