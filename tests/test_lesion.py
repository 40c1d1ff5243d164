"""Lesions, pair lesions, peer replacement and the lesion study (chanaxis_fast.lesion)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chanaxis_fast as cf
from chanaxis_fast.data import load_mnist
from chanaxis_fast.errors import UserInputError
from chanaxis_fast.lesion import predictor
from chanaxis_fast.lesion_study import LesionStudy
from chanaxis_fast.prune import channel_plan
from chanaxis_fast.zoo import ResNetMini

READOUTS = ("pre_bn", "post_bn", "post_act")


# ---------------------------------------------------------------------- helpers
def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, snap):
    """Every tensor of the state dict equal bit for bit, and no hook left on any module."""
    state = model.state_dict()
    assert state.keys() == snap.keys()
    for k, v in state.items():
        assert v.dtype == snap[k].dtype and v.shape == snap[k].shape, k
        assert torch.equal(v.reshape(-1).view(torch.uint8), snap[k].reshape(-1).view(torch.uint8)), k
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"


def classifier_eval(x, y):
    def evaluate(model):
        with torch.no_grad():
            z = model(x)
        return {"accuracy": float((z.argmax(1) == y).float().mean()), "loss": float(F.cross_entropy(z, y))}
    return evaluate


def failing_after(evaluate, n, exc=RuntimeError):
    calls = {"n": 0}

    def wrapped(model):
        calls["n"] += 1
        if calls["n"] > n:
            raise exc("evaluate failed on purpose")
        return evaluate(model)
    wrapped.config = getattr(evaluate, "config", None)  # the same evaluator, for a checkpoint
    return wrapped


# ---------------------------------------------------------------------- a network with a copy
class DupNet(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu (the same inplace ReLU, second call) -> fc.

    conv2's channel 1 is an exact copy of channel 0 (filter, bias and BatchNorm); channel 2 reads
    only conv1's channels 2-3, which read only input channel 1, while every other conv2 channel
    reads input channel 0 through conv1's channels 0-1: channel 2 is independent of its peers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def parts(self, x):
        """conv2's output, by hand."""
        return self.conv2(F.relu(self.bn1(self.conv1(x))))

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def dup():
    g = torch.Generator().manual_seed(0)
    m = DupNet()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        m.conv1.weight[:2, 1] = 0
        m.conv1.weight[2:, 0] = 0
        w = m.conv2.weight
        w[0, 2:] = 0
        w[3:, 2:] = 0
        w[2, :2] = 0
        w[1] = w[0]
        m.conv2.bias[1] = m.conv2.bias[0]
        for bn in (m.bn1, m.bn2):
            bn.weight.fill_(1.0)
            bn.bias.zero_()
        m.bn2.bias[2] = -0.5
        m.fc.weight.zero_()
        m.fc.weight[0, :2] = 4.0       # the copies feed class 0 together
        m.fc.weight[1, 2] = 8.0        # the independent channel feeds class 1
        m.fc.weight[2, 3:] = 1.2
    x = torch.randn(4096, 2, 1, 1, generator=g)
    for bn in (m.bn1, m.bn2):      # running statistics of the data (cumulative average)
        bn.momentum = None
        bn.reset_running_stats()
    m.train()
    with torch.no_grad():
        m(x)
    m.eval()
    with torch.no_grad():
        m.bn2.running_mean[1] = m.bn2.running_mean[0]
        m.bn2.running_var[1] = m.bn2.running_var[0]
        m.fc.bias -= m(x).mean(0)  # balanced classes
        y = m(x).argmax(1)         # the intact network is right by construction
    assert torch.bincount(y, minlength=3).min() > 800
    cal_x, cal_y, ev_x, ev_y = x[:2048], y[:2048], x[2048:], y[2048:]
    loader = [(cal_x[i:i + 512], cal_y[i:i + 512]) for i in range(0, 2048, 512)]
    cals = {ro: cf.calibrate(m, loader, readout=ro, extras=None, progress=False) for ro in READOUTS}
    return m, cals, classifier_eval(ev_x, ev_y), (cal_x, ev_x, ev_y)


