"""channel_moments: kernel vs float64 reference vs numpy, layouts, numerics, bad input, opcheck."""

import numpy as np
import pytest
import torch

import chanaxis_fast
from chanaxis_fast import ops, reference
from utils import DEVICES, DTYPES, assert_close


def numpy_rows(x, target=None, positions=None, mode="all"):
    """The batch's sample rows [n, D], gathered with numpy loops (independent of the kernels)."""
    xn = x.detach().double().cpu().numpy()
    tn = None if target is None else target.detach().double().cpu().numpy()
    rows = []
    if xn.ndim == 2:
        for n in range(xn.shape[0]):
            rows.append(list(xn[n]) + ([] if tn is None else [tn[n]]))
        return np.array(rows)
    N, C, H, W = xn.shape
    for n in range(N):
        if mode == "gap":
            rows.append(list(xn[n].mean(axis=(1, 2))) + ([] if tn is None else [tn[n]]))
            continue
        ps = range(H * W) if mode == "all" else positions[n].tolist()
        for p in ps:
            rows.append(list(xn[n, :, p // W, p % W]) + ([] if tn is None else [tn[n]]))
    return np.array(rows)


def check_against_numpy(m, rows):
    n = rows.shape[0]
    assert int(m.count) == n
    assert_close(m.mean, rows.mean(axis=0))
    if n > 1:
        # np.cov is the unbiased covariance: comoment / (n - 1)
        assert_close(m.comoment / (n - 1), np.atleast_2d(np.cov(rows, rowvar=False)))


SHAPES = [(2, 3, 4, 5), (5, 17, 3, 3), (3, 130, 6, 7), (1, 4, 1, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["all", "positions", "gap"])
@pytest.mark.parametrize("with_target", [False, True])
def test_matches_reference_and_numpy(device, dtype, shape, mode, with_target):
    g = torch.Generator().manual_seed(hash((shape, mode)) % 2**31)
    N, C, H, W = shape
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype).to(device)
    t = torch.randn(N, generator=g).to(device) if with_target else None
    pos = torch.randint(0, H * W, (N, 5), generator=g).to(device) if mode == "positions" else None
    m = ops.channel_moments(x, t, pos, mode=mode)
    r = reference.channel_moments(x, t, pos, mode=mode)
    assert m.mean.dtype == m.comoment.dtype == torch.float64
    assert m.comoment.shape == (C + with_target,) * 2
    assert_close(m.count, r.count, rtol=0, atol=0)
    assert_close(m.mean, r.mean)
    assert_close(m.comoment, r.comoment)
    check_against_numpy(m, numpy_rows(x, t, pos, mode))


def _layouts(x):
    """The same values in several memory layouts: contiguous, channels_last, sliced, transposed."""
    N, C, H, W = x.shape
    big = torch.randn(N, C * 2, H + 2, W * 3, dtype=x.dtype)
    big[:, ::2, 1:H + 1, ::3] = x
    wide_t = torch.randn(N, C, W, H, dtype=x.dtype)
    return {
        "contiguous": x.contiguous(),
        "channels_last": x.to(memory_format=torch.channels_last),
        "strided_slice": big[:, ::2, 1:H + 1, ::3],
        "transposed_hw": wide_t.copy_(x.transpose(2, 3)).transpose(2, 3),
    }


@pytest.mark.parametrize("mode", ["all", "positions", "gap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_layouts_agree(mode, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 5, 6, generator=g).to(dtype)
    t = torch.randn(4, generator=g)
    pos = torch.randint(0, 30, (4, 7), generator=g) if mode == "positions" else None
    expected = numpy_rows(x, t, pos, mode)
    for name, xv in _layouts(x).items():
        assert torch.equal(xv, x), name
        m = ops.channel_moments(xv, t, pos, mode=mode)
        check_against_numpy(m, expected)


def test_channels_last_nhwc_with_channel_dim():
    x = torch.randn(3, 8, 4, 5)
    t = torch.randn(3)
    nhwc = x.permute(0, 2, 3, 1).contiguous()  # [N, H, W, C]
    a = ops.channel_moments(x, t)
    for cd in (-1, 3):
        b = ops.channel_moments(nhwc, t, channel_dim=cd)
        assert_close(b.comoment, a.comoment)
        assert_close(b.mean, a.mean)
    pos = torch.randint(0, 20, (3, 4))
    assert_close(ops.channel_moments(nhwc, None, pos, channel_dim=-1).comoment,
                 ops.channel_moments(x, None, pos).comoment)


def test_two_dimensional_input_is_one_row_per_sample():
    x = torch.randn(50, 7, dtype=torch.float64)
    t = torch.randn(50)
    m = ops.channel_moments(x, t)
    check_against_numpy(m, np.concatenate([x.numpy(), t.double().numpy()[:, None]], axis=1))


def test_large_layer_uses_several_chunks_and_panels():
    # D = 300 takes the panel path; 30k rows cross the 13981-row chunk boundary twice.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 300, 10, 100, generator=g)
    m = ops.channel_moments(x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 300).double().numpy()
    assert_close(m.comoment / (rows.shape[0] - 1), np.cov(rows, rowvar=False), rtol=1e-9)


# ----------------------------------------------------------------------------- numerics
def test_huge_mean_keeps_correlations():
    # mean 1e4, std 1: a one-pass float32 E[xy] - E[x]E[y] loses everything, centring first does not.
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    z[:, 1] = 0.6 * z[:, 0] + 0.8 * z[:, 1]
    x = (1e4 + z).float()
    m = ops.channel_moments(x)
    stats = chanaxis_fast.ChannelStats().update(x)
    expected = np.corrcoef(x.double().numpy(), rowvar=False)  # numpy centres in float64 first
    assert_close(stats.correlation(), expected, rtol=0, atol=1e-6)
    # the test can fail: a naive float32 one-pass formula is far off
    n = x.shape[0]
    naive = (x.T @ x / n - torch.outer(x.mean(0), x.mean(0)))
    assert (naive[0, 1] / naive.diagonal().prod().sqrt() - expected[0, 1]).abs() > 1e-3
    assert_close(m.mean, x.double().mean(0))


@pytest.mark.parametrize("value", [0.1, 1e4 + 0.3, -7.25])
def test_constant_channels_have_zero_variance_and_zero_correlation(value):
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    x[:, 1] = value
    x[:, 3] = value * 2
    t = torch.randn(6)
    m = ops.channel_moments(x, t)
    assert m.comoment[1].abs().max() == 0 and m.comoment[:, 1].abs().max() == 0
    assert m.comoment[3].abs().max() == 0
    assert m.mean[1] == value
    stats = chanaxis_fast.ChannelStats().update(x, t).update(x[:3], t[:3])
    corr = stats.correlation()
    assert torch.isfinite(corr).all()
    assert corr[1, 3] == 0 and corr[1, 0] == 0 and corr[1, 1] == 1
    assert corr[0, 0] == 1 and abs(corr[0, 2]) < 1


def test_duplicated_channels_correlate_exactly():
    x = torch.randn(8, 5, 4, 4)
    x[:, 2] = x[:, 0]
    x[:, 4] = -x[:, 0]
    corr = chanaxis_fast.ChannelStats().update(x).correlation()
    assert_close(corr[0, 2], 1.0, atol=1e-12, rtol=0)
    assert_close(corr[0, 4], -1.0, atol=1e-12, rtol=0)
    assert corr.abs().max() <= 1.0


def test_single_sample():
    x = torch.randn(1, 4)
    m = ops.channel_moments(x)
    assert int(m.count) == 1
    assert_close(m.mean, x[0])
    assert m.comoment.abs().max() == 0
    stats = chanaxis_fast.ChannelStats().update(x)
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.covariance()


def test_nonfinite_is_an_error_by_default_and_skipped_on_request():
    x = torch.randn(5, 3, 2, 2)
    x[1, 2, 0, 1] = float("nan")
    x[3, 0, 1, 1] = float("inf")
    t = torch.randn(5)
    with pytest.raises(RuntimeError, match=r"channel_moments: x has NaN/Inf values \(first in channel 0"):
        ops.channel_moments(x, t)
    m = ops.channel_moments(x, t, skip_nonfinite=True)
    rows = numpy_rows(x, t)
    kept = rows[np.isfinite(rows).all(axis=1)]
    assert kept.shape[0] == 18
    check_against_numpy(m, kept)
    r = reference.channel_moments(x, t, skip_nonfinite=True)
    assert_close(m.comoment, r.comoment)
    t[2] = float("nan")
    with pytest.raises(RuntimeError, match="target has NaN/Inf"):
        ops.channel_moments(torch.randn(5, 3, 2, 2), t)
    m = ops.channel_moments(x, t, skip_nonfinite=True)
    assert int(m.count) == 14  # image 2's four rows go too
    # everything non-finite: nothing left, no NaN in the result
    m = ops.channel_moments(torch.full((2, 3), float("nan")), skip_nonfinite=True)
    assert int(m.count) == 0 and torch.isfinite(m.comoment).all()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.randn(2, 3, 4),), {}, r"channel_moments: x must be 2-D \[N, C\] or 4-D .* got 3-D"),
    ((torch.randn(2, 3, 4, 4, 1),), {}, "got 5-D"),
    ((torch.randint(0, 5, (2, 3, 4, 4)),), {}, "x must be a floating tensor"),
    ((torch.randn(2, 3, 4, 4), torch.randn(3)), {}, r"target must be \[N\] = \[2\]"),
    ((torch.randn(2, 3, 4, 4), torch.randn(2, 1)), {}, r"target must be \[N\] = \[2\]"),
    ((torch.randn(2, 3, 4, 4), torch.randint(0, 2, (2,))), {}, "target must be a floating tensor"),
    ((torch.randn(2, 3, 4, 4), None, torch.zeros(3, 2, dtype=torch.long)), {}, r"positions must be \[N, P\]"),
    ((torch.randn(2, 3, 4, 4), None, torch.zeros(2, dtype=torch.long)), {}, r"positions must be \[N, P\]"),
    ((torch.randn(2, 3, 4, 4), None, torch.zeros(2, 2, dtype=torch.int32)), {}, "positions must be Long"),
    ((torch.randn(2, 3, 4, 4), None, torch.tensor([[0, 16], [1, 2]])), {}, r"index the H\*W = 16 .* \[0, 16\]"),
    ((torch.randn(2, 3, 4, 4), None, torch.tensor([[0, -1], [1, 2]])), {}, r"values in \[-1, 2\]"),
    ((torch.randn(0, 3, 4, 4),), {}, r"x has no samples \(N = 0\)"),
    ((torch.randn(0, 3),), {}, "x has no samples"),
    ((torch.randn(2, 3, 4, 4),), {"mode": "bogus"}, "mode must be 'all', 'positions' or 'gap', got 'bogus'"),
    ((torch.randn(2, 3, 4, 4),), {"mode": "positions"}, "mode 'positions' needs a positions tensor"),
    ((torch.randn(2, 3, 4, 4), None, torch.zeros(2, 2, dtype=torch.long)), {"mode": "gap"}, "positions were given but mode is 'gap'"),
    ((torch.randn(5, 3),), {"mode": "gap"}, "needs a 4-D x"),
    ((torch.randn(2, 3, 4, 4),), {"channel_dim": 2}, "channel_dim of a 4-D x must be 1"),
    ((torch.randn(2, 3, 4, 4),), {"channel_dim": 7}, "channel_dim 7 is out of range"),
])
def test_bad_input_raises_clear_errors(args, kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        ops.channel_moments(*args, **kwargs)


# ----------------------------------------------------------------------------- dispatcher
@pytest.mark.parametrize("mode", ["all", "positions", "gap"])
def test_opcheck(mode):
    x = torch.randn(3, 5, 4, 4)
    pos = torch.randint(0, 16, (3, 2)) if mode == "positions" else None
    for t in (None, torch.randn(3)):
        torch.library.opcheck(torch.ops.chanaxis_fast.channel_moments.default,
                              (x, t, pos, mode, 1, False))
    torch.library.opcheck(torch.ops.chanaxis_fast.channel_moments.default,
                          (x.permute(0, 2, 3, 1), None, pos, mode, -1, False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["all", "positions", "gap"])
def test_cuda_matches_cpu(dtype, mode):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 300, 7, 9, generator=g).to(dtype)
    t = torch.randn(16, generator=g)
    pos = torch.randint(0, 63, (16, 11), generator=g) if mode == "positions" else None
    cpu = ops.channel_moments(x, t, pos, mode=mode)
    for xv in (x.cuda(), x.cuda().to(memory_format=torch.channels_last)):
        gpu = ops.channel_moments(xv, t.cuda(), None if pos is None else pos.cuda(), mode=mode)
        assert gpu.comoment.device.type == "cuda"
        assert_close(gpu.count, cpu.count, rtol=0, atol=0)
        assert_close(gpu.mean, cpu.mean)
        assert_close(gpu.comoment, cpu.comoment, rtol=1e-9)
    x[2, 5, 1, 1] = float("nan")
    with pytest.raises(RuntimeError, match="NaN/Inf"):
        ops.channel_moments(x.cuda(), mode=mode if mode != "positions" else "all")
    assert_close(ops.channel_moments(x.cuda(), t.cuda(), skip_nonfinite=True).comoment,
                 ops.channel_moments(x, t, skip_nonfinite=True).comoment, rtol=1e-9)


# ----------------------------------------------------------------------------- empty rows
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 4, 0, 5), (2, 6, 7, 0)])
def test_images_without_positions_give_count_zero(device, shape):
    # H * W = 0: no rows. No launch may divide by the row count (CUDA used to die of SIGFPE).
    x = torch.randn(shape, device=device)
    for args in ((x,), (x, torch.randn(shape[0], device=device))):
        m = ops.channel_moments(*args)
        r = reference.channel_moments(*args)
        D = shape[1] + (len(args) - 1)
        assert int(m.count) == int(r.count) == 0
        assert m.mean.shape == (D,) and m.comoment.shape == (D, D)
        assert m.mean.device.type == device
        assert_close(m.mean, np.zeros(D))
        assert_close(m.comoment, np.zeros((D, D)))
    with pytest.raises(RuntimeError, match=r"positions must index the H\*W = 0 positions"):
        ops.channel_moments(x, positions=torch.zeros(shape[0], 2, dtype=torch.long, device=device))
    m = ops.channel_moments(x.permute(0, 2, 3, 1), channel_dim=-1)
    assert int(m.count) == 0


