"""The two-axis metrics and composites against computations on activations captured by hand."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LinearRegression
from torch import nn

import chanaxis_fast as cf
from chanaxis_fast.metrics import minmax
from utils import assert_close


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = SmallNet().double().eval()  # float64 end to end: comparisons at float64 precision
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(48, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (48,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    cal = cf.calibrate(model, loader, mode="all", progress=False)
    # activations and inputs captured by hand
    acts, ins = {}, {}

    def capture(name):
        def hook(module, inputs, output):
            acts[name], ins[name] = output.detach(), inputs[0].detach()
        return hook

    hooks = [getattr(model, n).register_forward_hook(capture(n)) for n in ("conv1", "conv2")]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    top2 = logits.topk(2, dim=1).values
    true = logits.gather(1, y[:, None])[:, 0]
    other = torch.where(logits.argmax(1) == y, top2[:, 1], top2[:, 0])
    margin = (true - other).double()
    rows = {n: a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).double().numpy() for n, a in acts.items()}
    t = margin.repeat_interleave(36).numpy()
    return model, cal, rows, t, ins


def test_input_capture_is_w_sigma_w_from_unfolded_patches(setup):
    model, cal, rows, t, ins = setup
    s = cf.score(model, cal, ["input_capture"])
    for name in ("conv1", "conv2"):
        conv = getattr(model, name)
        patches = F.unfold(ins[name], 3, padding=1).permute(0, 2, 1).reshape(-1, conv.in_channels * 9)
        sigma = np.cov(patches.double().numpy(), rowvar=False)
        w = conv.weight.detach().double().reshape(conv.out_channels, -1).numpy()
        J = np.einsum("ik,kl,il->i", w, sigma, w)
        assert_close(J, rows[name].var(axis=0, ddof=1), rtol=1e-8)
        expected = 0.5 * np.log1p(J / np.median(J))
        assert_close(s["input_capture"][name], expected, rtol=1e-8)


def test_input_capture_is_monotone_in_variance(setup):
    model, cal, rows, t, ins = setup
    ix = cf.score(model, cal, ["input_capture"])["input_capture"]["conv2"].numpy()
    var = rows["conv2"].var(axis=0)
    order = np.argsort(var)
    assert np.all(np.diff(ix[order]) >= 0)


def test_task_information_and_peer_overlap_match_numpy(setup):
    model, cal, rows, t, ins = setup
    s = cf.score(model, cal, ["task_information", "peer_overlap"])
    for name, r in rows.items():
        corr = np.corrcoef(np.column_stack([r, t]), rowvar=False)
        rho_t = np.clip(corr[-1, :-1], -0.999, 0.999)
        assert_close(s["task_information"][name], -0.5 * np.log(1 - rho_t ** 2), rtol=1e-8)
        rho = np.clip(corr[:-1, :-1], -0.999, 0.999)
        R = -0.5 * np.log(1 - rho ** 2)
        np.fill_diagonal(R, 0)
        assert_close(s["peer_overlap"][name], R.sum(1) / (len(R) - 1), rtol=1e-8)


def test_hull_metrics(setup):
    model, cal, rows, t, ins = setup
    s = cf.score(model, cal, ["e_full(ridge=0.0)", "e_full", "hull_size", "compact_hull", "saturated",
                              "hull_size(max_size=2, eps=0.0)", "saturated(max_size=2, eps=0.0)"])
    for name, r in rows.items():
        # E_full without ridge is the R^2 of regressing each channel on all the others
        r2 = [LinearRegression().fit(np.delete(r, i, 1), r[:, i]).score(np.delete(r, i, 1), r[:, i])
              for i in range(r.shape[1])]
        assert_close(s["e_full(ridge=0.0)"][name], np.clip(r2, 0, 1), rtol=1e-6, atol=1e-8)
        size = s["hull_size"][name]
        assert_close(s["compact_hull"][name], s["e_full"][name] / size.clamp_min(1))
        assert ((size >= 0) & (size <= 10)).all()
        assert (s["hull_size(max_size=2, eps=0.0)"][name] <= 2).all()
        sat = s["saturated(max_size=2, eps=0.0)"][name]
        assert set(sat.tolist()) <= {0.0, 1.0} and sat.sum() > 0  # eps = 0 cannot be met in 2 steps


def test_target_excess_and_synergy_summaries(setup):
    model, cal, rows, t, ins = setup
    s = cf.score(model, cal, ["target_excess(partners=5, top=2)", "s2_mean(partners=5)",
                              "s3_mean(partners=5)", "synergy_ratio(partners=5)"])
    for name, r in rows.items():
        cov = np.cov(np.column_stack([r, t]), rowvar=False)
        C = r.shape[1]
        corr = np.corrcoef(np.column_stack([r, t]), rowvar=False)
        rho = np.clip(corr[:C, :C], -0.999, 0.999)
        R = -0.5 * np.log(1 - rho ** 2)

        def mi(idx):  # I(T; Y_idx) with the 1e-10 jitter, from determinants
            S = cov[np.ix_(idx, idx)] + 1e-10 * np.eye(len(idx))
            St = cov[np.ix_(idx + [C], idx + [C])] + 1e-10 * np.eye(len(idx) + 1)
            return 0.5 * np.log((cov[C, C] + 1e-10) * np.linalg.det(S) / np.linalg.det(St))

        single = -0.5 * np.log(1 - np.clip(corr[C, :C], -0.999, 0.999) ** 2)
        te, s2_all = [], []
        for i in range(C):
            order = sorted((j for j in range(C) if j != i), key=lambda j: (-R[i, j], j))[:5]
            s2 = [max(0.0, mi([i, j]) - max(single[i], single[j])) for j in order]
            s2_all += s2
            te.append(np.mean(sorted(s2)[-2:]))
        assert_close(s["target_excess(partners=5, top=2)"][name], te, rtol=1e-6, atol=1e-9)
        assert_close(s.summaries["s2_mean(partners=5)"][name], np.mean(s2_all), rtol=1e-6, atol=1e-9)
        s2m, s3m = s.summaries["s2_mean(partners=5)"][name], s.summaries["s3_mean(partners=5)"][name]
        assert np.isfinite(s3m)
        assert s.summaries["synergy_ratio(partners=5)"][name] == pytest.approx(0 if s2m < 1e-12 else s3m / s2m)


def test_composites(setup):
    model, cal, rows, t, ins = setup
    s = cf.score(model, cal, ["input_capture", "peer_overlap", "task_information", "l2",
                              "magnitude_ix(alpha=0.25)", "ix_rx(beta=0.7)", "two_axis(alpha=0.5, beta=0.3)"])
    for name in rows:
        ix, rx, ti, l2 = (s[m][name] for m in ("input_capture", "peer_overlap", "task_information", "l2"))
        mm = lambda a: (a - a.min()) / (a.max() - a.min())
        assert_close(s["magnitude_ix(alpha=0.25)"][name], mm(l2) + 0.25 * mm(ix))
        assert_close(s["ix_rx(beta=0.7)"][name], mm(ix) - 0.7 * mm(rx))
        assert_close(s["two_axis(alpha=0.5, beta=0.3)"][name], 0.5 * mm(ix) - 0.3 * mm(ti))
    assert torch.equal(minmax(torch.full((4,), 3.0)), torch.zeros(4))


def test_registry_errors_and_custom_metric(setup):
    model, cal, rows, t, ins = setup
    with pytest.raises(ValueError, match="unknown metric 'nope'; available: .*input_capture"):
        cf.score(model, cal, ["nope"])
    with pytest.raises(ValueError, match="cannot parse metric spec"):
        cf.score(model, cal, ["l1(("])
    with pytest.raises(ValueError, match="unknown parameter .bogus.; input_capture takes no parameters"):
        cf.score(model, cal, ["input_capture(bogus=1)"])

    @cf.register_metric("test_variance", needs=("stats",), replace=True)
    def test_variance(ctx, layer, scale=1.0):
        """Variance times a scale."""
        return scale * ctx.stats(layer).covariance().diagonal()[: ctx.num_channels(layer)]

    s = cf.score(model, cal, ["test_variance(scale=2.0)"])
    assert_close(s["test_variance(scale=2.0)"]["conv1"], 2 * rows["conv1"].var(axis=0, ddof=1))
    with pytest.raises(ValueError, match="exists already"):
        cf.register_metric("test_variance")(test_variance)
    df = s.to_pandas()
    assert list(df.columns) == ["layer", "channel", "test_variance(scale=2.0)"] and len(df) == 20


def test_missing_inputs_skip_or_raise():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 1))
    graph = cf.trace_model(model, torch.randn(2, 3, 4, 4))
    with pytest.raises(cf.MissingInputError, match="has no BatchNorm"):
        cf.score(model, None, ["l1", "bn_scale"], graph=graph, layers=["0"])
    s = cf.score(model, None, ["l1", "bn_scale", "input_capture"], graph=graph, layers=["0"], missing="skip")
    assert s.metrics == ["l1"] and set(s.skipped) == {"bn_scale", "input_capture"}
    assert "calibrate" in s.skipped["input_capture"]
