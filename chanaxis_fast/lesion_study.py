"""The lesion study (METHOD §5): does a channel metric predict the damage that removing the channel
does once its input capture I_X and task information I(T;Y) are accounted for, and can its hull
peers stand in for it?

:func:`lesion_study` bins every studied layer's channels by the terciles (``bins`` quantiles) of
I_X and of I(T;Y), samples up to ``per_bin`` channels of every ``bins x bins`` cell (seeded), and
for each runs :func:`~chanaxis_fast.lesion.lesion` and :func:`~chanaxis_fast.lesion.peer_replacement`
with its hull peers. :class:`LesionStudy` holds one row per channel and relates the damage to
E_full, the hull size and the compact-hull score (:meth:`LesionStudy.summary`).

Cost: two passes of ``evaluate`` per sampled channel (lesion, replacement), less where channels of
a coupled group were sampled in several of its layers (evaluated once); see the cost note of
:mod:`chanaxis_fast.lesion`. Measured on ResNetMini(widths=(8, 16, 16), blocks=1) with 500 MNIST
images of 14 x 14 (one CPU thread): about 0.08 s per channel, two passes of about 0.035 s and
about 0.01 s of planning and hooks.
"""

import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from torch import nn
from tqdm import tqdm

from .calibration import Calibration
from .digest import digest, model_digest
from .errors import UserInputError
from .lesion import (_baseline, _check_calibration, _check_ridge, _damage, _hulls,
                     _masked_evaluation, _plan, _recovered, _replaced_evaluation)
from .runtime import check_writable, sigterm_as_interrupt

_FORMAT, _VERSION = "chanaxis_fast.LesionStudy", 1
METRICS = ("e_full", "hull_size", "compact_hull")  # related to the damage
_AXES = ("input_capture", "task_information")      # the bins, and the partial correlation's controls
_COLUMNS = ("layer", "channel", "group", "ix_bin", "it_bin", "cell", "input_capture",
            "task_information", "e_full", "hull_size", "compact_hull", "loss_damage",
            "accuracy_damage", "replaced_loss_damage", "replaced_accuracy_damage", "recovered",
            "recovered_accuracy", "peers", "unreplaced")


