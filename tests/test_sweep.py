"""Sweeps and the FLOPs-AUC: analytic AUC values, random seeds, resumption, errors."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chanaxis_fast as cf
from chanaxis_fast.errors import UserInputError
from chanaxis_fast.sweep import SweepResult, flops_auc, sweep
from chanaxis_fast.zoo import ResNetMini


def result_from(curves, dense=0.8, finetuned=None):
    """A SweepResult from {metric: [(flops_removed, accuracy), ...]} (random: list per seed)."""
    points = []
    for m, c in curves.items():
        seeds = c if isinstance(c, dict) else {None: c}
        for seed, pts in seeds.items():
            for i, (x, acc) in enumerate(pts):
                p = dict(metric=m, seed=seed, ratio=round(0.1 * (i + 1), 3), flops_removed=x,
                         params_removed=x, channels_pruned=i, accuracy_before=acc, loss_before=1.0)
                if finetuned:
                    p.update(accuracy_after=min(dense, acc + finetuned), loss_after=0.5)
                points.append(p)
    return SweepResult(points, {"accuracy": dense, "loss": 0.3}, {"test": True})


def test_auc_of_perfect_retention_is_one_and_a_straight_line_has_its_analytic_value():
    xs = np.linspace(0.1, 0.9, 9)
    r = result_from({"flat": [(x, 0.8) for x in xs], "line": [(x, 0.8 * (1 - x)) for x in xs]})
    assert r.auc("flat") == pytest.approx(1.0)
    # integral of (1 - x) from 0.1 to 0.9, over 0.8
    assert r.auc("line") == pytest.approx(0.5)
    assert r.auc("line", origin=True) == pytest.approx((0.9 - 0.9 ** 2 / 2) / 0.9)
    assert r.auc("line", y="accuracy") == pytest.approx(0.8 * 0.5)
    assert r.auc("line", y="accuracy", origin=True) == pytest.approx(0.8 * (0.9 - 0.405) / 0.9)
    assert r.auc() == pytest.approx({"flat": 1.0, "line": 0.5})
    # trapezoid rule on uneven points, checked by hand
    assert flops_auc([0.0, 0.5, 0.6], [1.0, 0.5, 0.0]) == pytest.approx((0.375 + 0.025) / 0.6)
    assert flops_auc([0.6, 0.0, 0.5], [0.0, 1.0, 0.5]) == pytest.approx((0.375 + 0.025) / 0.6)


def test_after_fine_tuning_and_errors():
    xs = [0.2, 0.4, 0.6]
    r = result_from({"a": [(x, 0.4) for x in xs]}, dense=0.8, finetuned=0.2)
    assert r.auc("a", stage="before") == pytest.approx(0.5)
    assert r.auc("a", stage="after") == pytest.approx(0.75)
    with pytest.raises(UserInputError, match="stage must be"):
        r.auc("a", stage="during")
    with pytest.raises(UserInputError, match="no points for metric 'b'"):
        r.auc("b")
    plain = result_from({"a": [(x, 0.4) for x in xs]})
    with pytest.raises(UserInputError, match="needs a sweep with fine-tuning"):
        plain.auc("a", stage="after")


def test_random_seeds_give_the_mean_auc_and_its_range(tmp_path):
    xs = [0.1, 0.5, 0.9]
    seeds = {0: [(x, 0.8) for x in xs], 1: [(x, 0.4) for x in xs], 2: [(x, 0.6) for x in xs]}
    r = result_from({"random": seeds, "l1": [(x, 0.7) for x in xs]})
    assert r.auc("random") == pytest.approx(0.75)
    t = r.auc_table().set_index("metric")
    assert t.loc["random", "auc_before_min"] == pytest.approx(0.5)
    assert t.loc["random", "auc_before_max"] == pytest.approx(1.0)
    assert t.loc["random", "seeds"] == 3 and t.loc["l1", "rank"] == 1
    x, y, lo, hi = r.curve("random")
    np.testing.assert_allclose(y, [0.75] * 3)
    np.testing.assert_allclose(lo, [0.5] * 3)
    path = r.plot(tmp_path / "curves.png")
    assert os.path.getsize(path) > 1000
    again = SweepResult.from_json(r.to_json(tmp_path / "s.json"))
    assert again.points == r.points and again.auc() == r.auc()
    text = (tmp_path / "s.json").read_text().replace('"accuracy_before": 0.4', '"accuracy_before": 0.41', 1)
    with pytest.raises(UserInputError, match="checksum mismatch"):
        SweepResult.from_json(text)


# ---------------------------------------------------------------------- sweeps of a small network
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = ResNetMini(in_channels=1, widths=(8, 16, 16), blocks=1).eval()
    x = torch.randn(64, 1, 12, 12)
    with torch.no_grad():
        y = model(x).argmax(1)  # the dense model is right by construction
    scores = cf.score(model, graph=cf.trace_model(model, x[:2]), metrics=["l1", "bn_scale", "fpgm"])
    calls = {"n": 0}

    def evaluate(m):
        calls["n"] += 1
        with torch.no_grad():
            logits = m(x)
        return {"accuracy": float((logits.argmax(1) == y).float().mean()),
                "loss": float(F.cross_entropy(logits, y))}

    return model, scores, evaluate, calls


def test_sweep_is_flops_matched_restores_the_model_and_resumes(tiny, tmp_path):
    model, scores, evaluate, calls = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    full = sweep(model, scores, ["l1", "bn_scale", "random"], [0.2, 0.5, 0.8], evaluate=evaluate,
                 random_seeds=2, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    df = full.to_pandas()
    assert len(df) == (2 + 2) * 3 and df["seed"].isna().sum() == 6
    assert df.groupby("ratio")["flops_removed"].nunique().eq(1).all()  # FLOPs-matched
    assert (df.groupby("ratio")["flops_removed"].first().diff().dropna() > 0).all()
    assert full.dense["accuracy"] == 1.0
    # an interrupted sweep resumes from its checkpoint and ends with the same result
    ckpt = tmp_path / "sweep.json"
    n0 = calls["n"]

    def flaky(m):
        if calls["n"] - n0 == 5:
            calls["n"] += 1
            raise KeyboardInterrupt
        return evaluate(m)

    with pytest.raises(KeyboardInterrupt):
        sweep(model, scores, ["l1", "bn_scale", "random"], [0.2, 0.5, 0.8], evaluate=flaky,
              random_seeds=2, progress=False, checkpoint=ckpt)
    partial = SweepResult.from_json(ckpt)
    assert len(partial.points) == 4
    before = calls["n"]
    resumed = sweep(model, scores, ["l1", "bn_scale", "random"], [0.2, 0.5, 0.8], evaluate=evaluate,
                    random_seeds=2, progress=False, checkpoint=ckpt)
    assert calls["n"] - before == 12 - 4  # only the missing points were evaluated
    assert resumed.points == full.points
    # another sweep's checkpoint is refused and left as it was
    text = ckpt.read_text()
    with pytest.raises(UserInputError, match="belongs to another sweep.*ratios"):
        sweep(model, scores, ["l1", "bn_scale", "random"], [0.2, 0.5], evaluate=evaluate,
              random_seeds=2, progress=False, checkpoint=ckpt)
    assert ckpt.read_text() == text


def test_sweep_with_fine_tuning_keeps_the_masks_and_leaves_the_model(tiny):
    model, scores, evaluate, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 1, 12, 12)
    y = torch.randint(0, 10, (32,))
    seen = []

    def finetune(m, after_step):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        m.train()
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
            after_step(opt)
        m.eval()
        seen.append(m)

    def evaluate_masked(m):
        if seen and m is seen[-1]:
            # every pruned conv row is still zero after fine-tuning
            p = cf.plan(model, scores, "l1", 0.5)
            for layer, idx in p.pruned.items():
                assert (dict(m.named_modules())[layer].weight[idx] == 0).all()
        return evaluate(m)

    r = sweep(model, scores, ["l1"], [0.5], evaluate=evaluate_masked, finetune=finetune, progress=False)
    assert r.finetuned and r.points[0]["accuracy_after"] is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert set(r.auc_table().columns) >= {"auc_before", "auc_after", "rank"}


def test_sweep_errors_name_the_argument(tiny):
    model, scores, evaluate, _ = tiny
    for ratios, match in (([0.5, 1.0], "ratios must lie in"), ([0.0], "ratios must lie in"),
                          ([0.3, 0.3], "repeat"), ([], "empty")):
        with pytest.raises(UserInputError, match=match):
            sweep(model, scores, ["l1"], ratios, evaluate=evaluate, progress=False)
    with pytest.raises(UserInputError, match="no metric 'taylor'; they hold: l1, bn_scale, fpgm"):
        sweep(model, scores, ["taylor"], [0.5], evaluate=evaluate, progress=False)
    with pytest.raises(UserInputError, match="must return a dict with 'accuracy'"):
        sweep(model, scores, ["l1"], [0.5], evaluate=lambda m: {"acc": 1.0}, progress=False)
    other = ResNetMini(in_channels=1, widths=(8, 16, 32), blocks=1)
    with pytest.raises(UserInputError, match="layer 'layer3.0.conv1' has 16 output"):
        sweep(other, scores, ["l1"], [0.5], evaluate=evaluate, progress=False)
