"""Sweeps of the pruning protocol over metrics and ratios, and the FLOPs-based retention AUC
(METHOD §6).

For every metric and ratio, :func:`sweep` plans (uniform allocation by default: every metric
removes the same FLOPs at a ratio), masks, evaluates, optionally fine-tunes a copy with the masks
kept and evaluates again. ``random`` is a baseline with variance: it runs with several seeds and
its curve and AUC are their mean, with the range. :class:`SweepResult` holds the points and
computes ``AUC = trapz(y, x) / (x_max - x_min)`` with ``x`` the fraction of FLOPs removed and ``y``
the accuracy relative to the dense model (retention) or the raw accuracy.
"""

import copy
import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .digest import digest, model_digest
from .errors import UserInputError
from .prune import apply_masks, plan
from .runtime import sigterm_as_interrupt

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
_FORMAT, _VERSION = "chanaxis_fast.SweepResult", 1
_COLUMNS = ("metric", "seed", "ratio", "flops_removed", "params_removed", "channels_pruned",
            "accuracy_before", "loss_before", "accuracy_after", "loss_after")


def classifier_evaluator(loader, device=None, max_batches: Optional[int] = None) -> Callable:
    """``evaluate(model) -> {"accuracy", "loss", "images"}`` over ``loader`` (see
    :func:`~chanaxis_fast.training.evaluate_classifier`), for :func:`sweep`."""
    from .training import evaluate_classifier

    def evaluate(model):
        return evaluate_classifier(model, loader, device, max_batches=max_batches)

    evaluate.config = {"evaluator": "classifier", "max_batches": max_batches}
    return evaluate


def classifier_finetuner(loader, *, epochs: int = 5, max_batches: Optional[int] = 200,
                         lr: float = 1e-4, device=None, seed: int = 0) -> Callable:
    """``finetune(model, after_step)``: the protocol's fine-tuning (METHOD §6: Adam, lr 1e-4, 5
    epochs of at most 200 batches), for :func:`sweep`, which passes the mask-keeping hook."""
    from .training import finetune_classifier

    def finetune(model, after_step):
        finetune_classifier(model, loader, epochs=epochs, max_batches=max_batches, lr=lr,
                            device=device, after_step=after_step, seed=seed)

    finetune.config = {"finetuner": "classifier", "epochs": epochs, "max_batches": max_batches,
                       "lr": lr, "seed": seed}
    return finetune


