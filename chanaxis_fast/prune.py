"""The FLOPs-matched pruning protocol's plans and masks (METHOD §6).

:func:`plan` turns one metric's scores into a :class:`MaskPlan`: which channels of which layers to
remove at a ratio. Channels tied together by the network (residual additions, depthwise convs,
element-wise products) form one *group* that is removed together. :func:`apply_masks` zeroes a
plan's channels in place (a context manager restores every tensor bit for bit), and
:func:`keep_masked` keeps them zero during fine-tuning.

Masking a channel zeroes what physical removal deletes: the output rows (weights and bias) of
every layer of the group, every BatchNorm on the channel (gamma = beta = 0, running mean 0,
running variance 1, so its output is exactly 0), and the consumers' weights that read it, so that
the masked network computes what the slimmed network computes whatever the activation.
"""

import dataclasses
import json
import math
import operator
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import UserInputError
from .flops import count, layer_params
from .graph import ModelGraph

ALLOCATIONS = ("uniform", "global", "flops_target")
_FORMAT, _VERSION = "chanaxis_fast.MaskPlan", 1


@dataclasses.dataclass
class PruneGroup:
    """Channels removed together: the output channels of ``members`` (one channel space of
    ``size`` channels), the BatchNorms on them (module, offset of channel 0 in the module), and
    the layers reading them (layer, offset in its input, features per channel)."""

    members: List[str]
    size: int
    pruned: List[int]
    bns: List[Tuple[str, int]]
    consumers: List[Tuple[str, int, int]]


def metric_direction(label: str) -> int:
    """+1 when a higher value of the metric (a spec label such as ``"magnitude(p=1)"``) means
    keep, -1 when it means removable; +1 for names that are not registered."""
    from .metrics import get_metric, parse_metric

    try:
        return get_metric(parse_metric(label)[0]).direction
    except UserInputError:
        return 1


