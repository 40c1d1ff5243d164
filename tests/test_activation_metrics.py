"""Data-based baselines (taylor, activation_mean/rms, sfvr, hrank, chip) against independent
computations on hand-captured activations, and SFVR's invariance to the rescalings of seeds/004 §2."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import chanaxis_fast as cf
from chanaxis_fast import MissingInputError, calibrate
from chanaxis_fast.calibration import chip_drops

from calib_nets import (LAYERS, SMALL_CONSUMERS, ChannelsLastNet, SmallNet, dataset, hand_uniforms,
                        one_thread, rows_np, run)  # noqa: F401 (one_thread: autouse fixture)



def positions(u, S):
    return np.floor(u.double().numpy() * S).astype(np.int64)


def direct_sfvr(net, x, producer, mode, u):
    """SFVR of ``producer``'s channels: run each consumer on one input channel at a time."""
    st = net.stages(x)
    C = net.get_submodule(producer).weight.shape[0]
    total = np.zeros(C)
    for c, off in SMALL_CONSUMERS[producer]:
        mod = net.get_submodule(c)
        X = st[f"{c}.in"]
        Y = st[f"{c}.pre"]

        def pick(t):  # [N, C_out, ...] -> samples [n, C_out] at the consumer's output positions
            t = t.reshape(t.shape[0], t.shape[1], -1).numpy()
            S = t.shape[2]
            if mode == "sample" and S > 1:
                pos = positions(u, S)
                return np.concatenate([t[n][:, pos[n]].T for n in range(t.shape[0])])
            return t.transpose(0, 2, 1).reshape(-1, t.shape[1])

        var_y = pick(Y).var(0, ddof=1)
        for i in range(C):
            if isinstance(mod, torch.nn.Conv2d):
                Xi = torch.zeros_like(X)
                Xi[:, off + i] = X[:, off + i]
                M = F.conv2d(Xi, mod.weight, None, mod.stride, mod.padding, mod.dilation, mod.groups)
            else:
                e = mod.in_features // _channels_in(c)  # features per channel
                mask = torch.zeros(X.shape[1], dtype=X.dtype)
                mask[(off + i) * e:(off + i + 1) * e] = 1
                M = (X * mask) @ mod.weight.T
            var_m = pick(M.detach()).var(0, ddof=1)
            total[i] += (var_m / var_y).sum()
    return total


def _channels_in(consumer):
    """Channels feeding a Linear consumer of SmallNet (fc: e's 8 channels x 4 positions)."""
    return {"fc": 8, "fc2": 4}[consumer]


@pytest.mark.parametrize("mode", ["sample", "all"])
def test_sfvr_equals_direct_per_channel_contributions(mode):
    net, ds = SmallNet(), dataset(24)
    cal = run(net, ds, 5, mode=mode, extras="sfvr", seed=2)
    scores = cf.score(net, cal, ["sfvr"])
    u = hand_uniforms(24, 16, seed=2)
    for l in LAYERS:
        expected = direct_sfvr(net, ds.tensors[0], l, mode, u)
        np.testing.assert_allclose(scores["sfvr"][l].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_sfvr_channels_last_linear_consumer():
    net, ds = ChannelsLastNet(), dataset(10, classes=4)
    cal = run(net, ds, 4, layers=["pw1"], extras="sfvr", mode="all")
    st = net.stages(ds.tensors[0])
    X = st["pw2.in"].reshape(-1, 12).numpy()
    Y = st["pw2.pre"].reshape(-1, 8).numpy()
    W = net.pw2.weight.detach().numpy()
    # M_ji = W_ji X_i: Var(M_ji) = W_ji^2 Var(X_i)
    expected = ((W ** 2) * X.var(0, ddof=1)[None, :] / Y.var(0, ddof=1)[:, None]).sum(0)
    got = cf.score(net, cal, ["sfvr"])["sfvr"]["pw1"]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)