class SweepResult:
    """The points of a sweep and what follows from them.

    ``points``: list of dicts with keys metric, seed (random's seed, else None), ratio,
    flops_removed, params_removed, channels_pruned, accuracy_before, loss_before and, with
    fine-tuning, accuracy_after, loss_after. ``dense``: the dense model's evaluation
    (``{"accuracy", "loss", ...}``). ``config``: what defines the sweep (model digest, metrics,
    ratios, allocation, fine-tuning, ...), checked when a checkpoint is resumed.
    """

    def __init__(self, points: List[dict], dense: dict, config: dict):
        self.points = list(points)
        self.dense = dict(dense)
        self.config = dict(config)

    @property
    def metrics(self) -> List[str]:
        """The swept metrics, in sweep order."""
        return list(dict.fromkeys(p["metric"] for p in self.points))

    @property
    def finetuned(self) -> bool:
        """Whether the points were fine-tuned (they have ``accuracy_after``)."""
        return any(p.get("accuracy_after") is not None for p in self.points)

    def to_pandas(self):
        """One row per point, with ``retention_before`` / ``retention_after`` (accuracy over the
        dense accuracy) added."""
        import pandas as pd

        df = pd.DataFrame([{k: p.get(k) for k in _COLUMNS} for p in self.points], columns=list(_COLUMNS))
        acc = self.dense.get("accuracy") or float("nan")
        df["retention_before"] = df["accuracy_before"] / acc
        df["retention_after"] = df["accuracy_after"].astype(float) / acc
        return df

    def curve(self, metric: str, *, stage: str = "before", y: str = "retention"):
        """(x, y, y_min, y_max) numpy arrays for one metric, sorted by x (the fraction of FLOPs
        removed); over random's seeds ``y`` is the mean and y_min / y_max the range."""
        df = self._frame(stage, y)
        d = df[df["metric"] == metric]
        if d.empty:
            raise UserInputError(f"SweepResult: no points for metric {metric!r}; have {', '.join(self.metrics)}")
        g = d.groupby("ratio").agg(x=("flops_removed", "mean"), y=("y", "mean"),
                                   lo=("y", "min"), hi=("y", "max")).sort_values("x")
        return g["x"].to_numpy(), g["y"].to_numpy(), g["lo"].to_numpy(), g["hi"].to_numpy()

    def _frame(self, stage, y):
        if stage not in ("before", "after"):
            raise UserInputError(f"SweepResult: stage must be 'before' or 'after', got {stage!r}")
        if y not in ("retention", "accuracy"):
            raise UserInputError(f"SweepResult: y must be 'retention' or 'accuracy', got {y!r}")
        if stage == "after" and not self.finetuned:
            raise UserInputError("SweepResult: stage='after' needs a sweep with fine-tuning")
        df = self.to_pandas()
        df["y"] = df[f"{y}_{stage}"].astype(float)
        return df

    def auc(self, metric: Optional[str] = None, *, stage: str = "before", y: str = "retention",
            origin: bool = False):
        """The FLOPs-based AUC ``trapz(y, x) / (x_max - x_min)`` (METHOD §6) of one metric (a
        float), or of every metric (a dict). Over random's seeds: the mean of the seeds' AUCs
        (:meth:`auc_table` gives their range). ``origin=True`` prepends the point (0, 1) (or
        (0, dense accuracy) for ``y="accuracy"``)."""
        if metric is None:
            return {m: self.auc(m, stage=stage, y=y, origin=origin) for m in self.metrics}
        return float(np.mean(self._seed_aucs(metric, stage, y, origin)))

    def _seed_aucs(self, metric, stage, y, origin) -> List[float]:
        df = self._frame(stage, y)
        d = df[df["metric"] == metric]
        if d.empty:
            raise UserInputError(f"SweepResult: no points for metric {metric!r}; have {', '.join(self.metrics)}")
        out = []
        for _, s in d.groupby(d["seed"].fillna(-1)):
            s = s.sort_values("flops_removed")
            x, v = s["flops_removed"].to_numpy(float), s["y"].to_numpy(float)
            if origin:
                x = np.concatenate([[0.0], x])
                v = np.concatenate([[1.0 if y == "retention" else self.dense["accuracy"]], v])
            out.append(flops_auc(x, v))
        return out

    def auc_table(self, *, origin: bool = False):
        """One row per metric: AUC of retention before (and after) fine-tuning, the range over
        random's seeds, the rank (1 = best AUC before; after when fine-tuned), and the retention
        at 50 % of the channels (the ratio nearest 0.5)."""
        import pandas as pd

        rows = []
        df = self.to_pandas()
        for m in self.metrics:
            row = {"metric": m}
            for stage in ("before", "after") if self.finetuned else ("before",):
                aucs = self._seed_aucs(m, stage, "retention", origin)
                row[f"auc_{stage}"] = float(np.mean(aucs))
                row[f"auc_{stage}_min"] = float(np.min(aucs))
                row[f"auc_{stage}_max"] = float(np.max(aucs))
            d = df[df["metric"] == m]
            near = d.iloc[(d["ratio"] - 0.5).abs().argsort()]
            r50 = near["ratio"].iloc[0]
            at = d[d["ratio"] == r50]
            row["ratio_near_50"] = float(r50)
            row["retention_50_before"] = float(at["retention_before"].mean())
            if self.finetuned:
                row["retention_50_after"] = float(at["retention_after"].mean())
            row["seeds"] = int(d["seed"].nunique()) if d["seed"].notna().any() else 1
            rows.append(row)
        table = pd.DataFrame(rows)
        key = "auc_after" if self.finetuned else "auc_before"
        table["rank"] = table[key].rank(ascending=False, method="min").astype(int)
        return table.sort_values("rank").reset_index(drop=True)

    def plot(self, path, *, stage: Optional[str] = None, y: str = "retention", title: Optional[str] = None):
        """Retention (or accuracy) against the fraction of FLOPs removed, one curve per metric
        with its AUC in the legend, random's seed range shaded; before and after fine-tuning side
        by side when fine-tuned (or the one ``stage``). Writes a PNG; returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        stages = [stage] if stage else (["before", "after"] if self.finetuned else ["before"])
        fig, axes = plt.subplots(1, len(stages), figsize=(6.4 * len(stages), 4.6), squeeze=False)
        colors = plt.get_cmap("tab20").colors
        for ax, st in zip(axes[0], stages):
            for i, m in enumerate(self.metrics):
                x, v, lo, hi = self.curve(m, stage=st, y=y)
                is_random = m.split("(")[0] == "random"
                line, = ax.plot(100 * x, v, marker="o", ms=3, lw=1.4, ls="--" if is_random else "-",
                                color="black" if is_random else colors[(2 * i) % 20 + (2 * i // 20) % 2],
                                label=f"{m} (AUC {self.auc(m, stage=st, y=y):.3f})")
                if np.any(hi > lo):
                    ax.fill_between(100 * x, lo, hi, color=line.get_color(), alpha=0.15)
            ax.set_xlabel("FLOPs removed (%)")
            ax.set_ylabel("accuracy / dense accuracy" if y == "retention" else "accuracy")
            ax.set_title(f"{'fine-tuned' if st == 'after' else 'no fine-tuning'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """Plain JSON-able dict with a checksum (see :meth:`from_dict`)."""
        d = {"format": _FORMAT, "version": _VERSION, "config": self.config, "dense": self.dense,
             "points": self.points}
        d["checksum"] = digest(json.dumps(d, sort_keys=True, default=str))
        return d

    def to_json(self, path=None) -> str:
        """JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1, default=str)
        if path is not None:
            _atomic_write(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict, who: str = "SweepResult.from_json") -> "SweepResult":
        """Rebuild from :meth:`to_dict`; UserInputError for a foreign, other-version or corrupt file."""
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise UserInputError(f"{who}: not a chanaxis_fast sweep")
        if d.get("version") != _VERSION:
            raise UserInputError(f"{who}: written by sweep format {d.get('version')}, this is {_VERSION}")
        body = {k: v for k, v in d.items() if k != "checksum"}
        if d.get("checksum") != digest(json.dumps(body, sort_keys=True, default=str)):
            raise UserInputError(f"{who}: checksum mismatch, the sweep file is corrupt")
        return cls(d["points"], d["dense"], d["config"])

    @classmethod
    def from_json(cls, text_or_path) -> "SweepResult":
        """Read JSON text or a file written by :meth:`to_json`."""
        text = text_or_path
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        try:
            d = json.loads(text)
        except ValueError as e:
            raise UserInputError(f"SweepResult.from_json: not JSON ({e})") from None
        return cls.from_dict(d)

    def __repr__(self):
        return f"SweepResult({len(self.points)} points, metrics={self.metrics})"


