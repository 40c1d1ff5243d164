"""The metric registry, the context metrics read from, the Scores container, and score().

A metric is a function ``fn(ctx, layer, **params) -> Tensor[C]`` (one score per output channel of
``layer``; higher = keep) registered under a name::

    @chanaxis_fast.register_metric("my_metric", needs=("stats",))
    def my_metric(ctx, layer, scale=1.0):
        return scale * ctx.stats(layer).covariance().diagonal()[: ctx.num_channels(layer)]

A *summary* metric returns one float per layer instead (e.g. the S3/S2 ratio). Metric specs are
strings with optional parameters, ``"magnitude(p=1, normalizer='lamp')"``; a spec's label (its
column in the results) is the string itself, normalised.
"""

import ast
import dataclasses
import inspect
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..digest import digest, model_digest
from ..errors import UserInputError
from ..graph import ModelGraph


class MissingInputError(UserInputError):
    """A metric needs something the calibration did not gather (e.g. taylor without gradients)."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Parameter checks for register_metric(checks=...): (what the value must be, predicate).
INT_AT_LEAST_1 = ("an int >= 1", lambda v: _is_int(v) and v >= 1)
NUMBER = ("a finite number", _is_number)
NONNEGATIVE = ("a finite number >= 0", lambda v: _is_number(v) and v >= 0)
POSITIVE = ("a finite number > 0", lambda v: _is_number(v) and v > 0)
UNIT_INTERVAL = ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
INT = ("an int", _is_int)
INT_OR_NONE = ("an int or None", lambda v: v is None or _is_int(v))


def one_of(*choices):
    """A parameter check: the value must be one of ``choices``."""
    return ("one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices)


@dataclasses.dataclass
class MetricSpec:
    """A registered metric, as :func:`get_metric` returns it.

    Fields: ``name``; ``fn(ctx, layer, **params)``, the function; ``needs``, what the calibration
    must hold ("stats", "target", "patches", "grads", "hrank", "chip") or the model ("bn");
    ``kind``: "local", "target", "composite", "baseline" or "custom"; ``summary``: True when the
    metric gives one float per layer instead of one score per channel; ``direction``: +1 when a
    higher value means keep, -1 when it means removable; ``doc``: the first paragraph of the
    function's docstring, on one line (its formula), as ``chanaxis-fast metrics`` prints it;
    ``params``: the parameters after ``(ctx, layer)`` and their defaults; ``checks``: the
    constraints :func:`check_metric` applies to them (``{param: (description, predicate)}``).
    """

    name: str
    fn: Callable
    needs: Tuple[str, ...]   # what the calibration must hold: "stats", "target", "patches", "grads", "hrank", "chip", "bn"
    kind: str                # "local", "target", "composite", "baseline" or "custom"
    summary: bool            # one float per layer instead of one score per channel
    direction: int           # +1: a higher value means keep; -1: a higher value means removable
    doc: str
    params: Dict[str, object] = dataclasses.field(default_factory=dict)  # parameter -> default
    checks: Dict[str, Tuple[str, Callable]] = dataclasses.field(default_factory=dict)


_REGISTRY: Dict[str, MetricSpec] = {}


def register_metric(name: str, *, needs: Sequence[str] = (), kind: str = "custom",
                    summary: bool = False, direction: int = 1, replace: bool = False,
                    checks: Optional[Dict[str, Tuple[str, Callable]]] = None):
    """Decorator registering ``fn(ctx, layer, **params)`` as metric ``name``.

    ``direction`` says how the values rank channels for pruning: +1 (default) when a higher value
    means "keep", -1 when a higher value means "removable" (e.g. peer overlap). Scores report the
    raw values either way; the pruning protocol uses ``direction * value``.

    The keyword parameters of ``fn`` after ``(ctx, layer)`` are the metric's parameters; a spec
    that names another parameter, or gives a value of another type than the default's (int, float,
    bool, str), is refused by :func:`check_metric` before any work. ``checks`` adds constraints:
    ``{param: (description, predicate)}``, e.g. ``{"max_size": INT_AT_LEAST_1}``.
    """
    if not name.isidentifier():
        raise ValueError(f"register_metric: name must be an identifier, got {name!r}")
    if direction not in (1, -1):
        raise ValueError(f"register_metric: direction must be +1 or -1, got {direction!r}")

    def deco(fn):
        if name in _REGISTRY and not replace:
            raise ValueError(f"register_metric: a metric named {name!r} exists already "
                             f"(pass replace=True to override it)")
        summary_line = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        params = {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[2:]
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = set(checks or {}) - set(params)
        if unknown:
            raise ValueError(f"register_metric({name!r}): checks for parameters the function does "
                             f"not take: {sorted(unknown)}")
        _REGISTRY[name] = MetricSpec(name, fn, tuple(needs), kind, summary, direction, summary_line,
                                     params, dict(checks or {}))
        return fn

    return deco


def available_metrics(kind: Optional[str] = None) -> List[str]:
    """Names of the registered metrics (of one kind, if given), sorted."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def get_metric(name: str) -> MetricSpec:
    """The :class:`MetricSpec` registered as ``name`` (a bare name: parameters go in the spec
    strings that :func:`score` takes, see :func:`parse_metric`); UserInputError (a ValueError)
    listing the registered names when there is none, e.g.
    ``get_metric("peer_overlap").direction == -1``."""
    if name not in _REGISTRY:
        raise UserInputError(f"unknown metric {name!r}; available: {', '.join(available_metrics())}")
    return _REGISTRY[name]


