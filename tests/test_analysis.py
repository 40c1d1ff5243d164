"""The analyses of METHOD §5 against scipy, scikit-learn, numpy and hand computations, on planted
structure and on a small BatchNorm CNN trained on MNIST."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.metrics import adjusted_rand_score
from torch import nn

import chanaxis_fast as cf
from chanaxis_fast import ChannelStats, Scores
from chanaxis_fast.data import load_mnist
from calib_nets import one_thread  # noqa: F401  (autouse: tiny tensors, one thread)
from test_pipeline import BNNet


def _scores(per_metric, summaries=None):
    """Scores from {metric: {layer: array}} (every metric over the same layers)."""
    layers = list(next(iter(per_metric.values())))
    values = {m: {l: torch.as_tensor(v, dtype=torch.float64) for l, v in d.items()}
              for m, d in per_metric.items()}
    return Scores(layers, values, summaries or {})


def _correlated(rng, n, rho):
    x = rng.standard_normal(n)
    return x, rho * x + math.sqrt(1 - rho * rho) * rng.standard_normal(n)


# ----------------------------------------------------------------------------- cross-axis alignment
def test_cross_axis_alignment_matches_scipy_and_its_interval_shrinks_with_more_channels():
    rng = np.random.default_rng(1)
    halves = [_correlated(rng, 60, 0.9), _correlated(rng, 60, -0.9)]  # resampling must mix both
    data = {"small": _correlated(rng, 30, 0.5), "large": _correlated(rng, 600, 0.5),
            "mid": _correlated(rng, 100, -0.3),
            "mixed": tuple(np.concatenate([h[k] for h in halves]) for k in (0, 1))}
    scores = _scores({"input_capture": {l: x for l, (x, _) in data.items()},
                      "task_information": {l: y for l, (_, y) in data.items()}})
    df = cf.cross_axis_alignment(scores, seed=3)
    assert list(df.columns) == ["layer", "channels", "rho", "p_value", "ci_low", "ci_high"]
    assert list(df["layer"]) == ["small", "large", "mid", "mixed", "pooled"]
    for layer, (x, y) in data.items():
        row = df.set_index("layer").loc[layer]
        ref = stats.spearmanr(x, y)
        assert row["channels"] == len(x)
        assert row["rho"] == pytest.approx(ref.statistic, abs=1e-12)
        assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert row["ci_low"] < row["rho"] < row["ci_high"]
    # scipy's own percentile bootstrap of one layer gives the same interval, up to resampling noise
    x, y = data["mixed"]
    boot = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True,
                           vectorized=False, n_resamples=1000, method="percentile",
                           rng=np.random.default_rng(0)).confidence_interval
    assert df.loc[3, "ci_low"] == pytest.approx(boot.low, abs=0.04)
    assert df.loc[3, "ci_high"] == pytest.approx(boot.high, abs=0.04)
    width = (df["ci_high"] - df["ci_low"]).to_numpy()
    assert width[1] < width[2] < width[0]  # 600 < 100 < 30 channels
    pooled = df.iloc[-1]
    xs = np.concatenate([x for x, _ in data.values()])
    ys = np.concatenate([y for _, y in data.values()])
    assert pooled["channels"] == len(xs)
    assert pooled["rho"] == pytest.approx(stats.spearmanr(xs, ys).statistic, abs=1e-12)
    assert pooled["ci_low"] < pooled["rho"] < pooled["ci_high"]
    seeded = [cf.cross_axis_alignment(scores, n_boot=100, seed=s) for s in (3, 3, 4)]
    assert seeded[0].equals(seeded[1]) and not seeded[0].equals(seeded[2])


def test_cross_axis_alignment_degenerate_layers_and_errors():
    scores = _scores({"input_capture": {"const": [1.0, 1.0, 1.0, 1.0], "two": [1.0, 2.0]},
                      "task_information": {"const": [1.0, 2.0, 3.0, 4.0], "two": [2.0, 1.0]}},
                     summaries={"synergy_ratio": {"const": 0.1, "two": 0.2}})
    df = cf.cross_axis_alignment(scores, n_boot=50)
    assert df.iloc[:2][["rho", "p_value", "ci_low", "ci_high"]].isna().all().all()
    assert cf.cross_axis_alignment(scores, n_boot=0)[["ci_low", "ci_high"]].isna().all().all()
    with pytest.raises(ValueError, match="cross_axis_alignment: unknown metric x='nope'; the scores "
                                         "hold: input_capture, task_information"):
        cf.cross_axis_alignment(scores, x="nope")
    with pytest.raises(ValueError, match="y='synergy_ratio' is a per-layer summary"):
        cf.cross_axis_alignment(scores, y="synergy_ratio")
    with pytest.raises(ValueError, match="n_boot must be an int >= 0"):
        cf.cross_axis_alignment(scores, n_boot=-1)
    with pytest.raises(ValueError, match="ci must be in"):
        cf.cross_axis_alignment(scores, ci=1.5)
    with pytest.raises(TypeError, match="scores must be a chanaxis_fast.Scores"):
        cf.cross_axis_alignment({"input_capture": {}})


# ----------------------------------------------------------------------------- criteria similarity
@pytest.fixture(scope="module")
def twin_metrics():
    """Two custom metrics whose values are never computed here, only their registered directions."""
    @cf.register_metric("test_analysis_keep", replace=True)
    def keep(ctx, layer):
        """Registered with direction +1."""

    @cf.register_metric("test_analysis_removable", direction=-1, replace=True)
    def removable(ctx, layer):
        """Registered with direction -1."""


def test_criteria_similarity_is_direction_aware(twin_metrics):
    rng = np.random.default_rng(2)
    layers = {"a": 12, "b": 30}
    e = {l: rng.random(C) for l, C in layers.items()}
    other = {l: rng.random(C) for l, C in layers.items()}
    scores = _scores({
        "e_full": e,                                     # direction -1
        "test_analysis_keep": e,                         # same values, direction +1: opposite order
        "test_analysis_removable": {l: -v for l, v in e.items()},  # negated, same direction: opposite
        "magnitude(p=1)": other,                         # a label with parameters: direction +1
        "compact_hull(max_size=5)": {l: 0 * v for l, v in e.items()},  # constant
    })
    sim = cf.criteria_similarity(scores)
    names = list(scores.metrics)
    assert sim.metrics == names and list(sim.mean.index) == names
    for layer in layers:
        m = sim.per_layer[layer]
        assert m.loc["e_full", "e_full"] == pytest.approx(1)
        assert m.loc["e_full", "test_analysis_keep"] == pytest.approx(-1)
        assert m.loc["e_full", "test_analysis_removable"] == pytest.approx(-1)
        assert m.loc["test_analysis_keep", "test_analysis_removable"] == pytest.approx(1)
        # e_full removes high values first, magnitude low ones: the sign flips against scipy's raw rho
        raw = stats.spearmanr(e[layer], other[layer]).statistic
        assert m.loc["e_full", "magnitude(p=1)"] == pytest.approx(-raw, abs=1e-12)
        assert m.loc["magnitude(p=1)", "e_full"] == pytest.approx(-raw, abs=1e-12)
        assert m.loc["compact_hull(max_size=5)"].isna().all()
    mean = np.mean([-stats.spearmanr(e[l], other[l]).statistic for l in layers])
    assert sim.mean.loc["e_full", "magnitude(p=1)"] == pytest.approx(mean, abs=1e-12)
    assert np.isnan(sim.mean.loc["compact_hull(max_size=5)", "e_full"])
    sub = cf.criteria_similarity(scores, ["magnitude(p=1)", "e_full"])
    assert sub.metrics == ["magnitude(p=1)", "e_full"]
    assert sub.mean.iloc[0, 1] == pytest.approx(mean, abs=1e-12)
    with pytest.raises(ValueError, match=r"unknown metric metrics='l3'; the scores hold: e_full, "):
        cf.criteria_similarity(scores, ["e_full", "l3"])
    with pytest.raises(ValueError, match="lists 'e_full' more than once"):
        cf.criteria_similarity(scores, ["e_full", "e_full"])
    with pytest.raises(TypeError, match="metrics must be a list of metric labels, got the string"):
        cf.criteria_similarity(scores, "e_full")
    with pytest.raises(ValueError, match="no metrics to compare"):
        cf.criteria_similarity(scores, [])


# ----------------------------------------------------------------------------- pruned-set overlap
def test_pruned_set_overlap_jaccard():
    a = {"l1": torch.tensor([0, 1, 2, 3]), "l2": [0, 1], "l3": []}
    b = {"l1": [2, 3, 4], "l2": np.array([1, 0]), "l3": []}
    df = cf.pruned_set_overlap(a, b).set_index("layer")
    assert list(df.columns) == ["size_a", "size_b", "intersection", "union", "jaccard"]
    assert df.loc["l1", "jaccard"] == pytest.approx(2 / 5)  # {2, 3} of {0, 1, 2, 3, 4}
    assert df.loc["l2", "jaccard"] == 1.0
    assert df.loc["l3", "jaccard"] == 1.0  # two empty sets are identical
    assert df.loc["pooled", "jaccard"] == pytest.approx((2 + 2) / (5 + 2))
    assert list(df.loc["pooled", ["size_a", "size_b"]]) == [6, 5]
    assert (cf.pruned_set_overlap(a, a)["jaccard"] == 1).all()
    disjoint = cf.pruned_set_overlap({"l": [0, 1]}, {"l": torch.tensor([2, 3, 4])})
    assert (disjoint["jaccard"] == 0).all()
    with pytest.raises(ValueError, match="same layers; only in sets_a: .'l3'., only in sets_b: .."):
        cf.pruned_set_overlap(a, {"l1": [], "l2": []})
    with pytest.raises(ValueError, match=r"sets_b\['l'\] must be a 1-D integer tensor"):
        cf.pruned_set_overlap({"l": [0]}, {"l": torch.tensor([0.0])})
    with pytest.raises(ValueError, match=r"sets_a\['l'\] must hold channel indices .* got -1"):
        cf.pruned_set_overlap({"l": [-1]}, {"l": [0]})
    with pytest.raises(TypeError, match="sets_a must be a mapping"):
        cf.pruned_set_overlap([[0]], {"l": [0]})


def test_pruned_overlap_ranks_by_direction_times_value(twin_metrics):
    v = {"a": [0.5, 0.1, 0.9, 0.3, 0.7], "b": [3.0, 1.0, 2.0, 4.0]}
    scores = _scores({"test_analysis_keep": v, "test_analysis_removable": v, "l1": v})
    # ratio 0.5: floor(5 * 0.5) = 2 and 2 channels; keep-metric prunes the lowest values,
    # removable-metric the highest: {1, 3} / {2, 4} in a, {1, 2} / {3, 0} in b
    df = cf.pruned_overlap(scores, "test_analysis_keep", "test_analysis_removable", 0.5)
    assert list(df["intersection"]) == [0, 0, 0] and list(df["size_a"]) == [2, 2, 4]
    df = cf.pruned_overlap(scores, "test_analysis_keep", "test_analysis_removable", 0.8)
    # ratio 0.8: a prunes {0, 1, 3, 4} vs {0, 2, 3, 4}; b prunes {0, 1, 2} vs {0, 2, 3}
    assert list(df["jaccard"]) == pytest.approx([3 / 5, 2 / 4, 5 / 9])
    assert (cf.pruned_overlap(scores, "l1", "test_analysis_keep", 0.6)["jaccard"] == 1).all()
    assert (cf.pruned_overlap(scores, "l1", "l1", 0.0)["size_a"] == 0).all()
    with pytest.raises(ValueError, match="ratio must be a number in"):
        cf.pruned_overlap(scores, "l1", "l1", 1.5)
    with pytest.raises(ValueError, match="pruned_overlap: unknown metric metric_b='l2'"):
        cf.pruned_overlap(scores, "l1", "l2", 0.5)
    bad = _scores({"l1": {"a": [0.0, float("nan"), 1.0]}})
    with pytest.raises(ValueError, match="metric_a='l1' has NaN/Inf scores in layer 'a'"):
        cf.pruned_overlap(bad, "l1", "l1", 0.5)


# ----------------------------------------------------------------------------- modularity
def _stats(Y, T=None):
    st = ChannelStats()
    st.update(Y, T)
    return st


def _blocks(g, n, B):
    """Two blocks of B channels: each shares a large nuisance z_b (loadings a_i) and a target part
    u_b; T = u_1 + u_2. Within a block, channels are correlated (R-graph) and a pair cancels z_b,
    which a single channel cannot (S-graph)."""
    u = torch.randn(n, 2, generator=g, dtype=torch.float64)
    z = 3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    a = 0.5 + 1.5 * torch.rand(2 * B, generator=g, dtype=torch.float64)
    Y = (u.repeat_interleave(B, 1) + a * z.repeat_interleave(B, 1)
         + 0.3 * torch.randn(n, 2 * B, generator=g, dtype=torch.float64))
    return Y, u.sum(1) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)


def _partition_labels(parts, C):
    labels = np.full(C, -1)
    for k, p in enumerate(parts):
        labels[sorted(p)] = k
    assert (labels >= 0).all()  # the partition covers every channel
    return labels


def _modularity_np(A, labels):
    """Newman's weighted modularity from the adjacency matrix."""
    k = A.sum(1)
    two_m = A.sum()
    same = labels[:, None] == labels[None, :]
    return float(((A - np.outer(k, k) / two_m) * same).sum() / two_m)