def flops_auc(x, y) -> float:
    """``trapz(y, x) / (x_max - x_min)`` over points sorted by ``x``; a single point gives its y."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    span = x[-1] - x[0]
    if span <= 0:
        return float(np.mean(y))
    return float(np.trapezoid(y, x) / span)


def _atomic_write(path, text: str):
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _check_ratios(ratios) -> List[float]:
    try:
        ratios = [float(r) for r in ratios]
    except (TypeError, ValueError):
        raise UserInputError(f"sweep: ratios must be numbers in (0, 1), got {ratios!r}") from None
    if not ratios:
        raise UserInputError("sweep: ratios is empty")
    bad = [r for r in ratios if not (0 < r < 1)]
    if bad:
        raise UserInputError(f"sweep: ratios must lie in (0, 1), got {bad[0]!r}")
    if len(set(ratios)) != len(ratios):
        raise UserInputError(f"sweep: ratios repeat a value: {ratios}")
    return ratios


def _point_list(metrics: Sequence[str], ratios: Sequence[float], random_seeds: int):
    """(metric label, seed, ratio) of every point; random runs once per seed."""
    from .metrics import parse_metric

    out = []
    for m in metrics:
        seeds = list(range(random_seeds)) if parse_metric(m)[0] == "random" else [None]
        for s in seeds:
            for r in ratios:
                out.append((m, s, r))
    return out


def sweep(model: nn.Module, scores, metrics: Sequence[str], ratios: Sequence[float] = DEFAULT_RATIOS, *,
          evaluate: Callable, finetune: Optional[Callable] = None, allocation: str = "uniform",
          max_ratio: float = 0.95, coupled: str = "group", random_seeds: int = 3,
          checkpoint=None, progress: bool = True, points=None,
          distributed: Optional[bool] = None) -> SweepResult:
    """Plan, mask and evaluate every (metric, ratio); optionally fine-tune and evaluate again.

    Args:
        model: the scored model (masked in place and restored bit for bit after every point
            without fine-tuning; with fine-tuning, one working copy is reset to the dense
            weights before every point).
        scores: :class:`~chanaxis_fast.Scores` of ``model``, holding every metric (``random``
            with a seed other than the scores' is scored here: it needs only the weights).
        metrics: metric labels as in the scores, e.g. ``["l1", "e_full", "random"]``.
        ratios: fractions of channels to remove, in (0, 1), distinct.
        evaluate: ``evaluate(model) -> dict`` with at least ``"accuracy"`` (and ideally
            ``"loss"``), e.g. :func:`classifier_evaluator`.
        finetune: None, or ``finetune(model, after_step)`` that trains ``model`` calling
            ``after_step(optimizer)`` after each step, e.g. :func:`classifier_finetuner`.
        allocation, max_ratio, coupled: as in :func:`~chanaxis_fast.plan`.
        random_seeds: the seeds (0 .. n-1) the ``random`` metric runs with.
        checkpoint: a JSON path saved after every point; a rerun resumes from the finished
            points and ends with the same result. A checkpoint of another sweep (other model,
            metrics, ratios, allocation, fine-tuning, scores) raises UserInputError and is left
            untouched.
        points: evaluate only these indices of the point list; default all.
        distributed: spread the points over the processes of ``torch.distributed`` (point ``i``
            on rank ``i % world``) and gather them, so every rank returns the whole result and
            rank 0 writes ``checkpoint`` (each rank keeps its own ``checkpoint.rank{r}of{w}``
            until the end); None (default): when it is initialised with more than one process.
    """
    from . import distributed as dist_tools
    from .metrics import Scores, parse_metric, score

    if not isinstance(scores, Scores):
        raise UserInputError(f"sweep: scores must be a chanaxis_fast.Scores, got {type(scores).__name__}")
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = list(metrics)
    if not metrics:
        raise UserInputError("sweep: metrics is empty")
    if len(set(metrics)) != len(metrics):
        raise UserInputError(f"sweep: metrics repeat a label: {metrics}")
    for m in metrics:
        if m in scores.summaries:
            raise UserInputError(f"sweep: {m!r} is a layer summary, not a per-channel metric")
        if m not in scores.values and parse_metric(m)[0] != "random":
            raise UserInputError(f"sweep: the scores hold no metric {m!r}; they hold: "
                                 f"{', '.join(scores.values)}")
    ratios = _check_ratios(ratios)
    if isinstance(random_seeds, bool) or not isinstance(random_seeds, int) or random_seeds < 1:
        raise UserInputError(f"sweep: random_seeds must be an int >= 1, got {random_seeds!r}")
    if not callable(evaluate):
        raise UserInputError("sweep: evaluate must be a callable evaluate(model) -> dict with 'accuracy'")
    if finetune is not None and not callable(finetune):
        raise UserInputError("sweep: finetune must be None or a callable finetune(model, after_step)")
    if scores.graph is None:
        raise UserInputError("sweep: these scores carry no model graph (score them with a calibration)")
    all_points = _point_list(metrics, ratios, random_seeds)
    todo_idx = list(range(len(all_points))) if points is None else list(points)
    dist_on = dist_tools.active(distributed)
    rank, world = dist_tools.rank_and_world() if dist_on else (0, 1)
    if dist_on:
        todo_idx = [i for i in todo_idx if i % world == rank]
    final_checkpoint = checkpoint

    config = dict(model_digest=model_digest(model), scores_digest=digest(scores.state_dict()["checksum"]),
                  metrics=metrics, ratios=ratios, allocation=allocation, max_ratio=max_ratio,
                  coupled=coupled, random_seeds=random_seeds,
                  evaluate=getattr(evaluate, "config", None),
                  finetune=None if finetune is None else getattr(finetune, "config", "custom"))
    done: Dict[tuple, dict] = {}
    dense = None
    files = [] if checkpoint is None else [checkpoint] + (
        [f"{os.fspath(checkpoint)}.rank{rank}of{world}"] if dist_on else [])
    for path in [f for f in files if os.path.exists(f)]:
        old = SweepResult.from_json(path)
        diff = [k for k in config if old.config.get(k) != config[k]]
        if diff:
            raise UserInputError(f"sweep: checkpoint {os.fspath(path)!r} belongs to another sweep "
                                 f"({', '.join(diff)} differ); delete it or pass another checkpoint")
        done.update({(p["metric"], p["seed"], p["ratio"]): p for p in old.points})
        dense = old.dense
    if dist_on and checkpoint is not None:
        checkpoint = files[-1]
    if checkpoint is not None and not os.path.exists(checkpoint):
        from .runtime import check_writable

        check_writable(checkpoint, "sweep")

    random_scores = {}

    def scores_for(metric, seed):
        if seed is None:
            return scores, metric
        label = f"random(seed={seed})"
        if label not in random_scores:
            random_scores[label] = score(model, graph=scores.graph, metrics=[label],
                                         layers=scores.layers)
        return random_scores[label], label

    def record(result):
        if checkpoint is not None:
            result.to_json(checkpoint)

    if dense is None:
        dense = _evaluation(evaluate(model), "the dense model")
    result = SweepResult([], dense, config)
    work = None if finetune is None else copy.deepcopy(model)
    dense_state = None if finetune is None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    with sigterm_as_interrupt(), tqdm(total=len(todo_idx), disable=not progress, desc="sweep",
                                      unit="point") as bar:
        for i in todo_idx:
            metric, seed, ratio = all_points[i]
            key = (metric, seed, ratio)
            if key in done:
                result.points.append(done[key])
                bar.update(1)
                continue
            bar.set_postfix_str(f"{metric}{'' if seed is None else f' seed {seed}'} @ {ratio}", refresh=False)
            sc, label = scores_for(metric, seed)
            p = plan(model, sc, label, ratio, allocation=allocation, max_ratio=max_ratio, coupled=coupled)
            point = dict(metric=metric, seed=seed, ratio=ratio, flops_removed=p.flops_removed,
                         params_removed=p.params_removed,
                         channels_pruned=sum(len(g.pruned) * len(g.members) for g in p.groups))
            if finetune is None:
                with apply_masks(model, p):
                    ev = _evaluation(evaluate(model), f"{metric} at {ratio}")
                point.update(accuracy_before=ev["accuracy"], loss_before=ev.get("loss"))
            else:
                work.load_state_dict(dense_state)
                masking = apply_masks(work, p, permanent=True)
                ev = _evaluation(evaluate(work), f"{metric} at {ratio}")
                point.update(accuracy_before=ev["accuracy"], loss_before=ev.get("loss"))
                finetune(work, lambda optimizer: masking.reapply(optimizer))
                masking.reapply()
                ev = _evaluation(evaluate(work), f"{metric} at {ratio} after fine-tuning")
                point.update(accuracy_after=ev["accuracy"], loss_after=ev.get("loss"))
            result.points.append(point)
            done[key] = point
            record(result)
            bar.update(1)
    if finetune is not None:
        del work
    if dist_on:
        record(result)  # this rank's points are safe before the collective gather
        gathered = dist_tools.gather_points([(i, p) for i, p in zip(todo_idx, result.points)])
        result.points = [p for _, p in gathered]
        checkpoint = final_checkpoint if rank == 0 else None
        record(result)
        if final_checkpoint is not None:
            import torch.distributed as dist

            dist.barrier()
            part = f"{os.fspath(final_checkpoint)}.rank{rank}of{world}"
            if os.path.exists(part):
                os.remove(part)
        return result
    record(result)
    return result


def _evaluation(ev, what) -> dict:
    if not isinstance(ev, dict) or "accuracy" not in ev:
        raise UserInputError(f"sweep: evaluate(model) must return a dict with 'accuracy' (evaluating "
                             f"{what} returned {type(ev).__name__}"
                             f"{' with keys ' + ', '.join(map(str, ev)) if isinstance(ev, dict) else ''})")
    acc = float(ev["accuracy"])
    if not math.isfinite(acc):
        raise UserInputError(f"sweep: evaluate returned a non-finite accuracy for {what}")
    return {k: (float(v) if isinstance(v, float) else v) for k, v in ev.items()}