def readout_values(m, x, readout):
    """conv2's channels at a read-out point, computed by hand (one row per image: 1 x 1 maps)."""
    with torch.no_grad():
        z = m.parts(x)
        v = {"pre_bn": z, "post_bn": m.bn2(z), "post_act": F.relu(m.bn2(z))}[readout]
    return v[:, :, 0, 0].double().numpy()


# ---------------------------------------------------------------------- peer replacement
@pytest.mark.parametrize("readout", READOUTS)
def test_a_copy_is_recovered_and_an_independent_channel_is_not(dup, readout):
    m, cals, evaluate, _ = dup
    snap = snapshot(m)
    copy = cf.peer_replacement(m, cals[readout], "conv2", 0, evaluate)
    assert copy["peers"] == {"conv2": [1]} and copy["unreplaced"] == []
    assert copy["loss_damage"] > 0.05 and copy["accuracy_damage"] > 0.05
    assert copy["recovered"] > 0.99
    alone = cf.peer_replacement(m, cals[readout], "conv2", 2, evaluate)
    assert alone["loss_damage"] > 0.05 and alone["accuracy_damage"] > 0.05
    assert alone["recovered"] < 0.5
    # the peers add nothing to the channel's mean (an empty peer set predicts the mean)
    mean_only = cf.peer_replacement(m, cals[readout], "conv2", 2, evaluate, peers=[])
    assert abs(alone["recovered"] - mean_only["recovered"]) < 0.05
    assert_untouched(m, snap)


@pytest.mark.parametrize("readout", READOUTS)
def test_replacement_is_the_intact_network_with_the_channel_overwritten_at_the_readout(dup, readout):
    m, cals, evaluate, (_, ev_x, ev_y) = dup
    cal = cals[readout]
    r = cf.peer_replacement(m, cal, "conv2", 3, evaluate, peers=[0, 4, 5])
    const, idx, b = predictor(cal, "conv2", 3, [0, 4, 5])
    with torch.no_grad():  # by hand: intact modules, channel 3 replaced at the point, nothing masked
        z = m.parts(ev_x)

        def put(t):
            t = t.clone()
            t[:, 3] = (const + torch.einsum("nkhw,k->nhw", t[:, idx].double(), b)).float()
            return t
        if readout == "pre_bn":
            z = put(z)
        u = m.bn2(z)
        if readout == "post_bn":
            u = put(u)
        v = F.relu(u)
        if readout == "post_act":
            v = put(v)
        loss = float(F.cross_entropy(m.fc(v.mean((2, 3))), ev_y))
    assert r["replaced_loss_damage"] + r["baseline_loss"] == pytest.approx(loss, abs=1e-5)
    assert r["replaced_loss_damage"] < r["loss_damage"]


def test_pre_bn_and_post_bn_replacements_agree(dup):
    # BatchNorm is a per-channel affine map and the ridge acts on the correlation scale, so the
    # prediction after BN is BN of the prediction before it
    m, cals, evaluate, _ = dup
    for ch in (2, 3, 5):
        a = cf.peer_replacement(m, cals["pre_bn"], "conv2", ch, evaluate, peers=[0, 4])
        b = cf.peer_replacement(m, cals["post_bn"], "conv2", ch, evaluate, peers=[0, 4])
        assert a["replaced_loss_damage"] == pytest.approx(b["replaced_loss_damage"], abs=1e-5)


@pytest.mark.parametrize("readout", READOUTS)
def test_predictor_is_the_regression_on_the_peers(dup, readout):
    m, cals, _, (cal_x, _, _) = dup
    Y = readout_values(m, cal_x, readout)  # the calibration rows, by hand
    S, mu = np.cov(Y.T), Y.mean(0)
    H, i = [0, 2, 3], 4  # conv2 channels 0, 3, 4 and 5 span a plane before the ReLU (1 x 1 inputs)
    const, idx, b = predictor(cals[readout], "conv2", i, H, ridge=0.0)
    b_np = np.linalg.solve(S[np.ix_(H, H)], S[H, i])
    np.testing.assert_allclose(b.numpy(), b_np, rtol=1e-6, atol=1e-9)
    assert const == pytest.approx(mu[i] - b_np @ mu[H], rel=1e-6, abs=1e-8)
    sd = np.sqrt(np.diag(S))
    P = S / np.outer(sd, sd)
    beta = np.linalg.solve(P[np.ix_(H, H)] + 0.1 * np.eye(3), P[H, i])
    _, _, b = predictor(cals[readout], "conv2", i, H, ridge=0.1)
    np.testing.assert_allclose(b.numpy(), beta * sd[i] / sd[H], rtol=1e-6, atol=1e-9)
    const, idx, b = predictor(cals[readout], "conv2", i, [])
    assert const == pytest.approx(mu[i], rel=1e-9) and b.numel() == 0