def _rescale(net, seed=7):
    """Apply both network-equivalent transformations of seeds/004 §2 with random factors.

    (7) filter j of conv b (and e, a) scaled by alpha1_j, its BN's running mean by alpha1_j and
    running var by alpha1_j^2 (BN eps = 0 makes this exact); (8) BN_a's gamma_i, beta_i scaled by
    alpha2_i and every consumer kernel of a's channel i (b, d) divided by alpha2_i.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv, bn in ((net.a, net.bn_a), (net.b, net.bn_b), (net.e, net.bn_e)):
            al = torch.rand(conv.out_channels, generator=g, dtype=torch.float64) * 2.7 + 0.3
            conv.weight.mul_(al[:, None, None, None])
            conv.bias.mul_(al)
            bn.running_mean.mul_(al)
            bn.running_var.mul_(al ** 2)
        al2 = torch.rand(6, generator=g, dtype=torch.float64) * 2.7 + 0.3
        net.bn_a.weight.mul_(al2)
        net.bn_a.bias.mul_(al2)
        net.d.weight.div_(al2[None, :, None, None])
        for i in range(6):  # b has 2 groups of 3 input channels
            grp, local = divmod(i, 3)
            net.b.weight[grp * 4:(grp + 1) * 4, local].div_(al2[i])
    return net


@pytest.mark.parametrize("mode", ["sample", "all"])
def test_sfvr_invariant_to_network_equivalent_rescalings(mode):
    ds = dataset(24)
    net, scaled = SmallNet(eps=0.0), _rescale(SmallNet(eps=0.0))
    x = ds.tensors[0]
    torch.testing.assert_close(scaled(x), net(x), rtol=1e-10, atol=1e-10)  # same function
    metrics = ["sfvr", "activation_rms"]
    s0 = cf.score(net, run(net, ds, 5, mode=mode, extras="sfvr"), metrics)
    s1 = cf.score(scaled, run(scaled, ds, 7, mode=mode, extras="sfvr"), metrics)
    for l in LAYERS:
        torch.testing.assert_close(s1["sfvr"][l], s0["sfvr"][l], rtol=1e-9, atol=1e-12)
    # the rescaling is not a no-op: a scale-dependent criterion changes
    assert not torch.allclose(s1["activation_rms"]["a"], s0["activation_rms"]["a"], rtol=1e-3)


def test_taylor_equals_autograd_per_image():
    net, ds = SmallNet(), dataset(12)
    cal = run(net, ds, 5, extras="taylor")
    got = cf.score(net, cal, ["taylor"])["taylor"]
    x, y = ds.tensors
    grads = {l: torch.zeros_like(net.get_submodule(l).weight) for l in LAYERS}
    for n in range(len(y)):  # one image at a time, plain .backward()
        net.zero_grad()
        F.cross_entropy(net(x[n:n + 1]), y[n:n + 1]).backward()
        for l in LAYERS:
            grads[l] += net.get_submodule(l).weight.grad
    net.zero_grad()
    for l in LAYERS:
        w = net.get_submodule(l).weight.detach()
        expected = (w * grads[l]).abs().flatten(1).sum(1)
        torch.testing.assert_close(got[l], expected, rtol=1e-9, atol=1e-12)


def test_activation_mean_and_rms_against_numpy():
    net, ds = SmallNet(), dataset(20)
    cal = run(net, ds, 6, readout="post_bn", extras=None, seed=4, layers=LAYERS[:3])
    s = cf.score(net, cal, ["activation_mean", "activation_rms"])
    st = net.stages(ds.tensors[0])
    u = hand_uniforms(20, 16, seed=4)
    for l in LAYERS[:3]:
        rows, _ = rows_np(st[f"{l}.bn"], "sample", u)
        np.testing.assert_allclose(s["activation_mean"][l].numpy(), rows.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s["activation_rms"][l].numpy(), np.sqrt((rows ** 2).mean(0)), rtol=1e-10)


def test_hrank_against_matrix_rank_per_map():
    net, ds = SmallNet(), dataset(12)
    cal = run(net, ds, 3, readout="post_act", extras="hrank", rank_images=7, layers=LAYERS[:3])
    got = cf.score(net, cal, ["hrank"])["hrank"]
    st = net.stages(ds.tensors[0])
    for l in ("a", "b", "e"):
        maps = st[f"{l}.act"][:7]
        ranks = torch.tensor([[int(torch.linalg.matrix_rank(maps[n, c])) for c in range(maps.shape[1])]
                              for n in range(7)], dtype=torch.float64)
        torch.testing.assert_close(got[l], ranks.mean(0), rtol=0, atol=0)
        if l == "a":
            assert ranks.min() < 8 and ranks.max() == 8  # ReLU makes some maps rank-deficient


def _chip_numpy(maps):
    """Mean over images of ||A||_* - ||A with row c zeroed||_*, A = C x HW, numpy SVD in a loop."""
    maps = np.asarray(maps, dtype=np.float64)
    N, C = maps.shape[:2]
    out = np.zeros((N, C))
    for n in range(N):
        A = maps[n].reshape(C, -1)
        full = np.linalg.svd(A, compute_uv=False).sum()
        for c in range(C):
            Ac = A.copy()
            Ac[c] = 0
            out[n, c] = full - np.linalg.svd(Ac, compute_uv=False).sum()
    return out


def test_chip_against_numpy_svd_loop():
    net, ds = SmallNet(), dataset(10)
    cal = run(net, ds, 4, readout="post_bn", extras="chip", rank_images=6, layers=LAYERS[:3])
    got = cf.score(net, cal, ["chip"])["chip"]
    st = net.stages(ds.tensors[0])
    # a: C=6 <= HW=64; b: C=8 <= 16; e: C=8 > HW=4 (the QR branch)
    for l in ("a", "b", "e"):
        expected = _chip_numpy(st[f"{l}.bn"][:6]).mean(0)
        np.testing.assert_allclose(got[l].numpy(), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(3, 5, 9), (2, 9, 4), (2, 6, 6), (1, 7, 1)])
def test_chip_drops_both_branches(shape):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(*shape, generator=g, dtype=torch.float64)
    A[0, 1] = 0  # a dead channel drops nothing
    got = chip_drops(A)
    np.testing.assert_allclose(got.numpy(), _chip_numpy(A.numpy()), rtol=1e-9, atol=1e-10)
    assert abs(float(got[0, 1])) < 1e-10


def test_missing_inputs_name_the_calibrate_option():
    net, ds = SmallNet(), dataset(6)
    cal = run(net, ds, 6, extras=None)
    for metric, extra in (("taylor", "taylor"), ("sfvr", "sfvr"), ("hrank", "hrank"), ("chip", "chip")):
        with pytest.raises(MissingInputError, match=f"extras including '{extra}'"):
            cf.score(net, cal, [metric])
    with pytest.raises(MissingInputError, match="calibrate"):
        cf.score(net, None, ["activation_mean"], graph=cal.graph)
    partial = run(net, ds, 6, layers=["b"], extras="all")
    with pytest.raises(MissingInputError, match="layer 'a' was not calibrated"):
        cf.score(net, partial, ["taylor"], layers=["a"])
    assert set(cf.available_metrics("baseline")) >= {"taylor", "activation_mean", "activation_rms",
                                                      "sfvr", "hrank", "chip"}