# ----------------------------------------------------------------------------- precision="float32"
def offset_data(N=64, C=300, H=6, W=7, mean=1e4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, C, H, W, generator=g) + mean).float(), torch.randn(N, generator=g)


def rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64).cpu(), torch.as_tensor(b, dtype=torch.float64).cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["all", "positions", "gap"])
def test_float32_precision_is_within_1e6_of_float64_on_offset_data(device, mode):
    x, t = offset_data()
    pos = torch.randint(0, 42, (64, 9), generator=torch.Generator().manual_seed(1)) if mode == "positions" else None
    x, t = x.to(device), t.to(device)
    pos = None if pos is None else pos.to(device)
    m64 = ops.channel_moments(x, t, pos, mode=mode)
    for xv in (x, x.to(memory_format=torch.channels_last)):
        m32 = ops.channel_moments(xv, t, pos, mode=mode, precision="float32")
        assert m32.comoment.dtype == torch.float64 and m32.comoment.device.type == device
        # count and means come from the float64 pass: the same bits
        assert torch.equal(m32.count, m64.count) and torch.equal(m32.mean, m64.mean)
        assert rel_err(m32.comoment, m64.comoment) < 1e-6
        assert torch.equal(m32.comoment, m32.comoment.T)
    # against numpy in float64, and the float32 reference
    rows = numpy_rows(x, t, pos, mode)
    np_com = np.cov(rows, rowvar=False) * (rows.shape[0] - 1)
    assert rel_err(m32.comoment, np_com) < 1e-6
    r32 = reference.channel_moments(x, t, pos, mode=mode, precision="float32")
    assert rel_err(m32.comoment, r32.comoment) < 1e-6