# ---------------------------------------------------------------------- lesions
def test_lesion_zeroes_the_channel_after_its_batch_norm(dup):
    m, cals, evaluate, (_, ev_x, ev_y) = dup
    snap = snapshot(m)
    r = cf.lesion(m, "conv2", 3, evaluate, graph=cals["pre_bn"].graph)
    with torch.no_grad():
        v = F.relu(m.bn2(m.parts(ev_x)))
        v[:, 3] = 0
        logits = m.fc(v.mean((2, 3)))
    base = evaluate(m)
    assert r["loss_damage"] == pytest.approx(float(F.cross_entropy(logits, ev_y)) - base["loss"], abs=1e-5)
    accuracy = float((logits.argmax(1) == ev_y).float().mean())
    assert r["accuracy_damage"] == pytest.approx(base["accuracy"] - accuracy)
    assert r["members"] == ["conv2"] and r["channels"] == [3]
    again = cf.lesion(m, "conv2", [3], evaluate, graph=cals["pre_bn"].graph, baseline=base)
    assert again["loss_damage"] == r["loss_damage"]
    assert_untouched(m, snap)


def test_pair_lesion_of_copies_has_excess_damage(dup):
    m, cals, evaluate, _ = dup
    snap = snapshot(m)
    df = cf.pair_lesion(m, "conv2", [(0, 1), (0, 2)], evaluate, graph=cals["pre_bn"].graph)
    copies = df.iloc[0]
    assert copies["excess_loss"] > 0.1 and copies["excess_loss"] > copies["loss_damage_i"]
    assert copies["excess_accuracy"] > 0.05
    assert_untouched(m, snap)


