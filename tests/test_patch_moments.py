"""patch_moments (SFVR's input statistics): the CPU kernel against the F.unfold reference and a
numpy loop over every patch, kernel geometries, layouts, dtypes, NaN/Inf, bad input, opcheck, and
calibrate's SFVR statistics with the kernel against the PyTorch gather it replaces on the CPU."""

import numpy as np
import pytest
import torch

from chanaxis_fast import ops, reference
from chanaxis_fast.extras import sfvr
from utils import assert_close

GEOMETRIES = [  # kernel, stride, padding, dilation
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((1, 1), (2, 2), (0, 0), (1, 1)),
    ((3, 2), (2, 1), (2, 0), (2, 1)),
    ((5, 5), (1, 1), (2, 2), (1, 1)),
    ((7, 7), (2, 2), (3, 3), (1, 1)),
]


def _out(H, W, k, s, p, d):
    return ((H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1,
            (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)


def _numpy_patch_moments(x, pos, k, s, p, d, Wo):
    """Every patch read by hand (zero outside the image), then numpy mean and centred product."""
    a = x.double().numpy()
    N, C, H, W = a.shape
    rows = [[] for _ in range(C)]
    for n in range(N):
        for q in pos[n].tolist():
            oh, ow = divmod(q, Wo)
            for c in range(C):
                patch = []
                for i in range(k[0]):
                    for j in range(k[1]):
                        ih, iw = oh * s[0] - p[0] + i * d[0], ow * s[1] - p[1] + j * d[1]
                        patch.append(a[n, c, ih, iw] if 0 <= ih < H and 0 <= iw < W else 0.0)
                rows[c].append(patch)
    out = []
    for r in rows:
        r = np.array(r)
        z = r - r.mean(0)
        out.append((len(r), r.mean(0), z.T @ z))
    return out


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_kernel_equals_reference_and_numpy(geometry):
    k, s, p, d = geometry
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 11, 9, generator=g) * torch.linspace(0.5, 3, 4)[:, None, None] + 100
    Ho, Wo = _out(11, 9, k, s, p, d)
    pos = torch.randint(0, Ho * Wo, (5, 6), generator=g)
    ours = ops.patch_moments(x, pos, k, stride=s, padding=p, dilation=d, out_width=Wo)
    ref = reference.patch_moments(x, pos, k, stride=s, padding=p, dilation=d, out_width=Wo)
    assert ours.count.tolist() == ref.count.tolist() == [30] * 4
    assert_close(ours.mean, ref.mean, rtol=1e-14)
    assert_close(ours.comoment, ref.comoment, rtol=1e-11, atol=1e-9)
    assert torch.equal(ours.comoment, ours.comoment.transpose(1, 2))
    for c, (n, mean, M) in enumerate(_numpy_patch_moments(x, pos, k, s, p, d, Wo)):
        np.testing.assert_allclose(ours.mean[c].numpy(), mean, rtol=1e-13)
        np.testing.assert_allclose(ours.comoment[c].numpy(), M, rtol=1e-10, atol=1e-8)


def test_every_position_channels_last_and_half():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 6, 8, 8, generator=g) * 2).half().to(memory_format=torch.channels_last)
    pos = torch.arange(64).expand(3, 64)  # an expanded (stride 0) index, as mode "all" passes
    ours = ops.patch_moments(x, pos, 3, padding=1, out_width=8)
    ref = reference.patch_moments(x, pos, 3, padding=1, out_width=8)
    assert ours.count.tolist() == [192] * 6
    assert_close(ours.mean, ref.mean, rtol=1e-13, atol=1e-15)
    assert_close(ours.comoment, ref.comoment, rtol=1e-11, atol=1e-9)