class LesionStudy:
    """The rows of a lesion study and what follows from them.

    ``rows``: one dict per lesioned channel (columns of :meth:`to_pandas`); ``baseline``: the intact
    model's ``{"accuracy", "loss"}``; ``config``: what defines the study (digests of the model,
    scores and calibration, layers, bins, per_bin, seed, hull and ridge parameters, the evaluator,
    the sampled channels), checked when a checkpoint is resumed.
    """

    def __init__(self, rows: List[dict], baseline: dict, config: dict):
        self.rows = list(rows)
        self.baseline = dict(baseline)
        self.config = dict(config)

    @property
    def complete(self) -> bool:
        """Whether every sampled channel has its row (False for a checkpoint of a stopped study)."""
        return len(self.rows) == len(self.config.get("samples", []))

    def to_pandas(self):
        """One row per lesioned channel: ``layer``, ``channel``, ``group`` (the first layer of its
        coupled group), ``ix_bin`` / ``it_bin`` (0 = lowest quantile of I_X / I(T;Y) in the layer),
        ``cell`` (``"ix{a}_it{b}"``), the scores ``input_capture``, ``task_information``,
        ``e_full``, ``hull_size``, ``compact_hull``, the lesion's ``loss_damage`` /
        ``accuracy_damage``, the damage with the peer replacement ``replaced_loss_damage`` /
        ``replaced_accuracy_damage``, ``recovered`` (``1 - replaced / lesion`` loss damage, NaN
        when the lesion does no loss damage) and ``recovered_accuracy``, ``peers`` (the layer's
        peers used) and ``unreplaced`` (group members left lesioned)."""
        import pandas as pd

        return pd.DataFrame([{k: r.get(k) for k in _COLUMNS} for r in self.rows], columns=list(_COLUMNS))

    def summary(self, damage: str = "loss_damage"):
        """Per layer and pooled: how ``damage`` (a numeric column of :meth:`to_pandas`, e.g.
        ``"loss_damage"``, ``"accuracy_damage"``, ``"recovered"``) goes with E_full, hull size and
        the compact-hull score.

        Columns: ``layer`` (``"pooled"`` for all rows), ``metric``, ``n`` (rows with a finite
        value), ``spearman`` / ``spearman_p`` (``scipy.stats.spearmanr``), ``within_bin`` /
        ``within_bin_p`` and ``partial`` / ``partial_p``. All three are rank correlations
        (``scipy.stats.rankdata``, average ranks for ties, over the rows of the scope):

        * ``within_bin``: the correlation left inside the I_X x I(T;Y) cells, pooled over the cells by
          residualising on them: the ranks of damage and metric minus their cell means (cells of
          the pooled scope are per layer), then Pearson. Cells hold a few channels, too few for a
          correlation each, so averaging per-cell correlations would be noise.
        * ``partial``: the Spearman partial correlation controlling for I_X and I(T;Y): the ranks of
          damage and metric are regressed on ``[1, rank I_X, rank I(T;Y)]`` (plus one indicator per
          layer in the pooled scope), and the residuals correlated.

        p-values of the residual correlations use the t distribution with ``n - k - 1`` degrees of
        freedom (k = columns of the nuisance design, its rank). NaN when a side is constant or too
        few rows are left (``within_bin`` is NaN with ``per_bin=1``: nothing varies within a
        cell). A positive value means more damage with a higher value of the metric.
        """
        import pandas as pd
        from scipy import stats

        df = self.to_pandas()
        if damage not in df.columns or damage in ("layer", "group", "cell", "peers", "unreplaced"):
            raise UserInputError(f"LesionStudy.summary: damage must be a numeric column such as "
                                 f"'loss_damage', 'accuracy_damage' or 'recovered', got {damage!r}")
        df = df[np.isfinite(df[damage].astype(float))]
        out = []
        scopes = [(layer, df[df["layer"] == layer], False) for layer in dict.fromkeys(df["layer"])]
        for scope, d, pooled in scopes + [("pooled", df, True)]:
            y = d[damage].to_numpy(float)
            cells = pd.get_dummies(d["layer"] + "/" + d["cell"]).to_numpy(float)
            covs = [stats.rankdata(d[a].to_numpy(float)) for a in _AXES]
            nuisance = np.column_stack(covs + ([pd.get_dummies(d["layer"]).to_numpy(float)] if pooled
                                               else [np.ones(len(d))]))
            for metric in METRICS:
                x = d[metric].to_numpy(float)
                rho, p = _spearman(x, y)
                wb, wb_p = _residual_correlation(x, y, cells)
                pc, pc_p = _residual_correlation(x, y, nuisance)
                out.append(dict(layer=scope, metric=metric, n=len(d), spearman=rho, spearman_p=p,
                                within_bin=wb, within_bin_p=wb_p, partial=pc, partial_p=pc_p))
        return pd.DataFrame(out, columns=["layer", "metric", "n", "spearman", "spearman_p", "within_bin",
                                          "within_bin_p", "partial", "partial_p"])

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """Plain JSON-able dict with a checksum (see :meth:`from_dict`)."""
        d = {"format": _FORMAT, "version": _VERSION, "config": self.config, "baseline": self.baseline,
             "rows": self.rows}
        d["checksum"] = digest(json.dumps(d, sort_keys=True))
        return d

    def to_json(self, path=None) -> str:
        """JSON text (NaN written as ``NaN``); written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, d: dict, who: str = "LesionStudy.from_json") -> "LesionStudy":
        """Rebuild from :meth:`to_dict`; UserInputError for a foreign, other-version or corrupt file."""
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise UserInputError(f"{who}: not a chanaxis_fast lesion study")
        if d.get("version") != _VERSION:
            raise UserInputError(f"{who}: written by lesion study format {d.get('version')}, this is "
                                 f"{_VERSION}")
        body = {k: v for k, v in d.items() if k != "checksum"}
        if d.get("checksum") != digest(json.dumps(body, sort_keys=True)):
            raise UserInputError(f"{who}: checksum mismatch, the lesion study file is corrupt")
        return cls(d["rows"], d["baseline"], d["config"])

    @classmethod
    def from_json(cls, text_or_path) -> "LesionStudy":
        """Read JSON text or a file written by :meth:`to_json`."""
        text = text_or_path
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        try:
            d = json.loads(text)
        except ValueError as e:
            raise UserInputError(f"LesionStudy.from_json: not JSON ({e})") from None
        return cls.from_dict(d)

    def __repr__(self):
        layers = len(dict.fromkeys(r["layer"] for r in self.rows))
        return (f"LesionStudy({len(self.rows)} of {len(self.config.get('samples', []))} channels in "
                f"{layers} layers)")


def _spearman(x, y):
    from scipy import stats

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    r = stats.spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


def _residual_correlation(x, y, design):
    """(r, p): Pearson correlation of the ranks of x and y after removing their least-squares fit
    on ``design`` (the nuisance columns, an intercept among them or spanned by them)."""
    from scipy import stats

    rx, ry = stats.rankdata(x), stats.rankdata(y)
    res = []
    for v in (rx, ry):
        coef = np.linalg.lstsq(design, v, rcond=None)[0]
        res.append(v - design @ coef)
    k = np.linalg.matrix_rank(design)
    df = len(x) - k - 1
    scale = [np.sqrt(np.sum(r * r)) for r in res]
    if df < 1 or min(scale) <= 1e-9 * max(1.0, np.sqrt(np.sum(rx * rx))):
        return math.nan, math.nan
    r = float(np.clip(np.sum(res[0] * res[1]) / (scale[0] * scale[1]), -1.0, 1.0))
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt(df / (1.0 - r * r))
    return r, float(2 * stats.t.sf(abs(t), df))


def _labels(scores, who) -> Dict[str, str]:
    from .analysis._checks import label_of
    from .metrics import Scores

    if not isinstance(scores, Scores):
        raise UserInputError(f"{who}: scores must be a chanaxis_fast.Scores, got {type(scores).__name__}")
    try:
        labels = {name: label_of(scores, name, who) for name in _AXES + METRICS}
    except ValueError as e:
        raise UserInputError(str(e)) from None
    missing = [n for n, l in labels.items() if l is None]
    if missing:
        raise UserInputError(f"{who}: the scores hold no {', '.join(missing)}; score "
                             f"{', '.join(_AXES + METRICS)}")
    return labels


def _check_int(v, name, who, low):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise UserInputError(f"{who}: {name} must be an int >= {low}, got {v!r}")


def _sample(scores, labels, layers, bins, per_bin, seed) -> List[dict]:
    """(layer, channel, ix_bin, it_bin) of the sampled channels, cells in order, channels sorted."""
    import pandas as pd
    from scipy import stats

    rng = np.random.default_rng(seed)
    out = []
    for layer in layers:
        q = {}
        for axis in _AXES:
            v = scores.values[labels[axis]][layer].detach().cpu().double().numpy()
            # ordinal ranks split ties by index, so the quantile bins are equal in size
            q[axis] = pd.qcut(stats.rankdata(v, method="ordinal"), bins, labels=False)
        for a in range(bins):
            for b in range(bins):
                cell = np.flatnonzero((q["input_capture"] == a) & (q["task_information"] == b))
                take = rng.choice(cell, size=min(per_bin, len(cell)), replace=False) if len(cell) else []
                out += [dict(layer=layer, channel=int(c), ix_bin=a, it_bin=b) for c in sorted(take)]
    return out


def lesion_study(model: nn.Module, calibration: Calibration, scores, evaluate: Callable, *,
                 per_bin: int = 3, bins: int = 3, seed: int = 0, layers: Optional[Sequence[str]] = None,
                 ridge: float = 1e-3, max_size: int = 10, eps: float = 0.05, checkpoint=None,
                 progress: bool = True) -> LesionStudy:
    """Lesion and peer-replace channels sampled across the I_X x I(T;Y) plane of every layer.

    Args:
        model: the calibrated, scored network (restored bit for bit after every channel).
        calibration: its :class:`~chanaxis_fast.Calibration` (read-out point and statistics of the
            replacement; its ``model_digest`` must match the model).
        scores: :class:`~chanaxis_fast.Scores` holding ``input_capture``, ``task_information``,
            ``e_full``, ``hull_size`` and ``compact_hull`` (one parameter set each).
        evaluate: ``evaluate(model) -> {"accuracy", "loss", ...}``, e.g.
            :func:`~chanaxis_fast.classifier_evaluator`; called once for the intact model and
            (up to) twice per sampled channel.
        per_bin: channels sampled per cell (all of a cell that holds fewer).
        bins: quantile bins per axis (3: terciles), by rank within the layer.
        seed: seeds the sampling (numpy ``default_rng``).
        layers: the layers to study (default: every calibrated layer the scores hold whose channels
            can be masked; the others are listed in ``config["skipped"]`` with the reason).
        ridge, max_size, eps: the replacement's ridge and hull (module :mod:`chanaxis_fast.lesion`).
        checkpoint: a JSON path; the study is written after every channel (atomically) and a rerun
            with the same path resumes it, ending with the result of an uninterrupted run. A file of
            another study (other model, scores, calibration, settings or evaluator) is refused with
            a UserInputError and left untouched.
        progress: show a tqdm progress bar.

    Returns:
        a :class:`LesionStudy`.
    """
    who = "lesion_study"
    _check_calibration(model, calibration, who)
    labels = _labels(scores, who)
    _check_int(per_bin, "per_bin", who, 1)
    _check_int(bins, "bins", who, 1)
    _check_int(seed, "seed", who, 0)
    _check_ridge(ridge, who)
    if not callable(evaluate):
        raise UserInputError(f"{who}: evaluate must be a callable evaluate(model) -> dict with "
                             f"'accuracy' and 'loss'")
    graph = calibration.graph
    available = [l for l in calibration.layers if l in scores.layers]
    chosen = layers is not None
    layers = available if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    if not layers:
        raise UserInputError(f"{who}: no layer is both calibrated and scored")
    plans, skipped = {}, {}
    for layer in layers:
        if layer not in available:
            raise UserInputError(f"{who}: layer {layer!r} is not both calibrated and scored; such layers: "
                                 f"{', '.join(available) or '(none)'}")
        C = graph.layers[layer].out_channels
        if C < bins:
            raise UserInputError(f"{who}: layer {layer!r} has {C} channels, fewer than bins={bins}")
        try:  # can its channels be masked (not the model's output, not opaque, ...)?
            plans[layer] = _plan(model, graph, layer, [0], who)
        except UserInputError as e:
            if chosen:
                raise
            skipped[layer] = str(e).split(": ", 2)[-1]
    layers = [l for l in layers if l in plans]
    if not layers:
        reasons = "; ".join(f"{l}: {r}" for l, r in skipped.items())
        raise UserInputError(f"{who}: no studied layer can be masked ({reasons})")
    if checkpoint is not None and not os.path.exists(checkpoint):
        check_writable(checkpoint, who)
    samples = _sample(scores, labels, layers, bins, per_bin, seed)
    stats_checksums = {l: s.state_dict()["checksum"] for l, s in calibration.stats.items()}
    config = dict(model_digest=model_digest(model), scores_digest=digest(scores.state_dict()["checksum"]),
                  calibration_digest=digest(stats_checksums),
                  readout=calibration.config.get("readout"), labels=labels, layers=layers, bins=bins,
                  per_bin=per_bin, seed=seed, ridge=ridge, max_size=max_size, eps=eps,
                  evaluate=getattr(evaluate, "config", None), skipped=skipped, samples=samples)

    done, base = {}, None
    if checkpoint is not None and os.path.exists(checkpoint):
        old = LesionStudy.from_json(checkpoint)
        diff = [k for k in config if json.dumps(old.config.get(k)) != json.dumps(config[k])]
        if diff:
            raise UserInputError(f"{who}: checkpoint {os.fspath(checkpoint)!r} belongs to another study "
                                 f"({', '.join(diff)} differ); delete it or pass another checkpoint")
        done = {(r["layer"], r["channel"]): r for r in old.rows}
        base = old.baseline
    if base is None:
        base = _baseline(model, evaluate, None, who)
    hulls = _hulls(calibration, [m for l in layers for m in plans[l].groups[0].members
                                 if m in calibration.stats], max_size, eps, ridge)
    result = LesionStudy([], base, config)
    cache: Dict[tuple, tuple] = {}  # (group, channel) -> (lesion damage, replaced damage, peers, unreplaced)
    for r in done.values():
        cache[(r["group"], r["channel"])] = (
            {"loss_damage": r["loss_damage"], "accuracy_damage": r["accuracy_damage"]},
            {"loss_damage": r["replaced_loss_damage"], "accuracy_damage": r["replaced_accuracy_damage"]},
            r["group_peers"], r["unreplaced"])
    with sigterm_as_interrupt(), tqdm(total=len(samples), disable=not progress, desc="lesion study",
                                      unit="channel") as bar:
        for s in samples:
            layer, channel = s["layer"], s["channel"]
            if (layer, channel) in done:
                result.rows.append(done[(layer, channel)])
                bar.update(1)
                continue
            bar.set_postfix_str(f"{layer} #{channel}", refresh=False)
            plan = _plan(model, graph, layer, [channel], who)
            group = plan.groups[0].members[0]
            if (group, channel) not in cache:
                lesioned = _damage(_masked_evaluation(model, plan, evaluate, who,
                                                      f"the lesion of channel {channel} of {layer!r}"), base)
                ev, used, unreplaced = _replaced_evaluation(model, calibration, graph, plan, layer, channel,
                                                            None, hulls, ridge, evaluate, who)
                cache[(group, channel)] = (lesioned, _damage(ev, base), used, unreplaced)
            lesioned, replaced, used, unreplaced = cache[(group, channel)]
            values = {name: float(scores.values[label][layer][channel]) for name, label in labels.items()}
            row = dict(s, group=group, cell=f"ix{s['ix_bin']}_it{s['it_bin']}", **values,
                       loss_damage=lesioned["loss_damage"], accuracy_damage=lesioned["accuracy_damage"],
                       replaced_loss_damage=replaced["loss_damage"],
                       replaced_accuracy_damage=replaced["accuracy_damage"],
                       recovered=_recovered(replaced["loss_damage"], lesioned["loss_damage"]),
                       recovered_accuracy=_recovered(replaced["accuracy_damage"],
                                                     lesioned["accuracy_damage"]),
                       peers=used.get(layer), unreplaced=unreplaced, group_peers=used)
            result.rows.append(row)
            if checkpoint is not None:
                result.to_json(checkpoint)
            bar.update(1)
    if checkpoint is not None:
        result.to_json(checkpoint)
    return result
