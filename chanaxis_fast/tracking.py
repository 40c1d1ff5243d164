"""The two axes along training: :class:`AxisTracker` measures a few layers of a network on a fixed
calibration subset at chosen steps or epochs, and :func:`track_training` trains the built-in
default architecture on real data while tracking it.

A plain training loop::

    from torch.utils.data import DataLoader
    from chanaxis_fast import AxisTracker
    from chanaxis_fast.data import load_fashion_mnist, seeded_subset
    from chanaxis_fast.training import train_classifier
    from chanaxis_fast.zoo import ResNetMini

    train = load_fashion_mnist("train")
    calib = DataLoader(seeded_subset(train, 2000, seed=0), batch_size=250)  # fixed, not shuffled
    tracker = AxisTracker(calib, layers="depth_spaced:6", every=1, step_name="epoch")
    model = ResNetMini(in_channels=1, num_classes=10)
    tracker.measure(model, 0)                                 # at initialisation
    for epoch in range(1, 11):
        train_classifier(model, DataLoader(train, batch_size=128, shuffle=True))
        tracker.maybe_measure(model, epoch)                   # every `every`-th epoch
        tracker.save("tracker.pt")                            # atomic; AxisTracker.load continues it
    tracker.to_csv("series.csv")
    tracker.plot("tracking.png")

With PyTorch Lightning: :class:`chanaxis_fast.integrations.lightning.AxisTrackerCallback`.

Each measurement is a :func:`~chanaxis_fast.calibrate` of the chosen layers (no baseline extras
unless a named metric needs one; no gradients; the model in eval mode, so BatchNorm's running
statistics are not updated; every module's mode restored; the global RNG left as it was, so a
training run with a tracker is bit for bit the run without it) followed by :func:`score` and the
analyses, recorded per layer:

==================  ==========================================================================
``cross_axis_rho``  Spearman rho of I_X (input capture) with I(T;Y) over the layer's channels
``hull_size_mean``  mean replaceability-hull size |H|
``saturated_frac``  fraction of channels whose hull saturated
``e_full_mean``     mean E_full (variance of a channel explained by all its peers)
``s3_s2``           mean S3 / mean S2 (the ``synergy_ratio`` summary)
``Q_R``, ``Q_S``,   modularity of the R- and S-graphs and the gap Q_R - Q_S
``modularity_gap``  (:func:`chanaxis_fast.analysis.modularity`, top 10 % of the edges; only with
                    ``modularity=True``)
``<metric label>``  for each metric the user names: its mean over the layer's channels (a
                    per-layer summary metric: its value)
==================  ==========================================================================
"""

import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .digest import data_digest, digest
from .errors import UserInputError
from .stats import StatsFileError, atomic_save, check_header, read_state

_FORMAT, _VERSION = "chanaxis_fast.AxisTracker", 1
_BASE_METRICS = ["input_capture", "task_information", "e_full", "hull_size", "saturated",
                 "synergy_ratio"]
