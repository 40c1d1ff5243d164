"""Lesions and peer replacement (METHOD §5): what removing a channel costs, and whether its hull
peers can stand in for it.

* :func:`lesion` masks channels exactly as the pruning protocol does (:func:`~chanaxis_fast.prune.
  channel_plan`: the channel of the layer's whole coupled group, conv rows and bias, every
  BatchNorm on it, the consumers' input weights), without fine-tuning, and returns the damage:
  ``loss_damage = loss - loss_intact`` (mean cross-entropy, nats) and ``accuracy_damage =
  accuracy_intact - accuracy`` (positive = worse).
* :func:`pair_lesion` gives the excess damage ``D_ij - max(D_i, D_j)`` of pairs.
* :func:`peer_replacement` inserts, after the lesion, the channel's linear prediction from its
  peers at the calibration's read-out point, and reports the recovered fraction of the damage.
* :func:`lesion_study` samples channels binned by I_X and I(T;Y), lesions and replaces each, and
  relates the damage to E_full, hull size and the compact-hull score (:class:`LesionStudy`).

**Where the replacement goes.** The prediction ``Y^_i`` is inserted by a forward hook at the read-out
point the statistics were taken at: the conv's output ("pre_bn"), its BatchNorm's output
("post_bn") or the activation's output ("post_act"; for an activation module called several times
in a forward, only the call that follows the layer). The hook overwrites the channel's whole value
there, so what lies *upstream* of the point on the channel's path (the conv row, and for
"post_bn" / "post_act" its BatchNorm) cannot change what passes the point: masking it or not gives
the same forward. What lies *downstream* (the BatchNorm for "pre_bn", the consumers' input weights)
must stay intact, or masking would erase the inserted value (a masked BatchNorm maps everything to
0). The replaced network is therefore the lesioned network with the downstream masks lifted: the
group's conv rows are masked (and for "post_bn" / "post_act" the BatchNorms that follow them
directly), the prediction is inserted at the point, and everything after it is intact. For a
network whose channel reaches the rest of the network only through the read-out point (conv,
BatchNorm, activation in a chain), this equals the intact network with the channel's value at the
point replaced by ``Y^_i``; a branch that reads the channel before the point sees the lesion.

In a coupled group (residual additions) a channel is one channel of the network: the lesion removes
it from every member, and the replacement inserts, at the read-out point of every calibrated member,
that member's own prediction (``peers`` for ``layer``, the hulls of the other members); members that
were not calibrated stay lesioned (listed as ``unreplaced``). Members sharing one read-out point
(a shortcut and the conv whose sum the activation reads) are replaced once.

**The prediction.** From the calibration's statistics of the layer at the read-out point (means
``mu``, covariance ``S``, standard deviations ``s``, correlation ``P``), with ``H`` the peers:
``beta = (P_HH + ridge I)^-1 P_Hi`` on the standardised variables (the same ridge on the
correlation scale as E_i(S) and the hulls, METHOD §3), rescaled to ``b_j = beta_j s_i / s_j``
(``b_j = 0`` for a constant peer), and ``Y^_i = mu_i + sum_j b_j (Y_j - mu_j)``. With ``ridge = 0``
this is ``b = S_HH^-1 S_Hi``. No peers (an empty hull) gives ``Y^_i = mu_i``: the channel's mean.

**Cost.** Every lesion and every replacement is one call of ``evaluate`` (one pass over the
evaluation data): ``evaluate`` is an opaque ``evaluate(model) -> dict``, so lesions cannot be
batched into one pass without changing what it measures, and expanding the batch at the lesioned
layer breaks residual shortcuts that carry the unexpanded tensor past it. What is shared: the intact
model is evaluated once, and a lesion (and its replacement) of a coupled group's channel is
evaluated once for all the group's layers.
"""

import math
import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import ops
from .calibration import Calibration
from .digest import model_digest
from .errors import UserInputError
from .graph import ModelGraph
from .prune import MaskPlan, apply_masks, channel_plan
from .stats import correlation_from_covariance


# ====================================================================== shared checks
def _graph_of(graph, who: str) -> ModelGraph:
    g = getattr(graph, "graph", graph)  # a Calibration or Scores carries the model's graph
    if not isinstance(g, ModelGraph):
        raise UserInputError(f"{who}: graph must be the model's ModelGraph (trace_model(model, x), "
                             f"calibration.graph or scores.graph), got {type(graph).__name__}")
    return g


