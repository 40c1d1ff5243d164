"""Issue 7 ("Trustworthy runs") in the API: one test per item that is not about the command line
(those are in test_cli.py). Items covered elsewhere are named where they would be.

- item 3 (counts < 1): test_count_arguments_below_one_are_errors_before_any_work
- item 4 (score and another model): test_score_refuses_another_model, ..._other_weights_...
- item 5 (checkpoint by time): test_checkpoint_by_elapsed_time
- item 7 (checkpoint folder): test_missing_checkpoint_folder_is_an_error_before_the_first_batch
- item 8 (seeded initialisation): test_random_initialisation_is_seeded
- item 10: test_bad_first_batch_labels_and_positions, test_huge_partners_are_clamped,
  test_dead_channels_score_positive_zero; peer_hulls([]) and max_size > C - 1 are in
  test_peer_hulls.py (test_peer_hulls_bad_input's empty list, test_huge_max_size_is_clamped_to_the_peers_there_are)
"""

import os
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import chanaxis_fast as cf
from chanaxis_fast import ops
from chanaxis_fast.calibration import Calibration
from chanaxis_fast.cli import DEFAULT_METRICS
from chanaxis_fast.digest import model_digest
from chanaxis_fast.errors import UserInputError

from calib_nets import SmallNet, dataset, run


class _Untouchable:
    """A loader that fails the test if anything iterates it."""

    dataset = None

    def __iter__(self):
        raise AssertionError("the loader was consumed before the arguments were checked")

    def __len__(self):
        return 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(positions_per_image=0), "positions_per_image must be a positive int, got 0"),
    (dict(positions_per_image=-3), "positions_per_image must be a positive int, got -3"),
    (dict(max_images=0), "max_images must be a positive int or None, got 0"),
    (dict(max_images=-49990), "max_images must be a positive int or None, got -49990"),
    (dict(rank_images=0), "rank_images must be a positive int, got 0"),
    (dict(checkpoint_every=0), "checkpoint_every must be a positive int, got 0"),
    (dict(checkpoint_seconds=0), "checkpoint_seconds must be a positive number or None, got 0"),
    (dict(checkpoint_seconds=-1.0), "checkpoint_seconds must be a positive number or None"),
])
def test_count_arguments_below_one_are_errors_before_any_work(kwargs, match):
    with pytest.raises(UserInputError, match=match):
        cf.calibrate(SmallNet(), _Untouchable(), **kwargs)


def test_missing_checkpoint_folder_is_an_error_before_the_first_batch(tmp_path):
    with pytest.raises(UserInputError, match=r"checkpoint '.*missing_dir/cal.pt': folder .* does not exist"):
        cf.calibrate(SmallNet(), _Untouchable(), checkpoint=str(tmp_path / "missing_dir" / "cal.pt"))
    (tmp_path / "adir").mkdir()
    with pytest.raises(UserInputError, match=r"checkpoint .*adir' is a folder, not a file path"):
        cf.calibrate(SmallNet(), _Untouchable(), checkpoint=str(tmp_path / "adir"))
    assert sorted(os.listdir(tmp_path)) == ["adir"] and not os.listdir(tmp_path / "adir")


def test_bad_first_batch_labels_and_positions():
    net, ds = SmallNet(), dataset(8)
    x, y = ds.tensors
    with pytest.raises(UserInputError, match="the loader's first batch holds 0 images"):
        cf.calibrate(net, [(x[:0], y[:0]), (x, y)], progress=False)
    with pytest.raises(UserInputError, match="positions_per_image must be a positive int, got True"):
        cf.calibrate(net, DataLoader(ds, batch_size=4), positions_per_image=True, progress=False)
    # SmallNet has 5 outputs: label 5 is out of range for the logit margin and the cross-entropy
    bad = TensorDataset(x, torch.where(torch.arange(8) == 6, 5, y))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\) for the model's 5 logits; a batch "
                                         r"holds labels from \d to 5"):
        cf.calibrate(net, DataLoader(bad, batch_size=4), extras=None, progress=False)
    negative = TensorDataset(x, torch.where(torch.arange(8) == 1, -1, y))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\).* from -1 to"):
        cf.calibrate(net, DataLoader(negative, batch_size=4), extras=None, progress=False)


class _TimedLoader:
    """Yields ``n`` batches of 2 images, ``pause`` seconds apart; before each batch from the 5th on,
    records whether ``ckpt`` exists on disk and how many batches it holds."""

    def __init__(self, ds, n, pause, ckpt):
        self.dataset, self.n, self.pause, self.ckpt = ds, n, pause, ckpt
        self.seen = []

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            if i >= 4:
                saved = Calibration.load(self.ckpt).num_batches if os.path.exists(self.ckpt) else None
                self.seen.append(saved)
            time.sleep(self.pause)
            yield self.dataset.tensors[0][2 * i:2 * i + 2], self.dataset.tensors[1][2 * i:2 * i + 2]


