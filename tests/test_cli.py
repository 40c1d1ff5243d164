"""Issue 7 ("Trustworthy runs") through the real command line: ``python -m chanaxis_fast`` in a
subprocess, with this checkout's package first on PYTHONPATH.

A user error must be exactly one line on stderr, exit code 2, no traceback, nothing on stdout, and
no file written or changed. The commands that fail before any work run in one module fixture:
one case per item in a subprocess of its own (side by side), the others in process through
``cli.main`` (what ``python -m chanaxis_fast`` calls), since each Python-and-torch start costs
2-3 s of CPU. Each test below checks its item's cases.

- item 1 (--weights): test_weights_are_loaded_into_the_default_model, test_bad_weights_are_one_line_errors
- item 2 (data identity): test_resume_knows_which_data_it_was_made_from
- item 3 (counts < 1): test_negative_image_count_is_an_error, test_every_count_argument_below_one_is_an_error
- item 5 (kill -9, --checkpoint-every): test_kill_9_after_a_checkpoint_resumes_bit_for_bit
- item 6 (SIGTERM): test_sigterm_saves_the_checkpoint_and_exits_143
- item 8 (seeded random init): test_torchvision_model_without_weights_is_seeded_and_says_so
- item 9 (one-line errors): test_user_errors_are_one_line
Items 4, 7 and 10 are about the API: test_trust.py.
"""

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import types

import numpy as np
import pytest
import torch
from PIL import Image

from chanaxis_fast.calibration import Calibration
from chanaxis_fast.cli import main
from chanaxis_fast.digest import model_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = '''
from torch import nn


def build(num_classes=2):
    """conv-BN-ReLU, conv-ReLU, global average pool, linear: any input size."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, num_classes))
'''

# MNIST and the built-in trained CNN: 60 batches of 10 images
MNIST = ["calibrate", "--images", "600", "--batch-size", "10", "--extras", "none"]
BATCHES = 60


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"  # several processes at once on a small machine
    return env


def _mnist_defaults(args):
    """These tests use the trained MNIST CNN on MNIST (small, fast) where a command names no model
    or data: the package's defaults are the Fashion-MNIST ResNet of the demo."""
    args = [str(a) for a in args]
    if args and args[0] in ("calibrate", "run"):
        if "--model" not in args:
            args += ["--model", "mnist_cnn"]
        if "--data" not in args:
            args += ["--data", "mnist"]
    return args


def _command(*args):
    return [sys.executable, "-m", "chanaxis_fast", *_mnist_defaults(args)]


def cli(cwd, *args, timeout=300):
    """Run the command line; the finished process (text stdout / stderr)."""
    return subprocess.run(_command(*args), cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def snapshot(root):
    """{relative path: (size, mtime_ns, sha256)} of every file under root, and every folder."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root) + "/"] = None
        for f in files:
            p = os.path.join(folder, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (os.path.getsize(p), os.stat(p).st_mtime_ns,
                                                  hashlib.sha256(fh.read()).hexdigest())
    return out


def assert_user_error(res, command, *fragments):
    """Exit code 2, one line on stderr that starts with the command and holds the fragments, no
    traceback, nothing on stdout."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"chanaxis-fast {command}: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert res.stdout == ""


def _images(folder, classes, per_class, seed, size=20, broken=()):
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                os.path.join(folder, c, f"{i}.png"))
    for name in broken:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n but not an image")