class MaskPlan:
    """Which channels a pruning step removes, and what that saves.

    Attributes: ``metric``, ``ratio``, ``allocation``, ``max_ratio``, ``coupled``,
    ``flops_target`` (the settings :func:`plan` was called with); ``groups`` (list of
    :class:`PruneGroup`); ``skipped`` ({layer: why it is not pruned}); ``shapes`` ({layer:
    [out, in]} of every conv/linear layer of the model, to check a model against the plan);
    ``per_layer_macs`` ({layer: [dense, masked]} MACs per image); ``params_before`` /
    ``params_after`` (the model's parameters, and those left after physical removal);
    ``input_shape`` (one image, as the graph was traced).
    """

    def __init__(self, *, metric, ratio, allocation, max_ratio, coupled, flops_target, groups,
                 skipped, shapes, per_layer_macs, params_before, params_after, input_shape=None):
        self.metric, self.ratio, self.allocation = metric, ratio, allocation
        self.max_ratio, self.coupled, self.flops_target = max_ratio, coupled, flops_target
        self.groups: List[PruneGroup] = groups
        self.skipped: Dict[str, str] = dict(skipped)
        self.shapes: Dict[str, List[int]] = {k: list(v) for k, v in shapes.items()}
        self.per_layer_macs = {k: list(v) for k, v in per_layer_macs.items()}
        self.params_before, self.params_after = int(params_before), int(params_after)
        self.input_shape = None if input_shape is None else list(input_shape)

    # ------------------------------------------------------------------ what is removed
    @property
    def pruned(self) -> Dict[str, Tensor]:
        """{layer: int64 indices of its removed output channels}, every member of every group."""
        return {m: torch.tensor(g.pruned, dtype=torch.int64) for g in self.groups for m in g.members}

    @property
    def kept(self) -> Dict[str, Tensor]:
        """{layer: int64 indices of its kept output channels}."""
        out = {}
        for g in self.groups:
            keep = sorted(set(range(g.size)) - set(g.pruned))
            for m in g.members:
                out[m] = torch.tensor(keep, dtype=torch.int64)
        return out

    def pruned_outputs(self) -> Dict[str, set]:
        """{layer: set of removed output channels}."""
        return {m: set(g.pruned) for g in self.groups for m in g.members}

    def pruned_inputs(self, graph: Optional[ModelGraph] = None) -> Dict[str, set]:
        """{layer: set of removed input channels (input features for a Linear after flatten)}, for
        every consumer of a pruned group and every depthwise member (its input is its channel)."""
        out: Dict[str, set] = {}
        for g in self.groups:
            for name, off, e in g.consumers:
                s = out.setdefault(name, set())
                for c in g.pruned:
                    s.update(range((off + c) * e, (off + c + 1) * e))
            if graph is not None:
                for m in g.members:
                    node = graph.layers.get(m)
                    if node is not None and node.depthwise:
                        out.setdefault(m, set()).update(g.pruned)
        return out

    # ------------------------------------------------------------------ what it saves
    @property
    def macs_before(self) -> int:
        """MACs per image of the dense model's conv and linear layers."""
        return sum(d for d, _ in self.per_layer_macs.values())

    @property
    def macs_after(self) -> int:
        """MACs per image once the plan's channels are removed."""
        return sum(m for _, m in self.per_layer_macs.values())

    @property
    def flops_before(self) -> int:
        """FLOPs (2 * MACs) per image, dense."""
        return 2 * self.macs_before

    @property
    def flops_after(self) -> int:
        """FLOPs (2 * MACs) per image after the plan."""
        return 2 * self.macs_after

    @property
    def flops_removed(self) -> float:
        """The fraction of FLOPs the plan removes."""
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def params_removed(self) -> float:
        """The fraction of parameters the plan removes."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def summary(self):
        """One row per layer: channels, pruned, kept, ratio, group (index), MACs before/after."""
        import pandas as pd

        group_of = {m: i for i, g in enumerate(self.groups) for m in g.members}
        rows = []
        for layer, (dense, masked) in self.per_layer_macs.items():
            out = self.shapes[layer][0]
            p = len(self.groups[group_of[layer]].pruned) if layer in group_of else 0
            rows.append(dict(layer=layer, channels=out, pruned=p, kept=out - p, ratio=p / out if out else 0.0,
                             group=group_of.get(layer), macs_before=dense, macs_after=masked,
                             skipped=self.skipped.get(layer, "")))
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------ checks and files
    def check_model(self, model: nn.Module) -> None:
        """UserInputError naming the first layer that the model lacks or whose channel counts
        differ from the model the plan was made for."""
        modules = dict(model.named_modules())
        extra = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in self.shapes]
        if extra:
            raise UserInputError(f"this model has layer {extra[0]!r}, which the model the plan was "
                                 f"made for does not have")
        for name, (out, inp) in self.shapes.items():
            mod = modules.get(name)
            if mod is None:
                raise UserInputError(f"the plan was made for a model with layer {name!r}, which this "
                                     f"model does not have")
            shape = _io(mod)
            if shape != (out, inp):
                raise UserInputError(f"the plan was made for a model whose layer {name!r} has "
                                     f"{out} output / {inp} input channels; this model's has "
                                     f"{shape[0]} / {shape[1]}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict (see :meth:`from_dict`)."""
        return dict(format=_FORMAT, version=_VERSION, metric=self.metric, ratio=self.ratio,
                    allocation=self.allocation, max_ratio=self.max_ratio, coupled=self.coupled,
                    flops_target=self.flops_target,
                    groups=[dataclasses.asdict(g) for g in self.groups], skipped=self.skipped,
                    shapes=self.shapes, per_layer_macs=self.per_layer_macs,
                    params_before=self.params_before, params_after=self.params_after,
                    input_shape=self.input_shape)

    def to_json(self, path=None) -> str:
        """The plan as JSON text; written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "MaskPlan":
        """Rebuild a plan from :meth:`to_dict`; UserInputError for another format or version."""
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise UserInputError("MaskPlan.from_json: not a chanaxis_fast mask plan")
        if d.get("version") != _VERSION:
            raise UserInputError(f"MaskPlan.from_json: written by plan format {d.get('version')}, "
                                 f"this is {_VERSION}")
        try:
            groups = [PruneGroup(list(g["members"]), int(g["size"]), [int(c) for c in g["pruned"]],
                                 [tuple(b) for b in g["bns"]], [tuple(c) for c in g["consumers"]])
                      for g in d["groups"]]
            return cls(metric=d["metric"], ratio=d["ratio"], allocation=d["allocation"],
                       max_ratio=d["max_ratio"], coupled=d["coupled"], flops_target=d["flops_target"],
                       groups=groups, skipped=d["skipped"], shapes=d["shapes"],
                       per_layer_macs=d["per_layer_macs"], params_before=d["params_before"],
                       params_after=d["params_after"], input_shape=d.get("input_shape"))
        except (KeyError, TypeError, ValueError) as e:
            raise UserInputError(f"MaskPlan.from_json: incomplete plan ({type(e).__name__}: {e})") from None

    @classmethod
    def from_json(cls, text_or_path) -> "MaskPlan":
        """Read a plan from JSON text or a file written by :meth:`to_json`."""
        text = text_or_path
        if isinstance(text_or_path, os.PathLike) or (isinstance(text_or_path, str)
                                                     and not text_or_path.lstrip().startswith("{")):
            with open(text_or_path) as f:
                text = f.read()
        try:
            d = json.loads(text)
        except ValueError as e:
            raise UserInputError(f"MaskPlan.from_json: not JSON ({e})") from None
        return cls.from_dict(d)

    def __repr__(self):
        return (f"MaskPlan({self.metric!r}, ratio={self.ratio}, {self.allocation}, "
                f"{sum(len(g.pruned) * len(g.members) for g in self.groups)} channels in "
                f"{len(self.groups)} groups, {100 * self.flops_removed:.1f} % of FLOPs removed)")


def _io(mod: nn.Module) -> Tuple[Optional[int], Optional[int]]:
    if isinstance(mod, nn.Conv2d):
        return mod.out_channels, mod.in_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    return None, None


# ====================================================================== planning
def _check_fraction(name, v, lo_open=True, hi_closed=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (v > 0 if lo_open else v >= 0) and (v <= 1 if hi_closed else v < 1)
    if not ok:
        raise UserInputError(f"plan: {name} must be in (0, {'1]' if hi_closed else '1)'}, got {v!r}")


def _group_spaces(graph: ModelGraph, layers: Sequence[str], coupled: str):
    """(groups of layers to prune, {layer: why not}) for the scored ``layers``."""
    groups, skipped, seen = [], {}, set()
    for layer in layers:
        node = graph.layers[layer]
        root = graph.root(node.space)
        if root in seen:
            continue
        seen.add(root)
        members = graph.coupled(layer)
        reason = None
        if any(graph.layers[m].is_output for m in members):
            reason = "its channels are the model's output"
        elif graph.is_opaque(layer):
            reason = "its channels reach an op the graph tracer does not model (opaque)"
        elif graph.normalizations(layer):
            reason = (f"its channels are normalised together by {graph.normalizations(layer)[0]} "
                      f"(LayerNorm/GroupNorm): zeroing a channel there does not remove it")
        elif coupled == "exclude" and (len(members) > 1 or any(graph.layers[m].depthwise for m in members)):
            reason = f"coupled with {', '.join(m for m in members if m != layer) or 'a depthwise conv'} " \
                     f"(coupled='exclude')"
        if reason:
            for m in members:
                skipped[m] = reason
            continue
        consumers = [(c, off, e) for c, off, e in graph.consumers(layer)
                     if not (c in members and graph.layers[c].depthwise)]
        groups.append(PruneGroup(members, node.out_channels, [], graph.batch_norms(layer), consumers))
    return groups, skipped


def _group_keys(scores, metric: str, groups: List[PruneGroup]) -> List[Tensor]:
    """direction * score per channel of each group (the mean over its scored members)."""
    direction = metric_direction(metric)
    values = scores[metric]
    keys = []
    for g in groups:
        member = [values[m].detach().double().cpu() for m in g.members if m in values]
        k = direction * torch.stack(member).mean(0)
        if not bool(torch.isfinite(k).all()):
            raise UserInputError(f"plan: metric {metric!r} has NaN/Inf scores in {g.members[0]!r}")
        keys.append(k)
    return keys


def _uniform_counts(groups, ratio, max_ratio):
    return [min(math.floor(g.size * ratio + 1e-9), math.floor(g.size * max_ratio + 1e-9), g.size - 1)
            for g in groups]


def _lowest(key: Tensor, k: int) -> List[int]:
    """The k channels of lowest key (ties: lower index first), sorted."""
    order = torch.sort(key, stable=True).indices[:k]
    return sorted(order.tolist())


def _global_choice(groups, keys, ratio, max_ratio) -> List[List[int]]:
    from .metrics import minmax

    caps = [min(math.floor(g.size * max_ratio + 1e-9), g.size - 1) for g in groups]
    total = math.floor(sum(g.size for g in groups) * ratio + 1e-9)
    pool = sorted((float(v), gi, c) for gi, k in enumerate(keys) for c, v in enumerate(minmax(k).tolist()))
    chosen: List[List[int]] = [[] for _ in groups]
    taken = 0
    for _, gi, c in pool:
        if taken >= total:
            break
        if len(chosen[gi]) < caps[gi]:
            chosen[gi].append(c)
            taken += 1
    return [sorted(c) for c in chosen]


def _costs(graph: ModelGraph, groups: List[PruneGroup], model: nn.Module):
    tmp = MaskPlan(metric="", ratio=0, allocation="", max_ratio=1, coupled="", flops_target=None,
                   groups=groups, skipped={}, shapes={}, per_layer_macs={}, params_before=0,
                   params_after=0)
    out_p, in_p = tmp.pruned_outputs(), tmp.pruned_inputs(graph)
    fc = count(graph, out_p, in_p)
    modules = dict(model.named_modules())
    before = sum(p.numel() for p in model.parameters())
    removed = 0
    for name, node in graph.layers.items():
        has_bias = getattr(modules.get(name), "bias", None) is not None
        removed += layer_params(node, bias=has_bias) - layer_params(node, out_p.get(name, ()),
                                                                    in_p.get(name, ()), bias=has_bias)
    for g in groups:
        for bn, _ in g.bns:
            mod = modules.get(bn)
            if mod is not None and getattr(mod, "weight", None) is not None:
                removed += 2 * len(g.pruned)
    return fc.per_layer, before, before - removed


def plan(model: nn.Module, scores, metric: str, ratio: Optional[float] = None, *,
         allocation: str = "uniform", max_ratio: float = 0.95, coupled: str = "group",
         flops_target: Optional[float] = None, layers: Optional[Sequence[str]] = None,
         graph: Optional[ModelGraph] = None) -> MaskPlan:
    """The channels to remove at ``ratio`` by ``metric``, as a :class:`MaskPlan`.

    Channels are ranked by ``direction * value`` (:func:`metric_direction`), lowest first (ties:
    lower index first). Channels coupled by the network form one group, whose score is the mean of
    its members' scores (``coupled="group"``), or the group is left unpruned (``"exclude"``).

    Allocation:
      - ``"uniform"`` (default, what makes a sweep FLOPs-matched): ``floor(C * ratio)`` channels of
        every group, at most ``floor(C * max_ratio)``, at least one kept. The counts never depend on
        the metric: every metric removes the same FLOPs at the same ratio.
      - ``"global"``: one threshold over the per-group min-max normalised scores removes
        ``floor(ratio * total channels)``, with the same cap per group.
      - ``"flops_target"``: uniform counts at the smallest ``ratio`` (found by bisection) whose
        plan removes at least ``flops_target`` of the FLOPs; ``plan.ratio`` is the ratio found and
        ``plan.flops_removed`` the fraction reached (within one channel step of the target).

    Layers whose channels are the model's output, reach an op the tracer does not model, or are
    normalised together (LayerNorm/GroupNorm) are left out, with the reason in ``plan.skipped``.

    Args:
        model: the scored model (for the parameter counts and the shape check).
        scores: :class:`~chanaxis_fast.Scores` holding ``metric`` (their graph is used, else pass
            ``graph``).
        layers: the scored layers to prune (default: all the scores hold).
    """
    from .metrics import Scores

    if not isinstance(scores, Scores):
        raise UserInputError(f"plan: scores must be a chanaxis_fast.Scores, got {type(scores).__name__}")
    if metric not in scores.values:
        if metric in scores.summaries:
            raise UserInputError(f"plan: {metric!r} is a layer summary, not a per-channel metric")
        raise UserInputError(f"plan: the scores hold no metric {metric!r}; they hold: "
                             f"{', '.join(scores.values)}")
    if allocation not in ALLOCATIONS:
        raise UserInputError(f"plan: allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if coupled not in ("group", "exclude"):
        raise UserInputError(f"plan: coupled must be 'group' or 'exclude', got {coupled!r}")
    _check_fraction("max_ratio", max_ratio, hi_closed=True)
    if allocation == "flops_target":
        _check_fraction("flops_target", flops_target)
    else:
        _check_fraction("ratio", ratio)
        if flops_target is not None:
            raise UserInputError("plan: flops_target needs allocation='flops_target'")
    graph = graph if graph is not None else getattr(scores, "graph", None)
    if graph is None:
        raise UserInputError("plan: these scores carry no model graph; pass graph=trace_model(model, x)")
    layers = list(scores.layers if layers is None else layers)
    for l in layers:
        if l not in graph.layers or l not in scores.values[metric]:
            raise UserInputError(f"plan: layer {l!r} is not in the scores; they hold "
                                 f"{', '.join(scores.layers)}")
    shapes = {n: [l.out_channels, l.in_channels] for n, l in graph.layers.items()}
    MaskPlan(metric=metric, ratio=0, allocation=allocation, max_ratio=max_ratio, coupled=coupled,
             flops_target=None, groups=[], skipped={}, shapes=shapes, per_layer_macs={},
             params_before=0, params_after=0).check_model(model)
    groups, skipped = _group_spaces(graph, layers, coupled)
    keys = _group_keys(scores, metric, groups)

    def build(r):
        if allocation == "global":
            chosen = _global_choice(groups, keys, r, max_ratio)
        else:
            chosen = [_lowest(k, n) for k, n in zip(keys, _uniform_counts(groups, r, max_ratio))]
        gs = [dataclasses.replace(g, pruned=c) for g, c in zip(groups, chosen)]
        per_layer, before, after = _costs(graph, gs, model)
        return MaskPlan(metric=metric, ratio=r, allocation=allocation, max_ratio=max_ratio,
                        coupled=coupled, flops_target=flops_target, groups=gs, skipped=skipped,
                        shapes=shapes, per_layer_macs=per_layer, params_before=before,
                        params_after=after, input_shape=_input_shape(graph))

    if allocation != "flops_target":
        return build(float(ratio))
    hi_plan = build(max_ratio)
    if hi_plan.flops_removed < flops_target:
        warnings.warn(f"plan: flops_target={flops_target} is out of reach with max_ratio={max_ratio} "
                      f"(at most {hi_plan.flops_removed:.4f} of the FLOPs); the plan stops there")
        return hi_plan
    lo, hi = 0.0, float(max_ratio)
    for _ in range(50):  # the removed fraction is a step function of r: find its step at the target
        mid = 0.5 * (lo + hi)
        if build(mid).flops_removed >= flops_target:
            hi = mid
        else:
            lo = mid
    return build(hi)


def _input_shape(graph: ModelGraph):
    first = min(graph.layers.values(), key=lambda l: l.order, default=None)
    return None if first is None else list(first.input_shape)


def channel_plan(model: nn.Module, graph: ModelGraph, layer: str, channels: Sequence[int]) -> MaskPlan:
    """A :class:`MaskPlan` that removes the given output ``channels`` of ``layer`` and of every layer
    coupled with it (one group, as :func:`plan` forms them), whatever the scores: what a lesion
    masks. Any non-empty set of distinct channels may be given, all of them included.

    UserInputError when the layer is not in the graph, its channels cannot be masked (the reasons
    of ``plan.skipped``) or a channel is out of range."""
    if layer not in graph.layers:
        raise UserInputError(f"channel_plan: layer {layer!r} is not a traced conv/linear layer; "
                             f"layers: {', '.join(graph.layers)}")
    groups, skipped = _group_spaces(graph, [layer], "group")
    if skipped:
        raise UserInputError(f"channel_plan: the channels of {layer!r} cannot be masked: {skipped[layer]}")
    size = groups[0].size
    try:
        if any(isinstance(c, bool) for c in channels):
            raise TypeError
        chosen = [operator.index(c) for c in channels]  # numpy and 0-d torch ints too
    except TypeError:
        chosen = None
    if not chosen or not all(0 <= c < size for c in chosen):
        raise UserInputError(f"channel_plan: channels must be a non-empty list of ints in [0, {size}) "
                             f"(the channels of {layer!r}), got {channels!r}")
    if len(set(chosen)) != len(chosen):
        raise UserInputError(f"channel_plan: channels repeat a channel: {chosen}")
    group = dataclasses.replace(groups[0], pruned=sorted(chosen))
    per_layer, before, after = _costs(graph, [group], model)
    shapes = {n: [l.out_channels, l.in_channels] for n, l in graph.layers.items()}
    return MaskPlan(metric="channels", ratio=len(chosen) / size, allocation="channels", max_ratio=1.0,
                    coupled="group", flops_target=None, groups=[group], skipped={}, shapes=shapes,
                    per_layer_macs=per_layer, params_before=before, params_after=after,
                    input_shape=_input_shape(graph))


# ====================================================================== masks
def _mask_tensors(model: nn.Module, plan: MaskPlan) -> List[Tuple[Tensor, Tensor, float]]:
    """(tensor, bool mask of the entries to set, value) for every tensor the plan touches."""
    modules = dict(model.named_modules())
    masks: Dict[int, list] = {}

    def mark(t: Optional[Tensor], fill: float, index):
        if t is None:
            return
        entry = masks.get(id(t))
        if entry is None:
            entry = masks[id(t)] = [t, torch.zeros_like(t, dtype=torch.bool), fill]
        entry[1][index] = True

    for g in plan.groups:
        if not g.pruned:
            continue
        rows = torch.tensor(g.pruned, dtype=torch.int64)
        for m in g.members:
            mod = modules[m]
            mark(mod.weight, 0.0, rows)
            mark(mod.bias, 0.0, rows)
        for bn, off in g.bns:
            mod = modules[bn]
            idx = rows + off
            mark(mod.weight, 0.0, idx)
            mark(mod.bias, 0.0, idx)
            mark(getattr(mod, "running_mean", None), 0.0, idx)
            mark(getattr(mod, "running_var", None), 1.0, idx)
        for name, off, e in g.consumers:
            mod = modules[name]
            if isinstance(mod, nn.Linear):
                cols = ((rows + off)[:, None] * e + torch.arange(e)).reshape(-1)
                mark(mod.weight, 0.0, (slice(None), cols))
            else:
                # input channel k of a grouped conv feeds the output rows of its group only
                cin_g = mod.in_channels // mod.groups
                cout_g = mod.out_channels // mod.groups
                k = rows + off
                out_rows = ((k // cin_g)[:, None] * cout_g + torch.arange(cout_g)).reshape(-1)
                in_cols = (k % cin_g).repeat_interleave(cout_g)
                mark(mod.weight, 0.0, (out_rows, in_cols))
    return [tuple(v) for v in masks.values()]


class Masking:
    """The masks of a plan applied to a model (what :func:`apply_masks` returns).

    Used as a context manager, every touched tensor is restored bit for bit on exit (also when
    the block raises), unless ``permanent``. :meth:`reapply` sets the masked entries again (after
    an optimizer step); :meth:`restore` undoes the masks.
    """

    def __init__(self, model: nn.Module, plan: MaskPlan, permanent: bool = False):
        plan.check_model(model)
        self.model, self.plan, self.permanent = model, plan, permanent
        self.masks = _mask_tensors(model, plan)
        self._saved = None if permanent else [t.detach().clone() for t, _, _ in self.masks]
        self.reapply()

    @torch.no_grad()
    def reapply(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Set every masked entry again (0, or 1 for BatchNorm running variances); with an
        ``optimizer``, also zero its state for those entries (Adam moments, momentum buffers)."""
        for t, m, fill in self.masks:
            t.masked_fill_(m, fill)
        if optimizer is None:
            return
        by_id = {id(t): m for t, m, _ in self.masks}
        for group in optimizer.param_groups:
            for p in group["params"]:
                m = by_id.get(id(p))
                if m is None:
                    continue
                for v in optimizer.state.get(p, {}).values():
                    if isinstance(v, Tensor) and v.shape == p.shape:
                        v.masked_fill_(m, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back every tensor the masks touched, bit for bit (not for a permanent masking)."""
        if self._saved is None:
            raise RuntimeError("apply_masks(..., permanent=True) keeps no copy to restore")
        for (t, _, _), saved in zip(self.masks, self._saved):
            t.copy_(saved)

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc):
        if not self.permanent:
            self.restore()
        return False


def apply_masks(model: nn.Module, plan: MaskPlan, *, permanent: bool = False) -> Masking:
    """Zero the plan's channels in ``model`` in place (module docstring: what is zeroed).

    ``with apply_masks(model, plan): ...`` restores every tensor bit for bit on exit, also when the
    block raises; ``apply_masks(model, plan, permanent=True)`` keeps the masks. A plan made for
    another model is a UserInputError naming the first layer that does not match.
    """
    return Masking(model, plan, permanent)


def keep_masked(optimizer: torch.optim.Optimizer, masking, model: Optional[nn.Module] = None):
    """Re-apply a plan's masks after every ``optimizer.step()`` (a step post-hook), so that
    fine-tuning cannot revive a pruned channel: weights, biases, BatchNorm affine parameters and
    running statistics, and the optimizer's state for those entries (Adam moments, momentum
    buffers) are set back. ``masking``: what :func:`apply_masks` returned, or a plan together with
    ``model``. Returns the hook handle (``.remove()`` stops it)."""
    if isinstance(masking, MaskPlan):
        if model is None:
            raise UserInputError("keep_masked: pass the model with a plan (or the Masking that "
                                 "apply_masks returned)")
        masking = Masking(model, masking, permanent=True)
    elif not isinstance(masking, Masking):
        raise UserInputError(f"keep_masked: expected a Masking or a MaskPlan, got {type(masking).__name__}")

    def hook(opt, args, kwargs):
        masking.reapply(opt)

    return optimizer.register_step_post_hook(hook)
