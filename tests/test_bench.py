"""The benchmark command (issue 9): ``chanaxis-fast bench`` / benchmarks/run_all.py on a tiny set of
cases: the JSON schema, ratio = reference / ours, CUDA cases skipped (and said so) without a GPU, one
table on stdout."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from chanaxis_fast import bench
from chanaxis_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# two ops (one with a GB/s rate) and one end-to-end calibration: a few seconds
ONLY = r"peer_overlap_mean|channel_moments gap|channel_moments_fold_|patch_moments|map_ranks|pooled_means|mode=gap"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = main(["bench", "--size", "tiny", "--only", ONLY, "--device", "auto", "--out", str(out)])
    assert code == 0
    with open(out) as f:
        return json.load(f), stdout.getvalue()


def test_json_follows_the_schema(result):
    data, _ = result
    assert data["schema"] == "chanaxis_fast.bench/1"
    assert data["meta"]["size"] == "tiny" and data["meta"]["threads"] == torch.get_num_threads()
    bench.check_result(data)
    for row in data["cases"]:
        assert set(bench.FIELDS) <= set(row)
        assert row["device"] in ("cpu", "cuda") and row["status"] in ("ok", "skipped")


def test_ratio_is_reference_over_ours(result):
    data, _ = result
    timed = [r for r in data["cases"] if r["status"] == "ok"]
    names = [r["case"] for r in timed if r["device"] == "cpu"]
    assert any("peer_overlap_mean" in n for n in names)
    assert any(n.startswith("channel_moments gap") for n in names)
    assert any("mode=gap" in n for n in names)
    assert any(n.startswith("channel_moments_fold_") for n in names)
    assert any(n.startswith("patch_moments") for n in names)
    assert any(n.startswith("map_ranks") for n in names)
    assert any(n.startswith("pooled_means") for n in names)
    for r in timed:
        assert r["ref_ms"] > 0 and r["ours_ms"] > 0
        assert math.isclose(r["ratio"], r["ref_ms"] / r["ours_ms"], rel_tol=1e-9), r
    gap = next(r for r in timed if r["case"].startswith("channel_moments gap"))
    assert gap["rate_unit"] == "GB/s" and gap["rate"] > 0
    # 32 x 32 x 8 x 8 float32 values read in ours_ms
    assert math.isclose(gap["rate"], 32 * 32 * 8 * 8 * 4 / (gap["ours_ms"] / 1e3) / 1e9, rel_tol=1e-9)
    cal = next(r for r in timed if "mode=gap" in r["case"])
    assert cal["reference"] == "plain inference_mode forward"
    assert cal["note"].startswith(f"{cal['ours_ms'] / cal['ref_ms']:.2f}x forward")


def test_cuda_cases_run_or_say_why_not(result):
    data, _ = result
    cuda = [r for r in data["cases"] if r["device"] == "cuda"]
    if torch.cuda.is_available():
        assert cuda and all(r["status"] == "ok" for r in cuda)
    else:
        assert len(cuda) == 1 and cuda[0]["status"] == "skipped" and "no GPU" in cuda[0]["note"]


def test_one_table_on_stdout(result):
    data, text = result
    lines = text.splitlines()
    assert lines[0].startswith("torch ") and "ratio = reference / ours" in lines[0]
    assert lines[1].startswith("| ") and "reference" in lines[1] and "ratio" in lines[1]
    rows = [l for l in lines if l.startswith("| ")][1:]
    assert len(rows) == len(data["cases"])


def test_check_result_rejects_a_wrong_ratio(result):
    data, _ = result
    bad = json.loads(json.dumps(data))
    row = next(r for r in bad["cases"] if r["status"] == "ok")
    row["ratio"] = row["ours_ms"] / row["ref_ms"] * 1.5
    with pytest.raises(ValueError, match="ratio"):
        bench.check_result(bad)


def test_run_all_script_is_the_same_command(tmp_path):
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--size", "tiny",
                        "--only", "peer_overlap_mean", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    bench.check_result(data)
    assert [r["case"] for r in data["cases"]] == ["peer_overlap_mean C=32"]
    assert "peer_overlap_mean C=32" in p.stdout


def test_a_bad_only_pattern_is_one_line_and_exit_2(capsys):
    assert main(["bench", "--size", "tiny", "--only", "("]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only '('" in err[0] and "regular expression" in err[0]