def test_nonfinite_values_raise_or_drop_their_patches():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 6, generator=g)
    x[1, 2, 3, 3] = float("nan")
    pos = torch.tensor([[0, 14, 21], [14, 21, 35]])  # image 1 / channel 2 at (3, 3): both 14 and 21
    with pytest.raises(RuntimeError, match="NaN/Inf values \\(first in input channel 2\\)"):
        ops.patch_moments(x, pos, 3, padding=1, out_width=6)
    ours = ops.patch_moments(x, pos, 3, padding=1, out_width=6, skip_nonfinite=True)
    ref = reference.patch_moments(x, pos, 3, padding=1, out_width=6, skip_nonfinite=True)
    assert ours.count.tolist() == ref.count.tolist() == [6, 6, 4]
    assert_close(ours.mean, ref.mean, rtol=1e-14)
    assert_close(ours.comoment, ref.comoment, rtol=1e-12, atol=1e-12)
    x[:, 1] = float("inf")  # every patch of channel 1 dropped: count 0, zero statistics
    none = ops.patch_moments(x, pos, 3, padding=1, out_width=6, skip_nonfinite=True)
    assert none.count[1] == 0 and not none.mean[1].any() and not none.comoment[1].any()


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_a_nan_patch_is_dropped_and_huge_finite_values_are_kept(kernel):
    # the kernel tests each plane once (its column sums) and each row only when that fails: a
    # NaN in one patch drops exactly that patch, and finite values whose sums overflow are kept
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 7, 7, generator=g, dtype=torch.float64)
    x[2, 1, 0, 0] = float("nan")
    pos = torch.tensor([[0, 10, 48], [0, 10, 48], [0, 24, 48]])  # only (2, 0) sees pixel (0, 0)
    ours = ops.patch_moments(x, pos, kernel, padding=kernel // 2, out_width=7, skip_nonfinite=True)
    ref = reference.patch_moments(x, pos, kernel, padding=kernel // 2, out_width=7, skip_nonfinite=True)
    assert ours.count.tolist() == ref.count.tolist() == [9, 8]
    assert_close(ours.mean, ref.mean, rtol=1e-14)
    assert_close(ours.comoment, ref.comoment, rtol=1e-12, atol=1e-12)
    huge = torch.full((1, 1, 4, 4), 1.5e308, dtype=torch.float64)
    out = ops.patch_moments(huge, torch.tensor([[0, 5, 10, 15]]), kernel, padding=kernel // 2, out_width=4)
    assert out.count.tolist() == [4]  # no error, no row dropped: the overflow is the data's


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.randn(2, 3, 5),), {}, "x must be 4-D"),
    ((torch.randn(2, 3, 5, 5).int(),), {}, "x must be a floating tensor"),
    ((torch.randn(2, 3, 5, 5), torch.zeros(2, 2)), {}, "positions must be Long"),
    ((torch.randn(2, 3, 5, 5), torch.zeros(3, 2, dtype=torch.long)), {}, "positions must be \\[N, P\\]"),
    ((torch.randn(2, 3, 5, 5), torch.full((2, 2), 25)), {}, "positions must index the 5 x 5 = 25"),
    ((torch.randn(2, 3, 5, 5), torch.zeros(2, 2, dtype=torch.long)), {"out_width": 4}, "out_width must be"),
    ((torch.randn(2, 3, 5, 5), torch.zeros(2, 2, dtype=torch.long)), {"stride": 0}, "must be positive"),
])
def test_bad_input_names_the_argument(args, kwargs, match):
    x = args[0]
    pos = args[1] if len(args) > 1 else torch.zeros(2, 2, dtype=torch.long)
    kw = {"padding": 1, "out_width": 5, **kwargs}
    with pytest.raises(RuntimeError, match=match):
        ops.patch_moments(x, pos, 3, **kw)


def test_opcheck():
    x = torch.randn(2, 3, 6, 6)
    pos = torch.randint(0, 36, (2, 4))
    torch.library.opcheck(torch.ops.chanaxis_fast.patch_moments.default,
                          (x, pos, [3, 3], [1, 1], [1, 1], [1, 1], 6, False))


@pytest.mark.parametrize("conv", [
    torch.nn.Conv2d(5, 7, 3, padding=1),
    torch.nn.Conv2d(5, 10, 3, stride=2, padding=1, groups=5),
    torch.nn.Conv2d(5, 7, 1, stride=2),
    torch.nn.Conv2d(5, 7, 3, padding=2, dilation=2, padding_mode="reflect"),
    torch.nn.Conv2d(5, 7, 3, padding="same"),
])
def test_sfvr_input_statistics_with_the_kernel_equal_the_gather(conv, monkeypatch):
    """extras/sfvr.input_stats: the CPU kernel against the PyTorch gather it replaces (kept for GPUs)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 10, 10, generator=g) + 2
    node = type("Node", (), {"kind": "conv"})()
    u = torch.rand(6, 16, generator=g)
    index = lambda N, S, device: (u * S).floor().long().clamp_(max=S - 1)  # noqa: E731
    kernel = sfvr.input_stats(x, conv, node, index, skip_nonfinite=False, who="test")
    monkeypatch.setattr(sfvr, "USE_KERNEL", False)
    gather = sfvr.input_stats(x, conv, node, index, skip_nonfinite=False, who="test")
    assert torch.equal(kernel.count, gather.count)
    assert_close(kernel.mean, gather.mean, rtol=1e-13)
    assert_close(kernel.comoment, gather.comoment, rtol=1e-11, atol=1e-9)
