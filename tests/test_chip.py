"""chip_drops: the secular-equation kernel vs numpy brute force (one SVD per zeroed row) and the SVD
reference, on the spectra that make secular solvers fail (repeated and zero singular values, zero
and duplicated rows, rank-deficient float32 maps, graded spectra), exact cases, dtypes, scaling,
bad input, opcheck, CUDA vs CPU."""

import numpy as np
import pytest
import torch

import chanaxis_fast
from chanaxis_fast import ops, reference

RTOL = 1e-8  # the target; measured agreement is about 1e-12 and better
NUCLEAR_ATOL = 1e-13  # times ||A||_*: full - reduced of the brute force rounds at ~1e-15 of it


# ----------------------------------------------------------------------------- brute force
def np_chip(A):
    """||A||_* - ||A with row c zeroed||_* by one numpy SVD per image and zeroed row."""
    A = np.asarray(A, dtype=np.float64)
    out = np.zeros(A.shape[:2])
    for i, M in enumerate(A):
        full = np.linalg.svd(M, compute_uv=False).sum()
        for c in range(M.shape[0]):
            B = M.copy()
            B[c] = 0.0
            out[i, c] = full - np.linalg.svd(B, compute_uv=False).sum()
    return out


def assert_drops_close(actual, expected, A, rtol=RTOL):
    """|actual - expected| <= rtol |expected| + 1e-13 ||A_i||_* per image."""
    actual = torch.as_tensor(actual, dtype=torch.float64).cpu().numpy()
    expected = np.asarray(expected, dtype=np.float64)
    A = torch.as_tensor(A).double().cpu().numpy()
    nuclear = np.linalg.svd(A, compute_uv=False).sum(-1)[:, None]
    err = np.abs(actual - expected)
    bound = rtol * np.abs(expected) + NUCLEAR_ATOL * nuclear
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (f"drop {worst}: {actual[worst]!r} vs {expected[worst]!r} "
                                  f"(|A|_* = {nuclear[worst[0], 0]:.3e})")


# ----------------------------------------------------------------------------- matrices
def with_singular_values(rng, C, S, s):
    """U diag(s) V^T with random orthonormal U [C, m], V [S, m]."""
    m = min(C, S)
    U = np.linalg.qr(rng.standard_normal((C, m)))[0]
    V = np.linalg.qr(rng.standard_normal((S, m)))[0]
    return (U * np.asarray(s, dtype=np.float64)) @ V.T


