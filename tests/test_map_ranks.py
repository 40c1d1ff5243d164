"""map_ranks (HRank's feature-map ranks): against numpy's SVD rank, torch.linalg.matrix_rank (the
reference) and ranks known by construction; dtypes, strides, scale, tolerance, errors, CUDA."""

import numpy as np
import pytest
import torch

import chanaxis_fast
from chanaxis_fast import ops, reference

SHAPES = [(1, 1), (1, 7), (7, 1), (4, 4), (8, 8), (5, 9), (9, 5), (16, 16), (32, 32), (3, 40), (33, 20)]


def np_ranks(x, rtol):
    """numpy's rank (float64 LAPACK SVD of the same values) of every map of x [N, C, H, W]."""
    a = x.double().numpy()
    return np.array([[np.linalg.matrix_rank(a[i, c], rtol=rtol) for c in range(a.shape[1])]
                     for i in range(a.shape[0])])


def relu_maps(N, C, H, W, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, H, W, generator=g).relu().to(dtype)


def low_rank_maps(N, C, H, W, seed=0):
    """Integer maps of known rank r (exact in float32): [I_r; P] @ [I_r, Q], rank r per map."""
    rng = np.random.default_rng(seed)
    out, ranks = np.zeros((N, C, H, W), np.float32), np.zeros((N, C), np.int64)
    for i in range(N):
        for c in range(C):
            r = int(rng.integers(0, min(H, W) + 1))
            U = np.vstack([np.eye(r), rng.integers(-3, 4, (H - r, r))])
            V = np.hstack([np.eye(r), rng.integers(-3, 4, (r, W - r))])
            perm_h, perm_w = rng.permutation(H), rng.permutation(W)
            out[i, c] = (U @ V)[perm_h][:, perm_w]
            ranks[i, c] = r
    return torch.from_numpy(out), torch.from_numpy(ranks)


@pytest.mark.parametrize("H,W", SHAPES)
def test_random_maps_against_numpy_and_reference(H, W):
    x = relu_maps(3, 5, H, W, seed=H * 100 + W)
    x[0, 0] = 0                       # a dead channel
    x[1, 1, :, 0] = 0                 # a zero column
    x[2, 2] = x[2, 2, :1].expand(H, W)  # repeated rows: rank <= 1
    got = ops.map_ranks(x)
    assert got.dtype == torch.int64 and got.shape == (3, 5)
    rtol = max(H, W) * torch.finfo(torch.float32).eps
    np.testing.assert_array_equal(got.numpy(), np_ranks(x, rtol))
    assert torch.equal(got, reference.map_ranks(x))
    assert torch.equal(got, torch.linalg.matrix_rank(x))  # the float32 SVD agrees away from the tolerance
    assert got[0, 0] == 0 and got[2, 2] <= 1


@pytest.mark.parametrize("H,W", [(4, 4), (6, 11), (11, 6), (16, 16), (32, 32)])
def test_ranks_known_by_construction(H, W):
    x, ranks = low_rank_maps(4, 6, H, W, seed=H + W)
    assert torch.equal(ops.map_ranks(x), ranks)
    assert torch.equal(ops.map_ranks(x.double()), ranks)


def test_special_maps():
    x = torch.zeros(1, 5, 6, 6)
    x[0, 1, 2, 3] = 5.0                        # one entry: rank 1
    x[0, 2] = 3.0                              # constant: rank 1
    x[0, 3] = torch.eye(6)                     # identity: full
    x[0, 4] = torch.diag(torch.tensor([1.0, 2, 0, 4, 0, 6]))  # two zeros on the diagonal
    assert ops.map_ranks(x).tolist() == [[0, 1, 1, 6, 4]]


def test_graded_spectrum_and_explicit_rtol():
    # singular values 1, 1e-1, ..., 1e-7 of an orthogonally mixed float64 matrix
    rng = np.random.default_rng(3)
    Q1, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    Q2, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    A = torch.from_numpy(Q1 @ np.diag(10.0 ** -np.arange(8)) @ Q2.T)
    for k in range(8):
        # between sigma_k = 1e-k and sigma_{k+1}: k + 1 values above the tolerance
        assert ops.map_ranks(A, rtol=10.0 ** -(k + 0.5)).item() == k + 1
    assert ops.map_ranks(A).item() == 8  # float64's default tolerance: 8 * 2.2e-16