def _evaluation(ev, who: str, what: str) -> Dict[str, float]:
    if not isinstance(ev, dict) or "accuracy" not in ev or "loss" not in ev:
        keys = f" with keys {', '.join(map(str, ev))}" if isinstance(ev, dict) else ""
        raise UserInputError(f"{who}: evaluate(model) must return a dict with 'accuracy' and 'loss' "
                             f"(evaluating {what} returned {type(ev).__name__}{keys})")
    try:
        return {"accuracy": float(ev["accuracy"]), "loss": float(ev["loss"])}
    except (TypeError, ValueError):
        raise UserInputError(f"{who}: evaluate(model) returned a non-numeric accuracy or loss for "
                             f"{what}") from None


def _baseline(model, evaluate, baseline, who: str) -> Dict[str, float]:
    if not callable(evaluate):
        raise UserInputError(f"{who}: evaluate must be a callable evaluate(model) -> dict with "
                             f"'accuracy' and 'loss'")
    if baseline is not None:
        return _evaluation(baseline, who, "the intact model (baseline=)")
    return _evaluation(evaluate(model), who, "the intact model")


def _damage(ev: Dict[str, float], base: Dict[str, float]) -> Dict[str, float]:
    return {"loss_damage": ev["loss"] - base["loss"], "accuracy_damage": base["accuracy"] - ev["accuracy"]}


def _plan(model, graph, layer, channels, who) -> MaskPlan:
    try:
        return channel_plan(model, graph, layer, channels)
    except UserInputError as e:
        raise UserInputError(str(e).replace("channel_plan:", f"{who}:", 1)) from None


def _masked_evaluation(model, plan, evaluate, who, what) -> Dict[str, float]:
    with apply_masks(model, plan):
        return _evaluation(evaluate(model), who, what)


def _channel_list(channels) -> list:
    try:
        return [operator.index(channels)]
    except TypeError:
        return list(channels)


# ====================================================================== lesions
def lesion(model: nn.Module, layer: str, channels, evaluate: Callable, *, graph=None,
           baseline: Optional[dict] = None) -> dict:
    """Zero ``channels`` of ``layer`` (and of every layer coupled with it) without fine-tuning and
    return the damage; the model is restored bit for bit afterwards, also when ``evaluate`` raises.

    Args:
        model: the network (evaluated in place).
        layer: a traced conv/linear layer.
        channels: one channel or a list of channels of ``layer``.
        evaluate: ``evaluate(model) -> {"accuracy", "loss", ...}``, e.g.
            :func:`~chanaxis_fast.classifier_evaluator`.
        graph: the model's graph (``trace_model(model, x)``, or a Calibration / Scores carrying it).
        baseline: ``evaluate(model)`` of the intact model, if already known (saves one pass).

    Returns:
        dict with ``layer``, ``channels``, ``members`` (the masked layers), ``loss`` and ``accuracy``
        of the lesioned model, ``loss_damage = loss - intact loss`` and ``accuracy_damage = intact
        accuracy - accuracy``, and ``baseline_loss`` / ``baseline_accuracy``.
    """
    who = "lesion"
    plan = _plan(model, _graph_of(graph, who), layer, _channel_list(channels), who)
    base = _baseline(model, evaluate, baseline, who)
    ev = _masked_evaluation(model, plan, evaluate, who, f"the lesion of {layer!r}")
    return dict(layer=layer, channels=list(plan.groups[0].pruned), members=list(plan.groups[0].members),
                loss=ev["loss"], accuracy=ev["accuracy"], **_damage(ev, base),
                baseline_loss=base["loss"], baseline_accuracy=base["accuracy"])