# quantity -> (plot title, y-axis label)
QUANTITIES = {
    "cross_axis_rho": ("Cross-axis alignment", "Spearman ρ(I_X, I(T;Y))"),
    "hull_size_mean": ("Replaceability hulls", "mean hull size |H|"),
    "saturated_frac": ("Saturated hulls", "fraction of channels"),
    "e_full_mean": ("Variance explained by all peers", "mean E_full"),
    "s3_s2": ("Triplet synergy", "mean S3 / mean S2"),
    "Q_R": ("R-graph modularity (peer overlap)", "Q_R"),
    "Q_S": ("S-graph modularity (pair synergy)", "Q_S"),
    "modularity_gap": ("R/S modularity gap", "Q_R − Q_S"),
}
_MODULARITY = ("Q_R", "Q_S", "modularity_gap")
# what a metric's `needs` asks the calibration to gather (calibrate's extras)
_EXTRA_OF_NEED = {"patches": "sfvr", "grads": "taylor", "hrank": "hrank", "chip": "chip"}
_DEPTH_SPACED = re.compile(r"depth_spaced:(\d+)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def depth_spaced(names: Sequence[str], k: int) -> List[str]:
    """``k`` of ``names`` (layers in execution order) evenly spaced in depth: indices
    ``round(linspace(0, n - 1, k))``, so the first and the last layer are in for k >= 2; all of
    them when k >= n."""
    names = list(names)
    if k >= len(names):
        return names
    idx = np.round(np.linspace(0, len(names) - 1, k)).astype(int)
    return [names[i] for i in idx]


def _module_modes(model: nn.Module):
    return {m: m.training for m in model.modules()}


class AxisTracker:
    """The two axes of a few layers, measured on a fixed calibration subset along training.

    Args:
        loader: the calibration data: re-iterable, yielding the same ``(images, labels)`` batches in
            the same order every time (a DataLoader with ``shuffle=False`` over a fixed subset, or
            a list of batches); a shuffling DataLoader is refused.
        layers: ``"depth_spaced:K"`` (default K = 6): K conv layers evenly spaced in depth among the
            model's default layers (``graph.default_layers()``: every Conv2d with >= 4 outputs but
            the output layer); or what :func:`~chanaxis_fast.calibrate` takes: a list of module
            names, a regex matching whole names, or ``callable(name, module) -> bool``. Resolved
            to names at the first measurement and fixed from then on.
        metrics: metric specs whose per-layer mean is recorded too, e.g. ``["l1", "peer_overlap"]``
            (a summary metric such as ``"s3_mean"``: its value). A metric that needs a baseline
            input (``taylor``, ``sfvr``, ``hrank``, ``chip``) makes every measurement gather it.
        every: :meth:`maybe_measure` measures at the steps that are multiples of ``every``.
        modularity: also record Q_R, Q_S and the gap (networkx community detection on the R- and
            S-graphs: the most expensive part of a measurement on wide layers).
        seed: seeds the calibration's sampled positions and the modularity analysis.
        progress: tqdm bars during each calibration.
        positions_per_image, mode, readout: as in :func:`~chanaxis_fast.calibrate`.
        step_name: what a step counts ("step", "epoch", ...), for the tables and the plot.

    Measuring a step that is already recorded is an error unless ``replace=True`` is passed, which
    replaces that step's record.

    Attributes:
        layers: the tracked layer names in execution order (None before the first measurement).
        records: {step: {"values": {layer: {quantity: float}}, "info": {name: float}, "images":
            int, "seconds": {"calibrate", "score", "modularity", "total": float}}}.
        meta: free-form facts about the run, saved with it (plain dicts, lists, strings, numbers).

    Cost: one forward pass over the calibration subset plus the analyses. For ResNetMini 16/32/64
    on 2,000 Fashion-MNIST images (6 layers) about 1 % of a training epoch on a 2-core CPU; the
    forward pass is nearly all of it, the modularity analysis about 0.4 s
    (``benchmarks/bench_tracker.py``).
    """

    def __init__(self, loader, *, layers: Union[str, Sequence[str], Callable] = "depth_spaced:6",
                 metrics: Sequence[str] = (), every: int = 1, modularity: bool = True, seed: int = 0,
                 progress: bool = False, positions_per_image: int = 16, mode: str = "sample",
                 readout: str = "pre_bn", step_name: str = "step"):
        from torch.utils.data import RandomSampler

        from .calibration import MODES, READOUTS
        from .metrics import check_metric, get_metric

        who = "AxisTracker"
        if not isinstance(loader, Iterable):
            raise UserInputError(f"{who}: loader must be an iterable of (images, labels) batches, got "
                                 f"{type(loader).__name__}")
        if isinstance(loader, Iterator):
            raise UserInputError(f"{who}: loader is a one-shot iterator; pass a DataLoader or a list "
                                 f"of batches, which every measurement reads again")
        if isinstance(getattr(loader, "sampler", None), RandomSampler):
            raise UserInputError(f"{who}: loader shuffles; every measurement must read the same images "
                                 f"in the same order (DataLoader(..., shuffle=False) over a fixed subset)")
        if isinstance(layers, str):
            m = _DEPTH_SPACED.fullmatch(layers)
            if layers.startswith("depth_spaced") and (m is None or int(m.group(1)) < 1):
                raise UserInputError(f"{who}: layers={layers!r}: write depth_spaced:K with an int K >= 1")
        elif not callable(layers):
            layers = list(layers)
            if not layers or not all(isinstance(n, str) for n in layers):
                raise UserInputError(f"{who}: layers must be 'depth_spaced:K', a regex, a non-empty "
                                     f"list of module names or a callable, got {layers!r}")
        if isinstance(metrics, str):
            metrics = [metrics]
        labels, extras = [], set()
        for spec in metrics:
            name, _, label = check_metric(spec)
            if label in QUANTITIES:
                raise UserInputError(f"{who}: metric {label!r} has the name of a recorded quantity")
            labels.append(label)
            extras |= {_EXTRA_OF_NEED[n] for n in get_metric(name).needs if n in _EXTRA_OF_NEED}
        if not _is_int(every) or every < 1:
            raise UserInputError(f"{who}: every must be an int >= 1, got {every!r}")
        if not _is_int(seed):
            raise UserInputError(f"{who}: seed must be an int, got {seed!r}")
        if not _is_int(positions_per_image) or positions_per_image < 1:
            raise UserInputError(f"{who}: positions_per_image must be an int >= 1, got {positions_per_image!r}")
        if mode not in MODES:
            raise UserInputError(f"{who}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if readout not in READOUTS:
            raise UserInputError(f"{who}: readout must be one of {', '.join(READOUTS)}, got {readout!r}")
        if not isinstance(step_name, str) or not step_name:
            raise UserInputError(f"{who}: step_name must be a non-empty string, got {step_name!r}")
        self.loader = loader
        self.layer_spec = layers
        self.layers: Optional[List[str]] = list(layers) if isinstance(layers, list) else None
        self.metrics = labels
        self.extras = sorted(extras)
        self.every = every
        self.modularity = bool(modularity)
        self.seed = seed
        self.progress = progress
        self.positions_per_image = positions_per_image
        self.mode = mode
        self.readout = readout
        self.step_name = step_name
        self.data: Optional[dict] = None  # what the calibration data was, from the first measurement
        self.meta: dict = {}  # free-form JSON-like facts about the run (track_training fills it)
        self.records: Dict[int, dict] = {}

    # ------------------------------------------------------------------ measuring
    @property
    def steps(self) -> List[int]:
        """The recorded steps, ascending."""
        return sorted(self.records)

    @property
    def quantities(self) -> List[str]:
        """The recorded quantities, in table order."""
        base = [q for q in QUANTITIES if self.modularity or q not in _MODULARITY]
        return base + list(self.metrics)

    def maybe_measure(self, model: nn.Module, step: int, *, info: Optional[dict] = None,
                      replace: bool = False):
        """:meth:`measure` when ``step`` is a multiple of ``every``; returns its table or None."""
        if not _is_int(step):
            raise UserInputError(f"AxisTracker.maybe_measure: step must be an int, got {step!r}")
        return self.measure(model, step, info=info, replace=replace) if step % self.every == 0 else None

    def measure(self, model: nn.Module, step: int, *, info: Optional[dict] = None,
                replace: bool = False):
        """Calibrate the tracked layers of ``model`` on the loader and record the quantities at ``step``.

        ``info``: {name: number} recorded with the step (e.g. ``{"test_accuracy": 0.91}``), see
        :meth:`steps_to_pandas`. ``replace``: a step already recorded is replaced instead of being
        an error. The model is left exactly as it was (weights, buffers, gradients, every module's
        mode) and so is the global torch RNG.

        Returns:
            pandas DataFrame of this step, one row per layer, one column per quantity.
        """
        who = "AxisTracker.measure"
        if not isinstance(model, nn.Module):
            raise UserInputError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
        if not _is_int(step):
            raise UserInputError(f"{who}: step must be an int, got {step!r}")
        if step in self.records and not replace:
            raise UserInputError(f"{who}: {self.step_name} {step} is already recorded; pass "
                                 f"replace=True to measure it again")
        info = {} if info is None else info
        if not isinstance(info, dict):
            raise UserInputError(f"{who}: info must be a dict {{name: number}}, got {type(info).__name__}")
        for k, v in info.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserInputError(f"{who}: info {k!r}: {v!r} must be a number under a string name")
        modes = _module_modes(model)
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                record = self._measure(model)
        finally:
            for m, t in modes.items():
                m.training = t
        record["step"] = step
        record["info"] = {k: float(v) for k, v in info.items()}
        self.records[step] = record
        return self._frame([step], wide=True).drop(columns="step")

    def _measure(self, model) -> dict:
        from . import calibrate, score
        from .analysis import cross_axis_alignment, hull_statistics, modularity

        t0 = time.perf_counter()
        if self.layers is None:
            self.layers = self._resolve_layers(model)
        cal = calibrate(model, self.loader, layers=self.layers, positions_per_image=self.positions_per_image,
                        mode=self.mode, readout=self.readout, seed=self.seed, progress=self.progress,
                        extras=self.extras or None)
        self._check_data(cal.config)
        t1 = time.perf_counter()
        scores = score(model, cal, _BASE_METRICS + self.metrics)
        rho = cross_axis_alignment(scores, n_boot=0).set_index("layer")["rho"]
        hulls = hull_statistics(scores).set_index("layer")
        values = {layer: {"cross_axis_rho": float(rho[layer]),
                          "hull_size_mean": float(hulls.at[layer, "hull_size_mean"]),
                          "saturated_frac": float(hulls.at[layer, "saturated_frac"]),
                          "e_full_mean": float(hulls.at[layer, "e_full_mean"]),
                          "s3_s2": float(hulls.at[layer, "s3_s2"])} for layer in self.layers}
        for label in self.metrics:
            for layer in self.layers:
                values[layer][label] = (float(scores.summaries[label][layer]) if label in scores.summaries
                                        else float(scores[label][layer].double().mean()))
        t2 = time.perf_counter()
        if self.modularity:
            mod = modularity(cal, seed=self.seed).set_index("layer")
            for layer in self.layers:
                values[layer].update(Q_R=float(mod.at[layer, "Q_R"]), Q_S=float(mod.at[layer, "Q_S"]),
                                     modularity_gap=float(mod.at[layer, "gap"]))
        t3 = time.perf_counter()
        return {"values": values, "images": int(cal.num_images),
                "seconds": {"calibrate": t1 - t0, "score": t2 - t1, "modularity": t3 - t2,
                            "total": t3 - t0}}

    def _resolve_layers(self, model) -> List[str]:
        from .calibration import _unpack, select_layers
        from .graph import trace_model

        spec = self.layer_spec
        try:
            first = next(iter(self.loader))
        except StopIteration:
            raise UserInputError("AxisTracker: the loader yielded no batch") from None
        images = _unpack(first)[0]
        device = next(iter(model.parameters()), images).device
        graph = trace_model(model, images[:2].to(device))
        m = _DEPTH_SPACED.fullmatch(spec) if isinstance(spec, str) else None
        if m is None:
            return select_layers(model, graph, spec, self.readout)
        names = select_layers(model, graph, None, self.readout)  # the default layers, checked
        return depth_spaced(names, int(m.group(1)))

    def _check_data(self, config: dict):
        """The calibration data must stay what the series started with."""
        data = {"dataset_size": config.get("dataset_size"), "data_digest": config.get("data_digest"),
                "first_batch_digest": config.get("first_batch_digest")}
        if self.data is None:
            self.data = data
            return
        diff = [k for k in data if self.data.get(k) is not None and data[k] != self.data[k]]
        if diff:
            raise UserInputError(f"AxisTracker.measure: the calibration data differ from those of the "
                                 f"recorded series ({', '.join(diff)}); a series is measured on one fixed "
                                 f"subset, read in the same order")

    # ------------------------------------------------------------------ tables
    def to_pandas(self, wide: bool = False):
        """The series as a table.

        ``wide=False`` (tidy, the CSV format): one row per (step, layer, quantity), columns
        ``step``, ``layer``, ``quantity``, ``value``. ``wide=True``: one row per (step, layer),
        columns ``step``, ``layer`` and one per quantity. Rows are ordered by step, then by
        depth of the layer, then in :attr:`quantities` order.
        """
        return self._frame(self.steps, wide)

    def _frame(self, steps, wide):
        import pandas as pd

        qs = self.quantities
        rows = []
        for s in steps:
            for layer in self.layers or []:
                vals = self.records[s]["values"][layer]
                if wide:
                    rows.append({"step": s, "layer": layer, **{q: vals.get(q, math.nan) for q in qs}})
                else:
                    rows += [{"step": s, "layer": layer, "quantity": q, "value": vals.get(q, math.nan)}
                             for q in qs]
        cols = ["step", "layer"] + (qs if wide else ["quantity", "value"])
        return pd.DataFrame(rows, columns=cols)

    def steps_to_pandas(self):
        """One row per recorded step: ``step``, ``images`` (calibration images), the seconds the
        measurement took (``seconds_calibrate``, ``seconds_score``, ``seconds_modularity``,
        ``seconds_total``) and the ``info`` numbers passed to :meth:`measure`."""
        import pandas as pd

        rows = []
        for s in self.steps:
            r = self.records[s]
            rows.append({"step": s, "images": r["images"],
                         **{f"seconds_{k}": v for k, v in r["seconds"].items()}, **r["info"]})
        return pd.DataFrame(rows)

    def to_csv(self, path):
        """Write the tidy table (:meth:`to_pandas`) to ``path``; returns the path."""
        self.to_pandas().to_csv(path, index=False)
        return path

    # ------------------------------------------------------------------ plot
    def plot(self, path, quantities: Optional[Sequence[str]] = None):
        """A PNG with one panel per quantity against the step: one thin line per layer (coloured
        by depth), the mean over layers in bold black. Returns the path."""
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        if not self.records:
            raise UserInputError("AxisTracker.plot: nothing is recorded yet")
        qs = list(self.quantities if quantities is None else quantities)
        unknown = [q for q in qs if q not in self.quantities]
        if unknown or not qs:
            raise UserInputError(f"AxisTracker.plot: unknown quantities {unknown}; recorded: "
                                 f"{', '.join(self.quantities)}")
        wide = self.to_pandas(wide=True)
        steps = self.steps
        cols = min(3, len(qs))
        rows = math.ceil(len(qs) / cols)
        fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.9), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        colours = _depth_colours(len(self.layers))
        handles = []
        for ax, q in zip(axes.flat, qs):
            table = wide.pivot(index="step", columns="layer", values=q).reindex(index=steps,
                                                                                 columns=self.layers)
            handles = []
            for layer, colour in zip(self.layers, colours):
                handles += ax.plot(steps, table[layer].to_numpy(), color=colour, lw=1, alpha=0.8,
                                   marker="." if len(steps) < 30 else None, label=layer)
            values = table.to_numpy(dtype=float)
            mean = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in values])
            handles += ax.plot(steps, mean, color="black", lw=2.8, label="mean over layers")
            title, ylabel = QUANTITIES.get(q, (f"Mean {q} per layer", q))
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(self.step_name)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in list(axes.flat)[len(qs):]:
            ax.axis("off")
        fig.legend(handles=handles, loc="outside lower center", ncol=min(7, len(handles)),
                   fontsize=8, title="layer")
        images = self.records[steps[-1]]["images"]
        fig.suptitle(f"The two axes along training ({len(self.layers)} layers, {images} calibration images)")
        fig.savefig(path, dpi=110)
        return path

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict:
        if self.layers is None and callable(self.layer_spec):
            raise UserInputError("AxisTracker: a layers= callable is resolved at the first "
                                 "measurement; save the tracker after measuring")
        spec = self.layer_spec if isinstance(self.layer_spec, (str, list)) else "<callable>"
        return {"layer_spec": spec, "layers": self.layers,
                "metrics": list(self.metrics), "every": self.every, "modularity": self.modularity,
                "seed": self.seed, "positions_per_image": self.positions_per_image, "mode": self.mode,
                "readout": self.readout, "step_name": self.step_name}

    def state_dict(self) -> dict:
        """The configuration (with the resolved layers), the data identity, ``meta`` and every
        record, as plain dicts, lists, strings and numbers, with format, version and a checksum."""
        state = {"format": _FORMAT, "version": _VERSION, "config": self._config(),
                 "data": self.data, "meta": dict(self.meta),
                 "records": [self.records[s] for s in self.steps]}
        state["checksum"] = digest(state)
        return state

    def load_state_dict(self, state: dict, who: str = "AxisTracker.load_state_dict") -> "AxisTracker":
        """Replace the series by a saved one (checked: format, version, checksum, and the same
        configuration as this tracker, its layers resolved or not)."""
        config = _check_state(state, who)
        mine = self._config()
        diff = [k for k in mine if k not in ("layer_spec", "layers") and mine[k] != config.get(k)]
        if self.layers is not None and self.layers != config["layers"]:
            diff.insert(0, "layers")
        elif isinstance(self.layer_spec, str) and self.layer_spec != config["layer_spec"]:
            diff.insert(0, "layer_spec")
        if diff:
            raise UserInputError(f"{who}: the saved series was measured with another configuration ("
                                 + "; ".join(f"{k}: {config[k]!r} there, {mine[k]!r} here" for k in diff)
                                 + ")")
        if config["layers"] is not None:
            self.layers = list(config["layers"])
        if config["layer_spec"] != "<callable>":
            self.layer_spec = config["layer_spec"]
        self.data = state["data"]
        self.meta = dict(state["meta"])
        self.records = {int(r["step"]): r for r in state["records"]}
        return self

    def save(self, path) -> None:
        """Write the tracker atomically (``torch.save`` of :meth:`state_dict`: no code, only data)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path, loader, *, progress: bool = False) -> "AxisTracker":
        """A tracker saved by :meth:`save`, continuing its series on ``loader`` (which must hold
        the same calibration data: checked now where cheap, and at the next measurement).

        A truncated, corrupt or foreign file raises :class:`~chanaxis_fast.stats.StatsFileError`;
        it is read with ``torch.load(weights_only=True)``, so it can carry no code.
        """
        who = f"AxisTracker.load({os.fspath(path)!r})"
        state = read_state(path, who, "tracker")
        config = dict(_check_state(state, who))
        spec = config.pop("layer_spec")
        layers = config.pop("layers")
        tracker = cls(loader, layers=layers if layers is not None else spec, progress=progress,
                      **config).load_state_dict(state, who)
        dataset = getattr(loader, "dataset", None)
        if tracker.data is not None and dataset is not None:
            size, dig = len(dataset), data_digest(dataset)
            if (tracker.data.get("dataset_size") not in (None, size)
                    or tracker.data.get("data_digest") not in (None, dig)):
                raise UserInputError(f"{who}: the loader holds other calibration data than the saved "
                                     f"series ({size} images now, {tracker.data.get('dataset_size')} "
                                     f"there, or other samples)")
        return tracker

    def __repr__(self):
        return (f"AxisTracker({len(self.layers) if self.layers else self.layer_spec!r} layers, "
                f"{len(self.records)} {self.step_name}s recorded, every={self.every}, "
                f"modularity={self.modularity})")


def _check_state(state, who) -> dict:
    check_header(state, _FORMAT, _VERSION, who, "AxisTracker", "measure the series again")
    if state.get("checksum") != digest({k: v for k, v in state.items() if k != "checksum"}):
        raise StatsFileError(f"{who}: checksum mismatch, the tracker file is corrupt")
    missing = [k for k in ("config", "records", "data", "meta") if k not in state]
    if missing:
        raise StatsFileError(f"{who}: incomplete tracker state (no {', '.join(missing)})")
    try:
        config, records = state["config"], state["records"]
        ok = isinstance(config, dict) and isinstance(records, list) and all(
            isinstance(r["values"], dict) and _is_int(r["step"]) for r in records) and all(
            k in config for k in ("layer_spec", "layers", "metrics", "every", "modularity", "seed",
                                  "positions_per_image", "mode", "readout", "step_name"))
    except (KeyError, TypeError) as e:
        raise StatsFileError(f"{who}: incomplete tracker state ({type(e).__name__}: {e})") from None
    if not ok:
        raise StatsFileError(f"{who}: malformed tracker state")
    return config


def _depth_colours(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]


# ============================================================================ training with tracking
def track_training(model: Union[None, str, nn.Module] = None, data: str = "fashion-mnist", *,
                   epochs: int = 3, out="runs/track", seed: int = 0, calibration_images: int = 2000,
                   layers: Union[str, Sequence[str]] = "depth_spaced:6", metrics: Sequence[str] = (),
                   modularity: bool = True, widths=(16, 32, 64), batch_size: int = 128,
                   lr: float = 1e-3, train_images: Optional[int] = None,
                   eval_images: Optional[int] = None, device=None, force: bool = False,
                   progress: bool = True) -> AxisTracker:
    """Train a network from a seeded initialisation on real offline data and track its two axes at
    initialisation (step 0) and after every epoch.

    Args:
        model: None or ``"resnet_mini"``: the built-in default architecture,
            :class:`~chanaxis_fast.zoo.ResNetMini` with ``widths`` (seeded by ``seed``); another
            string: a :func:`~chanaxis_fast.zoo.load_model` spec (seeded alike); or an nn.Module,
            which is trained in place.
        data: a :func:`~chanaxis_fast.data.open_dataset` spec: ``"fashion-mnist"``, ``"mnist"``, ...
            Training uses its train split (shuffled by a generator seeded with ``seed``), the
            calibration subset is ``calibration_images`` training images drawn with ``seed``
            (:func:`~chanaxis_fast.data.seeded_subset`), accuracy is measured on the evaluation split.
        epochs: training epochs (Adam, ``lr``, ``batch_size``); ``train_images`` / ``eval_images``
            limit the images per epoch / the images evaluated (None: all).
        out: the folder that receives ``series.csv`` (the tidy table), ``steps.csv`` (per step:
            test accuracy, training loss, measurement times), ``tracker.pt`` (written after every
            measurement), ``tracking.png`` and ``model.pt`` (the trained state dict). A folder that
            already holds a ``tracker.pt`` is refused unless ``force``.
        layers, metrics, modularity: as in :class:`AxisTracker`.
        device: where training and measuring run (default CPU).

    Returns:
        the :class:`AxisTracker` of the run.
    """
    from torch.utils.data import DataLoader, Subset

    from .data import eval_split, open_dataset, seeded_subset
    from .runs import check_out_dir
    from .training import evaluate_classifier, train_classifier
    from .zoo import ResNetMini, load_model

    who = "track_training"
    for name, v, low in (("epochs", epochs, 1), ("calibration_images", calibration_images, 1),
                         ("batch_size", batch_size, 1)):
        if not _is_int(v) or v < low:
            raise UserInputError(f"{who}: {name} must be an int >= {low}, got {v!r}")
    for name, v in (("train_images", train_images), ("eval_images", eval_images)):
        if v is not None and (not _is_int(v) or v < 1):
            raise UserInputError(f"{who}: {name} must be an int >= 1 or None, got {v!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise UserInputError(f"{who}: lr must be a finite number > 0, got {lr!r}")
    out = check_out_dir(os.fspath(out))
    tracker_path = os.path.join(out, "tracker.pt")
    if os.path.exists(tracker_path) and not force:
        raise UserInputError(f"--out {out} already holds a tracked run (tracker.pt); pass --force to "
                             f"replace it, or choose another --out")
    device = torch.device("cpu" if device is None else device)
    train = open_dataset(data, "train")
    test = open_dataset(data, eval_split(data))
    in_channels = train.dataset[0][0].shape[0]
    if model is None or model == "resnet_mini":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ResNetMini(in_channels, train.num_classes, widths=tuple(widths))
        description = f"ResNetMini{tuple(widths)}, seeded initialisation (seed {seed})"
    elif isinstance(model, str):
        setup = load_model(model, num_classes=train.num_classes, seed=seed)
        net, description = setup.model, setup.description
    elif isinstance(model, nn.Module):
        net, description = model, type(model).__name__
    else:
        raise UserInputError(f"{who}: model must be None, 'resnet_mini', a model spec or an nn.Module, "
                             f"got {type(model).__name__}")
    net = net.to(device)
    calib = seeded_subset(train.dataset, calibration_images, seed)
    calib_loader = DataLoader(calib, batch_size=250, shuffle=False)
    train_set = train.dataset if train_images is None else seeded_subset(train.dataset, train_images, seed + 1)
    test_set = test.dataset if eval_images is None else Subset(test.dataset, range(min(eval_images, len(test.dataset))))
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=500, shuffle=False)
    _preflight(net, calib, train.num_classes, device)

    tracker = AxisTracker(calib_loader, layers=layers, metrics=metrics, modularity=modularity, seed=seed,
                          step_name="epoch")
    tracker.meta = {"model": description, "data": data, "epochs": epochs, "seed": seed, "lr": lr,
                    "batch_size": batch_size, "train_images": len(train_set),
                    "eval_images": len(test_set), "calibration_images": len(calib)}
    os.makedirs(out, exist_ok=True)
    per_epoch = len(train_loader)

    spent = [0.0]  # seconds spent evaluating and measuring, not training

    def measure(epoch):
        t = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # evaluation leaves the training's data order alone
            acc = evaluate_classifier(net, test_loader, device)
        tracker.measure(net, epoch, info={"test_accuracy": acc["accuracy"], "test_loss": acc["loss"]})
        tracker.save(tracker_path)
        spent[0] += time.perf_counter() - t
        if progress:
            rho = tracker.to_pandas(wide=True).query("step == @epoch")["cross_axis_rho"].mean()
            print(f"{who}: epoch {epoch}/{epochs}: test accuracy {acc['accuracy']:.4f}, mean "
                  f"cross-axis rho {rho:.3f}, measured in "
                  f"{tracker.records[epoch]['seconds']['total']:.1f} s", file=sys.stderr, flush=True)

    done = [0]

    def after_step(_opt):  # the end of an epoch is its last step
        done[0] += 1
        if done[0] % per_epoch == 0:
            measure(done[0] // per_epoch)

    measure(0)
    spent[0], t0 = 0.0, time.perf_counter()
    train_classifier(net, train_loader, epochs=epochs, lr=lr, device=device, seed=seed,
                     after_step=after_step, progress=progress)
    tracker.meta["seconds_per_training_epoch"] = (time.perf_counter() - t0 - spent[0]) / epochs
    tracker.save(tracker_path)
    tracker.to_csv(os.path.join(out, "series.csv"))
    tracker.steps_to_pandas().to_csv(os.path.join(out, "steps.csv"), index=False)
    tracker.plot(os.path.join(out, "tracking.png"))
    atomic_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, os.path.join(out, "model.pt"))
    return tracker


def _preflight(model, subset, num_classes, device):
    """The model must take the data's images and give at least ``num_classes`` logits."""
    x = torch.stack([subset[i][0] for i in range(min(2, len(subset)))]).to(device)
    modes = _module_modes(model)
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    except Exception as e:  # the model's own shape errors
        raise UserInputError(f"--model / --data: the model cannot take inputs of shape {list(x.shape)}: "
                             f"{str(e).splitlines()[0][:200]}") from None
    finally:
        for m, t in modes.items():
            m.training = t
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < num_classes:
        raise UserInputError(f"--model: the model must return [N, >= {num_classes}] logits, got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
