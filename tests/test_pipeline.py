"""End to end on real data: MNIST, a small BatchNorm CNN and the trained MNIST CNN, every metric,
the command line and its report."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import chanaxis_fast as cf
from chanaxis_fast.cli import DEFAULT_METRICS, main
from chanaxis_fast.data import load_mnist


class BNNet(nn.Module):
    """A small residual CNN with BatchNorm: every metric applies to it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(F.max_pool2d(x, 2))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def trained_bnnet():
    torch.manual_seed(0)
    ds = load_mnist("train", limit=5000)
    model = BNNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(ds, batch_size=50, shuffle=True)
    model.train()
    for _ in range(4):  # a few seconds: well above chance, far from converged
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    test = load_mnist("test", limit=1000)
    with torch.no_grad():
        acc = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    assert acc > 0.5
    return model


def test_every_metric_is_finite_for_every_layer_on_mnist(trained_bnnet):
    ds = torch.utils.data.Subset(load_mnist("train"), range(5000, 5300))
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    cal = cf.calibrate(trained_bnnet, loader, rank_images=8, progress=False)
    assert cal.layers == ["conv1", "conv2", "conv3"]
    scores = cf.score(trained_bnnet, cal, DEFAULT_METRICS)
    assert not scores.skipped
    assert set(scores.metrics) | set(scores.summaries) == set(DEFAULT_METRICS)
    for metric, per_layer in scores.values.items():
        for layer, v in per_layer.items():
            assert v.shape == (cal.graph.layers[layer].out_channels,), (metric, layer)
            assert torch.isfinite(v).all(), (metric, layer)
    for metric, per_layer in scores.summaries.items():
        assert set(per_layer) == set(cal.layers) and all(np.isfinite(list(per_layer.values())))
    # conv1 and conv2 are coupled by the residual add: group metrics agree on them
    assert torch.equal(scores["magnitude"]["conv1"], scores["magnitude"]["conv2"])
    df = scores.to_pandas()
    assert len(df) == 8 + 8 + 16 and df.notna().all().all()


def test_command_line_run_on_mnist(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--model", "mnist_cnn", "--data", "mnist", "--images", "300", "--batch-size", "100",
            "--rank-images", "8", "--ratios", "0.25,0.5", "--eval-images", "300", "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    for f in ("scores.csv", "summaries.csv", "report.md", "index.html", "figures/axes.png",
              "figures/retention.png", "tables/headline.csv", "calibration.pt", "run.json", "sweep.json"):
        assert (out / f).exists(), f
    import pandas as pd

    df = pd.read_csv(out / "scores.csv")
    assert set(df["layer"]) == {"features.0", "features.3"} and len(df) == 32 + 64
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert steps["calibrate"]["images"] == 300 and steps["sweep"]["eval_images"] == 300
    assert "bn_scale" in steps["score"]["skipped"]  # the MNIST CNN has no BatchNorm
    report = (out / "report.md").read_text()
    assert "features.3" in report and "Criteria similarity" in report and "FLOPs-matched" in report
    headline = pd.read_csv(out / "tables" / "headline.csv")
    assert "random" in set(headline["metric"]) and "bn_scale" not in set(headline["metric"])
    # running again reuses the finished steps and gives the same scores and sweep
    sweep = (out / "sweep.json").read_text()
    assert main(args) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), df)
    assert (out / "sweep.json").read_text() == sweep
    assert "auc_before" in capsys.readouterr().out


def test_command_line_on_an_image_folder_with_a_torchvision_model(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        os.makedirs(tmp_path / "data" / cls)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                tmp_path / "data" / cls / f"{i}.png")
    out = tmp_path / "run"
    assert main(["run", "--model", "torchvision:resnet18", "--num-classes", "3", "--image-size", "32",
                 "--data", f"imagefolder:{tmp_path / 'data'}", "--images", "12", "--batch-size", "6",
                 "--metrics", "l1,input_capture,two_axis(alpha=1, beta=0.5)", "--out", str(out),
                 "--no-sweep", "--quiet"]) == 0
    import pandas as pd

    df = pd.read_csv(out / "scores.csv")
    assert list(df.columns) == ["layer", "channel", "l1", "input_capture", "two_axis(alpha=1, beta=0.5)"]
    assert df["layer"].nunique() == 20


def test_command_line_errors(tmp_path, capsys):
    assert main(["run", "--model", "bogus", "--out", str(tmp_path / "a")]) == 2
    assert "--model: torchvision has no classification model 'bogus'" in capsys.readouterr().err
    assert main(["run", "--data", "imagefolder:/nonexistent", "--model", "resnet18",
                 "--out", str(tmp_path / "b")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["run", "--images", "100", "--metrics", "nope", "--out", str(tmp_path / "c"),
                 "--quiet"]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing written