def pair_lesion(model: nn.Module, layer: str, pairs: Sequence[Tuple[int, int]], evaluate: Callable, *,
                graph=None, baseline: Optional[dict] = None):
    """Single and pair lesions of ``layer``'s channels and the excess damage of each pair.

    With ``D`` the loss damage of :func:`lesion`, ``excess_loss = D_ij - max(D_i, D_j)`` (positive
    when removing both costs more than removing the worse one alone: the two stood in for each
    other) and ``interaction_loss = D_ij - D_i - D_j`` (0 when the damages add up); the same with
    the accuracy damage. Each single lesion is evaluated once however many pairs hold it.

    Returns:
        pandas DataFrame, one row per pair: ``i``, ``j``, ``loss_damage_i``, ``loss_damage_j``,
        ``loss_damage_ij``, ``excess_loss``, ``interaction_loss``, ``accuracy_damage_i``,
        ``accuracy_damage_j``, ``accuracy_damage_ij``, ``excess_accuracy``,
        ``interaction_accuracy``.
    """
    import pandas as pd

    who = "pair_lesion"
    g = _graph_of(graph, who)
    try:
        pairs = [tuple(operator.index(c) for c in p) for p in pairs]
    except TypeError:
        pairs = None
    if not pairs or any(len(p) != 2 or p[0] == p[1] for p in pairs):
        raise UserInputError(f"{who}: pairs must be a non-empty list of (i, j) with two distinct "
                             f"channels")
    plans = {c: _plan(model, g, layer, [c], who) for p in pairs for c in p}
    base = _baseline(model, evaluate, baseline, who)
    single = {}
    rows = []
    for i, j in pairs:
        for c in (i, j):
            if c not in single:
                single[c] = _damage(_masked_evaluation(model, plans[c], evaluate, who,
                                                       f"the lesion of channel {c} of {layer!r}"), base)
        both = _damage(_masked_evaluation(model, _plan(model, g, layer, [i, j], who), evaluate, who,
                                          f"the lesion of channels {i}, {j} of {layer!r}"), base)
        row = {"i": i, "j": j}
        for kind, short in (("loss_damage", "loss"), ("accuracy_damage", "accuracy")):
            di, dj, dij = single[i][kind], single[j][kind], both[kind]
            row.update({f"{kind}_i": di, f"{kind}_j": dj, f"{kind}_ij": dij,
                        f"excess_{short}": dij - max(di, dj), f"interaction_{short}": dij - di - dj})
        rows.append(row)
    return pd.DataFrame(rows)


# ====================================================================== peer replacement
def _hulls(calibration: Calibration, layers: Sequence[str], max_size: int, eps: float, ridge: float):
    """{layer: Hulls} of the layers' calibration correlations, in one call of the op."""
    layers = list(dict.fromkeys(layers))
    corrs = [correlation_from_covariance(_channel_cov(calibration, l)) for l in layers]
    return dict(zip(layers, ops.peer_hulls(corrs, max_size=max_size, eps=eps, ridge=ridge)))


def _channel_cov(calibration: Calibration, layer: str) -> Tensor:
    C = calibration.graph.layers[layer].out_channels
    return calibration.stats[layer].covariance()[:C, :C]


def predictor(calibration: Calibration, layer: str, channel: int, peers: Sequence[int], *,
              ridge: float = 1e-3) -> Tuple[float, Tensor, Tensor]:
    """``(c, peers, b)`` with ``Y^_i = c + sum_j b_j Y_j`` the linear prediction of ``channel`` from
    ``peers`` at the calibration's read-out point (module docstring: ridge on the correlation scale,
    ``c = mu_i - b . mu_H``); float64 ``b``, int64 ``peers``."""
    cov = _channel_cov(calibration, layer)
    mean = calibration.stats[layer].mean[:cov.shape[0]].double()
    idx = torch.as_tensor(list(peers), dtype=torch.int64, device=cov.device)
    if idx.numel() == 0:
        return float(mean[channel]), idx, torch.zeros(0, dtype=torch.float64, device=cov.device)
    sd = cov.diagonal().clamp_min(0).sqrt()
    P = correlation_from_covariance(cov)
    A = P[idx][:, idx] + ridge * torch.eye(len(idx), dtype=torch.float64, device=cov.device)
    try:
        beta = torch.linalg.solve(A, P[idx, channel])
    except RuntimeError:  # torch.linalg.LinAlgError: collinear peers and ridge = 0
        raise UserInputError(f"peer_replacement: the correlation matrix of the peers {idx.tolist()} of "
                             f"channel {channel} of {layer!r} is singular; pass ridge > 0") from None
    b = torch.where(sd[idx] > 0, beta * sd[channel] / sd[idx].clamp_min(1e-300), torch.zeros_like(beta))
    return float(mean[channel] - b @ mean[idx]), idx, b


def _readout_point(graph: ModelGraph, layer: str, readout: str) -> Tuple[str, int]:
    node = graph.layers[layer]
    return {"pre_bn": (layer, 0), "post_bn": (node.bn, node.bn_call),
            "post_act": (node.act, node.act_call)}[readout]


