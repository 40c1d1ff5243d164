"""An ImageNet-100-shaped run through the command line: an image folder with train/ and val/ of
100 classes (small images written here), and the two kinds of ImageNet CNN users bring (ResNet-50,
ConvNeXt with channels-last Linear MLPs), through calibrate, score, sweep and report."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chanaxis_fast.cli import main


@pytest.fixture(scope="module")
def imagenet100(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet100")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("val", 1)):
        for c in range(100):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                ext = "JPEG" if (c + i) % 2 else "png"
                Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(d / f"{i}.{ext}")
    return root


@pytest.mark.parametrize("model,layers", [("resnet50", 53), ("convnext_tiny", None)])
def test_calibrate_score_sweep_report(imagenet100, tmp_path, model, layers):
    out = tmp_path / model
    base = ["--quiet"]
    assert main(["calibrate", "--model", model, "--num-classes", "100", "--image-size", "32",
                 "--data", f"imagefolder:{imagenet100}", "--images", "24", "--batch-size", "12",
                 "--extras", "taylor", "--out", str(out), *base]) == 0
    assert main(["score", str(out), "--metrics", "l1,bn_scale,input_capture,taylor,random"
                 if model == "resnet50" else "l1,input_capture,taylor,random", *base]) == 0
    assert main(["sweep", str(out), "--ratios", "0.3,0.6", "--eval-images", "40", "--random-seeds", "2",
                 *base]) == 0
    assert main(["report", str(out), "--skip", "modularity,cwda", *base]) == 0
    steps = json.loads((out / "run.json").read_text())["steps"]
    assert steps["calibrate"]["images"] == 24 and steps["sweep"]["eval_split"] == "val"
    assert steps["sweep"]["eval_images"] == 40
    indices = json.loads((out / "calibration.pt.indices.json").read_text())
    assert indices["root"].endswith("train") and len(indices["indices"]) == 24
    scores = pd.read_csv(out / "scores.csv")
    if layers:
        assert scores["layer"].nunique() == layers
    else:  # ConvNeXt: its MLPs' Linear layers are scored like conv channels
        assert any(l.endswith("block.3") for l in scores["layer"].unique())
    sweep = pd.read_csv(out / "sweep.csv")
    assert sweep.groupby("ratio")["flops_removed"].nunique().eq(1).all()
    assert (out / "index.html").exists() and (out / "figures" / "retention.png").exists()
    if model == "convnext_tiny":
        plan_skipped = (out / "report.md").read_text()
        assert "FLOPs-matched" in plan_skipped
