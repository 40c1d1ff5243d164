"""The report of a run folder: ``index.html`` (opens from disk, no server), ``report.md`` for
terminals, every figure as a PNG in ``figures/`` and every table as CSV and JSON in ``tables/``.

:func:`write_report` reads what the folder holds (``run.json``, ``calibration.pt``,
``scores.pt``, ``sweep.json``, ``lesion.json``, ``track/tracker.json``) or takes the objects
directly, runs the analyses (:mod:`chanaxis_fast.analysis`) and writes the sections it has data
for: the FLOPs-matched pruning headline (AUC per criterion before and after fine-tuning, rank,
retention at 50 %), the two axes per layer, criteria similarity, hulls, modularity, the weight
distribution check, lesions and the training series.
"""

import html
import json
import math
import os
from typing import List, Optional

from . import figures

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}details{margin:.6em 0}summary{cursor:pointer}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.note{color:#555;font-size:.9em}
code{background:#f5f5f5;padding:0 .2em}
"""


def _fmt(v, digits=3):
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int) or (hasattr(v, "is_integer") and isinstance(v, float) and v.is_integer()
                              and abs(v) < 1e6 and digits == 0):
        return str(int(v))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.{digits}g}" if abs(f) < 1e5 else f"{f:.3e}"


class _Page:
    """Collects sections for the HTML page and the Markdown text at once."""

    def __init__(self, folder: str):
        self.folder = folder
        self.html: List[str] = []
        self.md: List[str] = []
        self.files: List[str] = []

    def heading(self, text):
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md += [f"## {text}", ""]

    def para(self, text, note=False):
        self.html.append(f"<p{' class=note' if note else ''}>{html.escape(text)}</p>")
        self.md += [text, ""]

    def table(self, df, name, caption=None, columns=None, folded=False):
        """Show ``df`` (in a folded ``<details>`` block when ``folded``) and save it as
        tables/name.csv and .json."""
        d = os.path.join(self.folder, "tables")
        os.makedirs(d, exist_ok=True)
        df.to_csv(os.path.join(d, f"{name}.csv"), index=False)
        df.to_json(os.path.join(d, f"{name}.json"), orient="records", indent=1)
        self.files += [f"tables/{name}.csv", f"tables/{name}.json"]
        show = df[columns] if columns else df
        cells = "".join(f"<th>{html.escape(str(c))}</th>" for c in show.columns)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
                       for r in show.itertuples(index=False))
        links = (f' <span class=note>(<a href="tables/{name}.csv">CSV</a>, '
                 f'<a href="tables/{name}.json">JSON</a>)</span>')
        table = f"<table><tr>{cells}</tr>{rows}</table>"
        if folded:
            self.html.append(f"<details><summary>{html.escape(caption or name)}{links}</summary>{table}</details>")
        else:
            if caption:
                self.html.append(f"<p>{html.escape(caption)}{links}</p>")
            self.html.append(table)
        if caption:
            self.md += [caption, ""]
        self.md.append("| " + " | ".join(str(c) for c in show.columns) + " |")
        self.md.append("|" + "|".join("---" for _ in show.columns) + "|")
        self.md += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in show.itertuples(index=False)]
        self.md += ["", f"(tables/{name}.csv)", ""]

    def figure(self, path, alt):
        if path is None:
            return
        rel = os.path.relpath(path, self.folder)
        self.files.append(rel)
        self.html.append(f'<img src="{html.escape(rel)}" alt="{html.escape(alt)}">')
        self.md += [f"![{alt}]({rel})", ""]

    def write(self, title, intro):
        body = "\n".join(self.html)
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
                f"<p>{html.escape(intro)}</p>{body}</body></html>")
        with open(os.path.join(self.folder, "index.html"), "w") as f:
            f.write(page)
        text = "\n".join([f"# {title}", "", intro, ""] + self.md)
        with open(os.path.join(self.folder, "report.md"), "w") as f:
            f.write(text)
        return text


def _load(folder, name, loader):
    path = os.path.join(folder, name)
    return loader(path) if os.path.exists(path) else None


def write_report(run_dir, *, model=None, calibration=None, scores=None, sweep=None, lesion=None,
                 tracker=None, modularity_method: str = "auto", modularity_top: float = 0.10,
                 max_modularity_channels: int = 512, greedy_max_channels: int = 256,
                 skip=()) -> str:
    """Write the report of ``run_dir`` (module docstring) and return the Markdown text.

    Objects not given are read from the folder when present. ``model`` (the scored model) enables
    the weight-distribution check. Modularity uses networkx's ``greedy`` (Clauset-Newman-Moore)
    or ``louvain`` communities on layers of at most ``max_modularity_channels`` channels; ``auto``:
    greedy up to ``greedy_max_channels`` channels (its cost grows fast), Louvain above (the table's
    ``method`` column says which). ``skip``: sections left out, any of "modularity", "cwda"
    (the costly analyses on large models).
    """
    skip = set(skip)
    unknown = skip - {"modularity", "cwda"}
    if unknown:
        from ..errors import UserInputError

        raise UserInputError(f"write_report: skip takes 'modularity' and 'cwda', got {sorted(unknown)}")
    from ..analysis import (criteria_similarity, cross_axis_alignment, hull_statistics, modularity,
                            weight_distribution)
    from ..calibration import Calibration
    from ..metrics import Scores
    from ..sweep import SweepResult

    folder = os.path.abspath(run_dir)
    os.makedirs(folder, exist_ok=True)
    run = _load(folder, "run.json", lambda p: json.load(open(p))) or {}
    steps = run.get("steps", {})
    calibration = calibration or _load(folder, "calibration.pt", Calibration.load)
    scores = scores or _load(folder, "scores.pt", Scores.load)
    sweep = sweep or _load(folder, "sweep.json", SweepResult.from_json)
    if lesion is None and os.path.exists(os.path.join(folder, "lesion.json")):
        from ..lesion_study import LesionStudy

        lesion = LesionStudy.from_json(os.path.join(folder, "lesion.json"))
    tracker_frame = None
    if tracker is not None:
        tracker_frame = tracker.to_pandas()
    elif os.path.exists(os.path.join(folder, "track", "series.csv")):
        import pandas as pd

        tracker_frame = pd.read_csv(os.path.join(folder, "track", "series.csv"))
    page = _Page(folder)
    fig = lambda name: figures.figure_path(folder, name)  # noqa: E731

    cal_args = steps.get("calibrate", {}).get("args", {})
    cal_step = steps.get("calibrate", {})
    title = f"chanaxis_fast report: {cal_args.get('model', 'model')} on {cal_args.get('data', 'data')}"
    parts = []
    if calibration is not None:
        cfg = calibration.config
        parts.append(f"{calibration.num_images} calibration images, read-out {cfg.get('readout')}, "
                     f"samples {cfg.get('mode')} ({cfg.get('positions_per_image')} positions per image), "
                     f"seed {cfg.get('seed')}, {len(calibration.layers)} layers.")
    if cal_step.get("model_description"):
        parts.append(f"Model: {cal_step['model_description']}.")
    if cal_step.get("seconds") is not None:
        parts.append(f"Calibration {cal_step['seconds']} s, scoring "
                     f"{steps.get('score', {}).get('seconds', '–')} s, sweep "
                     f"{steps.get('sweep', {}).get('seconds', '–')} s.")
    intro = " ".join(parts) or "A chanaxis_fast run."

    # ------------------------------------------------------------- the protocol's headline
    if sweep is not None:
        page.heading("FLOPs-matched pruning")
        table = sweep.auc_table()
        ev = sweep.dense
        page.para(f"Every criterion removes the same channels per layer at each ratio (uniform "
                  f"allocation), so the same FLOPs: only the choice of channels differs. Accuracy is "
                  f"measured on {ev.get('images', 'the')} evaluation images (dense accuracy "
                  f"{100 * ev['accuracy']:.2f} %); retention = accuracy / dense accuracy; AUC = "
                  f"trapz(retention, FLOPs removed) / (x_max - x_min). random: mean of "
                  f"{sweep.config.get('random_seeds', 1)} seeds, min-max in the range columns.")
        cols = [c for c in ("rank", "metric", "auc_before", "auc_before_min", "auc_before_max",
                            "auc_after", "auc_after_min", "auc_after_max", "retention_50_before",
                            "retention_50_after") if c in table]
        page.table(table, "headline", "AUC per criterion (higher = keeps more accuracy):", cols)
        page.table(sweep.to_pandas(), "sweep_points", "Every point of the sweep",
                   ["metric", "seed", "ratio", "flops_removed", "accuracy_before"]
                   + (["accuracy_after"] if sweep.finetuned else []), folded=True)
        page.figure(sweep.plot(fig("retention.png")), "accuracy retention against the fraction of FLOPs removed")
        page.figure(figures.auc_bars(table, fig("auc.png")), "FLOPs-AUC per criterion")

    # ------------------------------------------------------------- the two axes
    if scores is not None:
        page.heading("The two axes per layer")
        alignment = None
        if "input_capture" in scores.values and "task_information" in scores.values:
            alignment = cross_axis_alignment(scores)
            page.table(alignment, "alignment",
                       "Cross-axis alignment: Spearman rho of input capture I_X with task information "
                       "I(T;Y) per layer and pooled, with 95 % bootstrap intervals:")
        page.figure(figures.axes_scatter(scores, alignment, fig("axes.png")), "I_X against I(T;Y) per layer")
        if len(scores.values) > 1:
            page.heading("Criteria similarity")
            sim = criteria_similarity(scores)
            mean = sim.mean.reset_index().rename(columns={"index": "metric"})
            os.makedirs(os.path.join(folder, "tables"), exist_ok=True)
            mean.to_csv(os.path.join(folder, "tables", "similarity.csv"), index=False)
            page.files.append("tables/similarity.csv")
            page.para("Mean over layers of the per-layer Spearman correlation between criteria, each "
                      "taken in its pruning order (+1: the two remove channels in the same order).")
            page.figure(figures.similarity_heatmap(sim, fig("similarity.png")), "criteria similarity heatmap")
        if {"hull_size", "saturated"} <= set(scores.values):
            page.heading("Replaceability hulls")
            page.table(hull_statistics(scores), "hull_statistics",
                       "Hull sizes, saturated fraction, E_full quantiles and S3/S2 per layer:")
            page.figure(figures.hull_histograms(scores, fig("hull_sizes.png")), "hull-size histograms")
        if scores.skipped:
            page.heading("Metrics left out")
            for m, why in scores.skipped.items():
                page.para(f"{m}: {why}", note=True)
    if calibration is not None and "modularity" not in skip:
        small = [l for l in calibration.layers
                 if calibration.stats[l].num_channels <= max_modularity_channels]
        if small:
            import pandas as pd

            page.heading("Modularity")
            parts_by_method = {}
            for l in small:
                method = modularity_method if modularity_method != "auto" else (
                    "greedy" if calibration.stats[l].num_channels <= greedy_max_channels else "louvain")
                parts_by_method.setdefault(method, []).append(l)
            table = pd.concat([modularity(calibration, ls, top=modularity_top, method=m).assign(method=m)
                               for m, ls in parts_by_method.items()])
            table = table.set_index("layer").loc[small].reset_index()
            page.table(table, "modularity",
                       f"Communities of the R-graph (weights R_X) and the "
                       f"S-graph (weights S2), top {100 * modularity_top:.0f} % of the positive edges; "
                       f"gap = Q_R - Q_S; ari: agreement of the two partitions:",
                       [c for c in ("layer", "channels", "method", "Q_R", "Q_S", "gap", "communities_R",
                                    "communities_S", "ari") if c in table])
            page.figure(figures.modularity_bars(table, fig("modularity.png")), "modularity per layer")
    if model is not None and scores is not None and "cwda" not in skip:
        page.heading("Weight distribution (CWDA check)")
        page.table(weight_distribution(model, scores.layers), "weight_distribution",
                   "Whether the filters look like i.i.d. Gaussians (Shapiro W, normal fraction, "
                   "mean/std, block contrast of the filter Gram matrix):")

    # ------------------------------------------------------------- lesions, training
    if lesion is not None:
        page.heading("Lesions and peer replacement")
        page.table(lesion.summary(), "lesion_summary",
                   "Spearman of lesion damage with the hull statistics, within input-capture x "
                   "task-information bins, and partial correlations controlling for both:")
        frame = lesion.to_pandas()
        page.table(frame, "lesions", "Every lesioned channel", folded=True)
        page.figure(figures.lesion_scatter(frame, fig("lesion.png")), "lesion damage against hull statistics")
    if tracker_frame is not None:
        page.heading("The two axes along training")
        page.table(tracker_frame, "tracking", "Per layer and step", folded=True)
        page.figure(figures.tracker_series(tracker_frame, fig("tracking.png")), "tracked quantities against step")
    text = page.write(title, intro)
    return text