def _mnist_state_dict():
    from chanaxis_fast.zoo import load_model

    return load_model("mnist_cnn").model.state_dict()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with what the commands read: image folders, weights files, a tiny model module."""
    d = tmp_path_factory.mktemp("cli")
    (d / "tinynet.py").write_text(TINY_MODEL)
    _images(d / "A", "ab", 4, seed=0)
    _images(d / "B", "ab", 4, seed=1)
    _images(d / "three", "abc", 2, seed=2)
    _images(d / "bad", "ab", 2, seed=3, broken=["a/broken.png"])
    (d / "empty").mkdir()
    (d / "noimages" / "a").mkdir(parents=True)
    (d / "noimages" / "a" / "notes.txt").write_text("no image here")
    (d / "afile").write_text("a file, not a folder")
    sd = _mnist_state_dict()
    torch.save({k: v * 2 for k, v in sd.items()}, d / "mnist_x2.pt")
    last = list(sd)[-2:]  # the classifier's weight and bias
    fewer = dict(sd, **{k: sd[k][:5] for k in last})
    torch.save(fewer, d / "mnist_5_classes.pt")
    torch.save([1, 2, 3], d / "a_list.pt")
    (d / "text.pt").write_text("not a torch file")
    torch.save(torch.nn.Linear(3, 4).state_dict(), d / "linear.pt")
    return d


# every command that must fail before any work: (command, args, fragments of the message)
REFUSED = {
    # item 1
    "weights_missing": ("calibrate", ["--weights", "nope.pt"], ["--weights", "nope.pt does not exist"]),
    "weights_not_a_state_dict": ("calibrate", ["--weights", "a_list.pt"], ["--weights", "not a state dict"]),
    "weights_not_torch": ("calibrate", ["--weights", "text.pt"], ["--weights", "not a readable torch state dict"]),
    "weights_other_architecture": ("calibrate", ["--weights", "linear.pt"],
                                   ["--weights", "another architecture", "keys missing"]),
    "weights_other_classes": ("calibrate", ["--weights", "mnist_5_classes.pt"],
                              ["--weights", "[5, 128]", "[10, 128]", "--num-classes 5"]),
    # item 3
    "images_negative": ("run", ["--images", "-49990"], ["--images", "must be an int >= 1, got -49990"]),
    # item 9
    "torchvision_resnet": ("run", ["--model", "torchvision:resnet"], ["--model", "'resnet'"]),
    "torchvision_get_model": ("run", ["--model", "get_model"], ["--model", "'get_model'"]),
    "empty_folder": ("calibrate", ["--model", "tinynet:build", "--data", "imagefolder:empty"],
                     ["--data", "empty", "class folder"]),
    "folder_without_images": ("calibrate", ["--model", "tinynet:build", "--data", "imagefolder:noimages"],
                              ["--data", "noimages", "no valid file"]),
    "unreadable_image": ("calibrate", ["--model", "tinynet:build", "--data", "imagefolder:bad",
                                       "--image-size", "16"], ["--data", "broken.png"]),
    "labels_out_of_range": ("calibrate", ["--model", "tinynet:build", "--num-classes", "2",
                                          "--data", "imagefolder:three", "--image-size", "16"],
                            ["--num-classes", "labels up to 2", "2 outputs"]),
    "input_size": ("calibrate", ["--data", "imagefolder:A", "--image-size", "16"],
                   ["--image-size", "cannot take inputs of shape [2, 3, 16, 16]"]),
    "device_cuda": ("calibrate", ["--device", "cuda"], ["--device cuda", "no GPU"]),
    "device_unknown": ("calibrate", ["--device", "tpu9"], ["--device", "'tpu9'"]),
    "out_is_a_file": ("calibrate", ["--out", "afile"], ["--out", "afile is a file"]),
    "out_not_writable": ("calibrate", ["--out", "/proc/chanaxis-fast-test"], ["--out", "not writable"]),
    "out_below_a_file": ("calibrate", ["--out", "afile/run"], ["--out", "not writable"]),
    "readout_without_batchnorm": ("calibrate", ["--readout", "post_bn"], ["--readout post_bn", "no BatchNorm"]),
    "metric_unknown_parameter": ("run", ["--metrics", "l1,two_axis(gamma=1)"],
                                 ["--metrics", "unknown parameter 'gamma'", "alpha=1.0, beta=0.5"]),
    "metric_bad_value": ("run", ["--metrics", "hull_size(max_size=0)"],
                         ["--metrics", "max_size must be an int >= 1, got 0"]),
    "metric_bad_type": ("run", ["--metrics", "magnitude(p='x')"], ["--metrics", "p must be a finite number > 0, got 'x'"]),
}


if torch.cuda.is_available():  # a machine with a GPU takes --device cuda
    del REFUSED["device_cuda"]
if not os.path.isdir("/proc"):
    del REFUSED["out_not_writable"]
# a few cases run in a subprocess of their own (each costs a Python and torch start, 2-3 s of
# CPU); the others in process through cli.main, which is what ``python -m chanaxis_fast`` calls
IN_SUBPROCESS = {"weights_missing", "images_negative", "unreadable_image", "out_not_writable"}


def _main_in_process(cwd, args):
    """cli.main(args) run from ``cwd``, as a finished-process lookalike."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))  # --model tinynet:build, as `python -m` finds it in the cwd
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(_mnist_defaults(args))
            except SystemExit as e:  # argparse
                code = e.code
            except Exception:  # what the interpreter would print, and its exit code
                sys.stderr.write(traceback.format_exc())
                code = 1
    finally:
        sys.path.remove(str(cwd))
        sys.modules.pop("tinynet", None)
        os.chdir(old)
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def refused(work):
    """The REFUSED commands (subprocesses side by side, the rest in process meanwhile);
    {name: finished process}. Checks that together they wrote or changed nothing."""
    before = snapshot(work)
    cases = {}
    for name, (command, args, _) in REFUSED.items():
        out = [] if "--out" in args else ["--out", f"out-{name}"]
        cases[name] = [command, "--images", "8", "--batch-size", "4", "--extras", "none", *out, *args]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {n: pool.submit(cli, work, *a) for n, a in cases.items() if n in IN_SUBPROCESS}
        results = {n: _main_in_process(work, a) for n, a in cases.items() if n not in IN_SUBPROCESS}
        results.update({n: f.result() for n, f in futures.items()})
    assert snapshot(work) == before
    return results