def test_float32_precision_beats_float32_cov_and_one_pass_formula():
    # what the float32 mode is for: float32 arithmetic where it is cheap, float64 where it matters
    x, _ = offset_data(N=32, C=64, H=16, W=16)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 64)
    m64 = ops.channel_moments(x)
    ours = rel_err(ops.channel_moments(x, precision="float32").comoment, m64.comoment)
    cov32 = rel_err(torch.cov(rows.T) * (rows.shape[0] - 1), m64.comoment)
    mu = rows.mean(0)
    one_pass = rel_err(rows.T @ rows - rows.shape[0] * torch.outer(mu, mu), m64.comoment)
    assert ours < 1e-6 < cov32 < one_pass


def test_float32_precision_several_chunks_and_skip_nonfinite():
    # 2-D input of 2,000 channels: ~2,000 rows per chunk, so several chunks are folded
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, 2000, generator=g) * 3 + 100
    x[17, 5] = float("nan")
    m64 = ops.channel_moments(x, skip_nonfinite=True)
    m32 = ops.channel_moments(x, skip_nonfinite=True, precision="float32")
    assert int(m32.count) == 4999
    assert torch.equal(m32.mean, m64.mean)
    assert rel_err(m32.comoment, m64.comoment) < 1e-6
    with pytest.raises(RuntimeError, match="NaN/Inf"):
        ops.channel_moments(x, precision="float32")


