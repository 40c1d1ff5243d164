"""A Markdown report of a scoring run, and a figure of the two axes per layer."""

import math
import os

import numpy as np
from scipy.stats import spearmanr

from .analysis import criteria_similarity


def _spearman(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _fmt(v, digits=3):
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(v)
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(scores, calibration, out_dir, info) -> str:
    """Write ``report.md`` and ``axes.png`` into ``out_dir``; return the Markdown text."""
    has = lambda m: m in scores.values
    rows = []
    ix_all, ti_all = [], []
    for layer in scores.layers:
        C = calibration.graph.layers[layer].out_channels
        row = [layer, C]
        ix = scores["input_capture"][layer].numpy() if has("input_capture") else None
        ti = scores["task_information"][layer].numpy() if has("task_information") else None
        row += [ix.mean() if ix is not None else None, ti.mean() if ti is not None else None]
        row.append(_spearman(ix, ti) if ix is not None and ti is not None else None)
        if ix is not None and ti is not None:
            ix_all.append(ix)
            ti_all.append(ti)
        row.append(scores["e_full"][layer].mean().item() if has("e_full") else None)
        row.append(scores["hull_size"][layer].mean().item() if has("hull_size") else None)
        row.append(100 * scores["saturated"][layer].mean().item() if has("saturated") else None)
        row.append(scores.summaries.get("synergy_ratio", {}).get(layer))
        rows.append(row)
    pooled = _spearman(np.concatenate(ix_all), np.concatenate(ti_all)) if ix_all else float("nan")

    cfg = getattr(calibration, "config", {}) or {}
    parts = [
        f"# chanaxis_fast report: {info.get('model')} on {info.get('data')}",
        "",
        f"{info.get('images')} calibration images, read-out `{info.get('readout')}`, samples "
        f"`{info.get('mode')}` ({cfg.get('positions_per_image', '-')} positions per image), "
        f"seed {info.get('seed')}; {sum(s.count for s in calibration.stats.values())} channel "
        f"samples over {len(calibration.stats)} layers. Calibration {info.get('calibration_s')} s, "
        f"scoring {info.get('scoring_s')} s (CUDA kernels compiled: "
        f"{info.get('build', {}).get('cuda_kernels')}).",
        "",
        "## The two axes per layer",
        "",
        "I_X: input capture (local axis); I(T;Y): task information (target axis), nats; rho: Spearman "
        "correlation of the two over the layer's channels (cross-axis alignment); E_full: variance "
        "explained by all peers; |H|: replaceability-hull size; sat.: saturated hulls; S3/S2: "
        "triplet over pair target-excess.",
        "",
        _table(["layer", "C", "mean I_X", "mean I(T;Y)", "rho(I_X, I(T;Y))", "mean E_full",
                "mean |H|", "sat. %", "S3/S2"], rows),
        "",
    ]
    if ix_all:
        parts += [f"Pooled cross-axis Spearman rho over all {sum(len(a) for a in ix_all)} channels: "
                  f"{_fmt(pooled)}.", ""]
    if len(scores.metrics) > 1:
        sim = criteria_similarity(scores)
        short = [n.split("(")[0] for n in sim.metrics]
        parts += ["## Criteria similarity", "",
                  "Mean over layers of the per-layer Spearman correlation between criteria, each "
                  "ranked in its pruning order (direction-aware: +1 when two criteria would remove "
                  "channels in the same order, -1 in the opposite order).", "",
                  _table([""] + short, [[s] + list(r) for s, r in zip(short, sim.mean.to_numpy())]),
                  ""]
    if scores.skipped:
        parts += ["## Metrics left out", ""]
        parts += [f"- `{m}`: {why}" for m, why in scores.skipped.items()]
        parts.append("")
    text = "\n".join(parts)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    if ix_all:
        _plot_axes(scores, os.path.join(out_dir, "axes.png"))
    return text


def _plot_axes(scores, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = scores.layers
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        ix = scores["input_capture"][layer].numpy()
        ti = scores["task_information"][layer].numpy()
        ax.scatter(ix, ti, s=6, alpha=0.6)
        ax.set_title(f"{layer}  rho={_fmt(_spearman(ix, ti), 2)}", fontsize=8)
        ax.set_xlabel("I_X (input capture)", fontsize=7)
        ax.set_ylabel("I(T;Y) (task information)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
