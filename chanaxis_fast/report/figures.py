"""The report's figures (matplotlib, Agg backend): every one with a title, axis labels with units
and a legend where there is more than one series. Each function writes one PNG and returns its
path, or None when there is nothing to draw."""

import math
import os
from typing import Optional

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _grid(n, w=3.2, h=2.8, cols=4):
    plt = _plt()
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def axes_scatter(scores, alignment, path) -> Optional[str]:
    """I_X against I(T;Y) per layer, with the layer's Spearman rho in the title."""
    if "input_capture" not in scores.values or "task_information" not in scores.values:
        return None
    rho = dict(zip(alignment["layer"], alignment["rho"])) if alignment is not None else {}
    fig, axes = _grid(len(scores.layers))
    for ax, layer in zip(axes, scores.layers):
        ax.scatter(scores["input_capture"][layer].numpy(), scores["task_information"][layer].numpy(),
                   s=6, alpha=0.6)
        r = rho.get(layer, float("nan"))
        ax.set_title(f"{layer}\nSpearman rho = {r:.2f}", fontsize=8)
        ax.set_xlabel("I_X, input capture (nats)", fontsize=7)
        ax.set_ylabel("I(T;Y), task information (nats)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("The two axes per layer: local (I_X) against target (I(T;Y))", fontsize=10)
    return _save(fig, path)


def similarity_heatmap(similarity, path) -> Optional[str]:
    """The mean over layers of the direction-aware Spearman matrix between criteria."""
    if similarity is None or len(similarity.metrics) < 2:
        return None
    plt = _plt()
    mat = similarity.mean.to_numpy(dtype=float)
    n = len(mat)
    fig, ax = plt.subplots(figsize=(0.42 * n + 3, 0.42 * n + 2))
    im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
    labels = [m if len(m) <= 22 else m[:20] + ".." for m in similarity.metrics]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, label="Spearman rho (pruning order)")
    ax.set_title("Criteria similarity (mean over layers)", fontsize=10)
    return _save(fig, path)


def hull_histograms(scores, path) -> Optional[str]:
    """Histogram of replaceability-hull sizes per layer (saturated hulls in a second colour)."""
    if "hull_size" not in scores.values:
        return None
    fig, axes = _grid(len(scores.layers))
    sat = scores.values.get("saturated")
    for ax, layer in zip(axes, scores.layers):
        size = scores["hull_size"][layer].numpy()
        bins = np.arange(0, max(2, int(size.max()) + 2)) - 0.5
        if sat is not None:
            s = sat[layer].numpy() > 0
            ax.hist([size[~s], size[s]], bins=bins, stacked=True, label=["complete", "saturated"])
            ax.legend(fontsize=6)
        else:
            ax.hist(size, bins=bins)
        ax.set_title(layer, fontsize=8)
        ax.set_xlabel("hull size |H| (peers)", fontsize=7)
        ax.set_ylabel("channels", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("Replaceability-hull sizes per layer", fontsize=10)
    return _save(fig, path)


def modularity_bars(table, path) -> Optional[str]:
    """Q_R and Q_S per layer (grouped bars)."""
    if table is None or table.empty:
        return None
    plt = _plt()
    n = len(table)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * n + 2), 3.6))
    x = np.arange(n)
    ax.bar(x - 0.2, table["Q_R"], 0.4, label="Q_R (peer-overlap graph)")
    ax.bar(x + 0.2, table["Q_S"], 0.4, label="Q_S (target-excess graph)")
    ax.set_xticks(x, table["layer"], rotation=90, fontsize=7)
    ax.set_ylabel("modularity Q")
    ax.set_title("Modularity of the R- and S-graphs per layer")
    ax.legend(fontsize=7)
    return _save(fig, path)


def auc_bars(table, path) -> Optional[str]:
    """FLOPs-AUC per metric (before and, when fine-tuned, after), random's seed range as an error bar."""
    if table is None or table.empty:
        return None
    plt = _plt()
    stages = [s for s in ("before", "after") if f"auc_{s}" in table]
    n = len(table)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * n + 2), 3.8))
    x = np.arange(n)
    w = 0.8 / len(stages)
    for i, st in enumerate(stages):
        v = table[f"auc_{st}"].to_numpy(float)
        err = np.vstack([v - table[f"auc_{st}_min"].to_numpy(float), table[f"auc_{st}_max"].to_numpy(float) - v])
        ax.bar(x + (i - (len(stages) - 1) / 2) * w, v, w, yerr=err, capsize=2,
               label="no fine-tuning" if st == "before" else "fine-tuned")
    ax.set_xticks(x, table["metric"], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("FLOPs-AUC of accuracy retention")
    lo = float(np.nanmin(table[[f"auc_{s}_min" for s in stages]].to_numpy(float)))
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_title("FLOPs-matched pruning: AUC per criterion (bars: random's seed range)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def lesion_scatter(frame, path) -> Optional[str]:
    """Lesion damage against E_full and hull size, one point per lesioned channel."""
    if frame is None or frame.empty:
        return None
    plt = _plt()
    damage = "loss_damage" if "loss_damage" in frame else next(c for c in frame if "damage" in c)
    cols = [c for c in ("e_full", "hull_size", "compact_hull") if c in frame]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 3.2), squeeze=False)
    for ax, c in zip(axes[0], cols):
        ax.scatter(frame[c], frame[damage], s=10, alpha=0.7)
        ax.set_xlabel(c.replace("_", " "))
        ax.set_ylabel("lesion damage (increase of mean cross-entropy, nats)")
        ax.set_title(f"damage vs {c}", fontsize=9)
    return _save(fig, path)


def tracker_series(frame, path) -> Optional[str]:
    """Each tracked quantity against the training step, one line per layer, the mean in bold."""
    if frame is None or frame.empty:
        return None
    quantities = [c for c in frame.columns if c not in ("step", "layer")]
    fig, axes = _grid(len(quantities), w=3.6, h=2.8, cols=3)
    for ax, q in zip(axes, quantities):
        for layer, d in frame.groupby("layer"):
            ax.plot(d["step"], d[q], lw=0.8, alpha=0.6, label=layer)
        mean = frame.groupby("step")[q].mean()
        ax.plot(mean.index, mean.to_numpy(), lw=2.2, color="black", label="mean")
        ax.set_title(q, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].legend(fontsize=5)
    return _save(fig, path)


def figure_path(folder, name):
    """``folder/figures/name``, the folder created."""
    d = os.path.join(folder, "figures")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, name)