def test_float32_precision_ignores_reduced_matmul_precision():
    # TF32 / bfloat16 products would cost three or more digits: the op sets full float32 precision
    # for its own products and restores the user's setting
    x, _ = offset_data(N=8, C=128)
    want = ops.channel_moments(x, precision="float32").comoment
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = ops.channel_moments(x, precision="float32").comoment
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(got, want)


def test_precision_is_checked():
    with pytest.raises(RuntimeError, match="precision must be 'float64' or 'float32', got 'half'"):
        ops.channel_moments(torch.randn(4, 3), precision="half")
    with pytest.raises(ValueError, match="precision must be"):
        reference.channel_moments(torch.randn(4, 3), precision="half")


def test_opcheck_float32_precision():
    x = torch.randn(3, 5, 4, 4)
    torch.library.opcheck(torch.ops.chanaxis_fast.channel_moments.default,
                          (x, torch.randn(3), None, "all", 1, False, "float32"))


# ----------------------------------------------------------------------------- CUDA layouts
CUDA = pytest.mark.skipif(
    not (torch.cuda.is_available() and chanaxis_fast.build_info()["cuda_kernels"]),
    reason="needs a GPU and the CUDA kernels")


@CUDA
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_cuda_channel_stride_one_layouts_match_cpu(precision):
    # threads along channels (channel stride 1): [N, C], channels-last, gap, gathered positions,
    # with C not a multiple of 32 and a target column
    g = torch.Generator().manual_seed(9)
    x = torch.randn(12, 77, 5, 6, generator=g) * 2 + 3
    t = torch.randn(12, generator=g)
    pos = torch.randint(0, 30, (12, 7), generator=g)
    cases = [(x.permute(0, 2, 3, 1).reshape(-1, 77), None, None, "all", 1),
             (x, t, None, "gap", 1),
             (x, t, pos, "positions", 1),
             (x.permute(0, 2, 3, 1).contiguous(), t, pos, "positions", -1),
             (x.permute(0, 2, 3, 1).contiguous(), t, None, "all", -1),
             (x.to(memory_format=torch.channels_last), t, None, "all", 1)]
    for xv, tv, pv, mode, cd in cases:
        cpu = ops.channel_moments(xv, tv, pv, mode=mode, channel_dim=cd, precision=precision)
        gpu = ops.channel_moments(xv.cuda(), None if tv is None else tv.cuda(),
                                  None if pv is None else pv.cuda(), mode=mode, channel_dim=cd,
                                  precision=precision)
        assert_close(gpu.count, cpu.count, rtol=0, atol=0)
        assert_close(gpu.mean, cpu.mean)
        assert_close(gpu.comoment, cpu.comoment, rtol=1e-9 if precision == "float64" else 1e-6,
                     atol=1e-9 if precision == "float64" else 1e-5)