def test_default_tolerance_follows_the_dtype():
    A = torch.diag(torch.tensor([1.0, 1e-10], dtype=torch.float64))
    assert ops.map_ranks(A).item() == 2                           # float64: 2 * 2.2e-16
    assert ops.map_ranks(A.float()).item() == 1                   # float32: 2 * 1.2e-7
    assert ops.default_rank_rtol(A.half()) == ops.default_rank_rtol(A.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_maps_are_ranked_exactly(dtype):
    x = relu_maps(2, 4, 8, 8, seed=1, dtype=dtype)
    x[1, 0] = x[1, 0, :1].expand(8, 8)
    got = ops.map_ranks(x)
    assert torch.equal(got, ops.map_ranks(x.float()))  # the same values, float32's tolerance
    np.testing.assert_array_equal(got.numpy(), np_ranks(x, 8 * torch.finfo(torch.float32).eps))


def test_scale_does_not_matter():
    x, ranks = low_rank_maps(2, 4, 7, 9, seed=5)
    x = x.double()
    for s in (1e-300, 1e-30, 1.0, 1e30, 1e300):
        assert torch.equal(ops.map_ranks(x * s), ranks), s


def test_strides():
    x = relu_maps(3, 4, 6, 10, seed=2)
    x[:, 1, 3:] = 0
    want = ops.map_ranks(x.contiguous())
    assert torch.equal(ops.map_ranks(x.to(memory_format=torch.channels_last)), want)
    assert torch.equal(ops.map_ranks(x.transpose(2, 3).contiguous().transpose(2, 3)), want)
    assert torch.equal(ops.map_ranks(x.transpose(2, 3)), torch.linalg.matrix_rank(x.transpose(2, 3)))
    big = relu_maps(3, 8, 6, 10, seed=2)
    assert torch.equal(ops.map_ranks(big[:, ::2]), torch.linalg.matrix_rank(big[:, ::2]))


def test_2d_and_empty_inputs():
    x = relu_maps(1, 1, 5, 5, seed=4)
    two_d = ops.map_ranks(x[0, 0])
    assert two_d.dim() == 0 and two_d.item() == ops.map_ranks(x).item()
    assert ops.map_ranks(torch.zeros(0, 3, 4, 4)).shape == (0, 3)
    assert ops.map_ranks(torch.zeros(2, 0, 4, 4)).shape == (2, 0)
    assert ops.map_ranks(torch.zeros(2, 3, 0, 4)).tolist() == [[0] * 3] * 2


def test_bad_input():
    with pytest.raises(RuntimeError, match="map_ranks: x must be 4-D"):
        torch.ops.chanaxis_fast.map_ranks(torch.zeros(2, 3, 4), 1e-6)
    with pytest.raises(RuntimeError, match="map_ranks: x must be a floating tensor"):
        ops.map_ranks(torch.zeros(1, 1, 3, 3, dtype=torch.int64), rtol=1e-6)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="map_ranks: rtol must be a positive finite number"):
            ops.map_ranks(torch.ones(1, 1, 3, 3), rtol=bad)
    for bad in (float("nan"), float("inf")):
        x = torch.ones(1, 2, 3, 3)
        x[0, 1, 1, 1] = bad
        with pytest.raises(RuntimeError, match="map_ranks: x has NaN/Inf values"):
            ops.map_ranks(x)


def test_opcheck():
    x = relu_maps(2, 3, 5, 7, seed=6)
    torch.library.opcheck(torch.ops.chanaxis_fast.map_ranks.default, (x, 1e-6))
    torch.library.opcheck(torch.ops.chanaxis_fast.map_ranks.default,
                          (x.to(memory_format=torch.channels_last).double(), 1e-12))


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not (torch.cuda.is_available() and chanaxis_fast.build_info()["cuda_kernels"]),
                    reason="needs a GPU and the CUDA kernels")
def test_cuda_matches_cpu():
    for H, W in SHAPES + [(56, 56), (7, 60)]:
        for dtype in (torch.float32, torch.float64, torch.float16):
            x = relu_maps(3, 70, H, W, seed=H + W, dtype=dtype)
            x[0, :3] = 0
            gpu = ops.map_ranks(x.cuda())
            assert gpu.device.type == "cuda"
            assert torch.equal(gpu.cpu(), ops.map_ranks(x))  # the same code, the same bits
    x, ranks = low_rank_maps(2, 5, 12, 9)
    assert torch.equal(ops.map_ranks(x.cuda().to(memory_format=torch.channels_last)).cpu(), ranks)
    with pytest.raises(RuntimeError, match="map_ranks: x has NaN/Inf values"):
        ops.map_ranks(torch.full((1, 2, 3, 3), float("nan"), device="cuda"))


def test_finite_values_whose_sum_overflows_are_accepted():
    # the NaN/Inf check is one sum; a sum that overflows on finite values takes the exact test
    x = torch.full((1, 2, 8, 8), 1.5e308, dtype=torch.float64)
    x[0, 1, ::2] = -1.5e308
    assert ops.map_ranks(x).tolist() == [[1, 1]]
    x[0, 1, 3, 3] = float("inf")
    with pytest.raises(RuntimeError, match="map_ranks: x has NaN/Inf values"):
        ops.map_ranks(x)