def _type_ok(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return _is_int(value)
    if isinstance(default, float):
        return _is_number(value)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def check_metric(spec: str) -> Tuple[str, dict, str]:
    """Parse a metric spec and check it against the metric's signature and constraints.

    Returns ``(name, params, label)`` as :func:`parse_metric`; raises :class:`UserInputError` for an
    unknown metric, an unknown parameter (listing the ones it takes), or an invalid value.
    """
    name, params, label = parse_metric(spec)
    m = get_metric(name)
    for k, v in params.items():
        if k not in m.params:
            takes = ", ".join(f"{p}={d!r}" for p, d in m.params.items()) or "no parameters"
            raise UserInputError(f"metric {label!r}: unknown parameter {k!r}; {name} takes {takes}")
        default = m.params[k]
        if k in m.checks:  # the check defines the type too (p=2 by default, p=1.5 allowed)
            what, ok = m.checks[k]
        else:
            what = f"of type {type(default).__name__} like its default {default!r}"
            ok = lambda v, d=default: _type_ok(v, d)  # noqa: E731
        if not ok(v):
            raise UserInputError(f"metric {label!r}: {k} must be {what}, got {v!r}")
    return name, params, label


def parse_metric(spec: str) -> Tuple[str, dict, str]:
    """``"name(a=1, b='x')"`` -> (name, {"a": 1, "b": "x"}, canonical label)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"metric spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    try:
        call = ast.parse(spec, mode="eval").body
    except SyntaxError:
        raise UserInputError(f"cannot parse metric spec {spec!r}; write name or name(key=value, ...)") from None
    if isinstance(call, ast.Name):
        return call.id, {}, call.id
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args):
        raise UserInputError(f"cannot parse metric spec {spec!r}; write name or name(key=value, ...)")
    if any(k.arg is None for k in call.keywords):
        raise UserInputError(f"metric spec {spec!r}: write parameters as key=value")
    try:
        params = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except ValueError:
        raise UserInputError(f"metric spec {spec!r}: parameter values must be literals") from None
    label = call.func.id + "(" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"
    return call.func.id, params, label


class MetricContext:
    """What a metric may read: the model, the traced graph, the calibration, shared caches.

    Built by :func:`score`; tests of weight-only metrics may build one without a calibration.
    """

    def __init__(self, model: nn.Module, graph: ModelGraph, calibration=None, options=None):
        self.model = model
        self.graph = graph
        self.calibration = calibration
        self.options = dict(options or {})
        self.cache: Dict[object, object] = {}
        self._modules = dict(model.named_modules()) if model is not None else None

    def module(self, name: str) -> nn.Module:
        """The model's submodule ``name`` (as in ``model.named_modules()``); KeyError if absent,
        MissingInputError when scoring without a model."""
        if self._modules is None:
            raise MissingInputError(f"this metric reads the weights of {name!r}; pass the model to "
                                    f"score() (it was called with model=None)")
        if name not in self._modules:
            raise KeyError(f"the model has no module named {name!r}")
        return self._modules[name]

    def weight(self, layer: str) -> Tensor:
        """The layer's weight, detached, float64, on the CPU: [C_out, C_in/groups, kh, kw] or [C_out, C_in]."""
        return self.module(layer).weight.detach().to("cpu", torch.float64)

    def num_channels(self, layer: str) -> int:
        """C, the number of output channels of ``layer``."""
        return self.graph.layers[layer].out_channels

    def bn(self, layer: str, metric: str = "") -> nn.Module:
        """The BatchNorm after ``layer``, or MissingInputError."""
        name = self.graph.layers[layer].bn
        if name is None:
            raise MissingInputError(f"metric {metric!r}: layer {layer!r} has no BatchNorm after it")
        return self.module(name)

    def _need_calibration(self, metric, what):
        if self.calibration is None:
            raise MissingInputError(f"metric {metric!r} needs {what} from a calibration; "
                                    f"call chanaxis_fast.calibrate(model, loader) first")
        return self.calibration

    def stats(self, layer: str, metric: str = ""):
        """The layer's ChannelStats (rows [Y_1..Y_C, T] at the calibration's read-out point)."""
        cal = self._need_calibration(metric, "channel statistics")
        if layer not in cal.stats:
            raise MissingInputError(f"metric {metric!r}: the calibration has no statistics for layer "
                                    f"{layer!r}; calibrated layers: {', '.join(cal.stats)}")
        return cal.stats[layer]

    def metric(self, spec: str, layer: str) -> Tensor:
        """Scores of another registered metric for ``layer`` (cached), e.g. inside a composite."""
        name, params, label = check_metric(spec)
        return self.cached(("metric", label, layer), lambda: _run(self, get_metric(name), params, label, layer))

    def cached(self, key, compute: Callable):
        """compute() once per context for ``key``: shared intermediate results between metrics."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


class Scores:
    """Per-layer, per-metric channel scores (and per-layer summaries) from :func:`score`.

    ``scores["l1"]`` -> {layer: Tensor[C]}; ``scores.layer(name)`` -> {metric: Tensor[C]};
    ``scores.summaries`` -> {metric: {layer: float}}; ``scores.skipped`` -> {metric: reason}.
    """

    def __init__(self, layers: List[str], values: Dict[str, Dict[str, Tensor]],
                 summaries: Dict[str, Dict[str, float]], skipped: Optional[Dict[str, str]] = None,
                 provenance: Optional[dict] = None, graph: Optional[ModelGraph] = None):
        self.layers = list(layers)
        self.values = values
        self.summaries = summaries
        self.skipped = dict(skipped or {})  # metric -> why it was left out (score(missing="skip"))
        # what the scores were computed from: model_digest (of the scored model),
        # calibration_digest (the calibration's model_digest), other_weights (they differ and
        # score(..., allow_other_weights=True) accepted it)
        self.provenance = dict(provenance or {})
        self.graph = graph  # the model's traced graph (what the pruning protocol plans on)

    @property
    def metrics(self) -> List[str]:
        """Labels of the per-channel metrics held (layer summaries are in ``summaries``)."""
        return list(self.values)

    def __getitem__(self, metric: str) -> Dict[str, Tensor]:
        if metric not in self.values:
            raise KeyError(f"no per-channel scores for {metric!r}; have: {', '.join(self.values)}")
        return self.values[metric]

    def __contains__(self, metric: str) -> bool:
        return metric in self.values or metric in self.summaries

    def layer(self, name: str) -> Dict[str, Tensor]:
        """{metric label: Tensor[C]} of one layer."""
        return {m: v[name] for m, v in self.values.items() if name in v}

    def to_pandas(self):
        """Long table: one row per (layer, channel), one column per metric."""
        import pandas as pd

        frames = []
        for layer in self.layers:
            cols = self.layer(layer)
            if not cols:
                continue
            C = len(next(iter(cols.values())))
            data = {"layer": [layer] * C, "channel": list(range(C))}
            data.update({m: v.detach().cpu().double().numpy() for m, v in cols.items()})
            frames.append(pd.DataFrame(data))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["layer", "channel"])

    def summaries_to_pandas(self):
        """One row per layer, one column per summary metric."""
        import pandas as pd

        return pd.DataFrame({m: pd.Series(v) for m, v in self.summaries.items()}).reindex(self.layers)

    def to_csv(self, path, **kwargs):
        """Write :meth:`to_pandas` to ``path``; returns the path."""
        self.to_pandas().to_csv(path, index=False, **kwargs)
        return path

    # ------------------------------------------------------------------ persistence
    _FORMAT, _VERSION = "chanaxis_fast.Scores", 1

    def state_dict(self) -> dict:
        """Plain tensors, dicts, lists and strings (loadable with ``weights_only=True``)."""
        state = {"format": self._FORMAT, "version": self._VERSION, "layers": list(self.layers),
                 "values": {m: {l: v.detach().cpu().double() for l, v in per.items()}
                            for m, per in self.values.items()},
                 "summaries": {m: {l: float(v) for l, v in per.items()} for m, per in self.summaries.items()},
                 "skipped": dict(self.skipped), "provenance": dict(self.provenance),
                 "graph": None if self.graph is None else self.graph.state_dict()}
        state["checksum"] = digest(state)
        return state

    @classmethod
    def from_state_dict(cls, state: dict, who: str = "Scores.from_state_dict") -> "Scores":
        """Rebuild scores saved by :meth:`state_dict`; a foreign, corrupt or incomplete state raises
        :class:`~chanaxis_fast.stats.StatsFileError`."""
        from ..stats import StatsFileError, check_header

        check_header(state, cls._FORMAT, cls._VERSION, who, "Scores", "score again")
        if state.get("checksum") != digest({k: v for k, v in state.items() if k != "checksum"}):
            raise StatsFileError(f"{who}: checksum mismatch, the scores are corrupt")
        try:
            graph = None if state.get("graph") is None else ModelGraph.from_state_dict(state["graph"])
            return cls(state["layers"], state["values"], state["summaries"], state["skipped"],
                       state["provenance"], graph)
        except KeyError as e:
            raise StatsFileError(f"{who}: incomplete scores state (no {e})") from None

    def save(self, path) -> None:
        """Write atomically (``torch.save`` of :meth:`state_dict`)."""
        from ..stats import atomic_save

        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path) -> "Scores":
        """Read a file written by :meth:`save` (checked: format, version, checksum)."""
        import os

        from ..stats import read_state

        who = f"Scores.load({os.fspath(path)!r})"
        return cls.from_state_dict(read_state(path, who, "scores"), who)

    def __repr__(self):
        return f"Scores({len(self.layers)} layers, metrics={self.metrics + list(self.summaries)})"


def score(model: nn.Module, calibration=None, metrics: Union[str, Sequence[str]] = ("l1",), *,
          layers: Optional[Sequence[str]] = None, graph: Optional[ModelGraph] = None,
          missing: str = "raise", allow_other_weights: bool = False, progress: bool = False,
          **options) -> Scores:
    """Score every channel of the calibrated layers with each metric.

    Args:
        model: the model the calibration was computed on (weights are read from it), or None
            for metrics that read only the calibration's statistics (the others are then missing
            inputs, see ``missing``).
        calibration: a :class:`~chanaxis_fast.Calibration` (needed by every data-based metric).
        metrics: metric specs, e.g. ``["l1", "magnitude(p=2, normalizer='lamp')", "two_axis(alpha=1, beta=0.5)"]``.
        layers: a subset of layers (default: the calibration's layers, or the graph's default layers).
        graph: the model's :class:`~chanaxis_fast.graph.ModelGraph` when there is no calibration.
        missing: "raise" (default): a metric whose inputs are missing (MissingInputError, e.g.
            bn_scale on a layer without BatchNorm) is an error; "skip": the metric is left out and
            the reason recorded in ``Scores.skipped``.
        allow_other_weights: the model must be the one the calibration was computed on (same
            ``model_digest``); True accepts other weights of the same architecture (e.g. to
            score a fine-tuned copy with the dense model's statistics) and records it in
            ``Scores.provenance["other_weights"]``. Other channel counts are always an error.
        progress: a tqdm progress bar over (metric, layer) steps.
        **options: options shared by the metrics (e.g. ``ridge=1e-3``, ``seed=0``).

    Every metric spec is checked (:func:`check_metric`), and the model against the calibration,
    before any metric runs; problems raise :class:`~chanaxis_fast.errors.UserInputError`.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    if missing not in ("raise", "skip"):
        raise UserInputError(f"score: missing must be 'raise' or 'skip', got {missing!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise UserInputError(f"score: model must be an nn.Module or None, got {type(model).__name__}")
    if graph is None:
        if calibration is None:
            raise UserInputError("score: pass a calibration, or a graph (chanaxis_fast.trace_model) "
                                 "for weight-only metrics")
        graph = calibration.graph
    if layers is None:
        layers = list(calibration.layers) if calibration is not None else graph.default_layers()
    for name in layers:
        if name not in graph.layers:
            raise UserInputError(f"score: unknown layer {name!r}; layers: {', '.join(graph.layers)}")
    parsed = [check_metric(m) for m in metrics]  # every spec is checked before any work
    provenance = ({} if model is None else
                  _check_model(model, graph, calibration, layers, allow_other_weights))
    ctx = MetricContext(model, graph, calibration, options)
    values: Dict[str, Dict[str, Tensor]] = {}
    summaries: Dict[str, Dict[str, float]] = {}
    skipped: Dict[str, str] = {}
    from tqdm import tqdm

    bar = tqdm(total=len(parsed) * len(layers), disable=not progress, unit="layer", desc="score")
    for name, params, label in parsed:
        spec = get_metric(name)
        per_layer = {}
        bar.set_postfix_str(label, refresh=False)
        try:
            for layer in layers:
                per_layer[layer] = ctx.cached(("metric", label, layer),
                                              lambda: _run(ctx, spec, params, label, layer))
                bar.update(1)
        except MissingInputError as e:
            if missing == "raise":
                raise
            skipped[label] = str(e)
            continue
        (summaries if spec.summary else values)[label] = per_layer
    bar.close()
    return Scores(layers, values, summaries, skipped, provenance, graph)


def _check_model(model: nn.Module, graph: ModelGraph, calibration, layers, allow_other_weights
                 ) -> dict:
    """The model must have the graph's layers with the graph's channel counts, and (with a
    calibration) the calibration's weights unless ``allow_other_weights``."""
    modules = dict(model.named_modules())
    for name in layers:
        node = graph.layers[name]
        mod = modules.get(name)
        if mod is None:
            raise UserInputError(f"score: the model has no layer {name!r}, which the "
                                 f"{'calibration' if calibration is not None else 'graph'} holds")
        weight = getattr(mod, "weight", None)
        out = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() >= 1 else None
        inp = getattr(mod, "in_channels", getattr(mod, "in_features", None))
        if (out, inp) != (node.out_channels, node.in_channels):
            raise UserInputError(
                f"score: layer {name!r} of the model has {out} output / {inp} input channels, the "
                f"{'calibration' if calibration is not None else 'graph'} was made on "
                f"{node.out_channels} / {node.in_channels}: another architecture")
        if calibration is not None and name in calibration.stats:
            C = calibration.stats[name].num_channels
            if C is not None and C != node.out_channels:
                raise UserInputError(f"score: the calibration's statistics of {name!r} hold {C} "
                                     f"channels, the layer has {node.out_channels}")
    if calibration is None or not getattr(calibration, "config", {}).get("model_digest"):
        return {}
    ours, theirs = model_digest(model), calibration.config["model_digest"]
    if ours != theirs and not allow_other_weights:
        raise UserInputError(
            "score: the model's weights differ from those the calibration was computed on "
            f"(model_digest {ours[:12]}... here, {theirs[:12]}... in the calibration); pass "
            "allow_other_weights=True to score these weights with that calibration")
    return {"model_digest": ours, "calibration_digest": theirs, "other_weights": ours != theirs}


def _run(ctx: MetricContext, spec: MetricSpec, params: dict, label: str, layer: str):
    """One metric on one layer, its result checked: a float (summary) or float64 [C] on the CPU."""
    result = spec.fn(ctx, layer, **params)
    if spec.summary:
        return float(result)
    result = torch.as_tensor(result).detach().to("cpu", torch.float64).reshape(-1)
    C = ctx.graph.layers[layer].out_channels
    if result.numel() != C:
        raise RuntimeError(f"metric {label!r} returned {result.numel()} scores for layer "
                           f"{layer!r}, which has {C} channels")
    return result + 0.0  # -0.0 (e.g. -1/2 log1p(-0) of a dead channel) becomes 0.0


def minmax(a: Tensor) -> Tensor:
    """Per-layer min-max normalisation of METHOD §3: (a - min) / (max - min), 0 if the range < 1e-8."""
    lo, hi = a.min(), a.max()
    rng = float(hi - lo)
    return torch.zeros_like(a) if not math.isfinite(rng) or rng < 1e-8 else (a - lo) / rng