class SplitNet(nn.Module):
    """No bias, no BatchNorm: conv channels 0-1 read input channel 0, channels 2-3 input channel 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_damages_of_independent_channels_add_up():
    # Half of the images have only input channel 0, the other half only input channel 1: channel 0
    # is exactly 0 on the second half and channel 2 on the first, so each lesion changes the loss
    # of its own half only and the mean loss of the pair lesion is the sum of the two.
    g = torch.Generator().manual_seed(1)
    m = SplitNet().eval()
    with torch.no_grad():
        m.conv.weight.copy_(torch.randn(m.conv.weight.shape, generator=g))
        m.conv.weight[:2, 1] = 0
        m.conv.weight[2:, 0] = 0
        m.fc.bias.zero_()
        m.fc.weight.zero_()  # every channel raises the logit of its own class
        m.fc.weight[0, 0] = m.fc.weight[1, 2] = m.fc.weight[2, 1] = m.fc.weight[2, 3] = 3.0
    x = torch.randn(2000, 2, 6, 6, generator=g)
    x[:1000, 1] = 0
    x[1000:, 0] = 0
    with torch.no_grad():
        y = m(x).argmax(1)
    graph = cf.trace_model(m, x[:2])
    snap = snapshot(m)
    df = cf.pair_lesion(m, "conv", [(0, 2), (1, 3)], classifier_eval(x, y), graph=graph)
    for _, row in df.iterrows():
        assert row["loss_damage_i"] > 0.01 and row["loss_damage_j"] > 0.01
        assert abs(row["interaction_loss"]) < 1e-5
        assert row["loss_damage_ij"] == pytest.approx(row["loss_damage_i"] + row["loss_damage_j"], abs=1e-5)
        assert row["excess_loss"] == pytest.approx(min(row["loss_damage_i"], row["loss_damage_j"]), abs=1e-5)
    assert_untouched(m, snap)


def test_the_model_is_untouched_when_evaluate_raises(dup):
    m, cals, evaluate, _ = dup
    graph = cals["pre_bn"].graph
    snap = snapshot(m)
    with pytest.raises(RuntimeError, match="on purpose"):
        cf.lesion(m, "conv2", [0, 1], failing_after(evaluate, 1), graph=graph)  # inside the masks
    assert_untouched(m, snap)
    with pytest.raises(RuntimeError, match="on purpose"):
        cf.pair_lesion(m, "conv2", [(0, 1)], failing_after(evaluate, 3), graph=graph)
    assert_untouched(m, snap)
    for readout in READOUTS:
        with pytest.raises(KeyboardInterrupt):  # inside the masks and the insertion hooks
            cf.peer_replacement(m, cals[readout], "conv2", 0, failing_after(evaluate, 2, KeyboardInterrupt))
        assert_untouched(m, snap)


def test_errors_name_the_function_and_the_argument(dup):
    m, cals, evaluate, _ = dup
    graph = cals["pre_bn"].graph
    with pytest.raises(UserInputError, match=r"lesion: channels must be .* \[0, 6\)"):
        cf.lesion(m, "conv2", 6, evaluate, graph=graph)
    with pytest.raises(UserInputError, match="lesion: channels repeat"):
        cf.lesion(m, "conv2", [1, 1], evaluate, graph=graph)
    with pytest.raises(UserInputError, match="lesion: the channels of 'fc' cannot be masked"):
        cf.lesion(m, "fc", 0, evaluate, graph=graph)
    with pytest.raises(UserInputError, match="lesion: graph must be"):
        cf.lesion(m, "conv2", 0, evaluate)
    with pytest.raises(UserInputError, match="'accuracy' and 'loss'"):
        cf.lesion(m, "conv2", 0, lambda model: {"accuracy": 1.0}, graph=graph)
    with pytest.raises(UserInputError, match="pair_lesion: pairs"):
        cf.pair_lesion(m, "conv2", [(1, 1)], evaluate, graph=graph)
    with pytest.raises(UserInputError, match="peer_replacement: peers must be distinct"):
        cf.peer_replacement(m, cals["pre_bn"], "conv2", 0, evaluate, peers=[0, 1])
    with pytest.raises(UserInputError, match="peer_replacement: layer 'fc' is not calibrated"):
        cf.peer_replacement(m, cals["pre_bn"], "fc", 0, evaluate)
    with pytest.raises(UserInputError, match="peer_replacement: ridge"):
        cf.peer_replacement(m, cals["pre_bn"], "conv2", 0, evaluate, ridge=-1)
    other = DupNet().eval()
    with pytest.raises(UserInputError, match="other weights"):
        cf.peer_replacement(other, cals["pre_bn"], "conv2", 0, evaluate)
    plan = channel_plan(m, graph, "conv2", [4, 2])
    assert plan.pruned["conv2"].tolist() == [2, 4] and plan.pruned_inputs() == {"fc": {2, 4}}


# ---------------------------------------------------------------------- the lesion study
@pytest.fixture(scope="module")
def trained():
    """ResNetMini on 14 x 14 MNIST, trained for a few seconds; calibrated (pre-BN) and scored."""
    def small(ds):
        x, y = ds.tensors
        return torch.utils.data.TensorDataset(F.avg_pool2d(x, 2), y)

    torch.manual_seed(0)
    model = ResNetMini(in_channels=1, widths=(8, 16, 16), blocks=1)
    train = small(load_mnist("train", limit=9600))
    cf.train_classifier(model, torch.utils.data.DataLoader(train, batch_size=64, shuffle=True),
                        max_batches=150, lr=3e-3, seed=0)
    model.eval()
    test = small(load_mnist("test", limit=500))
    evaluate = cf.classifier_evaluator(torch.utils.data.DataLoader(test, batch_size=500))
    assert evaluate(model)["accuracy"] > 0.6
    cal_ds = small(load_mnist("val", limit=300))
    cal = cf.calibrate(model, torch.utils.data.DataLoader(cal_ds, batch_size=100), extras=None,
                       progress=False)
    scores = cf.score(model, cal, ["input_capture", "task_information", "e_full", "hull_size",
                                   "compact_hull"])
    return model, cal, scores, evaluate


def test_lesion_study_is_finite_and_resumes_from_its_checkpoint(trained, tmp_path):
    model, cal, scores, evaluate = trained
    snap = snapshot(model)
    kw = dict(per_bin=1, bins=2, seed=0, progress=False)
    full = cf.lesion_study(model, cal, scores, evaluate, **kw)
    assert_untouched(model, snap)
    df = full.to_pandas()
    for layer in cal.layers:  # one channel from every non-empty cell of the 2 x 2 halves
        rank = {a: np.argsort(np.argsort(scores[a][layer].numpy(), kind="stable"), kind="stable")
                for a in ("input_capture", "task_information")}
        C = len(rank["input_capture"])
        cells = set(zip(rank["input_capture"] * 2 // C, rank["task_information"] * 2 // C))
        d = df[df["layer"] == layer]
        assert set(zip(d["ix_bin"], d["it_bin"])) == cells and len(d) == len(cells)
    assert full.complete and len(df) == len(full.config["samples"])
    numeric = df[["loss_damage", "accuracy_damage", "replaced_loss_damage", "replaced_accuracy_damage",
                  "e_full", "hull_size", "compact_hull", "input_capture", "task_information"]]
    assert np.isfinite(numeric.to_numpy(float)).all()
    assert (df["loss_damage"] > 0).mean() > 0.5
    # a channel of a coupled group is one lesion, whichever of its layers sampled it
    for _, d in df.groupby(["group", "channel"]):
        assert d["loss_damage"].nunique() == 1 and d["replaced_loss_damage"].nunique() == 1
    assert (df["group"] != df["layer"]).any()
    summary = full.summary()
    assert list(summary["layer"].unique()) == list(dict.fromkeys(df["layer"])) + ["pooled"]
    pooled = summary[summary["layer"] == "pooled"]
    assert len(pooled) == 3 and np.isfinite(pooled[["spearman", "partial"]].to_numpy()).all()
    assert summary["within_bin"].isna().all()  # one channel per cell: nothing varies within a cell

    # interrupted after a few channels, then resumed: the same result
    ckpt = tmp_path / "study.json"
    with pytest.raises(KeyboardInterrupt):
        cf.lesion_study(model, cal, scores, failing_after(evaluate, 9, KeyboardInterrupt),
                        checkpoint=ckpt, **kw)
    assert_untouched(model, snap)
    partial = LesionStudy.from_json(ckpt)
    assert 0 < len(partial.rows) < len(full.rows) and not partial.complete
    resumed = cf.lesion_study(model, cal, scores, evaluate, checkpoint=ckpt, **kw)
    assert resumed.to_pandas().equals(df)
    assert resumed.to_json() == full.to_json()
    assert LesionStudy.from_json(ckpt).to_json() == full.to_json()
    # another study's checkpoint is refused and left as it was
    before = ckpt.read_bytes()
    with pytest.raises(UserInputError, match="belongs to another study"):
        cf.lesion_study(model, cal, scores, evaluate, checkpoint=ckpt, **dict(kw, seed=1))
    assert ckpt.read_bytes() == before
    with pytest.raises(UserInputError, match="not a chanaxis_fast lesion study"):
        LesionStudy.from_json('{"format": "other"}')


def test_lesion_study_samples_the_cells_and_checks_its_arguments(trained):
    model, cal, scores, evaluate = trained
    calls = {"n": 0}

    def counting(m):
        calls["n"] += 1
        return evaluate(m)

    st = cf.lesion_study(model, cal, scores, counting, per_bin=2, bins=3, layers=["layer2.0.conv1"],
                         progress=False)
    df = st.to_pandas()
    rank = {a: np.argsort(np.argsort(scores[a]["layer2.0.conv1"].numpy(), kind="stable"), kind="stable")
            for a in ("input_capture", "task_information")}
    sizes = np.bincount(rank["input_capture"] * 3 // 16 * 3 + rank["task_information"] * 3 // 16, minlength=9)
    assert len(df) == np.minimum(sizes, 2).sum() and df["channel"].is_unique
    assert df.groupby(["ix_bin", "it_bin"]).size().max() == 2
    assert calls["n"] == 1 + 2 * len(df)
    summary = st.summary()
    assert np.isfinite(summary[["spearman", "within_bin", "partial"]].to_numpy()).all()
    for axis, col in (("input_capture", "ix_bin"), ("task_information", "it_bin")):
        v = scores[axis]["layer2.0.conv1"].numpy()  # the bins are the layer's terciles of the axis
        lo, hi = np.sort(v)[[5, 10]]
        assert (df.loc[df[col] == 0, axis] <= lo).all() and (df.loc[df[col] == 2, axis] >= hi).all()
    with pytest.raises(UserInputError, match="lesion_study: the scores hold no hull_size"):
        cf.lesion_study(model, cal, cf.score(model, cal, ["input_capture", "task_information", "e_full",
                                                          "compact_hull"]), evaluate, progress=False)
    with pytest.raises(UserInputError, match="lesion_study: per_bin"):
        cf.lesion_study(model, cal, scores, evaluate, per_bin=0, progress=False)
    with pytest.raises(UserInputError, match="lesion_study: layer 'fc'"):
        cf.lesion_study(model, cal, scores, evaluate, layers=["fc"], progress=False)


def test_summary_correlations_against_independent_formulas():
    rng = np.random.default_rng(0)
    rows = []
    for layer in ("a", "b"):
        for k in range(40):
            ix, it = rng.normal(size=2)
            e = rng.normal()
            rows.append(dict(layer=layer, channel=k, ix_bin=int(ix > 0), it_bin=int(it > 0),
                             cell=f"ix{int(ix > 0)}_it{int(it > 0)}", input_capture=ix, task_information=it,
                             e_full=e, hull_size=rng.normal(), compact_hull=-e + 0.1 * rng.normal(),
                             loss_damage=e + ix + 0.5 * rng.normal()))
    summary = LesionStudy(rows, {}, {}).summary()
    import pandas as pd
    from scipy import stats

    df = pd.DataFrame(rows)
    d = df[df["layer"] == "a"]
    R = np.column_stack([stats.rankdata(d[c]) for c in ("e_full", "loss_damage", "input_capture",
                                                        "task_information")])
    prec = np.linalg.inv(np.corrcoef(R.T))  # partial correlation from the precision matrix
    expected = -prec[0, 1] / np.sqrt(prec[0, 0] * prec[1, 1])
    got = summary[(summary["layer"] == "a") & (summary["metric"] == "e_full")].iloc[0]
    assert got["partial"] == pytest.approx(expected, abs=1e-10)
    assert got["spearman"] == pytest.approx(stats.spearmanr(d["e_full"], d["loss_damage"]).statistic)
    ranks = pd.DataFrame({"x": stats.rankdata(d["e_full"]), "y": stats.rankdata(d["loss_damage"]),
                          "cell": d["cell"].to_numpy()})
    centred = ranks[["x", "y"]] - ranks.groupby("cell")[["x", "y"]].transform("mean")
    assert got["within_bin"] == pytest.approx(np.corrcoef(centred["x"], centred["y"])[0, 1], abs=1e-10)
    assert got["partial"] > 0.5
    compact = summary[(summary["layer"] == "pooled") & (summary["metric"] == "compact_hull")].iloc[0]
    assert compact["partial"] < -0.5 and compact["partial_p"] < 1e-6
    # damage equal to the metric: every correlation is 1
    for r in rows:
        r["loss_damage"] = r["e_full"]
    s = LesionStudy(rows, {}, {}).summary()
    assert np.allclose(s.loc[s["metric"] == "e_full", ["spearman", "within_bin", "partial"]], 1.0)


class Head(nn.Module):
    """A conv whose channels are the model's output (they cannot be masked)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(self.relu(self.bn(self.conv1(x)))).mean((2, 3))


def test_lesion_study_leaves_out_the_layers_it_cannot_mask():
    torch.manual_seed(0)
    m = Head().eval()
    x = torch.randn(256, 2, 5, 5)
    with torch.no_grad():
        y = m(x).argmax(1)
    cal = cf.calibrate(m, [(x, y)], layers=["conv1", "head"], extras=None, progress=False)
    scores = cf.score(m, cal, ["input_capture", "task_information", "e_full", "hull_size", "compact_hull"])
    st = cf.lesion_study(m, cal, scores, classifier_eval(x, y), per_bin=1, bins=2, progress=False)
    assert st.config["layers"] == ["conv1"] and set(st.to_pandas()["layer"]) == {"conv1"}
    assert st.config["skipped"] == {"head": "its channels are the model's output"}
    with pytest.raises(UserInputError, match="lesion_study: the channels of 'head' cannot be masked"):
        cf.lesion_study(m, cal, scores, classifier_eval(x, y), layers=["head"], progress=False)