@pytest.fixture(scope="module")
def planted():
    g = torch.Generator().manual_seed(0)
    n = 4000
    Y, T = _blocks(g, n, 10)
    Y80, T80 = _blocks(g, n, 40)
    f = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return {
        "planted": (Y, T), "planted80": (Y80, T80),
        "independent": (torch.randn(n, 60, generator=g, dtype=torch.float64),
                        torch.randn(n, generator=g, dtype=torch.float64)),
        "one_factor": (f + torch.randn(n, 30, generator=g, dtype=torch.float64), None),
    }


def test_modularity_finds_planted_communities(planted):
    stats_map = {name: _stats(Y, T) for name, (Y, T) in planted.items()}
    df = cf.modularity(stats_map, top=1.0, null=3).set_index("layer")
    assert list(df.columns) == ["channels", "edges_R", "edges_S", "Q_R", "Q_S", "gap", "Q_R_null",
                                "Q_S_null", "communities_R", "communities_S", "ari", "ari_channels"]
    row = df.loc["planted"]
    assert row["Q_R"] > 0.3 and row["Q_S"] > 0.3
    assert row["Q_R"] - row["Q_R_null"] > 0.2 and row["Q_S"] - row["Q_S_null"] > 0.1
    assert row["communities_R"] == row["communities_S"] == 2 and row["ari"] > 0.99
    assert row["gap"] == pytest.approx(row["Q_R"] - row["Q_S"])
    graphs = cf.modularity_graphs(stats_map, "planted", top=1.0)["planted"]
    truth = np.repeat([0, 1], 10)
    for parts in (graphs.r_partition, graphs.s_partition):
        assert adjusted_rand_score(truth, _partition_labels(parts, 20)) > 0.99
    # the R-graph's weights from the data with numpy, and Q from them without networkx
    Y = planted["planted"][0].numpy()
    rho = np.clip(np.corrcoef(Y, rowvar=False), -0.999, 0.999)
    A = -0.5 * np.log1p(-rho * rho)
    np.fill_diagonal(A, 0)
    A_nx = np.zeros((20, 20))
    for i, j, w in graphs.r_graph.edges(data="weight"):
        A_nx[i, j] = A_nx[j, i] = w
    np.testing.assert_allclose(A_nx, A, rtol=1e-9, atol=1e-12)
    assert graphs.q_r == pytest.approx(_modularity_np(A, _partition_labels(graphs.r_partition, 20)))
    assert graphs.q_r == pytest.approx(row["Q_R"])
    # no community structure: equal correlations give Q near 0; independent channels no more than
    # the same weights shuffled over the pairs
    assert abs(df.loc["one_factor", "Q_R"]) < 0.02
    assert abs(df.loc["independent", "Q_R"] - df.loc["independent", "Q_R_null"]) < 0.05
    assert df.loc["independent", "Q_R"] < row["Q_R"] - 0.2
    # without a target there is no S-graph
    assert df.loc["one_factor", ["edges_S", "Q_S", "gap", "Q_S_null", "ari"]].isna().all()
    assert graphs.s_graph is not None
    assert cf.modularity_graphs(stats_map, "one_factor")["one_factor"].s_graph is None


