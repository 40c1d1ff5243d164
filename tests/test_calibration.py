"""calibrate() and Calibration: statistics against hand-captured activations, batching, seeds,
read-out points, layer selection, errors, save/load and checkpoint resumption, real MNIST data."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import chanaxis_fast as cf
from chanaxis_fast import Calibration, StatsFileError, calibrate
from chanaxis_fast.graph import ModelGraph, trace_model

from calib_nets import (LAYERS, SMALL_CONSUMERS, ChannelsLastNet, SmallNet, dataset, hand_uniforms,
                        margin_np, moments_np, one_thread, rows_np, run)  # noqa: F401



def assert_stats_equal(c1, c2, rtol=1e-10, atol=1e-10):
    assert c1.layers == c2.layers
    for l in c1.layers:
        assert c1.stats[l].count == c2.stats[l].count
        torch.testing.assert_close(c1.stats[l].mean, c2.stats[l].mean, rtol=rtol, atol=atol)
        torch.testing.assert_close(c1.stats[l].comoment, c2.stats[l].comoment, rtol=rtol, atol=atol)


def assert_calibrations_equal(c1, c2, rtol=1e-10, atol=1e-10):
    assert_stats_equal(c1, c2, rtol, atol)
    assert sorted(c1.patches) == sorted(c2.patches) and sorted(c1.grads) == sorted(c2.grads)
    for c in c1.patches:
        assert torch.equal(c1.patches[c].count, c2.patches[c].count)
        for a, b in ((c1.patches[c].comoment, c2.patches[c].comoment),
                     (c1.patches[c].mean, c2.patches[c].mean),
                     (c1.outputs[c].comoment, c2.outputs[c].comoment)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for l in c1.grads:
        torch.testing.assert_close(c1.grads[l], c2.grads[l], rtol=rtol, atol=atol)
    for l in c1.hrank:
        torch.testing.assert_close(c1.hrank[l], c2.hrank[l], rtol=0, atol=0)
        torch.testing.assert_close(c1.chip[l], c2.chip[l], rtol=1e-9, atol=1e-9)
    assert c1.num_images == c2.num_images


# ---------------------------------------------------------------------- statistics
@pytest.mark.parametrize("mode", ["sample", "all", "gap"])
def test_same_statistics_whatever_the_batch_size(mode):
    net, ds = SmallNet(), dataset(40)
    cals = [run(net, ds, bs, mode=mode, rank_images=10) for bs in (3, 7, 32)]
    for other in cals[1:]:
        assert_calibrations_equal(cals[0], other, rtol=1e-9, atol=1e-9)
    P = {"sample": 16, "all": None, "gap": 1}[mode]
    for l, S in (("a", 64), ("b", 16), ("e", 4), ("d", 64)):
        assert cals[0].stats[l].count == 40 * (S if P is None else P)


@pytest.mark.parametrize("readout", ["pre_bn", "post_bn", "post_act"])
@pytest.mark.parametrize("mode", ["sample", "all", "gap"])
def test_statistics_equal_hand_computation(mode, readout):
    net, ds = SmallNet(), dataset(24)
    layers = ["a", "b", "e"]
    cal = run(net, ds, 5, mode=mode, readout=readout, layers=layers, extras=None, seed=3)
    st = net.stages(ds.tensors[0])
    t = margin_np(st["logits"], ds.tensors[1])
    u = hand_uniforms(24, 16, seed=3)
    suffix = {"pre_bn": "pre", "post_bn": "bn", "post_act": "act"}[readout]
    for l in layers:
        rows, per_image = rows_np(st[f"{l}.{suffix}"], mode, u)
        mean, M = moments_np(np.concatenate([rows, np.repeat(t, per_image)[:, None]], 1))
        s = cal.stats[l]
        assert s.count == rows.shape[0]
        np.testing.assert_allclose(s.mean.numpy(), mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.comoment.numpy(), M, rtol=1e-10, atol=1e-10)
    # and the package's own op on the same hand-captured activations
    if mode == "sample":
        x = st[f"b.{suffix}"]
        pos = torch.floor(u.double() * 16).long()
        m = cf.ops.channel_moments(x, torch.as_tensor(t), pos)
        torch.testing.assert_close(cal.stats["b"].comoment, m.comoment, rtol=1e-10, atol=1e-10)


def test_channels_last_linear_layers():
    net, ds = ChannelsLastNet(), dataset(12, classes=4)
    cal = run(net, ds, 5, layers=["pw1", "pw2"], extras=("hrank", "sfvr"), readout="pre_bn", rank_images=4)
    st = net.stages(ds.tensors[0])
    t = margin_np(st["logits"], ds.tensors[1])
    u = hand_uniforms(12, 16, seed=0)
    for l in ("pw1", "pw2"):
        rows, per = rows_np(st[f"{l}.pre"], "sample", u, channel_dim=-1)
        mean, M = moments_np(np.concatenate([rows, np.repeat(t, per)[:, None]], 1))
        np.testing.assert_allclose(cal.stats[l].comoment.numpy(), M, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(cal.stats[l].mean.numpy(), mean, rtol=1e-10, atol=1e-12)
    maps = st["pw1.pre"][:4].permute(0, 3, 1, 2)
    expected = torch.stack([torch.linalg.matrix_rank(maps[i, c]) for i in range(4) for c in range(12)])
    torch.testing.assert_close(cal.hrank["pw1"], expected.reshape(4, 12).double().mean(0))
    assert "pw2" in cal.patches and cal.patches["pw2"].covariance().shape == (12, 1, 1)


def test_readout_points_relate_as_bn_and_relu():
    net, ds = SmallNet(), dataset(32)
    cal = {r: run(net, ds, 8, readout=r, extras=None, layers=["a", "b"]) for r in
           ("pre_bn", "post_bn", "post_act")}
    for l, bn in (("a", net.bn_a), ("b", net.bn_b)):
        pre, post, act = (cal[r].stats[l] for r in ("pre_bn", "post_bn", "post_act"))
        C = bn.num_features
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        shift = bn.bias.detach() - bn.running_mean * scale
        # post_bn is a per-channel affine map of pre_bn: same correlations, transformed moments
        torch.testing.assert_close(post.correlation(), pre.correlation(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(post.mean[:C], pre.mean[:C] * scale + shift, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(post.covariance().diagonal()[:C],
                                   pre.covariance().diagonal()[:C] * scale ** 2, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(post.mean[:C], pre.mean[:C])
        # post_act = relu(post_bn): non-negative means, and some channel actually clipped
        assert (act.mean[:C] >= 0).all()
        assert (act.mean[:C] > post.mean[:C] + 1e-6).any()
        torch.testing.assert_close(act.mean[C], pre.mean[C])  # the target column does not change


def test_positions_reproducible_from_the_seed():
    net, ds = SmallNet(), dataset(20)
    c0 = run(net, ds, 4, seed=5, extras=None)
    c1 = run(net, ds, 6, seed=5, extras=None)
    c2 = run(net, ds, 4, seed=6, extras=None)
    assert_stats_equal(c0, c1)
    assert not torch.allclose(c0.stats["a"].comoment, c2.stats["a"].comoment)
    assert c0.config["seed"] == 5 and c0.config["num_images"] == 20


def test_max_images_and_subset_indices():
    net, ds = SmallNet(), dataset(40)
    sub = Subset(ds, list(range(30, 2, -3)))  # 10 images
    cal = run(net, sub, 4, max_images=7, extras=None)
    assert cal.num_images == 7 and cal.stats["a"].count == 7 * 16
    assert cal.config["dataset_indices"].tolist() == list(range(30, 2, -3))
    ref = run(net, torch.utils.data.TensorDataset(*ds[[30, 27, 24, 21, 18, 15, 12]]), 7, extras=None)
    assert_stats_equal(cal, ref)


def test_extras_do_not_change_statistics():
    net, ds = SmallNet(), dataset(16)
    plain = run(net, ds, 5, extras=None)
    full = run(net, ds, 5, extras="all", rank_images=3)
    assert_stats_equal(plain, full)
    assert plain.grads == {} and plain.patches == {} and plain.hrank == {}
    assert full.rank_counts == {l: 3 for l in LAYERS}
    assert sorted(full.patches) == ["b", "d", "e", "fc", "fc2"]


def test_model_mode_and_grad_flags_restored():
    net, ds = SmallNet(), dataset(8)
    net.train()
    net.bn_b.eval()  # mixed modes must come back as they were
    net.a.weight.requires_grad_(False)
    seen = []
    net.bn_a.register_forward_hook(lambda m, i, o: seen.append(m.training))
    run(net, ds, 4)
    assert seen and not any(seen)  # ran in eval mode
    assert net.training and net.bn_a.training and not net.bn_b.training
    assert not net.a.weight.requires_grad and net.b.weight.requires_grad and net.a.weight.grad is None

    def broken():
        yield ds.tensors[0][:4], ds.tensors[1][:4]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        calibrate(net, broken(), progress=False)
    assert net.training and not net.bn_b.training and not net.a.weight.requires_grad


def test_layer_selection():
    net, ds = SmallNet(), dataset(4)
    kw = dict(extras=None, batch_size=4)
    assert run(net, ds, layers=None, **kw).layers == LAYERS
    assert run(net, ds, layers=["e", "a"], **kw).layers == ["a", "e"]  # execution order
    assert run(net, ds, layers="[ab]", **kw).layers == ["a", "b"]
    assert run(net, ds, layers=lambda n, m: isinstance(m, nn.Linear), **kw).layers == ["fc", "fc2"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=["nope"]), "no module named 'nope'"),
    (dict(layers=["a", "bn_a"]), "'bn_a' is a BatchNorm2d, not an nn.Conv2d"),
    (dict(layers="bn_.*"), "'bn_a' is a BatchNorm2d"),
    (dict(layers=lambda n, m: n.startswith("b")), "'b' .*|'bn_a' is a BatchNorm2d"),
    (dict(layers="zz"), "matches no module"),
    (dict(layers=["d"], readout="post_bn"), "layer 'd' has no BatchNorm"),
    (dict(layers=["d"], readout="post_act"), "layer 'd' has no activation module"),
    (dict(readout="post_relu"), "readout must be one of"),
    (dict(mode="random"), "mode must be one of"),
    (dict(precision="float16"), "precision must be 'float64' or 'float32'"),
    (dict(extras=["sfvr", "fisher"]), "unknown extra 'fisher'"),
    (dict(target=lambda z, y: z[:, 0:2]), r"target must be a Tensor\[4\]"),
])
def test_errors_name_the_problem(kwargs, match):
    net, ds = SmallNet(), dataset(4)
    with pytest.raises(ValueError, match=match):
        run(net, ds, 4, **kwargs)


def test_layer_not_in_the_forward_is_an_error():
    net, ds = SmallNet(), dataset(4)
    net.unused = nn.Conv2d(3, 4, 1).double()
    with pytest.raises(ValueError, match="'unused' is not called in the model's forward"):
        run(net, ds, 4, layers=["a", "unused"])


def test_custom_target():
    net, ds = SmallNet(), dataset(12)
    cal = run(net, ds, 5, target=lambda z, y: z[:, 0], layers=["a"], extras=None)
    st = net.stages(ds.tensors[0])
    rows, per = rows_np(st["a.pre"], "sample", hand_uniforms(12, 16, 0))
    t = st["logits"][:, 0].numpy()
    _, M = moments_np(np.concatenate([rows, np.repeat(t, per)[:, None]], 1))
    np.testing.assert_allclose(cal.stats["a"].comoment.numpy(), M, rtol=1e-10, atol=1e-10)


def test_nonfinite_images_raise_or_are_skipped():
    net, ds = SmallNet(), dataset(10)
    x, y = ds.tensors[0].clone(), ds.tensors[1]
    x[3, 0, 2, 2] = float("nan")  # reaches every read-out row of image 3 through its target
    bad = torch.utils.data.TensorDataset(x, y)
    with pytest.raises((ValueError, RuntimeError), match="NaN/Inf|non-finite"):
        run(net, bad, 4)
    with pytest.raises(ValueError, match="non-finite cross-entropy"):
        run(net, bad, 4, extras=["taylor"])
    kept = [i for i in range(10) if i != 3]
    skipped = run(net, bad, 4, skip_nonfinite=True, extras=["taylor", "hrank", "chip"], rank_images=5)
    clean = run(net, torch.utils.data.TensorDataset(x[kept], y[kept]), 4, extras=["taylor", "hrank", "chip"],
                rank_images=4)
    for l in LAYERS:
        assert skipped.stats[l].count == clean.stats[l].count  # (positions differ: not the values)
        torch.testing.assert_close(skipped.grads[l], clean.grads[l], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(skipped.hrank[l], clean.hrank[l])
        torch.testing.assert_close(skipped.chip[l], clean.chip[l], rtol=1e-9, atol=1e-9)
    assert skipped.rank_counts["a"] == 4


def test_a_nan_in_the_last_layer_folds_nothing_of_its_batch(tmp_path):
    """The statistics are folded in place layer by layer: a NaN that only the last calibrated layer
    sees must stop the batch before any layer is folded, and the checkpoint then holds whole
    batches only."""
    net, ds = SmallNet(), dataset(16)
    calls = []

    def poison(mod, args, out):  # the trace is call 1, batch k is call k + 1
        calls.append(1)
        if len(calls) == 4:
            out = out.clone()
            out[0, 0] = float("nan")  # every position of one map: whatever is sampled
            return out

    handle = net.d.register_forward_hook(poison)
    ckpt = tmp_path / "c.pt"
    zero = lambda logits, labels: torch.zeros(len(labels), dtype=torch.float64)  # noqa: E731
    try:
        with pytest.raises(RuntimeError, match="NaN/Inf"):
            run(net, ds, 4, extras=None, target=zero, checkpoint=ckpt)
    finally:
        handle.remove()
    partial = Calibration.load(ckpt)
    assert partial.num_batches == 2 and not partial.complete
    clean = run(net, torch.utils.data.TensorDataset(*(t[:8] for t in ds.tensors)), 4, extras=None,
                target=zero)
    assert_stats_equal(partial, clean, rtol=0, atol=0)  # layer "a" came before "d": not folded


def test_readouts_changed_in_place_are_seen_and_copied_from_then_on(monkeypatch):
    """Mode "all" keeps each read-out without a copy and checks its version counter after the
    forward. SmallNet's BatchNorm outputs go through ReLU(inplace=True): with readout="post_bn"
    the first batch runs twice (then copying those read-outs), every later batch once, and the
    statistics are those of the BatchNorm outputs, not of their ReLU."""
    net, ds = SmallNet(), dataset(12)
    calls = []
    handle = net.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        cal = run(net, ds, 4, mode="all", readout="post_bn", extras=None, layers=["a", "b"])
        assert calls == [2, 4, 4, 4, 4]  # the trace, batch 1 twice, batches 2 and 3
        calls.clear()
        run(net, ds, 4, mode="all", readout="pre_bn", extras=None, layers=["a", "b"])
        assert calls == [2, 4, 4, 4]  # the convs' outputs are not changed in place
    finally:
        handle.remove()
    st = net.stages(ds.tensors[0])
    for layer, key in (("a", "a.bn"), ("b", "b.bn")):
        rows, _ = rows_np(st[key], "all", None)
        assert (rows < 0).any()  # BatchNorm outputs, before the ReLU
        t = margin_np(st["logits"], ds.tensors[1])
        per = rows.shape[0] // 12
        _, M = moments_np(np.concatenate([rows, np.repeat(t, per)[:, None]], 1))
        np.testing.assert_allclose(cal.stats[layer].comoment.numpy(), M, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------- persistence, resume
def test_graph_state_dict_roundtrip():
    net = SmallNet()
    g = trace_model(net, dataset(2).tensors[0])
    g2 = ModelGraph.from_state_dict(torch.load(_roundtrip(g.state_dict()), weights_only=True))
    assert g2.layers == g.layers
    for l in g.layers:
        assert g2.consumers(l) == g.consumers(l) and g2.producers(l) == g.producers(l)
        assert g2.coupled(l) == g.coupled(l) and g2.is_opaque(l) == g.is_opaque(l)
    assert [(c, o) for c, o, _ in g2.consumers("a")] == SMALL_CONSUMERS["a"]


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_save_load_roundtrip_and_corrupt_files(tmp_path):
    net, ds = SmallNet(), dataset(12)
    cal = run(net, ds, 5, rank_images=4)
    path = tmp_path / "cal.pt"
    cal.save(path)
    back = Calibration.load(path)
    assert_calibrations_equal(cal, back, rtol=0, atol=0)
    assert back.complete and back.config["layers"] == LAYERS and back.graph.layers == cal.graph.layers
    # scores from the loaded calibration equal those from the fresh one
    s1 = cf.score(net, cal, ["sfvr", "taylor", "chip"])
    s2 = cf.score(net, back, ["sfvr", "taylor", "chip"])
    for m in s1.metrics:
        for l in LAYERS:
            assert torch.equal(s1[m][l], s2[m][l])

    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(StatsFileError, match="truncated or corrupt"):
        Calibration.load(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(StatsFileError):
        Calibration.load(tmp_path / "junk.pt")
    state = cal.state_dict()
    state["version"] = 99
    torch.save(state, tmp_path / "v99.pt")
    with pytest.raises(StatsFileError, match="version 99"):
        Calibration.load(tmp_path / "v99.pt")
    state = cal.state_dict()
    state["stats"]["a"]["mean"] = state["stats"]["a"]["mean"] + 1.0  # silently altered numbers
    torch.save(state, tmp_path / "tampered.pt")
    with pytest.raises(StatsFileError, match="checksum"):
        Calibration.load(tmp_path / "tampered.pt")
    cal.stats["a"].save(tmp_path / "stats.pt")
    with pytest.raises(StatsFileError, match="not a chanaxis_fast Calibration"):
        Calibration.load(tmp_path / "stats.pt")


class FlakyLoader:
    """Yields the batches of a DataLoader and raises after ``fail_after`` of them (once)."""

    def __init__(self, ds, batch_size, fail_after=None):
        self.loader = DataLoader(ds, batch_size=batch_size)
        self.dataset, self.fail_after = ds, fail_after

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.fail_after is not None and i == self.fail_after:
                self.fail_after = None
                raise OSError("disk went away")
            yield batch


@pytest.mark.parametrize("every", [2, 100])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, every):
    net, ds = SmallNet(), dataset(40)
    full = run(net, ds, 4, rank_images=10)
    ckpt = tmp_path / "ckpt.pt"
    flaky = FlakyLoader(ds, 4, fail_after=5)
    with pytest.raises(OSError, match="disk went away"):
        calibrate(net, flaky, checkpoint=ckpt, checkpoint_every=every, rank_images=10, progress=False)
    partial = Calibration.load(ckpt)
    assert not partial.complete and partial.num_batches == 5 and partial.num_images == 20
    resumed = calibrate(net, flaky, checkpoint=ckpt, checkpoint_every=every, rank_images=10,
                        progress=False)
    assert resumed.complete and resumed.num_batches == 10
    assert_calibrations_equal(full, resumed, rtol=0, atol=0)
    # a finished checkpoint is returned as is; another configuration is refused
    again = calibrate(net, DataLoader(ds, batch_size=4), checkpoint=ckpt, rank_images=10, progress=False)
    assert_calibrations_equal(full, again, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another configuration.*seed: 0 there, 1 now"):
        calibrate(net, DataLoader(ds, batch_size=4), checkpoint=ckpt, rank_images=10, seed=1,
                  progress=False)


def test_resume_refuses_a_loader_with_other_batches(tmp_path):
    net, ds = SmallNet(), dataset(24)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(OSError):
        calibrate(net, FlakyLoader(ds, 4, fail_after=3), checkpoint=ckpt, extras=None, progress=False)
    with pytest.raises(ValueError, match="same batches"):
        calibrate(net, DataLoader(ds, batch_size=5), checkpoint=ckpt, extras=None, progress=False)
    with pytest.raises(ValueError, match="model_digest"):
        with torch.no_grad():
            net.a.weight.mul_(2)
        calibrate(net, DataLoader(ds, batch_size=4), checkpoint=ckpt, extras=None, progress=False)


def test_float32_precision_is_close_to_float64_and_part_of_the_configuration(tmp_path):
    net, ds = SmallNet(), dataset(40)
    ckpt = tmp_path / "ckpt.pt"
    c64 = run(net, ds, 8, extras=None)
    c32 = run(net, ds, 8, extras=None, precision="float32", checkpoint=ckpt)
    assert c32.config["precision"] == "float32" and c64.config["precision"] == "float64"
    for l in c64.layers:
        assert c32.stats[l].count == c64.stats[l].count
        torch.testing.assert_close(c32.stats[l].mean, c64.stats[l].mean, rtol=0, atol=0)  # float64 sums
        a, b = c32.stats[l].comoment, c64.stats[l].comoment
        rel = float((a - b).norm() / b.norm())
        assert 0 < rel < 1e-6, rel  # float32 products: close, not the same bits
    with pytest.raises(ValueError, match="precision: 'float32' there, 'float64' now"):
        run(net, ds, 8, extras=None, checkpoint=ckpt)


def test_truncated_checkpoint_is_an_error(tmp_path):
    net, ds = SmallNet(), dataset(12)
    ckpt = tmp_path / "ckpt.pt"
    run(net, ds, 4, checkpoint=ckpt, extras=None)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:-100])
    with pytest.raises(StatsFileError):
        run(net, ds, 4, checkpoint=ckpt, extras=None)


# ---------------------------------------------------------------------- real data
def test_trained_mnist_cnn_metrics_are_finite():
    from chanaxis_fast.data import load_mnist
    from chanaxis_fast.zoo import load_model

    model = load_model("mnist_cnn").model
    ds = load_mnist("train", limit=256)
    layers = ["features.0", "features.3", "classifier.0"]
    cal = calibrate(model, DataLoader(ds, batch_size=64), layers=layers, readout="post_act",
                    rank_images=16, progress=False)
    assert cal.layers == layers and cal.stats["features.0"].count == 256 * 16
    assert cal.stats["classifier.0"].count == 256  # no spatial positions: one row per image
    margin = cal.stats["features.0"].mean[-1]
    assert margin > 0  # a trained net: positive mean logit margin on its training data
    metrics = ["taylor", "activation_mean", "activation_rms", "sfvr", "hrank", "chip"]
    scores = cf.score(model, cal, metrics)
    for m in metrics:
        for l in layers:
            v = scores[m][l]
            assert v.shape == (model.get_submodule(l).weight.shape[0],)
            assert torch.isfinite(v).all(), (m, l)
    assert (scores["activation_mean"]["features.3"] >= 0).all()  # post-ReLU
    assert scores["hrank"]["features.0"].max() <= 28 and scores["hrank"]["classifier.0"].max() <= 1
