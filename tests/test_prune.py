"""The pruning protocol's plans, masks and FLOPs against torch.utils.flop_counter and physically
slimmed copies made with Torch-Pruning's DependencyGraph."""

import copy
import json
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import chanaxis_fast as cf
from chanaxis_fast.errors import UserInputError
from chanaxis_fast.flops import flops
from chanaxis_fast.prune import MaskPlan, apply_masks, keep_masked, plan

tp = pytest.importorskip("torch_pruning")


def randomised_bn(model, seed=0):
    """Running statistics and affine parameters far from their defaults, so that BatchNorm matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                C = m.num_features
                m.running_mean.copy_(torch.rand(C, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
                m.weight.copy_(torch.rand(C, generator=g) + 0.5)
                m.bias.copy_(torch.rand(C, generator=g) - 0.5)
    return model.eval()


def tv(name, num_classes=10, seed=0):
    torch.manual_seed(seed)
    return randomised_bn(torchvision.models.get_model(name, num_classes=num_classes), seed)


def dense_flop_counter(model, x):
    with FlopCounterMode(display=False) as fcm, torch.no_grad():
        model(x)
    return fcm.get_total_flops()


def weight_scores(model, x, metrics=("l1",)):
    return cf.score(model, graph=cf.trace_model(model, x), metrics=list(metrics))


def slimmed(model, p, x):
    """A physically slimmed copy: every group of the plan removed with Torch-Pruning."""
    slim = copy.deepcopy(model)
    DG = tp.DependencyGraph().build_dependency(slim, example_inputs=x[:1])
    mods = dict(slim.named_modules())
    for g in p.groups:
        if g.pruned:
            DG.get_pruning_group(mods[g.members[0]], tp.prune_conv_out_channels, idxs=list(g.pruned)).prune()
    return slim


# ---------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("vgg16_bn", 32),
                                       ("mobilenet_v2", 64), ("convnext_tiny", 64)])
def test_dense_flops_equal_flop_counter(name, size):
    model = tv(name)
    x = torch.randn(2, 3, size, size)
    count = flops(model, x)
    assert count.dense_flops == count.flops == dense_flop_counter(model, x)
    assert count.removed == 0.0
    df = count.to_pandas()
    assert (df["flops"] == 2 * df["macs"]).all() and df["flops"].sum() == count.flops


def test_dense_flops_of_the_offline_imagenet_efficientnet():
    from chanaxis_fast.zoo import load_model

    try:
        model = load_model("efficientnet_lite0").model
    except UserInputError as e:
        pytest.skip(str(e))
    x = torch.randn(1, 3, 96, 96)
    assert flops(model, x).dense_flops == dense_flop_counter(model, x)


@pytest.fixture(scope="module", params=["resnet18", "vgg16_bn", "mobilenet_v2"])
def slim_case(request):
    model = tv(request.param)
    x = torch.randn(3, 3, 32, 32)
    return request.param, model, x, weight_scores(model, x, ["l1", "random"])


@pytest.mark.parametrize("ratio", [0.3, 0.65])
def test_masking_equals_physical_removal(slim_case, ratio):
    name, model, x, scores = slim_case
    p = plan(model, scores, "l1", ratio)
    assert p.groups and any(g.pruned for g in p.groups)
    slim = slimmed(model, p, x)
    with torch.no_grad():
        y_slim = slim(x)
    with apply_masks(model, p), torch.no_grad():
        y_masked = model(x)
        masked = flops(model, x, p)
    # the same network: logits, FLOPs and parameter counts agree
    torch.testing.assert_close(y_masked, y_slim, rtol=1e-4, atol=1e-4 * float(y_slim.abs().max()))
    assert masked.flops == dense_flop_counter(slim, x)
    assert masked.flops == 3 * p.flops_after  # the plan counts per image
    assert p.params_after == sum(q.numel() for q in slim.parameters())
    assert 0.2 < p.flops_removed < 0.95


def test_uniform_allocation_removes_the_same_flops_for_every_metric():
    model = tv("resnet18")
    x = torch.randn(2, 3, 32, 32)
    scores = weight_scores(model, x, ["l1", "fpgm", "bn_scale", "random", "magnitude(p=1)"])
    for r in (0.1, 0.37, 0.5, 0.9):
        plans = [plan(model, scores, m, r) for m in scores.metrics]
        assert len({(p.macs_after, p.params_after) for p in plans}) == 1, r
        counts = {tuple(len(g.pruned) for g in p.groups) for p in plans}
        assert len(counts) == 1
        # floor(C * r) per group, capped at 0.95, at least one kept
        for g, n in zip(plans[0].groups, next(iter(counts))):
            assert n == min(math.floor(g.size * r + 1e-9), math.floor(g.size * 0.95), g.size - 1)
        # different metrics choose different channels
        assert len({tuple(tuple(g.pruned) for g in p.groups) for p in plans}) > 1


def test_group_scores_are_the_mean_over_the_members_and_ranking_uses_the_direction():
    model = tv("resnet18")
    x = torch.randn(2, 3, 32, 32)
    scores = weight_scores(model, x, ["l1"])
    p = plan(model, scores, "l1", 0.5)
    stem = next(g for g in p.groups if "conv1" in g.members)
    assert set(stem.members) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}  # one residual stream
    mean = torch.stack([scores["l1"][m] for m in stem.members]).mean(0)
    assert stem.pruned == sorted(torch.argsort(mean, stable=True)[:32].tolist())
    # a metric with direction -1 (higher = removable) prunes its highest values
    cf.register_metric("l1_removable", kind="custom", direction=-1, replace=True)(
        lambda ctx, layer: ctx.weight(layer).flatten(1).abs().sum(1))
    try:
        neg = cf.score(model, graph=scores.graph, metrics=["l1_removable"])
        q = plan(model, neg, "l1_removable", 0.5)
        stem_q = next(g for g in q.groups if "conv1" in g.members)
        assert stem_q.pruned == sorted(torch.argsort(-mean, stable=True)[:32].tolist())
    finally:
        from chanaxis_fast.metrics.registry import _REGISTRY
        _REGISTRY.pop("l1_removable")


def test_global_allocation_prunes_the_fraction_over_all_channels_with_the_cap():
    model = tv("vgg16_bn")
    x = torch.randn(2, 3, 32, 32)
    scores = weight_scores(model, x, ["l1"])
    p = plan(model, scores, "l1", 0.4, allocation="global", max_ratio=0.6)
    total = sum(g.size for g in p.groups)
    assert sum(len(g.pruned) for g in p.groups) == math.floor(0.4 * total)
    assert all(len(g.pruned) <= math.floor(0.6 * g.size) for g in p.groups)
    assert len({len(g.pruned) / g.size for g in p.groups}) > 1  # not uniform


@pytest.mark.parametrize("target", [0.25, 0.5, 0.71])
def test_flops_target_lands_within_one_channel_step(target):
    model = tv("resnet18")
    x = torch.randn(2, 3, 32, 32)
    scores = weight_scores(model, x, ["l1"])
    p = plan(model, scores, "l1", allocation="flops_target", flops_target=target)
    assert p.flops_removed >= target
    # one channel step less (the largest ratio below p.ratio at which some group keeps one
    # channel more) does not reach the target
    steps = sorted({k / g.size for g in p.groups for k in range(1, g.size)})
    below = max(s for s in steps if s < p.ratio - 1e-12)
    assert plan(model, scores, "l1", below).flops_removed < target


def test_masks_zero_what_removal_deletes_and_the_context_restores_bit_for_bit():
    model = tv("mobilenet_v2")
    x = torch.randn(2, 3, 32, 32)
    scores = weight_scores(model, x, ["l1"])
    p = plan(model, scores, "l1", 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods = dict(model.named_modules())
    with apply_masks(model, p) as m:
        assert m is model
        for g in p.groups:
            for layer in g.members:
                assert (mods[layer].weight[g.pruned] == 0).all()
            for bn, off in g.bns:
                idx = [c + off for c in g.pruned]
                b = mods[bn]
                assert (b.weight[idx] == 0).all() and (b.bias[idx] == 0).all()
                assert (b.running_mean[idx] == 0).all() and (b.running_var[idx] == 1).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="inside"):
        with apply_masks(model, p):
            raise RuntimeError("inside")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_keep_masked_survives_fine_tuning():
    from chanaxis_fast.zoo import ResNetMini

    torch.manual_seed(0)
    model = randomised_bn(ResNetMini(in_channels=3, widths=(8, 16, 32), blocks=1))
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    scores = weight_scores(model, x, ["l1"])
    p = plan(model, scores, "l1", 0.5)
    for opt_cls, kw in ((torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
                        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3))):
        work = copy.deepcopy(model).train()
        masking = apply_masks(work, p, permanent=True)
        opt = opt_cls(work.parameters(), **kw)
        handle = keep_masked(opt, masking)
        for _ in range(20):
            opt.zero_grad()
            nn.functional.cross_entropy(work(x), y).backward()
            opt.step()
        handle.remove()
        for t, m, fill in masking.masks:
            assert (t[m] == fill).all()
            for v in opt.state.get(t, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == t.shape:
                    assert (v[m] == 0).all()
        # the network still equals its slimmed copy after training
        work.eval()
        slim = slimmed(work, p, x)
        with torch.no_grad():
            torch.testing.assert_close(work(x), slim(x), rtol=1e-4, atol=1e-4)
    # without the hook the pruned channels would revive
    work = copy.deepcopy(model).train()
    masking = apply_masks(work, p, permanent=True)
    opt = torch.optim.Adam(work.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(work(x), y).backward()
        opt.step()
    assert any((t[m] != fill).any() for t, m, fill in masking.masks)


def test_plan_json_round_trip_and_another_model_is_refused(tmp_path):
    model = tv("resnet18")
    x = torch.randn(2, 3, 32, 32)
    scores = weight_scores(model, x, ["l1"])
    p = plan(model, scores, "l1", 0.3)
    q = MaskPlan.from_json(p.to_json(tmp_path / "plan.json"))
    assert q.to_json() == p.to_json()
    assert {k: v.tolist() for k, v in q.pruned.items()} == {k: v.tolist() for k, v in p.pruned.items()}
    df = q.summary()
    assert set(df.columns) >= {"layer", "channels", "pruned", "kept", "macs_before", "macs_after"}
    assert (df["pruned"] + df["kept"] == df["channels"]).all()
    other = tv("resnet34")
    with pytest.raises(UserInputError, match="this model has layer 'layer1.2.conv1'"):
        apply_masks(other, q)
    wide = torchvision.models.resnet18(num_classes=100)
    with pytest.raises(UserInputError, match="'fc' has 10 output / 512 input channels; this model's has 100"):
        apply_masks(wide, q)
    with pytest.raises(UserInputError, match="not a chanaxis_fast mask plan"):
        MaskPlan.from_json('{"format": "x"}')


def test_what_cannot_be_masked_is_skipped_with_a_reason():
    model = tv("convnext_tiny")
    x = torch.randn(1, 3, 64, 64)
    graph = cf.trace_model(model, x)
    scores = cf.score(model, graph=graph, metrics=["l1"], layers=graph.default_layers(linear=True))
    p = plan(model, scores, "l1", 0.5)
    # the residual streams pass LayerNorms: skipped; the MLPs' hidden Linear channels are pruned
    assert "LayerNorm" in p.skipped["features.1.0.block.0"]
    assert "features.1.0.block.3" in p.pruned and len(p.pruned["features.1.0.block.3"]) == 192
    slim_flops = dense_flop_counter(model, x)
    with apply_masks(model, p):
        assert flops(model, x, p).flops < slim_flops
    r18 = tv("resnet18")
    s18 = weight_scores(r18, torch.randn(2, 3, 32, 32), ["l1"])
    ex = plan(r18, s18, "l1", 0.5, coupled="exclude")
    assert "coupled='exclude'" in ex.skipped["conv1"] and "layer1.0.conv1" in ex.pruned
    assert "conv1" not in ex.pruned


def test_plan_errors_name_the_argument():
    model = tv("resnet18")
    x = torch.randn(2, 3, 32, 32)
    graph = cf.trace_model(model, x)
    scores = cf.score(model, graph=graph, metrics=["l1"])
    for ratio in (0, 1, 1.5, -0.1, float("nan")):
        with pytest.raises(UserInputError, match="ratio must be in"):
            plan(model, scores, "l1", ratio)
    with pytest.raises(UserInputError, match="no metric 'fpgm'; they hold: l1"):
        plan(model, scores, "fpgm", 0.5)
    with pytest.raises(UserInputError, match="allocation must be one of"):
        plan(model, scores, "l1", 0.5, allocation="local")
    with pytest.raises(UserInputError, match="flops_target must be in"):
        plan(model, scores, "l1", allocation="flops_target", flops_target=1.2)
    with pytest.raises(UserInputError, match="'layer1.0.conv1' has 64 output / 64 input"):
        other = torchvision.models.resnet18(num_classes=10)
        other.layer1[0].conv1 = nn.Conv2d(64, 32, 3, padding=1)
        plan(other, scores, "l1", 0.5)