def test_modularity_keeps_the_top_fraction_of_positive_edges(planted):
    Y, T = planted["planted80"]
    st = {"l": _stats(Y, T)}
    df = cf.modularity(st, null=3).iloc[0]  # METHOD's default: the top 10 %
    assert df["edges_R"] == math.ceil(0.1 * 80 * 79 / 2)
    assert df["Q_R"] > 0.3 and df["Q_R"] - df["Q_R_null"] > 0.15
    g = cf.modularity_graphs(st)["l"]
    # the kept edges are the heaviest of all pairs
    cov = st["l"].covariance()[:80, :80].numpy()
    rho = np.clip(cov / np.sqrt(np.outer(cov.diagonal(), cov.diagonal())), -0.999, 0.999)
    w = -0.5 * np.log1p(-rho[np.triu_indices(80, 1)] ** 2)
    kept = np.array([d for _, _, d in g.r_graph.edges(data="weight")])
    assert kept.min() >= np.sort(w)[-len(kept)] - 1e-12
    # every community of the sparse graph lies inside one planted block
    for part in g.r_partition + g.s_partition:
        assert len({c // 40 for c in part}) == 1
    louvain = cf.modularity(st, method="louvain", seed=1).iloc[0]
    assert louvain["Q_R"] > 0.3
    assert cf.modularity(st, method="louvain", seed=1).equals(cf.modularity(st, method="louvain", seed=1))


def test_modularity_errors(planted):
    st = {"l": _stats(*planted["planted"])}
    with pytest.raises(ValueError, match="modularity: layer 'm' is not in the calibration; layers: l"):
        cf.modularity(st, "m")
    with pytest.raises(ValueError, match="top must be a fraction in"):
        cf.modularity(st, top=0)
    with pytest.raises(ValueError, match="method must be 'greedy' or 'louvain'"):
        cf.modularity_graphs(st, method="cnm")
    with pytest.raises(TypeError, match="calibration must be a chanaxis_fast.Calibration"):
        cf.modularity({"l": torch.eye(3)})
    one = cf.modularity({"one": _stats(torch.randn(10, 1, dtype=torch.float64))}).iloc[0]
    assert one["edges_R"] == 0 and math.isnan(one["Q_R"])


# ----------------------------------------------------------------------------- weight distribution
def _bank(g, C_out, C_in, k, sampler):
    conv = nn.Conv2d(C_in, C_out, k, bias=False)
    with torch.no_grad():
        conv.weight.copy_(sampler(g, (C_out, C_in, k * k)).reshape(C_out, C_in, k, k))
    return conv


def test_weight_distribution_on_gaussian_laplace_and_block_filters():
    g = torch.Generator().manual_seed(0)
    gauss = lambda g, shape: torch.randn(shape, generator=g)
    def laplace(g, shape):  # by the inverse CDF, from the seeded generator
        u = torch.rand(shape, generator=g) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())

    K = 0.6 * torch.ones(9, 9) + 0.4 * torch.eye(9)  # weights of one input channel co-vary
    L = torch.linalg.cholesky(K)
    blocks = lambda g, shape: torch.randn(shape, generator=g) @ L.T
    model = nn.ModuleDict({"gauss": _bank(g, 64, 32, 3, gauss), "laplace": _bank(g, 64, 32, 3, laplace),
                           "blocks": _bank(g, 64, 32, 3, blocks), "fc": nn.Linear(50, 40)})
    df = cf.weight_distribution(model, ["gauss", "laplace", "blocks", "fc"]).set_index("layer")
    gs, lp, bl = df.loc["gauss"], df.loc["laplace"], df.loc["blocks"]
    assert list(gs[["filters", "params_per_filter", "kernel_size"]]) == [64, 288, 9]
    assert gs["shapiro_w_median"] > 0.99 and gs["normal_frac"] > 0.85
    assert abs(gs["kurtosis_median"]) < 0.3 and abs(gs["skew_median"]) < 0.1
    assert gs["mean_over_std"] < 3 / math.sqrt(288) and gs["diag_cv"] < 0.4
    assert 0.85 < gs["block_contrast"] < 1.2 and gs["corr_noise"] == pytest.approx(1 / 8)
    assert gs["within_block_corr"] == pytest.approx(1 / 8, rel=0.2)
    assert lp["normal_frac"] < 0.3 and lp["kurtosis_median"] > 1.5
    assert 0.85 < lp["block_contrast"] < 1.2
    assert bl["within_block_corr"] > 0.5 and bl["block_contrast"] > 4
    assert bl["diag_energy"] < gs["diag_energy"]
    fc = df.loc["fc"]
    assert fc["kernel_size"] == 1 and math.isnan(fc["within_block_corr"])
    assert math.isnan(fc["block_contrast"]) and fc["off_block_corr"] > 0
    default = cf.weight_distribution(model)  # every Conv2d with >= 4 outputs
    assert list(default["layer"]) == ["gauss", "laplace", "blocks"]


def test_weight_distribution_matches_a_hand_computation():
    g = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(3, 7, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(7, 3, 2, 2, generator=g) + 0.3)
        conv.weight[2] = 0  # a masked channel: left out of the per-filter tests
    row = cf.weight_distribution(nn.Sequential(conv), ["0"]).iloc[0]
    F_ = conv.weight.detach().double().reshape(7, 12).numpy()
    live = np.delete(F_, 2, 0)
    w = [stats.shapiro(f).statistic for f in live]
    assert row["shapiro_w_median"] == pytest.approx(np.median(w))
    assert row["mean_over_std"] == pytest.approx(np.median([abs(f.mean()) / f.std() for f in live]))
    G = sum(np.outer(f, f) for f in F_) / 7
    within, off = [], []
    for a in range(12):
        for b in range(12):
            r = G[a, b] / math.sqrt(G[a, a] * G[b, b])
            if a // 4 == b // 4 and a != b:
                within.append(r * r)
            elif a // 4 != b // 4:
                off.append(r * r)
    assert row["within_block_corr"] == pytest.approx(math.sqrt(np.mean(within)))
    assert row["off_block_corr"] == pytest.approx(math.sqrt(np.mean(off)))
    assert row["diag_energy"] == pytest.approx(np.sum(np.diag(G) ** 2) / np.sum(G ** 2))
    assert row["diag_cv"] == pytest.approx(np.std(np.diag(G)) / np.mean(np.diag(G)))
    with pytest.raises(ValueError, match="weight_distribution: the model has no module named 'x'"):
        cf.weight_distribution(conv, ["x"])
    with pytest.raises(ValueError, match="layer '0' is a ReLU, not a Conv2d or Linear"):
        cf.weight_distribution(nn.Sequential(nn.ReLU()), ["0"])
    with pytest.raises(TypeError, match="layers must be a list of module names"):
        cf.weight_distribution(nn.Sequential(conv), "0")


# ----------------------------------------------------------------------------- on a trained network
@pytest.fixture(scope="module")
def mnist_run():
    torch.manual_seed(0)
    mnist = load_mnist("train", limit=5300)
    ds = torch.utils.data.Subset(mnist, range(2000))
    model = BNNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):  # about a second: far from converged, enough for structure in the weights
        for x, y in torch.utils.data.DataLoader(ds, batch_size=50, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    calib = torch.utils.data.Subset(mnist, range(5000, 5300))
    cal = cf.calibrate(model, torch.utils.data.DataLoader(calib, batch_size=100), progress=False)
    metrics = ["input_capture", "task_information", "peer_overlap", "e_full", "hull_size",
               "saturated", "compact_hull", "synergy_ratio", "l1", "l2", "magnitude(p=1)"]
    return model, cal, cf.score(model, cal, metrics)


def test_analyses_on_a_trained_bn_network(mnist_run):
    model, cal, scores = mnist_run
    layers = ["conv1", "conv2", "conv3"]
    align = cf.cross_axis_alignment(scores, n_boot=200)
    assert list(align["layer"]) == layers + ["pooled"] and align["rho"].notna().all()
    assert (align["ci_low"] <= align["rho"]).all() and (align["rho"] <= align["ci_high"]).all()

    sim = cf.criteria_similarity(scores)
    for layer in layers:
        m = sim.per_layer[layer].to_numpy()
        defined = ~np.isnan(np.diag(m))
        np.testing.assert_allclose(np.diag(m)[defined], 1.0)
        np.testing.assert_allclose(m, m.T, equal_nan=True)
    assert sim.mean.loc["l1", "l2"] > 0.5  # seeds/002: l1 and l2 rank filters alike
    overlap = cf.pruned_overlap(scores, "l1", "e_full", 0.5).set_index("layer")
    for layer in layers:  # l1 prunes its lowest values, e_full (direction -1) its highest
        C = len(scores["l1"][layer])
        a = set(np.argsort(scores["l1"][layer].numpy(), kind="stable")[:C // 2])
        b = set(np.argsort(-scores["e_full"][layer].numpy(), kind="stable")[:C // 2])
        assert overlap.loc[layer, "intersection"] == len(a & b)
        assert overlap.loc[layer, "jaccard"] == pytest.approx(len(a & b) / len(a | b))

    hulls = cf.hull_statistics(scores)
    assert list(hulls["layer"]) == layers
    sizes = hulls[[f"size_{k}" for k in range(11)]]
    assert (sizes.sum(axis=1) == hulls["channels"]).all()
    for _, row in hulls.iterrows():
        h = scores["hull_size"][row["layer"]].numpy()
        e = scores["e_full"][row["layer"]].numpy()
        assert row["hull_size_mean"] == pytest.approx(h.mean())
        assert row["size_0"] == (h == 0).sum()
        assert row["e_full_median"] == pytest.approx(np.median(e))
        assert row["s3_s2"] == scores.summaries["synergy_ratio"][row["layer"]]
    from_cal = cf.hull_statistics(cal)  # the same table, scored on the way
    assert from_cal.equals(hulls)

    mod = cf.modularity(cal)
    assert list(mod["layer"]) == layers and mod["Q_R"].notna().all()
    assert ((mod["ari"].isna()) | mod["ari"].between(-1, 1)).all()

    cwda = cf.weight_distribution(model, layers)
    assert list(cwda["params_per_filter"]) == [9, 72, 72]
    assert cwda[["shapiro_w_median", "mean_over_std", "within_block_corr"]].notna().all().all()
    # conv1 reads one input channel: a single block, nothing outside it
    assert list(cwda["block_contrast"].isna()) == [True, False, False]


def test_hull_statistics_errors(mnist_run):
    _, _, scores = mnist_run
    partial = Scores(scores.layers, {"e_full": scores["e_full"]}, {})
    with pytest.raises(ValueError, match="hull_statistics: the scores lack hull_size, saturated"):
        cf.hull_statistics(partial)
    with pytest.raises(TypeError, match="source must be a chanaxis_fast.Scores or Calibration"):
        cf.hull_statistics({"e_full": {}})
    twice = Scores(scores.layers, {"e_full": scores["e_full"], "e_full(ridge=0.01)": scores["e_full"],
                                   "hull_size": scores["hull_size"], "saturated": scores["saturated"]}, {})
    with pytest.raises(ValueError, match="several parameter sets"):
        cf.hull_statistics(twice)
    no_synergy = Scores(scores.layers, {k: scores[k] for k in ("e_full", "hull_size", "saturated")}, {})
    assert cf.hull_statistics(no_synergy)["s3_s2"].isna().all()