def test_checkpoint_by_elapsed_time(tmp_path):
    net, ds = SmallNet(), dataset(12)
    ckpt = str(tmp_path / "cal.pt")
    # every 1000 batches or 0.05 s: each batch takes longer than that, so each one is saved
    loader = _TimedLoader(ds, 6, 0.06, ckpt)
    timed = cf.calibrate(net, loader, extras=None, checkpoint=ckpt, checkpoint_every=1000,
                         checkpoint_seconds=0.05, progress=False)
    assert loader.seen == [4, 5]  # saved during the run, before batch 5 and before batch 6
    # by count alone: nothing on disk until the end
    ckpt2 = str(tmp_path / "cal2.pt")
    loader = _TimedLoader(ds, 6, 0.06, ckpt2)
    counted = cf.calibrate(net, loader, extras=None, checkpoint=ckpt2, checkpoint_every=1000,
                           checkpoint_seconds=None, progress=False)
    assert loader.seen == [None, None]
    for layer in timed.layers:
        assert torch.equal(timed.stats[layer].comoment, counted.stats[layer].comoment)
    assert Calibration.load(ckpt).complete and Calibration.load(ckpt2).complete


@pytest.fixture(scope="module")
def calibrated():
    net, ds = SmallNet(), dataset(16)
    return net, run(net, ds, 8, extras=None)


def _widened(net):
    """SmallNet with one more output channel in layer 'a' (and the input of 'b' to match)."""
    other = SmallNet()
    other.a = torch.nn.Conv2d(3, 7, 3, padding=1).double()
    other.bn_a = torch.nn.BatchNorm2d(7).double().eval()
    return other


def test_score_refuses_another_model(calibrated):
    net, cal = calibrated
    with pytest.raises(UserInputError, match=r"score: layer 'a' of the model has 7 output / 3 input "
                                             r"channels, the calibration was made on 6 / 3"):
        cf.score(_widened(net), cal, ["input_capture"])
    with pytest.raises(UserInputError, match="has 7 output"):  # other channel counts: always
        cf.score(_widened(net), cal, ["input_capture"], allow_other_weights=True)
    other = SmallNet(seed=5)  # same architecture, other weights
    with pytest.raises(UserInputError, match=r"weights differ from those the calibration was computed on "
                                             r"\(model_digest"):
        cf.score(other, cal, ["l1", "input_capture"])


def test_score_accepts_other_weights_when_asked_and_records_it(calibrated):
    net, cal = calibrated
    same = cf.score(net, cal, ["l1"])
    assert same.provenance["other_weights"] is False
    assert same.provenance["model_digest"] == cal.config["model_digest"] == model_digest(net)
    other = SmallNet(seed=5)
    s = cf.score(other, cal, ["l1", "input_capture"], allow_other_weights=True)
    assert s.provenance["other_weights"] is True and s.provenance["model_digest"] == model_digest(other)
    assert not torch.equal(s["l1"]["a"], same["l1"]["a"])  # the other weights were read
    # statistics-only metrics need no model and cannot mix models
    stats_only = cf.score(None, cal, ["input_capture"])
    assert torch.equal(stats_only["input_capture"]["a"], s["input_capture"]["a"])


def test_random_initialisation_is_seeded():
    from chanaxis_fast.zoo import load_model

    a = load_model("resnet18", num_classes=3, cifar_stem=True, seed=0)
    b = load_model("resnet18", num_classes=3, cifar_stem=True, seed=0)
    c = load_model("resnet18", num_classes=3, cifar_stem=True, seed=1)
    assert model_digest(a.model) == model_digest(b.model) != model_digest(c.model)
    assert not a.trained and "random weights (seed 0)" in a.description
    state = torch.get_rng_state()
    load_model("resnet18", num_classes=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone


def test_huge_partners_are_clamped():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64)
    S = torch.cov(torch.cat([X, X[:, :2].sum(1, keepdim=True)], 1).T)
    te, chosen = ops.target_excess(S, partners=10**12, top=10**12)  # unclamped: terabytes
    ref_te, ref_chosen = ops.target_excess(S, partners=5, top=5)
    assert chosen.shape == (6, 5)
    assert torch.equal(te, ref_te) and torch.equal(chosen, ref_chosen)


def test_dead_channels_score_positive_zero():
    # a channel whose filter and bias are zero is constant; peer_overlap's -1/2 log1p(-0) is -0.0
    # before score() folds it to 0.0
    net, ds = SmallNet(), dataset(24)
    with torch.no_grad():
        net.a.weight[0] = 0
        net.a.bias[0] = 0
    cal = run(net, ds, 8, rank_images=4)
    scores = cf.score(net, cal, DEFAULT_METRICS, missing="skip")  # bn_scale: d has no BatchNorm
    assert scores["peer_overlap"]["a"][0].item() == 0.0
    for metric, per_layer in scores.values.items():
        for layer, v in per_layer.items():
            negative_zero = (v == 0) & torch.signbit(v)
            assert not negative_zero.any(), (metric, layer, negative_zero.nonzero().flatten().tolist())


def test_interrupts_are_held_back_until_a_fold_is_whole():
    """Ctrl-C or SIGTERM during deferred_interrupts (calibrate's fold of a batch) arrives after the
    block, which runs to its end."""
    import signal

    from chanaxis_fast.runtime import Terminated, deferred_interrupts, sigterm_as_interrupt

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is delivered here and held back
            done.append("after SIGINT")
    assert done == ["after SIGINT"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    with sigterm_as_interrupt():
        with pytest.raises(Terminated):
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("after SIGTERM")
    assert done == ["after SIGINT", "after SIGTERM"]
    with deferred_interrupts():  # nothing received: nothing raised
        done.append("quiet")
    assert done[-1] == "quiet"