def matrix(kind, C, S, seed=0):
    """One C x S test matrix of the named structure (float64 numpy)."""
    rng = np.random.default_rng(seed)
    m = min(C, S)
    if kind == "random":
        return rng.standard_normal((C, S))
    if kind == "relu":
        return np.maximum(rng.standard_normal((C, S)) + 0.3, 0.0)
    if kind == "rank_deficient":  # rank min(3, m) exactly
        r = min(3, m)
        return rng.standard_normal((C, r)) @ rng.standard_normal((r, S))
    if kind == "zero_rows":
        A = rng.standard_normal((C, S))
        A[::3] = 0.0
        return A
    if kind == "duplicated_rows":
        A = rng.standard_normal((C, S))
        A[1::4] = A[0]
        A[2::4] = -2.0 * A[0]
        return A
    if kind == "repeated_sv":  # two singular values, each of multiplicity ~m/2
        return with_singular_values(rng, C, S, [1.0] * (m // 2) + [3.0] * (m - m // 2))
    if kind == "equal_sv":  # every singular value the same
        return with_singular_values(rng, C, S, np.full(m, 2.0))
    if kind == "graded_sv":  # 1, 1e-1, ..., far below sqrt(eps)
        return with_singular_values(rng, C, S, 10.0 ** -np.arange(m))
    if kind == "float32_low_rank":  # a conv with fewer inputs than outputs, rounded to float32
        r = max(1, m // 3)
        W = rng.standard_normal((C, r)).astype(np.float32)
        X = rng.standard_normal((r, S)).astype(np.float32)
        return (W @ X).astype(np.float64)
    if kind == "block_diagonal":  # many components exactly zero: deflation of zero weights
        A = np.zeros((C, S))
        for rows, cols in ((slice(0, C // 2), slice(0, S // 2)), (slice(C // 2, C), slice(S // 2, S))):
            A[rows, cols] = rng.standard_normal(A[rows, cols].shape)
        return A
    raise ValueError(kind)


KINDS = ["random", "relu", "rank_deficient", "zero_rows", "duplicated_rows", "repeated_sv",
         "equal_sv", "graded_sv", "float32_low_rank", "block_diagonal"]
SHAPES = [(12, 30), (20, 20), (30, 12)]  # C < S, C == S, C > S


# ----------------------------------------------------------------------------- against brute force
@pytest.mark.parametrize("C, S", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_against_numpy_and_reference(kind, C, S):
    A = torch.from_numpy(np.stack([matrix(kind, C, S, seed) for seed in range(2)]))
    got = ops.chip_drops(A)
    assert got.dtype == torch.float64 and got.shape == (2, C)
    assert_drops_close(got, np_chip(A), A)
    assert_drops_close(got, reference.chip_drops(A), A)


def test_division_path_matches_the_default_path(tmp_path):
    # On AVX-512 CPUs the kernel takes 1 / delta from a refined reciprocal estimate;
    # CHANAXIS_CHIP_NO_RCP14=1 runs the portable division path (the one CUDA and other CPUs run).
    # Both must agree with the brute force, and with each other far below the tolerance.
    import os
    import subprocess
    import sys

    A = torch.from_numpy(np.stack([matrix(kind, C, S, 0) for kind in KINDS for C, S in [(24, 40)]]
                                  + [np.maximum(np.random.default_rng(1).standard_normal((24, 40)), 0)]))
    src = tmp_path / "A.pt"
    torch.save(A, src)
    code = ("import sys, torch, chanaxis_fast; A = torch.load(sys.argv[1]); "
            "torch.save(chanaxis_fast.ops.chip_drops(A), sys.argv[2])")
    env = dict(os.environ, CHANAXIS_CHIP_NO_RCP14="1")
    subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "d.pt")], env=env, check=True)
    division = torch.load(tmp_path / "d.pt")
    default = ops.chip_drops(A)
    assert_drops_close(division, np_chip(A), A)
    assert_drops_close(default, np_chip(A), A)
    assert_drops_close(default, division, A, rtol=1e-11)


@pytest.mark.parametrize("C, S", [(1, 7), (7, 1), (1, 1), (2, 2), (64, 100), (100, 24)])
def test_small_and_larger_shapes(C, S):
    A = torch.randn(3, C, S, dtype=torch.float64, generator=torch.Generator().manual_seed(C * S))
    assert_drops_close(ops.chip_drops(A), np_chip(A), A)


def test_2d_input_is_one_image():
    A = torch.from_numpy(matrix("random", 9, 15))
    torch.testing.assert_close(ops.chip_drops(A), ops.chip_drops(A[None])[0], rtol=0, atol=0)
    torch.testing.assert_close(reference.chip_drops(A), ops.chip_drops(A), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- exact cases
def test_exact_values():
    # One channel: removing it leaves the zero matrix.
    row = torch.tensor([[[3.0, 4.0, 0.0]]], dtype=torch.float64)
    assert ops.chip_drops(row).item() == pytest.approx(5.0, rel=1e-15)
    # Orthogonal rows: the singular values are the row norms, each lost with its row, across
    # twelve orders of magnitude (relative accuracy of tiny drops, not only of the total).
    rng = np.random.default_rng(3)
    Q = np.linalg.qr(rng.standard_normal((40, 12)))[0]
    norms = 10.0 ** rng.uniform(-12, 0, 12)
    got = ops.chip_drops(torch.from_numpy((Q * norms).T.copy()))
    np.testing.assert_allclose(got.numpy(), norms, rtol=1e-12)
    # A zero row drops exactly 0; a zero matrix too.
    A = torch.from_numpy(matrix("zero_rows", 15, 20))
    assert (ops.chip_drops(A)[::3] == 0).all()
    assert (ops.chip_drops(torch.zeros(2, 4, 6)) == 0).all()


def test_bounds_and_symmetries():
    A = torch.from_numpy(np.stack([matrix(k, 16, 24, 5) for k in ("random", "duplicated_rows", "relu")]))
    got = ops.chip_drops(A)
    # 0 <= drop <= |row c| (the nuclear norm is 1-Lipschitz in the removed row)
    assert (got >= 0).all() and (got <= A.norm(dim=2) * (1 + 1e-15)).all()
    # rows equal up to sign and scale: the duplicated rows (equal up to sign) drop the same
    dup = got[1]
    torch.testing.assert_close(dup[1::4], dup[0].expand(len(dup[1::4])), rtol=1e-12, atol=0)
    # channel permutation permutes the drops
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ops.chip_drops(A[:, perm]), got[:, perm], rtol=1e-11, atol=1e-13)
    # exact powers of two are exact (the op rescales each image by a power of two), even at the
    # ends of the double range where A A^T would overflow or underflow
    for k in (600, -600, 3):
        torch.testing.assert_close(ops.chip_drops(A * 2.0 ** k), got * 2.0 ** k, rtol=0, atol=0)
    torch.testing.assert_close(ops.chip_drops(A * 0.3), got * 0.3, rtol=1e-11, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_computed_in_float64(dtype):
    A = torch.from_numpy(matrix("relu", 10, 14, 7)).to(dtype)
    got = ops.chip_drops(A)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ops.chip_drops(A.double()), rtol=0, atol=0)
    assert_drops_close(got[None], np_chip(A.double()[None]), A.double()[None])


def test_empty_batch():
    out = ops.chip_drops(torch.zeros(0, 5, 7))
    assert out.shape == (0, 5) and out.dtype == torch.float64


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    op = torch.ops.chanaxis_fast.chip_drops
    with pytest.raises(RuntimeError, match=r"chip_drops: A must be 3-D \[N, C, S\].*got 2-D"):
        op(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="chip_drops: A must be a floating tensor"):
        op(torch.zeros(1, 3, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"chip_drops: A must have at least one channel and one "
                                           r"position.*\[2, 0, 4\]"):
        op(torch.zeros(2, 0, 4))
    with pytest.raises(RuntimeError, match=r"chip_drops: A must have.*\[2, 3, 0\]"):
        op(torch.zeros(2, 3, 0))
    for bad in (float("nan"), float("inf")):
        A = torch.ones(2, 3, 4)
        A[1, 2, 3] = bad
        with pytest.raises(RuntimeError, match="chip_drops: A has NaN/Inf values"):
            ops.chip_drops(A)


def test_opcheck():
    A = torch.from_numpy(matrix("random", 6, 9))[None].repeat(2, 1, 1)
    torch.library.opcheck(torch.ops.chanaxis_fast.chip_drops.default, (A,))
    torch.library.opcheck(torch.ops.chanaxis_fast.chip_drops.default, (A.transpose(1, 2).float(),))


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not (torch.cuda.is_available() and chanaxis_fast.build_info()["cuda_kernels"]),
                    reason="needs a GPU and the CUDA kernels")
def test_cuda_matches_cpu():
    for kind in KINDS:
        for C, S in SHAPES + [(64, 300), (300, 20)]:
            A = torch.from_numpy(np.stack([matrix(kind, C, S, seed) for seed in range(3)]))
            gpu = ops.chip_drops(A.cuda())
            assert gpu.device.type == "cuda"
            # cuSOLVER and LAPACK round differently: agree as each agrees with the brute force
            assert_drops_close(gpu, ops.chip_drops(A), A, rtol=1e-10)
    assert (ops.chip_drops(torch.zeros(2, 3, 4, device="cuda")) == 0).all()
    with pytest.raises(RuntimeError, match="chip_drops: A has NaN/Inf values"):
        ops.chip_drops(torch.full((1, 2, 3), float("nan"), device="cuda"))


def test_finite_values_whose_sum_overflows_are_accepted():
    # the NaN/Inf check is one sum; a sum that overflows on finite values takes the exact test
    A = torch.full((1, 3, 5), 4e307, dtype=torch.float64)  # the sum, 2e308, overflows
    A[0, 1] = -4e307
    # rank one, three rows of norm r: ||A||_* = sqrt(3) r, sqrt(2) r with any row zeroed
    r = 4e307 * 5 ** 0.5
    drops = ops.chip_drops(A)
    assert torch.allclose(drops, torch.full((1, 3), (3 ** 0.5 - 2 ** 0.5) * r, dtype=torch.float64), rtol=1e-12)
    A[0, 2, 4] = float("nan")
    with pytest.raises(RuntimeError, match="chip_drops: A has NaN/Inf values"):
        ops.chip_drops(A)
