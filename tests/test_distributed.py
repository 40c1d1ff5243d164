"""Distributed calibration and sweeps (gloo, 2 processes on the CPU) equal the single-process run."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

import chanaxis_fast as cf
from calib_nets import SmallNet, dataset

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _calibrate(distributed, ckpt=None):
    net, ds = SmallNet(), dataset(40)
    return cf.calibrate(net, DataLoader(ds, batch_size=7), rank_images=10, progress=False,
                        checkpoint=ckpt, distributed=distributed)


def _sweep(distributed, ckpt=None):
    import torch.nn.functional as F

    net, ds = SmallNet(), dataset(40)
    cal = cf.calibrate(net, DataLoader(ds, batch_size=10), extras=None, progress=False,
                       distributed=False)
    scores = cf.score(net, cal, ["l1", "input_capture", "random"])
    x, y = ds.tensors

    def evaluate(m):
        with torch.no_grad():
            z = m(x)
        return {"accuracy": float((z.argmax(1) == y).double().mean()), "loss": float(F.cross_entropy(z, y))}

    return cf.sweep(net, scores, ["l1", "input_capture", "random"], [0.25, 0.5], evaluate=evaluate,
                    random_seeds=2, progress=False, checkpoint=ckpt, distributed=distributed)


def _worker(rank, world, init, out, what):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        if what == "calibrate":
            cal = _calibrate(True, os.path.join(out, "cal.pt"))
            torch.save(cal.state_dict(), os.path.join(out, f"rank{rank}.pt"))
        else:
            result = _sweep(True, os.path.join(out, "sweep.json"))
            with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
                f.write(result.to_json())
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, what, world=2):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init, str(tmp_path), what), nprocs=world, join=True)


def test_distributed_calibration_equals_one_process(tmp_path):
    single = _calibrate(False)
    _spawn(tmp_path, "calibrate")
    files = sorted(os.listdir(tmp_path))
    assert "cal.pt" in files and not any(".rank" in f for f in files)  # partials removed
    for name in ("rank0.pt", "rank1.pt", "cal.pt"):
        state = torch.load(tmp_path / name, weights_only=True)
        cal = cf.Calibration.from_state_dict(state)
        assert cal.complete and cal.num_images == 40 and cal.num_batches == single.num_batches
        for l in single.layers:
            a, b = single.stats[l], cal.stats[l]
            assert a.count == b.count
            torch.testing.assert_close(b.mean, a.mean, rtol=0, atol=1e-10)
            torch.testing.assert_close(b.comoment, a.comoment, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(cal.grads[l], single.grads[l], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(cal.hrank[l], single.hrank[l], rtol=0, atol=1e-12)
            torch.testing.assert_close(cal.chip[l], single.chip[l], rtol=1e-10, atol=1e-10)
            assert cal.rank_counts[l] == single.rank_counts[l] == 10
        for c in single.patches:
            torch.testing.assert_close(cal.patches[c].comoment, single.patches[c].comoment,
                                       rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(cal.outputs[c].comoment, single.outputs[c].comoment,
                                       rtol=1e-10, atol=1e-10)
            assert torch.equal(cal.patches[c].count, single.patches[c].count)
    # the scores of the merged calibration equal the single-process scores
    metrics = ["input_capture", "task_information", "sfvr", "taylor", "hrank", "e_full"]
    a = cf.score(SmallNet(), single, metrics)
    b = cf.score(SmallNet(), cf.Calibration.load(tmp_path / "cal.pt"), metrics)
    for m in metrics:
        for l in single.layers:
            torch.testing.assert_close(b[m][l], a[m][l], rtol=1e-8, atol=1e-10)


def test_distributed_sweep_equals_one_process(tmp_path):
    single = _sweep(False)
    _spawn(tmp_path, "sweep")
    for name in ("rank0.json", "rank1.json", "sweep.json"):
        result = cf.SweepResult.from_json(tmp_path / name)
        assert result.points == single.points
    assert not any(".rank" in f for f in os.listdir(tmp_path))


def test_torchrun_command_line_equals_one_process(tmp_path):
    """``torchrun -m chanaxis_fast calibrate / score / sweep`` against the same commands in one
    process (one thread each, so that the float32 forward passes are bit for bit the same)."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(cf.__file__)))] + sys.path))
    common = ["--model", "mnist_cnn", "--data", "mnist", "--images", "60", "--batch-size", "10",
              "--extras", "taylor,hrank", "--rank-images", "8", "--quiet"]
    sweep = ["--sweep-metrics", "l1,input_capture,random", "--ratios", "0.3,0.6", "--eval-images", "100",
             "--random-seeds", "2", "--quiet"]

    def run(prefix, out):
        for cmd in (["calibrate", *common, "--out", out], ["score", out, "--metrics", "l1,input_capture,taylor"],
                    ["sweep", out, *sweep]):
            r = subprocess.run(prefix + cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]

    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "chanaxis_fast"], "multi")
    run([sys.executable, "-m", "chanaxis_fast"], "single")
    a = cf.Calibration.load(tmp_path / "single" / "calibration.pt")
    b = cf.Calibration.load(tmp_path / "multi" / "calibration.pt")
    for l in a.layers:
        torch.testing.assert_close(b.stats[l].comoment, a.stats[l].comoment, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b.grads[l], a.grads[l], rtol=1e-10, atol=1e-12)
    assert not any(".rank" in f for f in os.listdir(tmp_path / "multi"))
    sa = cf.SweepResult.from_json(tmp_path / "single" / "sweep.json")
    sb = cf.SweepResult.from_json(tmp_path / "multi" / "sweep.json")
    assert sa.points == sb.points and len(sa.points) == 2 * 4