@CUDA
def test_cuda_empty_rows_and_out_of_range_positions():
    x = torch.randn(3, 4, 0, 5, device="cuda")
    assert int(ops.channel_moments(x).count) == 0  # no SIGFPE
    y = torch.randn(2, 3, 4, 4, device="cuda")
    for bad in (16, -1):
        pos = torch.tensor([[0, 1], [2, bad]], device="cuda")
        with pytest.raises(RuntimeError, match=r"positions must index the H\*W = 16 positions"):
            ops.channel_moments(y, positions=pos)
    torch.cuda.synchronize()  # the bad index was never read: the context is still usable
    assert int(ops.channel_moments(y).count) == 32
    # (more than 65,535 columns, which the kernels now loop over in grid.y, would need a
    # comoment of 34 GB: checked by reading only)


@CUDA
def test_cuda_mixed_devices_give_the_ops_own_error():
    x = torch.randn(3, 4, 2, 2)
    with pytest.raises(RuntimeError, match="target is on cuda:0 but x is on cpu"):
        ops.channel_moments(x, torch.randn(3, device="cuda"))
    with pytest.raises(RuntimeError, match="positions is on cuda:0 but x is on cpu"):
        ops.channel_moments(x, positions=torch.zeros(3, 1, dtype=torch.long, device="cuda"))