class _Insertion:
    """Forward hooks overwriting one channel at read-out points (module, call) with its prediction.

    The call counters restart at every forward of the model (a pre-hook on it), so a module called
    several times in a forward (a reused ReLU) is replaced only at the given call. Removes its hooks
    on exit, also on error; :meth:`check` raises when a point was never reached."""

    def __init__(self, model: nn.Module, points: Dict[Tuple[str, int], tuple]):
        self.points = points
        self.calls: Dict[str, int] = {}
        self.reached = set()
        self.handles = []
        modules = dict(model.named_modules())
        by_module: Dict[str, Dict[int, tuple]] = {}
        for (name, call), spec in points.items():
            by_module.setdefault(name, {})[call] = spec
        try:
            self.handles.append(model.register_forward_pre_hook(lambda mod, args: self.calls.clear()))
            for name, calls in by_module.items():
                self.handles.append(modules[name].register_forward_hook(self._hook(name, calls)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, name, calls):
        def hook(mod, args, out):
            k = self.calls.get(name, 0)
            self.calls[name] = k + 1
            spec = calls.get(k)
            if spec is None:
                return None
            self.reached.add((name, k))
            return _insert(out, *spec)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def check(self, who: str):
        missing = [f"{n} (call {k})" for n, k in self.points if (n, k) not in self.reached]
        if missing:
            raise RuntimeError(f"{who}: the read-out point {missing[0]} was never reached while "
                               f"evaluating: the forward took another path than the traced one")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def _insert(out: Tensor, layer: str, cdim: int, C: int, channel: int, const: float, idx: Tensor,
            b: Tensor) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[cdim] != C:
        raise RuntimeError(f"peer_replacement: the read-out of {layer!r} is not a tensor with {C} "
                           f"channels at dim {cdim}")
    x = out.detach().movedim(cdim, -1)
    pred = x.index_select(-1, idx.to(x.device)).double() @ b.to(x.device) + const
    new = out.clone()  # a fresh tensor: an inplace activation's input may be referenced elsewhere
    new.select(cdim, channel).copy_(pred)
    return new


def _replacement(model, calibration, graph, plan, layer, channel, peers, hulls, ridge):
    """(upstream-only plan, insertion points, {member: peers}, unreplaced members)."""
    readout = calibration.config["readout"]
    group = plan.groups[0]
    points, used, unreplaced = {}, {}, []
    for m in [layer] + [m for m in group.members if m != layer]:  # layer first: its point, its peers
        if m not in calibration.stats:
            unreplaced.append(m)
            continue
        point = _readout_point(graph, m, readout)
        if point in points:
            continue
        h = list(peers) if (m == layer and peers is not None) else hulls[m].hull_members[channel]
        h = [int(j) for j in h if int(j) >= 0]
        const, idx, b = predictor(calibration, m, channel, h, ridge=ridge)
        node = graph.layers[m]
        points[point] = (m, node.channel_dim, node.out_channels, channel, const, idx, b)
        used[m] = h
    # the BatchNorms right after the members are upstream of a post_bn / post_act point, and those
    # of unreplaced members stay lesioned; every other mask lies downstream of the insertion
    own = {graph.layers[m].bn for m in group.members if readout != "pre_bn" or m in unreplaced}
    up = MaskPlan.from_dict(dict(plan.to_dict(), groups=[dict(
        members=group.members, size=group.size, pruned=group.pruned,
        bns=[bn for bn in group.bns if bn[0] in own], consumers=[])]))
    return up, points, used, unreplaced


def _replaced_evaluation(model, calibration, graph, plan, layer, channel, peers, hulls, ridge,
                         evaluate, who) -> Tuple[Dict[str, float], Dict[str, List[int]], List[str]]:
    up, points, used, unreplaced = _replacement(model, calibration, graph, plan, layer, channel,
                                                peers, hulls, ridge)
    with apply_masks(model, up), _Insertion(model, points) as ins:
        ev = _evaluation(evaluate(model), who, f"the replacement of channel {channel} of {layer!r}")
        ins.check(who)
    return ev, used, unreplaced


def _recovered(replaced: float, lesioned: float) -> float:
    return 1.0 - replaced / lesioned if lesioned > 0 else math.nan


def _check_calibration(model, calibration, who):
    if not isinstance(calibration, Calibration):
        raise UserInputError(f"{who}: calibration must be a chanaxis_fast.Calibration, got "
                             f"{type(calibration).__name__}")
    expected = calibration.config.get("model_digest")
    if expected is not None and expected != model_digest(model):
        raise UserInputError(f"{who}: the calibration was computed on other weights than this model's "
                             f"(model_digest differs); calibrate this model")


def _check_ridge(ridge, who):
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or \
            not math.isfinite(ridge):
        raise UserInputError(f"{who}: ridge must be a finite number >= 0, got {ridge!r}")


def peer_replacement(model: nn.Module, calibration: Calibration, layer: str, channel: int,
                     evaluate: Callable, peers: Optional[Sequence[int]] = None, *, ridge: float = 1e-3,
                     max_size: int = 10, eps: float = 0.05, baseline: Optional[dict] = None) -> dict:
    """Lesion one channel, then insert its linear prediction from its peers at the calibration's
    read-out point (module docstring: where, how, and for coupled groups), and report how much of
    the damage that recovers. The model is left untouched (weights, buffers, no hook left), also
    when ``evaluate`` raises.

    Args:
        model: the calibrated network (the calibration's ``model_digest`` must match its weights).
        calibration: its :class:`~chanaxis_fast.Calibration`; ``layer`` must be calibrated, at any
            read-out point (``config["readout"]``: "pre_bn", "post_bn" or "post_act").
        layer, channel: the channel to lesion and replace.
        evaluate: ``evaluate(model) -> {"accuracy", "loss", ...}``.
        peers: the channels predicting it; default its greedy hull (``ops.peer_hulls`` on the
            calibration's correlation with ``max_size``, ``eps``, ``ridge``). ``[]``: its mean.
        ridge: lambda of the prediction, on the correlation scale (METHOD §3).
        baseline: ``evaluate(model)`` of the intact model, if already known.

    Returns:
        dict with ``layer``, ``channel``, ``peers`` (per replaced member: the peers used; a
            member sharing its read-out point with ``layer`` or an earlier member is absent),
        ``unreplaced`` (group members left lesioned, not calibrated), ``loss_damage`` /
        ``accuracy_damage`` of the lesion, ``replaced_loss_damage`` / ``replaced_accuracy_damage``
        with the replacement, ``recovered = 1 - replaced_loss_damage / loss_damage`` (NaN unless
        the lesion damage is > 0), ``recovered_accuracy`` likewise, and the baseline.
    """
    who = "peer_replacement"
    _check_calibration(model, calibration, who)
    _check_ridge(ridge, who)
    if layer not in calibration.stats:
        raise UserInputError(f"{who}: layer {layer!r} is not calibrated; calibrated layers: "
                             f"{', '.join(calibration.layers)}")
    graph = calibration.graph
    plan = _plan(model, graph, layer, _channel_list(channel), who)
    if len(plan.groups[0].pruned) != 1:
        raise UserInputError(f"{who}: channel must be one channel, got {channel!r}")
    channel = plan.groups[0].pruned[0]
    C = graph.layers[layer].out_channels
    if peers is not None:
        try:
            peers = [operator.index(j) for j in peers]
        except TypeError:
            raise UserInputError(f"{who}: peers must be a list of channel indices, got {peers!r}") from None
        if any(not 0 <= j < C or j == channel for j in peers) or len(set(peers)) != len(peers):
            raise UserInputError(f"{who}: peers must be distinct channels of {layer!r} in [0, {C}) other "
                                 f"than {channel}, got {peers}")
    members = [m for m in plan.groups[0].members if m in calibration.stats]
    hulls = _hulls(calibration, members, max_size, eps, ridge)
    base = _baseline(model, evaluate, baseline, who)
    lesioned = _damage(_masked_evaluation(model, plan, evaluate, who,
                                          f"the lesion of channel {channel} of {layer!r}"), base)
    ev, used, unreplaced = _replaced_evaluation(model, calibration, graph, plan, layer, channel, peers,
                                                hulls, ridge, evaluate, who)
    replaced = _damage(ev, base)
    return dict(layer=layer, channel=channel, peers=used, unreplaced=unreplaced, **lesioned,
                replaced_loss_damage=replaced["loss_damage"],
                replaced_accuracy_damage=replaced["accuracy_damage"],
                recovered=_recovered(replaced["loss_damage"], lesioned["loss_damage"]),
                recovered_accuracy=_recovered(replaced["accuracy_damage"], lesioned["accuracy_damage"]),
                baseline_loss=base["loss"], baseline_accuracy=base["accuracy"])
