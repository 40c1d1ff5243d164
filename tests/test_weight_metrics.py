"""Weight-only baselines (l1, l2, magnitude, fpgm, fermat, bn_scale, random) against Torch-Pruning,
scipy and brute-force numpy."""

import numpy as np
import pytest
import torch
import torchvision
from scipy.optimize import minimize
from scipy.spatial.distance import cdist
from torch import nn

from chanaxis_fast import score, trace_model
from chanaxis_fast.metrics import MetricContext, MissingInputError
from chanaxis_fast.metrics.weights import channel_group, fermat, geometric_median

tp = pytest.importorskip("torch_pruning")

REDUCTIONS = ["mean", "sum", "max", "prod", "first", "gate"]
NORMALIZERS = ["mean", "sum", "max", "standardization", "gaussian", "lamp"]
TP_NORMALIZER = {"standardization": "standarization"}  # tp's spelling


def _randomise_bn(m):
    with torch.no_grad():  # BN scales far from 1 and of both signs, so that BN matters
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.2, 1.5).mul_(torch.randint(0, 2, mod.weight.shape) * 2 - 1)
                mod.bias.uniform_(-1.0, 1.0)
    return m.eval()


def resnet18_cifar():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return _randomise_bn(m)


def _torchvision(name, seed):
    torch.manual_seed(seed)
    return _randomise_bn(torchvision.models.get_model(name, num_classes=10))


# model, input size, the groups tp forms: resnet18 has fc, 4 residual streams (the stem joins the
# first) and 8 block-internal convs; resnet50 fc, the stem, 4 streams and 32 block-internal convs;
# vgg16_bn its 13 convs and 3 linears (features.40 feeds classifier.0 through flatten: 49 features
# per channel, the 1x1 map replicated to 7x7 by the adaptive pooling)
TP_MODELS = {
    "resnet18": (resnet18_cifar, 32, 13),
    "resnet50": (lambda: _torchvision("resnet50", 1), 32, 38),
    "vgg16_bn": (lambda: _torchvision("vgg16_bn", 2), 32, 16),
}
P_BIAS = [(2, False), (1, True)]


