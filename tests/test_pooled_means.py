"""pooled_means (mode "gap"'s per-read-out means): the CPU kernel against the float64 reference
and numpy, dtypes, strides, huge means, NaN/Inf, empty shapes, bad input, opcheck; the blockwise
path that other devices run; CUDA vs CPU."""

import numpy as np
import pytest
import torch

from chanaxis_fast import ops, reference
from utils import assert_close


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-15), (torch.float64, 1e-15),
                                         (torch.float16, 1e-15), (torch.bfloat16, 1e-15)])
def test_kernel_equals_reference_and_numpy(dtype, rtol):
    g = torch.Generator().manual_seed(0)
    for S in (1, 7, 64, 1000, 4099):  # below, at and off the vector width
        x = (torch.randn(3, 5, S, generator=g) * 3 + 2).to(dtype)
        ours = ops.pooled_means(x)
        assert ours.dtype == torch.float64 and ours.shape == (3, 5)
        assert_close(ours, reference.pooled_means(x), rtol=rtol, atol=0)
        np.testing.assert_allclose(ours.numpy(), x.double().numpy().mean(2), rtol=rtol, atol=0)


def test_strides_channels_last_and_huge_means():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 6, 9, 11, generator=g) + 1e4).to(memory_format=torch.channels_last)
    flat = x.flatten(2)  # [N, C, H W] with entries C apart
    assert flat.stride(2) == 6
    ours = ops.pooled_means(flat)
    np.testing.assert_allclose(ours.numpy(), x.double().numpy().reshape(4, 6, -1).mean(2), rtol=1e-15)
    sliced = x.double()[:, ::2, 1:, ::3].flatten(2)  # a copy, then a strided 3-D view
    np.testing.assert_allclose(ops.pooled_means(sliced[:, :, ::2]).numpy(),
                               sliced[:, :, ::2].numpy().mean(2), rtol=1e-15)


def test_nonfinite_values_propagate_and_empty_shapes():
    x = torch.ones(2, 3, 8)
    x[1, 2, 5] = float("nan")
    x[0, 1, 0] = float("inf")
    out = ops.pooled_means(x)
    assert torch.isnan(out[1, 2]) and out[0, 1] == float("inf")
    assert (out[[0, 0, 1, 1], [0, 2, 0, 1]] == 1).all()
    assert ops.pooled_means(torch.ones(0, 3, 4)).shape == (0, 3)
    assert torch.isnan(ops.pooled_means(torch.ones(2, 3, 0))).all()  # as torch's mean


@pytest.mark.parametrize("x, match", [(torch.ones(2, 3), "x must be 3-D"),
                                      (torch.ones(2, 3, 4, dtype=torch.int64), "floating")])
def test_bad_input_names_the_argument(x, match):
    with pytest.raises(RuntimeError, match=f"pooled_means: .*{match}"):
        ops.pooled_means(x)


def test_opcheck():
    x = torch.randn(2, 3, 17)
    torch.library.opcheck(torch.ops.chanaxis_fast.pooled_means.default, (x,))


def test_blockwise_path_is_the_whole_mean(monkeypatch):
    # what devices without a kernel run: x.double().mean(2) a few images at a time, the same bits
    from chanaxis_fast import ops as ops_mod

    x = torch.randn(7, 3, 10) * 100 + 1e4
    whole = x.double().mean(2)
    monkeypatch.setattr(ops_mod, "_POOL_BLOCK", 50)  # blocks of one image
    assert torch.equal(ops_mod._pooled_means_blocks(x), whole)
    monkeypatch.setattr(ops_mod, "_POOL_BLOCK", 70)  # two images, and a last block of one
    assert torch.equal(ops_mod._pooled_means_blocks(x), whole)
    assert torch.equal(ops_mod._pooled_means_blocks(x.double()), whole)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(4)
    for x in (torch.randn(5, 7, 300, generator=g) + 3,  # rows shorter and longer than a block
              torch.randn(3, 4, 1000, generator=g).half(),
              (torch.randn(2, 6, 5, 9, generator=g) + 1e4).to(memory_format=torch.channels_last).flatten(2),
              torch.randn(70000, 1, 3, generator=g)):  # more rows than blocks (grid stride)
        assert_close(ops.pooled_means(x.cuda()).cpu(), ops.pooled_means(x), rtol=1e-14, atol=0)
    x = torch.ones(2, 3, 8, device="cuda")
    x[1, 2, 5] = float("nan")
    assert torch.isnan(ops.pooled_means(x)[1, 2]) and (ops.pooled_means(x)[0] == 1).all()
    assert torch.isnan(ops.pooled_means(torch.ones(2, 3, 0, device="cuda"))).all()
