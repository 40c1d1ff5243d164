"""The axis tracker on real data: the axes separate along training, the model is left exactly as it
was, a resumed series equals an uninterrupted one, the table, the plot, the Lightning callback and
the ``track`` command."""

import importlib
import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader

import chanaxis_fast as cf
from chanaxis_fast.cli import main
from chanaxis_fast.data import load_fashion_mnist, seeded_subset
from chanaxis_fast.errors import UserInputError
from chanaxis_fast.stats import StatsFileError
from chanaxis_fast.tracking import AxisTracker, depth_spaced
from chanaxis_fast.training import evaluate_classifier, train_classifier
from chanaxis_fast.zoo import ResNetMini


class SmallBNCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (two of stride 2), global average pooling, a linear head: a
    small BatchNorm CNN that trains in seconds on 28 x 28 images."""

    def __init__(self, widths=(32, 32, 64, 64)):
        super().__init__()
        layers, c = [], 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, 2 if i in (0, 2) else 1, 1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def fashion():
    return load_fashion_mnist("train")


@pytest.fixture(scope="module")
def calib_loader(fashion):
    return DataLoader(seeded_subset(fashion, 160, 7), batch_size=80)


# ------------------------------------------------------------------ layer selection
def test_depth_spaced_picks_evenly_spaced_layers_of_the_default_ones(calib_loader):
    names = [f"l{i}" for i in range(15)]
    # round(14 * k / 5) for k = 0..5: 0, 2.8, 5.6, 8.4, 11.2, 14
    assert depth_spaced(names, 6) == ["l0", "l3", "l6", "l8", "l11", "l14"]
    assert depth_spaced(names, 2) == ["l0", "l14"]
    assert depth_spaced(names, 15) == names and depth_spaced(names, 40) == names

    model = ResNetMini(widths=(4, 4, 8))
    graph = cf.trace_model(model, torch.zeros(2, 1, 28, 28))
    default = graph.default_layers()
    assert len(default) == 15  # the stem, 12 convs in blocks, 2 shortcut projections
    tracker = AxisTracker(calib_loader, modularity=False)
    tracker.measure(model, 0)
    assert tracker.layers == [default[i] for i in (0, 3, 6, 8, 11, 14)]
    regex = AxisTracker(calib_loader, layers=r"layer3\..*conv\d", modularity=False)
    regex.measure(model, 0)
    assert regex.layers == ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2"]


def test_bad_arguments_are_clear_errors(calib_loader, fashion):
    with pytest.raises(UserInputError, match="depth_spaced:K"):
        AxisTracker(calib_loader, layers="depth_spaced:0")
    with pytest.raises(UserInputError, match="shuffles"):
        AxisTracker(DataLoader(fashion, batch_size=10, shuffle=True))
    with pytest.raises(UserInputError, match="one-shot iterator"):
        AxisTracker(iter(calib_loader))
    with pytest.raises(UserInputError, match="every must be an int >= 1"):
        AxisTracker(calib_loader, every=0)
    with pytest.raises(UserInputError, match="unknown metric 'nope'"):
        AxisTracker(calib_loader, metrics=["nope"])
    tracker = AxisTracker(calib_loader, layers=["features.0", "nope"])
    with pytest.raises(UserInputError, match="no module named 'nope'"):
        tracker.measure(SmallBNCNN((4, 4, 4, 4)), 0)
    with pytest.raises(UserInputError, match="step must be an int"):
        tracker.measure(SmallBNCNN((4, 4, 4, 4)), 1.5)
    with pytest.raises(UserInputError, match="nothing is recorded"):
        tracker.plot("unused.png")


# ------------------------------------------------------------------ the model is left alone
def test_measuring_leaves_weights_buffers_gradients_modes_and_the_rng_exactly_as_they_were(calib_loader):
    torch.manual_seed(3)
    model = ResNetMini(widths=(4, 8, 8))
    model.train()
    model.layer2.eval()  # a mixed mode, as when a user freezes part of the network
    model.fc.weight.requires_grad_(False)
    F.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.arange(8)).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()

    tracker = AxisTracker(calib_loader, metrics=["l1", "taylor"])  # taylor: gradients inside calibrate
    tracker.measure(model, 0)

    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before), "weights or buffers changed"
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if n in grads)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(grads)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG moved"


def test_training_with_the_tracker_is_bit_for_bit_training_without_it(fashion, calib_loader):
    def run(track):
        torch.manual_seed(0)
        model = SmallBNCNN((8, 8, 8, 8))
        loader = DataLoader(seeded_subset(fashion, 256, 1), batch_size=64, shuffle=True)
        tracker = AxisTracker(calib_loader, modularity=False, every=2)
        train_classifier(
            model, loader, epochs=2, max_batches=2, seed=5,
            after_step=(lambda opt, n=iter(range(1, 99)): tracker.maybe_measure(model, next(n)))
            if track else None)
        return model.state_dict(), tracker

    plain, _ = run(False)
    tracked, tracker = run(True)
    assert tracker.steps == [2, 4]  # every=2 over 4 steps
    assert all(torch.equal(plain[k], tracked[k]) for k in plain)


# ------------------------------------------------------------------ the axes separate along training
@pytest.fixture(scope="module")
def trained_series(fashion):
    """ResNetMini 16/32/64 with one block per stage, trained for 150 steps of 32 images on
    Fashion-MNIST from seed 0, measured at initialisation and at the end on 1,000 images.

    Seed survey (mean over the 6 layers of the cross-axis rho at steps 0 / 150 / 300): seed 0
    0.64 / 0.40 / 0.27, seed 1 -0.11 / 0.32 / 0.25, seed 2 0.46 / 0.44 / 0.39. After training
    it is consistently 0.25-0.4; at initialisation it depends on the draw (eval-mode BatchNorm
    is the identity before training), so the drop is pinned on seed 0, where it is largest."""
    torch.manual_seed(0)
    model = ResNetMini(1, 10, widths=(16, 32, 64), blocks=1)
    loader = DataLoader(seeded_subset(fashion, 1000, 123), batch_size=250)
    tracker = AxisTracker(loader, layers="depth_spaced:6", metrics=["l1"], seed=0)
    tracker.measure(model, 0)
    train = DataLoader(seeded_subset(fashion, 300 * 32, 1000), batch_size=32, shuffle=True)
    train_classifier(model, train, lr=1e-3, max_batches=150, seed=0)
    test = load_fashion_mnist("test", limit=1000)
    acc = evaluate_classifier(model, DataLoader(test, batch_size=500))["accuracy"]
    tracker.measure(model, 150, info={"test_accuracy": acc})
    return model, tracker


def test_the_cross_axis_alignment_drops_along_training(trained_series):
    _, tracker = trained_series
    rho = tracker.to_pandas(wide=True).groupby("step")["cross_axis_rho"].mean()
    assert tracker.steps_to_pandas()["test_accuracy"].iloc[-1] > 0.7  # it learned
    assert rho[0] > 0.5 and rho[150] < rho[0] - 0.15, f"mean rho {rho[0]:.3f} -> {rho[150]:.3f}"


def test_recorded_quantities_match_an_independent_computation(trained_series):
    model, tracker = trained_series
    cal = cf.calibrate(model, tracker.loader, layers=tracker.layers, extras=None, seed=tracker.seed,
                       progress=False)
    wide = tracker.to_pandas(wide=True).query("step == 150").set_index("layer")
    mod = cf.modularity(cal, seed=tracker.seed).set_index("layer")
    for layer in tracker.layers:
        cov = cal.stats[layer].covariance().numpy()
        C = cov.shape[0] - 1
        J = np.diag(cov)[:C]
        ix = 0.5 * np.log1p(J / np.median(J))
        r = np.clip(cov[C, :C] / np.sqrt(cov[C, C] * J), -0.999, 0.999)
        ti = -0.5 * np.log1p(-r * r)
        assert wide.at[layer, "cross_axis_rho"] == pytest.approx(stats.spearmanr(ix, ti).statistic, abs=1e-9)
        w = dict(model.named_modules())[layer].weight.detach().double()
        assert wide.at[layer, "l1"] == pytest.approx(w.abs().sum((1, 2, 3)).mean().item(), rel=1e-9)
        assert wide.at[layer, "modularity_gap"] == pytest.approx(mod.at[layer, "Q_R"] - mod.at[layer, "Q_S"])
        assert 0 <= wide.at[layer, "saturated_frac"] <= 1 and 0 <= wide.at[layer, "e_full_mean"] <= 1
        assert 0 <= wide.at[layer, "hull_size_mean"] <= 10 and np.isfinite(wide.at[layer, "s3_s2"])


def test_tables_csv_and_plot(trained_series, tmp_path):
    _, tracker = trained_series
    long = tracker.to_pandas()
    assert list(long.columns) == ["step", "layer", "quantity", "value"]
    assert len(long) == 2 * len(tracker.layers) * len(tracker.quantities)
    assert set(long["quantity"]) == {"cross_axis_rho", "hull_size_mean", "saturated_frac", "e_full_mean",
                                     "s3_s2", "Q_R", "Q_S", "modularity_gap", "l1"}
    wide = tracker.to_pandas(wide=True)
    back = long.pivot_table(index=["step", "layer"], columns="quantity", values="value")
    for q in tracker.quantities:
        for _, row in wide.iterrows():
            assert back.at[(row["step"], row["layer"]), q] == row[q]
    path = tracker.to_csv(tmp_path / "series.csv")
    pd.testing.assert_frame_equal(pd.read_csv(path), long, check_dtype=False)
    png = tracker.plot(tmp_path / "tracking.png")
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image

    with Image.open(png) as im:  # 3 x 3 panels of 4.2 x 3.2 inches at 110 dpi
        assert im.size[0] > 1200 and im.size[1] > 1000


# ------------------------------------------------------------------ resuming
@pytest.fixture(scope="module")
def checkpoints(fashion):
    """The states of a small network at steps 0, 10, 20 and 30 of a seeded training."""
    torch.manual_seed(0)
    model = SmallBNCNN((8, 8, 16, 16))
    data = seeded_subset(fashion, 30 * 32, 2)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    for i in range(3):
        train_classifier(model, DataLoader(data, batch_size=32, shuffle=True), max_batches=10,
                                     seed=i)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def _at(states, k):
    model = SmallBNCNN((8, 8, 16, 16))
    model.load_state_dict(states[k])
    return model


def test_a_resumed_series_equals_an_uninterrupted_one(checkpoints, calib_loader, fashion, tmp_path):
    whole = AxisTracker(calib_loader, metrics=["peer_overlap"], every=20)
    for k in range(4):
        whole.maybe_measure(_at(checkpoints, k), 20 * k)

    first = AxisTracker(calib_loader, metrics=["peer_overlap"], every=20)
    for k in range(2):
        first.maybe_measure(_at(checkpoints, k), 20 * k)
    first.meta["note"] = "part one"
    first.save(tmp_path / "tracker.pt")
    del first
    again = DataLoader(seeded_subset(fashion, 160, 7), batch_size=80)  # a new loader, same data
    resumed = AxisTracker.load(tmp_path / "tracker.pt", again)
    assert resumed.steps == [0, 20] and resumed.meta == {"note": "part one"}
    for k in range(2, 4):
        resumed.maybe_measure(_at(checkpoints, k), 20 * k)
    pd.testing.assert_frame_equal(resumed.to_pandas(), whole.to_pandas())
    # timings aside, the records are the same
    strip = lambda t: [{k: v for k, v in t.records[s].items() if k != "seconds"} for s in t.steps]  # noqa: E731
    assert strip(resumed) == strip(whole)

    # a step already recorded is an error, unless replaced
    with pytest.raises(UserInputError, match="epoch|step 60 is already recorded"):
        resumed.measure(_at(checkpoints, 3), 60)
    resumed.measure(_at(checkpoints, 0), 60, replace=True)
    replaced = resumed.to_pandas().query("step == 60")["value"].to_numpy()
    at_init = whole.to_pandas().query("step == 0")["value"].to_numpy()
    np.testing.assert_array_equal(replaced, at_init)


def test_loading_checks_the_file_and_the_data(checkpoints, calib_loader, fashion, tmp_path):
    tracker = AxisTracker(calib_loader, modularity=False)
    tracker.measure(_at(checkpoints, 0), 0)
    path = tmp_path / "t.pt"
    tracker.save(path)
    state = torch.load(path, weights_only=True)
    assert json.loads(json.dumps(state)) == state  # plain data only: no tensors, no objects

    other = DataLoader(seeded_subset(fashion, 160, 8), batch_size=80)
    with pytest.raises(UserInputError, match="other calibration data"):
        AxisTracker.load(path, other)
    tampered = dict(state, records=[dict(state["records"][0], step=5)])
    torch.save(tampered, tmp_path / "bad.pt")
    with pytest.raises(StatsFileError, match="checksum mismatch"):
        AxisTracker.load(tmp_path / "bad.pt", calib_loader)
    torch.save(dict(state, version=99), tmp_path / "v.pt")
    with pytest.raises(StatsFileError, match="version"):
        AxisTracker.load(tmp_path / "v.pt", calib_loader)
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(StatsFileError, match="truncated or corrupt"):
        AxisTracker.load(tmp_path / "trunc.pt", calib_loader)
    with pytest.raises(UserInputError, match="another configuration"):
        AxisTracker(calib_loader, modularity=True).load_state_dict(state)
    # a loader over other data that slipped past the cheap check is caught at the next measurement
    swapped = AxisTracker.load(path, list(DataLoader(seeded_subset(fashion, 160, 9), batch_size=80)))
    with pytest.raises(UserInputError, match="calibration data differ"):
        swapped.measure(_at(checkpoints, 1), 1)


# ------------------------------------------------------------------ Lightning
def _stand_in_trainer(epoch, **metrics):
    return types.SimpleNamespace(current_epoch=epoch, is_global_zero=True, sanity_checking=False,
                                 callback_metrics={k: torch.tensor(v) for k, v in metrics.items()})


def test_lightning_callback_with_a_stand_in_trainer(checkpoints, calib_loader, tmp_path):
    from chanaxis_fast.integrations.lightning import AxisTrackerCallback

    tracker = AxisTracker(calib_loader, every=2, modularity=False, step_name="epoch")
    callback = AxisTrackerCallback(tracker, path=tmp_path / "tracker.pt")
    callback.on_train_start(_stand_in_trainer(0), _at(checkpoints, 0))
    for epoch in range(3):  # epochs 1, 2, 3 completed; every=2 measures after epoch 2
        callback.on_train_epoch_end(_stand_in_trainer(epoch, val_acc=0.5 + epoch / 10),
                                    _at(checkpoints, epoch + 1))
    assert tracker.steps == [0, 2]
    assert tracker.records[2]["info"] == {"val_acc": pytest.approx(0.6)}
    assert AxisTracker.load(tmp_path / "tracker.pt", calib_loader).steps == [0, 2]

    # Lightning's checkpoint round trip: a new callback continues the series
    fresh = AxisTrackerCallback(AxisTracker(calib_loader, every=2, modularity=False, step_name="epoch"))
    fresh.load_state_dict(callback.state_dict())
    fresh.on_train_start(_stand_in_trainer(3), _at(checkpoints, 3))  # step 0 is there: no re-measure
    fresh.on_train_epoch_end(_stand_in_trainer(3), _at(checkpoints, 3))
    assert fresh.tracker.steps == [0, 2, 4]
    rank1 = types.SimpleNamespace(current_epoch=5, is_global_zero=False, sanity_checking=False)
    fresh.on_train_epoch_end(rank1, _at(checkpoints, 3))
    assert fresh.tracker.steps == [0, 2, 4]


def test_the_library_imports_without_lightning(monkeypatch, calib_loader, checkpoints):
    import chanaxis_fast.integrations.lightning as integration

    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning raises ImportError
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    try:
        plain = importlib.reload(integration)
        assert plain.AxisTrackerCallback.__mro__[1] is object
        callback = plain.AxisTrackerCallback(AxisTracker(calib_loader, modularity=False))
        callback.on_train_start(_stand_in_trainer(0), _at(checkpoints, 0))
        assert callback.tracker.steps == [0]
    finally:
        monkeypatch.undo()
        importlib.reload(integration)


def test_lightning_callback_in_a_real_trainer(checkpoints, calib_loader):
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    from chanaxis_fast.integrations.lightning import AxisTrackerCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _at(checkpoints, 0)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    tracker = AxisTracker(calib_loader, modularity=False, step_name="epoch")
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), DataLoader(list(calib_loader), batch_size=None))
    assert tracker.steps == [] and trainer.current_epoch == 2  # the tracker was not a callback
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=[AxisTrackerCallback(tracker, model=lambda m: m.net)])
    trainer.fit(Module(), DataLoader(list(calib_loader), batch_size=None))
    assert tracker.steps == [0, 1, 2]
    assert "train_loss" in tracker.records[2]["info"]


# ------------------------------------------------------------------ the command line
def test_track_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "track"
    args = ["track", "--data", "mnist", "--epochs", "2", "--widths", "4,4,8", "--images", "200",
            "--train-images", "128", "--eval-images", "200", "--batch-size", "64", "--out", str(out),
            "--metrics", "l1", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epochs"] == [0, 1, 2] and len(result["layers"]) == 6
    series = pd.read_csv(out / "series.csv")
    assert sorted(series["step"].unique()) == [0, 1, 2]
    assert set(series["quantity"]) >= {"cross_axis_rho", "modularity_gap", "l1"}
    steps = pd.read_csv(out / "steps.csv")
    assert list(steps["step"]) == [0, 1, 2] and steps["test_accuracy"].between(0, 1).all()
    assert (out / "tracking.png").stat().st_size > 10_000
    tracker = AxisTracker.load(out / "tracker.pt", [])  # a list has no dataset to check
    assert tracker.meta["data"] == "mnist" and tracker.meta["epochs"] == 2
    model = ResNetMini(widths=(4, 4, 8))
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))

    assert main(args) == 2  # the folder holds a run
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert main(["track", "--widths", "4,4", "--out", str(tmp_path / "x")]) == 2
    assert "--widths" in capsys.readouterr().err
    assert main(["track", "--data", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "--data" in capsys.readouterr().err