def _tp_setup(name):
    build, size, n_groups = TP_MODELS[name]
    model = build()
    graph = trace_model(model, torch.randn(2, 3, size, size))
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, size, size))
    groups = list(DG.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
    assert len(groups) == n_groups
    names = {m: n for n, m in model.named_modules()}
    return model, graph, DG, groups, names


@pytest.fixture(scope="module")
def resnet():
    return _tp_setup("resnet18")


class _Capture(tp.importance.MagnitudeImportance):
    """tp's MagnitudeImportance that keeps the local importances it reduces, so that every
    reduction and normaliser runs tp's own _reduce / _normalize on them without recomputing them
    (vgg16_bn's classifier holds 100 M weights)."""

    def _reduce(self, group_imp, group_idxs):
        self.captured = (group_imp, group_idxs)
        return super()._reduce(group_imp, group_idxs)


def _tp_local(group, p, bias):
    cap = _Capture(p=p, bias=bias, normalizer=None)
    full = cap(group)
    imp, idxs = cap.captured
    return imp, idxs, full


def _tp_scores(local, p, bias, reduction, normalizer):
    """tp's _reduce and _normalize (in float32, as tp runs them) on the captured local importances."""
    imp, idxs, _ = local
    ref = tp.importance.MagnitudeImportance(p=p, group_reduction=reduction, bias=bias,
                                            normalizer=TP_NORMALIZER.get(normalizer, normalizer))
    return ref._normalize(ref._reduce(imp, idxs), ref.normalizer).double()


def _tp_normalize_in_float64(x, normalizer):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # tp's lamp allocates its buffers in the default dtype
    try:
        return tp.importance.MagnitudeImportance()._normalize(x.clone(), TP_NORMALIZER.get(normalizer, normalizer))
    finally:
        torch.set_default_dtype(default)


def _rank(x):
    return torch.empty_like(x, dtype=torch.long).scatter_(0, x.argsort(stable=True), torch.arange(len(x)))


def _reduction_spec(p, bias, reduction):
    return f"magnitude(p={p}, group_reduction={reduction!r}, normalizer=None, bias={bias})"


def _normalizer_spec(reduction, normalizer):
    return f"magnitude(group_reduction={reduction!r}, normalizer={normalizer!r})"


def _flatten_sum_spec(reduction):
    return f"magnitude(group_reduction={reduction!r}, normalizer=None, flatten='sum')"


NORMALIZER_REDUCTIONS = ["mean", "max"]  # max: the flatten consumer's last feature matters
FLATTEN_REDUCTIONS = ["max", "prod", "gate"]  # those where flatten="sum" is not tp's


@pytest.fixture(scope="module", params=list(TP_MODELS))
def tp_case(request):
    """One model per module run: tp's groups and local importances, and our scores for every
    spec the comparisons need, from one score() call."""
    model, graph, DG, groups, names = _tp_setup(request.param)
    specs = [_reduction_spec(p, b, r) for p, b in P_BIAS for r in REDUCTIONS]
    specs += [_normalizer_spec(r, n) for r in NORMALIZER_REDUCTIONS for n in NORMALIZERS]
    specs += [_flatten_sum_spec(r) for r in FLATTEN_REDUCTIONS]
    ours = score(model, graph=graph, metrics=specs, layers=list(graph.layers))
    local = {(p, b): [_tp_local(g, p, b) for g in groups] for p, b in P_BIAS}
    return request.param, model, graph, groups, names, ours, local


def _ours(model, graph, spec):
    s = score(model, graph=graph, metrics=[spec], layers=list(graph.layers))
    return s[s.metrics[0]]


def _assert_group_scores(ours, ref, group, names, what, rtol=1e-5, atol_of_max=0.0):
    for layer in _tp_out_layers(group, names):  # every member gets the group's scores
        torch.testing.assert_close(ours[layer], ref, rtol=rtol, atol=atol_of_max * float(ref.abs().max()),
                                   msg=lambda m: f"{what} on {layer}: {m}")


def _tp_layers(group, names, handlers):
    return [names[dep.target.module] for dep, _ in group if dep.handler in handlers]


def _tp_out_layers(group, names):
    return _tp_layers(group, names, (tp.prune_conv_out_channels, tp.prune_linear_out_channels))


def test_channel_groups_match_torch_pruning(tp_case):
    _, _, graph, groups, names, _, _ = tp_case
    for group in groups:
        root = names[group[0].dep.target.module]
        out_layers = _tp_out_layers(group, names)
        for layer in out_layers:
            cg = channel_group(graph, layer)
            assert cg.root == root
            assert sorted(cg.members) == sorted(out_layers)
            assert sorted(c for c, _, _ in cg.consumers) == sorted(
                _tp_layers(group, names, (tp.prune_conv_in_channels, tp.prune_linear_in_channels)))
            bns = [n for n in (graph.layers[m].bn for m in cg.members) if n is not None]
            assert sorted(bns) == sorted(
                names[dep.target.module] for dep, _ in group if isinstance(dep.target.module, nn.BatchNorm2d))


def test_captured_local_importances_are_tps_own(tp_case):
    # the shortcut through _Capture gives what tp's __call__ gives (mean reduction)
    _, _, _, groups, _, _, local = tp_case
    for (p, bias), per_group in local.items():
        for loc in per_group:
            torch.testing.assert_close(_tp_scores(loc, p, bias, "mean", None), loc[2].double(),
                                       rtol=0, atol=0)


@pytest.mark.parametrize("p,bias", P_BIAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_magnitude_group_reductions_match_torch_pruning(tp_case, reduction, p, bias):
    _, _, _, groups, names, ours, local = tp_case
    spec = _reduction_spec(p, bias, reduction)
    for group, loc in zip(groups, local[(p, bias)]):
        _assert_group_scores(ours[spec], _tp_scores(loc, p, bias, reduction, None), group, names, spec)


@pytest.mark.parametrize("reduction", NORMALIZER_REDUCTIONS)
@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_magnitude_normalizers_match_torch_pruning(tp_case, normalizer, reduction):
    _, _, _, groups, names, ours, local = tp_case
    spec = _normalizer_spec(reduction, normalizer)
    raw = ours[_reduction_spec(2, False, reduction)]
    for group, loc in zip(groups, local[(2, False)]):
        root = names[group[0].dep.target.module]
        # tp's normaliser in float64 on our float64 sums: the same formula (lamp: tp's tail
        # sums are sum - cumsum, ours a reversed cumsum, hence not 1e-12 on 2048 channels)
        torch.testing.assert_close(ours[spec][root], _tp_normalize_in_float64(raw[root], normalizer),
                                   rtol=1e-10, atol=1e-12)
        # all of tp in float32, as it runs: gaussian and standardization subtract nearly equal
        # numbers (errors up to ~1e-5 of the largest score, near zero); lamp's tail sums
        # (sum - cumsum over up to 2048 channels) lose up to ~4e-4 of the largest score, and
        # channels whose sums are equal to float32 precision may swap places in its ascending
        # order, which moves their LAMP scores by one channel's share of the tail: those
        # channels are left out (but must be few)
        ref = _tp_scores(loc, 2, False, reduction, normalizer)
        keep = torch.ones_like(ref, dtype=torch.bool)
        if normalizer == "lamp":
            keep = _rank(raw[root]) == _rank(_tp_scores(loc, 2, False, reduction, None))
            assert keep.float().mean() > 0.95
        for layer in _tp_out_layers(group, names):
            torch.testing.assert_close(ours[spec][layer][keep], ref[keep], rtol=1e-5,
                                       atol=(1e-3 if normalizer == "lamp" else 2e-5) * float(ref.abs().max()),
                                       msg=lambda m: f"{spec} on {layer}: {m}")


def test_vgg_flatten_consumer_uses_the_last_feature_like_tp(tp_case):
    # features.40 -> BN -> ReLU -> pool -> 7x7 -> flatten -> classifier.0: tp's max/prod/gate see
    # only the feature c*49 + 48 of channel c (scatter_ keeps the last write); flatten="sum" the
    # sum over the 49 features, as sum and mean do
    name, model, graph, _, _, ours, _ = tp_case
    if name != "vgg16_bn":
        pytest.skip("the flatten consumer is vgg16_bn's")
    conv = model.features[40].weight.detach().double().flatten(1).pow(2).sum(1)
    bn = model.features[41].weight.detach().double().pow(2)
    feat = model.classifier[0].weight.detach().double().pow(2).sum(0).reshape(512, 49)
    want = {"gate": feat[:, -1], "prod": conv * bn * feat[:, -1],
            "max": torch.maximum(torch.maximum(conv, bn), feat[:, -1])}
    summed = {"gate": feat.sum(1), "prod": conv * bn * feat.sum(1),
              "max": torch.maximum(torch.maximum(conv, bn), feat.sum(1))}
    for how in FLATTEN_REDUCTIONS:
        got = ours[_reduction_spec(2, False, how)]["features.40"]
        torch.testing.assert_close(got, want[how], rtol=1e-12, atol=0)
        got_sum = ours[_flatten_sum_spec(how)]["features.40"]
        torch.testing.assert_close(got_sum, summed[how], rtol=1e-12, atol=0)
    assert not torch.allclose(want["max"], summed["max"])  # the choice matters here


@pytest.mark.parametrize("reduction", ["mean", "first"])
def test_magnitude_lamp_matches_lamp_importance(resnet, reduction):
    model, graph, _, groups, names = resnet
    spec = f"magnitude(group_reduction={reduction!r}, normalizer='lamp')"
    ours = _ours(model, graph, spec)
    imp = tp.importance.LAMPImportance(p=2, group_reduction=reduction)
    for group in groups:
        _assert_group_scores(ours, imp(group).double(), group, names, spec, rtol=1e-4, atol_of_max=1e-4)


def test_l1_l2_are_tp_first_on_the_layers_own_group(resnet):
    model, graph, DG, _, _ = resnet
    l1, l2 = _ours(model, graph, "l1"), _ours(model, graph, "l2")
    tp_l1 = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    tp_l2 = tp.importance.MagnitudeImportance(p=2, group_reduction="first", normalizer=None)
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        fn = tp.prune_conv_out_channels if isinstance(mod, nn.Conv2d) else tp.prune_linear_out_channels
        group = DG.get_pruning_group(mod, fn, idxs=list(range(mod.weight.shape[0])))
        torch.testing.assert_close(l1[name], tp_l1(group).double(), rtol=1e-5, atol=0)
        torch.testing.assert_close(l2[name] ** 2, tp_l2(group).double(), rtol=1e-5, atol=0)
        W = mod.weight.detach().double().numpy().reshape(mod.weight.shape[0], -1)
        np.testing.assert_allclose(l1[name].numpy(), np.abs(W).sum(1), rtol=1e-12)
        np.testing.assert_allclose(l2[name].numpy(), np.linalg.norm(W, axis=1), rtol=1e-12)


def test_depthwise_members_count_their_filters_unlike_torch_pruning():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    graph = trace_model(model, torch.randn(2, 3, 32, 32))
    cg = channel_group(graph, "features.2.conv.1.0")
    assert cg.root == "features.2.conv.0.0"
    assert cg.members == ["features.2.conv.0.0", "features.2.conv.1.0"]
    assert [c for c, _, _ in cg.consumers] == ["features.2.conv.2"]
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    expand = model.features[2].conv[0][0]
    group = DG.get_pruning_group(expand, tp.prune_conv_out_channels, idxs=list(range(96)))
    ref = tp.importance.MagnitudeImportance(p=1, group_reduction="sum", normalizer=None)(group).double()
    ours = _ours(model, graph, "magnitude(p=1, group_reduction='sum', normalizer=None)")
    dw = model.features[2].conv[1][0].weight.detach().double().abs().sum((1, 2, 3))
    torch.testing.assert_close(ours["features.2.conv.0.0"] - dw, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours["features.2.conv.1.0"], ours["features.2.conv.0.0"])


class _GroupedNet(nn.Module):
    """a -> BN -> grouped conv b -> flatten -> fc: grouped and flattened consumer slices."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        y = self.b(torch.relu(self.bn(self.a(x))))
        return self.fc(torch.flatten(nn.functional.max_pool2d(y, 2), 1))


def test_magnitude_grouped_and_flattened_consumers_by_brute_force():
    torch.manual_seed(1)
    net = _GroupedNet().eval()
    with torch.no_grad():
        net.bn.weight.uniform_(-2, 2)
        net.bn.bias.uniform_(-2, 2)
    graph = trace_model(net, torch.randn(2, 3, 4, 4))
    p = 1.5
    got = _ours(net, graph, f"magnitude(p={p}, group_reduction='sum', normalizer=None, bias=True)")
    A, a_bias = net.a.weight.detach().double().numpy(), net.a.bias.detach().double().numpy()
    B, b_bias = net.b.weight.detach().double().numpy(), net.b.bias.detach().double().numpy()
    F = net.fc.weight.detach().double().numpy()
    gamma, beta = net.bn.weight.detach().double().numpy(), net.bn.bias.detach().double().numpy()
    want_a = []
    for c in range(4):
        s = (np.abs(A[c]) ** p).sum() + abs(a_bias[c]) ** p + abs(gamma[c]) ** p + abs(beta[c]) ** p
        for o in range(6):  # b: 2 groups of 2 inputs / 3 outputs; o reads c only in its own group
            if o // 3 == c // 2:
                s += (np.abs(B[o, c % 2]) ** p).sum()
        want_a.append(s)
    want_b = []
    for c in range(6):  # fc reads channel c as features 4c .. 4c+3
        s = (np.abs(B[c]) ** p).sum() + abs(b_bias[c]) ** p
        s += sum((np.abs(F[:, 4 * c + j]) ** p).sum() for j in range(4))
        want_b.append(s)
    np.testing.assert_allclose(got["a"].numpy(), want_a, rtol=1e-12)
    np.testing.assert_allclose(got["b"].numpy(), want_b, rtol=1e-12)
    # max / prod / gate over b's dependencies (filters, bias, fc's slice): by default fc counts
    # with its last feature 4c+3 of channel c only, as Torch-Pruning's scatter_ leaves it
    filt = [(np.abs(B[c]) ** p).sum() for c in range(6)]
    bias = [abs(b_bias[c]) ** p for c in range(6)]
    for flatten, cols in [("torch_pruning", lambda c: [4 * c + 3]), ("sum", lambda c: range(4 * c, 4 * c + 4))]:
        fc = [sum((np.abs(F[:, j]) ** p).sum() for j in cols(c)) for c in range(6)]
        want = {"max": np.maximum(np.maximum(filt, bias), fc), "prod": np.multiply(np.multiply(filt, bias), fc),
                "gate": fc}
        for how, w in want.items():
            spec = f"magnitude(p={p}, group_reduction={how!r}, normalizer=None, bias=True, flatten={flatten!r})"
            np.testing.assert_allclose(_ours(net, graph, spec)["b"].numpy(), w, rtol=1e-12, err_msg=spec)
    tp_graph = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 4, 4))
    group = tp_graph.get_pruning_group(net.b, tp.prune_conv_out_channels, idxs=list(range(6)))
    for how in ["max", "prod", "gate"]:
        ref = tp.importance.MagnitudeImportance(p=p, group_reduction=how, normalizer=None, bias=True)(group)
        got = _ours(net, graph, f"magnitude(p={p}, group_reduction={how!r}, normalizer=None, bias=True)")
        torch.testing.assert_close(got["b"], ref.double(), rtol=1e-5, atol=0)


def test_fpgm_is_the_sum_of_pairwise_distances(resnet):
    model, graph, _, _, _ = resnet
    got = _ours(model, graph, "fpgm")
    for name in ["conv1", "layer2.0.conv1", "layer4.0.downsample.0", "fc"]:
        W = dict(model.named_modules())[name].weight.detach().double().numpy()
        W = W.reshape(W.shape[0], -1)
        np.testing.assert_allclose(got[name].numpy(), cdist(W, W).sum(1), rtol=1e-9)


def _weiszfeld_numpy(X, iters=10000):
    y = X.mean(0)
    for _ in range(iters):
        d = np.linalg.norm(X - y, axis=1)
        y_new = (X / d[:, None]).sum(0) / (1.0 / d).sum()
        if np.linalg.norm(y_new - y) < 1e-15 * np.linalg.norm(X - X.mean(0), axis=1).mean():
            return y_new
        y = y_new
    return y


def test_fermat_against_numpy_weiszfeld(resnet):
    model, graph, _, _, _ = resnet
    got = _ours(model, graph, "fermat")
    for name in ["conv1", "layer1.0.conv1", "layer3.0.conv2"]:
        W = dict(model.named_modules())[name].weight.detach().double().numpy()
        W = W.reshape(W.shape[0], -1)
        gm = _weiszfeld_numpy(W)
        scale = np.linalg.norm(W - W.mean(0), axis=1).mean()
        np.testing.assert_allclose(geometric_median(torch.from_numpy(W)).numpy(), gm, rtol=0,
                                   atol=1e-6 * scale)
        np.testing.assert_allclose(got[name].numpy(), np.linalg.norm(W - gm, axis=1), rtol=1e-6)


def _minimize_sum_of_distances(X):
    fun = lambda y: np.linalg.norm(X - y, axis=1).sum()  # noqa: E731
    jac = lambda y: -((X - y) / np.linalg.norm(X - y, axis=1)[:, None]).sum(0)  # noqa: E731
    return minimize(fun, X.mean(0) + 0.01, jac=jac, method="BFGS", options={"gtol": 1e-12}).x


def test_geometric_median_against_scipy_minimize():
    rng = np.random.default_rng(0)
    for n, d in [(12, 5), (7, 2), (30, 9)]:
        X = rng.normal(size=(n, d))
        np.testing.assert_allclose(geometric_median(torch.from_numpy(X)).numpy(),
                                   _minimize_sum_of_distances(X), atol=1e-6)


def _fermat_of_points(points):
    """fermat on a 1x1 conv whose filters are the given points (stored in float32)."""
    P = torch.as_tensor(points, dtype=torch.float64)
    conv = nn.Conv2d(P.shape[1], P.shape[0], 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(P[:, :, None, None])
    net = nn.Sequential(conv)
    ctx = MetricContext(net, trace_model(net, torch.randn(1, P.shape[1], 2, 2)))
    return fermat(ctx, "0")


def test_geometric_median_on_data_points():
    # the centroid is a data point and the median: exact, no division by zero
    cross = [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]]
    np.testing.assert_array_equal(geometric_median(torch.tensor(cross, dtype=torch.float64)).numpy(), [0, 0])
    np.testing.assert_allclose(_fermat_of_points(cross).numpy(), [0, 1, 1, 1, 1], rtol=1e-12)
    # an obtuse (> 120 degrees) vertex is the median; Weiszfeld only creeps towards it
    tri = [[0, 0], [1, 0], [-1, 0.2]]
    np.testing.assert_array_equal(geometric_median(torch.tensor(tri, dtype=torch.float64)).numpy(), [0, 0])
    # the first iterate (the centroid) is a data point that is not the median
    pts = np.array([[0, 0], [3, 0], [-1, 1], [-1, -1], [-1, 0]], dtype=np.float64)
    assert np.allclose(pts.mean(0), pts[0])
    gm = geometric_median(torch.from_numpy(pts)).numpy()
    assert np.all(np.isfinite(gm)) and np.linalg.norm(gm) > 0.1
    np.testing.assert_allclose(gm, _minimize_sum_of_distances(pts), atol=1e-6)
    # dead (all-zero) filters in the majority: the median is the zero filter
    rng = np.random.default_rng(1)
    dead = np.vstack([np.zeros((6, 4)), rng.normal(size=(4, 4))]).astype(np.float32).astype(np.float64)
    f = _fermat_of_points(dead).numpy()
    np.testing.assert_array_equal(f[:6], 0)
    np.testing.assert_allclose(f[6:], np.linalg.norm(dead[6:], axis=1), rtol=1e-12)


def test_bn_scale_is_the_abs_gamma(resnet):
    model, graph, _, _, _ = resnet
    got = score(model, graph=graph, metrics=["bn_scale"])["bn_scale"]
    modules = dict(model.named_modules())
    assert len(got) == 20
    for name, s in got.items():
        bn = modules[name.replace("conv", "bn").replace("downsample.0", "downsample.1")]
        np.testing.assert_array_equal(s.numpy(), bn.weight.detach().double().abs().numpy())
        assert (bn.weight < 0).any()  # the fixture's signs are really folded


def test_bn_scale_without_batchnorm_raises():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    graph = trace_model(net, torch.randn(1, 3, 8, 8))
    with pytest.raises(MissingInputError, match=r"bn_scale.*'0' has no BatchNorm"):
        score(net, graph=graph, metrics=["bn_scale"])
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Conv2d(4, 4, 3))
    graph = trace_model(net, torch.randn(1, 3, 8, 8))
    with pytest.raises(MissingInputError, match=r"bn_scale.*'0' has no scale \(affine=False\)"):
        score(net, graph=graph, metrics=["bn_scale"])
    # magnitude skips a BatchNorm without parameters: filters and consumer slices only
    got = score(net, graph=graph, metrics=["magnitude(p=1, group_reduction='sum', normalizer=None)"],
                layers=["0"])
    W0, W3 = net[0].weight.detach().double(), net[3].weight.detach().double()
    torch.testing.assert_close(got[got.metrics[0]]["0"], W0.abs().sum((1, 2, 3)) + W3.abs().sum((0, 2, 3)))


def test_magnitude_warns_when_the_group_is_not_fully_traced():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.a(x).view(2, 2, 4, 8, 8).transpose(1, 2).reshape(2, 8, 8, 8)  # channel shuffle
            return self.b(y).mean((2, 3))

    net = Shuffle()
    graph = trace_model(net, torch.randn(2, 3, 8, 8))
    with pytest.warns(UserWarning, match=r"channels of 'a' reach an op the tracer does not model"):
        score(net, graph=graph, metrics=["magnitude"], layers=["a"])


def test_random_is_reproducible_and_differs_across_layers_and_seeds(resnet):
    model, graph, _, _, _ = resnet
    a = score(model, graph=graph, metrics=["random"])["random"]
    b = score(model, graph=graph, metrics=["random(seed=0)"])["random(seed=0)"]
    c = score(model, graph=graph, metrics=["random(seed=1)"])["random(seed=1)"]
    d = score(model, graph=graph, metrics=["random"], seed=1)["random"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
        torch.testing.assert_close(c[name], d[name], rtol=0, atol=0)
        assert not torch.equal(a[name], c[name])
        assert a[name].dtype == torch.float64 and 0 <= a[name].min() and a[name].max() < 1
    assert not torch.equal(a["layer1.0.conv1"], a["layer1.0.conv2"])  # same width, other layer


@pytest.mark.parametrize("spec,match", [
    ("magnitude(group_reduction='median')", r"group_reduction must be one of 'mean', 'sum', 'max', "
                                            r"'prod', 'first', 'gate', got 'median'"),
    ("magnitude(normalizer='zscore')", r"normalizer must be one of 'mean', 'sum', 'max', "
                                      r"'standardization', 'gaussian', 'lamp', None, got 'zscore'"),
    ("magnitude(normalizer='standarization')", r"normalizer must be one of"),
    ("magnitude(p=0)", r"p must be a finite number > 0, got 0"),
    ("magnitude(p=-1)", r"p must be a finite number > 0"),
    ("magnitude(p='2')", r"p must be a finite number > 0, got '2'"),
    ("magnitude(p='x')", r"p must be a finite number > 0, got 'x'"),
    ("magnitude(bias=1)", r"bias must be of type bool"),
    ("magnitude(flatten='last')", r"flatten must be one of 'torch_pruning', 'sum', got 'last'"),
    ("magnitude(q=1)", r"unknown parameter 'q'; magnitude takes p=2, group_reduction='mean'"),
    ("random(seed=1.5)", r"seed must be an int or None, got 1.5"),
    ("fermat(max_iter=0)", r"max_iter must be an int >= 1, got 0"),
])
def test_bad_parameters(spec, match):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    graph = trace_model(net, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=match):
        score(net, graph=graph, metrics=[spec])