def _check_refused(refused, *names):
    for name in names:
        command, _, fragments = REFUSED[name]
        assert_user_error(refused[name], command, *fragments)


# ------------------------------------------------------------------------------------ item 1
def test_weights_are_loaded_into_the_default_model(work):
    res = cli(work, "calibrate", "--weights", "mnist_x2.pt", "--images", "20", "--batch-size", "10",
              "--extras", "none", "--out", "weights-x2", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["random_weights"] is False
    cal = Calibration.load(work / "weights-x2" / "calibration.pt")
    from chanaxis_fast.zoo import load_model

    loaded = load_model("mnist_cnn").model
    builtin = model_digest(loaded)
    loaded.load_state_dict(torch.load(work / "mnist_x2.pt", weights_only=True))
    assert cal.config["model_digest"] == model_digest(loaded) != builtin
    rec = json.loads((work / "weights-x2" / "run.json").read_text())["steps"]["calibrate"]
    assert rec["args"]["weights"] == str(work / "mnist_x2.pt") and "mnist_x2.pt" in rec["model_description"]


def test_bad_weights_are_one_line_errors(refused):
    _check_refused(refused, "weights_missing", "weights_not_a_state_dict", "weights_not_torch",
                   "weights_other_architecture", "weights_other_classes")


# ------------------------------------------------------------------------------------ item 2
def test_resume_knows_which_data_it_was_made_from(work):
    base = ["calibrate", "--model", "tinynet:build", "--num-classes", "2", "--image-size", "16",
            "--images", "8", "--batch-size", "4", "--extras", "none", "--json"]
    runs = {d: _main_in_process(work, base + ["--data", f"imagefolder:{d}"]) for d in "AB"}
    for res in runs.values():
        assert res.returncode == 0, res.stderr
    out_a, out_b = (json.loads(runs[d].stdout)["out"] for d in "AB")
    assert out_a != out_b  # two folders of the same size: two default run folders
    assert os.path.dirname(out_a) == str(work / "runs")
    cal_a = Calibration.load(os.path.join(out_a, "calibration.pt"))
    cal_b = Calibration.load(os.path.join(out_b, "calibration.pt"))
    assert not torch.equal(cal_a.stats["0"].mean, cal_b.stats["0"].mean)
    before = snapshot(out_a)
    # the same folder A holding other images (same names and count, other sizes), with its
    # default --out; and the same --out on the other folder B, of the same size
    _images(work / "A", "ab", 4, seed=9, size=24)
    res = {"changed": cli(work, *base, "--data", "imagefolder:A"),
           "other": _main_in_process(work, base + ["--data", "imagefolder:B", "--out", out_a])}
    _images(work / "A", "ab", 4, seed=0)  # as the other tests expect it
    assert_user_error(res["changed"], "calibrate", f"--out {out_a}", "other contents of --data", "--force")
    assert_user_error(res["other"], "calibrate", f"--out {out_a}", "--data", "imagefolder:" + str(work / "A"))
    assert snapshot(out_a) == before


# ------------------------------------------------------------------------------------ item 3
def test_negative_image_count_is_an_error(refused, work):
    _check_refused(refused, "images_negative")
    assert not (work / "out-images_negative").exists()


@pytest.mark.parametrize("arg, value, must", [
    ("--images", "0", "an int >= 1"), ("--batch-size", "0", "an int >= 1"),
    ("--batch-size", "-5", "an int >= 1"), ("--positions", "0", "an int >= 1"),
    ("--rank-images", "-1", "an int >= 1"), ("--checkpoint-every", "0", "an int >= 1"),
    ("--num-classes", "0", "an int >= 1"), ("--image-size", "-32", "an int >= 1"),
    ("--workers", "-1", "an int >= 0"), ("--checkpoint-seconds", "0", "a finite number > 0"),
    ("--checkpoint-seconds", "inf", "a finite number > 0"), ("--images", "ten", "an int >= 1"),
])
def test_every_count_argument_below_one_is_an_error(tmp_path, capsys, arg, value, must):
    # argparse's checks, in process (the subprocess contract is test_negative_image_count_is_an_error)
    for command in ("run", "calibrate"):
        with pytest.raises(SystemExit) as e:
            main([command, arg, value, "--out", str(tmp_path / "out")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"argument {arg}: must be {must}, got" in err[0], err
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------ items 5, 6
@pytest.fixture(scope="module")
def mnist_reference(work):
    """An uninterrupted MNIST calibration, started in the background (the interrupted runs below
    start meanwhile); call it to wait for the loaded result."""
    proc = subprocess.Popen(_command(*MNIST, "--out", "mnist-ref", "--quiet"), cwd=work, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return Calibration.load(work / "mnist-ref" / "calibration.pt")

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def assert_same_statistics(a, b):
    assert a.complete and b.complete and a.layers == b.layers
    assert a.num_images == b.num_images and a.num_batches == b.num_batches
    for layer in a.layers:
        sa, sb = a.stats[layer], b.stats[layer]
        assert sa.count == sb.count
        assert torch.equal(sa.mean, sb.mean) and torch.equal(sa.comoment, sb.comoment), layer


def test_kill_9_after_a_checkpoint_resumes_bit_for_bit(work, mnist_reference):
    args = [*MNIST, "--out", "mnist-killed", "--checkpoint-every", "5", "--quiet"]
    ckpt = work / "mnist-killed" / "calibration.pt"
    proc = subprocess.Popen(_command(*args), cwd=work, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not ckpt.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = Calibration.load(ckpt)
    assert not partial.complete and 5 <= partial.num_batches < BATCHES
    assert partial.num_batches % 5 == 0  # only the periodic saves: kill -9 leaves no chance for more
    res = cli(work, *args)
    assert res.returncode == 0, res.stderr
    assert_same_statistics(Calibration.load(ckpt), mnist_reference())


def _read_into(stream, buf):
    for chunk in iter(lambda: stream.read1(4096), b""):
        buf.extend(chunk)


def test_sigterm_saves_the_checkpoint_and_exits_143(work, mnist_reference):
    # no periodic save before the end: what is on disk after SIGTERM was saved on SIGTERM
    args = [*MNIST, "--out", "mnist-term", "--checkpoint-every", "1000", "--checkpoint-seconds", "1000"]
    ckpt = work / "mnist-term" / "calibration.pt"
    proc = subprocess.Popen(_command(*args), cwd=work, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    err = bytearray()
    reader = threading.Thread(target=_read_into, args=(proc.stderr, err), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while True:  # the progress bar shows batches done: the SIGTERM handler is in place
        done = [int(n) for n in re.findall(rb"(\d+)/%d \[" % BATCHES, bytes(err))]
        if done and max(done) >= 3:
            break
        assert proc.poll() is None, bytes(err).decode()
        assert time.monotonic() < deadline, "no progress after 240 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    text = bytes(err).decode()
    assert proc.returncode == 143, text
    assert "Traceback" not in text
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert last == ("chanaxis-fast calibrate: terminated (SIGTERM); progress is saved, run the same "
                    "command again to resume")
    partial = Calibration.load(ckpt)
    assert not partial.complete and max(done) <= partial.num_batches < BATCHES
    res = cli(work, *args, "--quiet")
    assert res.returncode == 0, res.stderr
    assert_same_statistics(Calibration.load(ckpt), mnist_reference())


# ------------------------------------------------------------------------------------ item 8
def test_torchvision_model_without_weights_is_seeded_and_says_so(work):
    from chanaxis_fast.zoo import load_model

    args = ["calibrate", "--model", "resnet18", "--cifar-stem", "--num-classes", "2", "--data",
            "imagefolder:A", "--image-size", "32", "--images", "4", "--batch-size", "4", "--extras",
            "none", "--out", "tv", "--quiet"]
    res = cli(work, *args)
    assert res.returncode == 0, res.stderr
    assert "random weights (seeded by --seed 0)" in res.stdout
    # the same network in another process (this one), so the same command twice resumes instead
    # of failing the calibration's model check; --seed changes it
    seeded = [model_digest(load_model("resnet18", num_classes=2, cifar_stem=True, seed=s).model)
              for s in (0, 1)]
    assert Calibration.load(work / "tv" / "calibration.pt").config["model_digest"] == seeded[0] != seeded[1]
    assert json.loads((work / "tv" / "run.json").read_text())["steps"]["calibrate"]["random_weights"]


# ------------------------------------------------------------------------------------ item 9
def test_user_errors_are_one_line(refused, work):
    names = [n for n in REFUSED if not n.startswith(("weights_", "images_"))]
    _check_refused(refused, *names)
    assert not any(os.path.exists(work / f"out-{n}") for n in names)
