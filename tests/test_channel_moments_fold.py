"""channel_moments_fold_: batches folded in place into running statistics (what ChannelStats.update
and calibrate run) against numpy over all rows, the float64 reference and channel_moments; only the
upper triangle is read and written; a call that raises changes nothing; opcheck; CUDA vs CPU."""

import numpy as np
import pytest
import torch

from chanaxis_fast import ChannelStats, ops, reference
from utils import assert_close

_fold = torch.ops.chanaxis_fast.channel_moments_fold_.default


def _running(D, device="cpu"):
    return (torch.zeros((), dtype=torch.int64, device=device),
            torch.zeros(D, dtype=torch.float64, device=device),
            torch.zeros(D, D, dtype=torch.float64, device=device))


def _symmetric(upper):
    return upper.triu() + upper.triu(1).T


def _numpy_rows(x, t, positions=None):
    """Rows [Y_1..Y_C, T] of NCHW x, computed with numpy (every position, or the given ones)."""
    a = x.double().numpy()
    N, C, H, W = a.shape
    flat = a.reshape(N, C, H * W)
    if positions is None:
        rows = flat.transpose(0, 2, 1).reshape(-1, C)
        tt = np.repeat(t.numpy(), H * W)
    else:
        p = positions.numpy()
        rows = np.stack([flat[n][:, p[n]].T for n in range(N)]).reshape(-1, C)
        tt = np.repeat(t.numpy(), p.shape[1])
    return np.concatenate([rows, tt[:, None]], 1)


def _np_moments(rows):
    mean = rows.mean(0)
    z = rows - mean
    return rows.shape[0], mean, z.T @ z


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["all", "positions", "gap"])
def test_folding_batches_equals_numpy_over_all_rows(mode, precision):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 7, 5, 6, generator=g) * torch.linspace(0.5, 4, 7)[:, None, None] + 1e3
    t = torch.randn(20, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 30, (20, 4), generator=g) if mode == "positions" else None
    count, mean, M = _running(8)
    for a, b in ((0, 3), (3, 4), (4, 12), (12, 20)):
        ops.channel_moments_fold_(count, mean, M, x[a:b], t[a:b], None if pos is None else pos[a:b],
                                  mode=mode, precision=precision)
    if mode == "gap":
        rows = np.concatenate([x.double().mean((2, 3)).numpy(), t.numpy()[:, None]], 1)
    else:
        rows = _numpy_rows(x, t, pos)
    n, mu, C = _np_moments(rows)
    assert int(count) == n
    np.testing.assert_allclose(mean.numpy(), mu, rtol=1e-14, atol=0)
    rtol = 1e-11 if precision == "float64" else 1e-6
    np.testing.assert_allclose(_symmetric(M).numpy(), C, rtol=rtol, atol=rtol * np.abs(C).max())


def test_fold_equals_channel_moments_and_the_reference_channels_last_half():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(12, 9, 4, 4, generator=g) * 3 + 5).half().to(memory_format=torch.channels_last)
    t = torch.randn(12, generator=g, dtype=torch.float64)
    count, mean, M = _running(10)
    ops.channel_moments_fold_(count, mean, M, x[:5], t[:5])
    ops.channel_moments_fold_(count, mean, M, x[5:], t[5:])
    one = ops.channel_moments(x, t)
    ref = reference.channel_moments(x, t)
    assert int(count) == int(one.count) == int(ref.count) == 12 * 16
    assert_close(mean, ref.mean, rtol=1e-14)
    assert_close(_symmetric(M), one.comoment, rtol=1e-12)
    assert_close(_symmetric(M), ref.comoment, rtol=1e-12)


def test_only_the_upper_triangle_is_read_and_written():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 300, 2, 2, generator=g)  # D = 301 > 96: several panels
    count, mean, M = _running(300)
    ops.channel_moments_fold_(count, mean, M, x[:3])
    below = torch.ones(300, 300, dtype=torch.bool).tril(-1)
    M[below] = float("nan")  # poison what the op may leave stale ...
    ops.channel_moments_fold_(count, mean, M, x[3:])
    upper = M.triu()
    assert torch.isfinite(upper).all()  # ... it is never read
    assert_close(_symmetric(M), reference.channel_moments(x).comoment, rtol=1e-12)


