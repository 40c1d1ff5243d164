"""Multiply-accumulates of every conv and linear layer, dense or under a pruning plan's masks.

Counted analytically from the traced graph (shapes, groups, kernel sizes), never by running the
model per plan: a conv with ``G`` groups costs ``H_out * W_out * kh * kw * sum_g out_g * in_g``
MACs (``out_g`` / ``in_g`` the live output / input channels of group g), a linear layer
``positions * out * in``. A plan removes output channels of the layers it prunes *and* the input
channels that disappear from their consumers (grouped and depthwise convs, concatenation
segments, a flatten before a Linear: ``H*W`` features per channel). ``FLOPs = 2 * MACs``, as
``torch.utils.flop_counter.FlopCounterMode`` counts convolutions and matrix products (biases,
normalisations and activations are not counted, there or here).
"""

import dataclasses
import math
from typing import Dict, Iterable, Mapping, Optional, Set

from .graph import ModelGraph


@dataclasses.dataclass
class FlopsCount:
    """MACs per layer (dense and, with a plan, after masking) for one example input.

    ``per_layer``: {layer: (dense MACs, MACs after the plan)}; ``macs`` / ``flops``: totals after
    the plan (the dense totals without one); ``dense_macs`` / ``dense_flops``: totals without it;
    ``removed``: the fraction of FLOPs the plan removes.
    """

    per_layer: Dict[str, tuple]
    batch: int = 1

    @property
    def dense_macs(self) -> int:
        """Total MACs of the dense model (whole example batch)."""
        return self.batch * sum(d for d, _ in self.per_layer.values())

    @property
    def macs(self) -> int:
        """Total MACs after the plan (dense without one)."""
        return self.batch * sum(m for _, m in self.per_layer.values())

    @property
    def dense_flops(self) -> int:
        """2 * dense_macs."""
        return 2 * self.dense_macs

    @property
    def flops(self) -> int:
        """2 * macs."""
        return 2 * self.macs

    @property
    def removed(self) -> float:
        """Fraction of the dense FLOPs the masks remove (0 without a plan)."""
        return 1.0 - self.macs / self.dense_macs if self.dense_macs else 0.0

    def to_pandas(self):
        """One row per layer: dense and masked MACs and FLOPs (for the whole example batch)."""
        import pandas as pd

        rows = [dict(layer=l, dense_macs=self.batch * d, macs=self.batch * m,
                     dense_flops=2 * self.batch * d, flops=2 * self.batch * m)
                for l, (d, m) in self.per_layer.items()]
        return pd.DataFrame(rows)


def _spatial(node) -> int:
    """Output positions per sample: H_out * W_out of a conv, the leading dims of a linear."""
    if node.kind == "conv":
        return math.prod(node.output_shape[1:])
    return math.prod(node.output_shape) // node.out_channels


def _live_pairs(node, pruned_out: Set[int], pruned_in: Set[int]) -> int:
    """Live (output, input) channel pairs that share weights: ``sum_g out_g * in_g``."""
    if node.kind == "linear":
        return (node.out_channels - len(pruned_out)) * (node.in_channels - len(pruned_in))
    g = node.groups
    cin_g, cout_g = node.in_channels // g, node.out_channels // g
    if not pruned_out and not pruned_in:
        return node.out_channels * cin_g
    outs = [cout_g] * g
    for o in pruned_out:
        outs[o // cout_g] -= 1
    ins = [cin_g] * g
    for i in pruned_in:
        ins[i // cin_g] -= 1
    return sum(a * b for a, b in zip(outs, ins))


def layer_macs(node, pruned_out: Iterable[int] = (), pruned_in: Iterable[int] = ()) -> int:
    """MACs per sample of one traced layer with the given output channels and input channels
    (input features for a Linear after flatten) removed."""
    kk = math.prod(node.kernel_size) if node.kind == "conv" else 1
    return _spatial(node) * kk * _live_pairs(node, set(pruned_out), set(pruned_in))


def layer_params(node, pruned_out: Iterable[int] = (), pruned_in: Iterable[int] = (),
                 bias: bool = False) -> int:
    """Weights (and, with ``bias``, bias entries) of one traced layer with channels removed."""
    pruned_out = set(pruned_out)
    kk = math.prod(node.kernel_size) if node.kind == "conv" else 1
    live_out = node.out_channels - len(pruned_out)
    return kk * _live_pairs(node, pruned_out, set(pruned_in)) + (live_out if bias else 0)


def count(graph: ModelGraph, pruned_out: Optional[Mapping[str, Set[int]]] = None,
          pruned_in: Optional[Mapping[str, Set[int]]] = None, batch: int = 1) -> FlopsCount:
    """MACs of every conv / linear layer of ``graph`` with the given channels removed
    ({layer: output channels}, {layer: input channels or features})."""
    pruned_out, pruned_in = pruned_out or {}, pruned_in or {}
    per = {}
    for name, node in graph.layers.items():
        per[name] = (layer_macs(node), layer_macs(node, pruned_out.get(name, ()), pruned_in.get(name, ())))
    return FlopsCount(per, batch)


def flops(model, example_input, plan=None) -> FlopsCount:
    """MACs and FLOPs of every conv and linear layer of ``model`` on ``example_input`` (a tensor
    or a tuple of positional arguments; totals are for its whole batch), dense or under
    ``plan`` (a :class:`~chanaxis_fast.prune.MaskPlan`).

    The model runs once (traced by :func:`~chanaxis_fast.trace_model`); the count itself is
    analytic. The dense count equals ``torch.utils.flop_counter.FlopCounterMode`` for networks
    whose convolutions and matrix products all sit in ``nn.Conv2d`` / ``nn.Linear`` modules.
    """
    from .graph import trace_model

    graph = trace_model(model, example_input)
    x = example_input[0] if isinstance(example_input, tuple) else example_input
    batch = int(x.shape[0])
    if plan is None:
        return count(graph, batch=batch)
    plan.check_model(model)
    return count(graph, plan.pruned_outputs(), plan.pruned_inputs(graph), batch=batch)