def test_a_call_that_raises_changes_nothing():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 3, 3, generator=g)
    count, mean, M = _running(6)
    t = torch.randn(4, dtype=torch.float64)
    ops.channel_moments_fold_(count, mean, M, x, t)
    before = (count.clone(), mean.clone(), M.clone())
    bad = x.clone()
    bad[2, 1, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN/Inf"):
        ops.channel_moments_fold_(count, mean, M, bad, t)
    with pytest.raises(RuntimeError, match="positions must index"):
        ops.channel_moments_fold_(count, mean, M, x, t, torch.tensor([[0], [1], [99], [2]]))
    with pytest.raises(RuntimeError, match="mean must be a contiguous"):
        ops.channel_moments_fold_(count, mean[:5], M, x, t)
    with pytest.raises(RuntimeError, match="comoment must be Double"):
        ops.channel_moments_fold_(count, mean, M.float(), x, t)
    with pytest.raises(RuntimeError, match="count must be a 0-dim"):
        ops.channel_moments_fold_(count[None], mean, M, x, t)
    with pytest.raises(RuntimeError, match="count must be Long"):
        ops.channel_moments_fold_(count.double(), mean, M, x, t)
    for a, b in zip(before, (count, mean, M)):
        assert torch.equal(a, b)
    # every row skipped: nothing to fold
    ops.channel_moments_fold_(count, mean, M, torch.full_like(x, float("inf")), t, skip_nonfinite=True)
    for a, b in zip(before, (count, mean, M)):
        assert torch.equal(a, b)
    # some rows skipped: the others are folded, as channel_moments counts them
    ops.channel_moments_fold_(count, mean, M, bad, t, skip_nonfinite=True)
    assert int(count) == 4 * 9 + 4 * 9 - 1


def test_channel_stats_update_equals_the_merge_of_batch_statistics():
    """The in-place fold against the pairwise merge of separately computed batch statistics."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 11, 3, 3, generator=g, dtype=torch.float64) * 2 + 1e4
    t = torch.randn(30, generator=g, dtype=torch.float64)
    fold = ChannelStats(11, has_target=True)
    merged = ChannelStats()
    for a in range(0, 30, 7):
        fold.update(x[a:a + 7], t[a:a + 7])
        merged.merge(ChannelStats().update(x[a:a + 7], t[a:a + 7]))
    assert fold.count == merged.count
    assert_close(fold.mean, merged.mean, rtol=1e-15)
    assert_close(fold.comoment, merged.comoment, rtol=1e-12)
    assert torch.equal(fold.comoment, fold.comoment.T)  # mirrored when read
    with pytest.raises(ValueError, match="these statistics have 11 channels"):
        fold.update(x[:, :10], t)


def test_opcheck():
    x = torch.randn(3, 5, 4, 4)
    for t, D in ((None, 5), (torch.randn(3), 6)):
        count, mean, M = _running(D)
        torch.library.opcheck(_fold, (x, t, None, "all", 1, False, "float64", count, mean, M),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["all", "positions", "gap"])
def test_cuda_matches_cpu(mode, precision):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 40, 6, 6, generator=g) + 3
    t = torch.randn(16, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 36, (16, 5), generator=g) if mode == "positions" else None
    cpu, gpu = _running(41), _running(41, "cuda")
    for a in range(0, 16, 5):
        sl = slice(a, a + 5)
        p = None if pos is None else pos[sl]
        ops.channel_moments_fold_(*cpu, x[sl], t[sl], p, mode=mode, precision=precision)
        ops.channel_moments_fold_(*gpu, x[sl].cuda(), t[sl].cuda(), None if p is None else p.cuda(),
                                  mode=mode, precision=precision)
    assert int(gpu[0]) == int(cpu[0])
    assert_close(gpu[1].cpu(), cpu[1], rtol=1e-13)
    rtol = 1e-11 if precision == "float64" else 1e-6
    assert_close(_symmetric(gpu[2]).cpu(), _symmetric(cpu[2]), rtol=rtol, atol=rtol)
    # a NaN on the device changes nothing there either
    before = [v.clone() for v in gpu]
    bad = x[:5].clone().cuda()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN/Inf"):
        ops.channel_moments_fold_(*gpu, bad, t[:5].cuda(), None if pos is None else pos[:5].cuda(),
                                  mode=mode, precision=precision)
    for a, b in zip(before, gpu):
        assert torch.equal(a, b)
