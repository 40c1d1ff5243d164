"""The one-sum NaN/Inf tests (chanaxis_fast.finite) against numpy's exact per-value test."""

import numpy as np
import pytest
import torch

from chanaxis_fast.finite import all_finite, finite_rows


def _numpy_rows(x: torch.Tensor) -> np.ndarray:
    a = x.detach().double().numpy() if x.dtype != torch.bfloat16 else x.float().double().numpy()
    return np.isfinite(a.reshape(a.shape[0], -1)).all(1) if a.ndim > 1 else np.isfinite(a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_rows_and_whole_match_numpy(dtype, bad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 4, 3, generator=g).to(dtype)
    if bad is not None:
        x[2, 4, 3, 2] = bad
        x[5, 0, 0, 0] = bad
    expect = _numpy_rows(x)
    assert finite_rows(x).tolist() == expect.tolist()
    assert all_finite(x) == bool(expect.all())


def test_finite_values_whose_sum_overflows_are_finite():
    # float32 sums of these overflow to inf: the exact test must take over and say "finite"
    big = torch.full((3, 8), 3e38)
    big[1, 0] = float("nan")
    assert torch.isinf(big[0].sum())
    assert finite_rows(big).tolist() == [True, False, True]
    assert not all_finite(big)
    assert all_finite(big[[0, 2]])
    huge64 = torch.full((2, 4), 1.7e308, dtype=torch.float64)
    assert finite_rows(huge64).tolist() == [True, True] and all_finite(huge64)


def test_strided_and_channels_last_views_without_copy_semantics():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    x[3, 1, 2, 2] = float("nan")
    view = x.transpose(0, 1)[:, ::2]  # non-contiguous, rows are x's channels
    assert finite_rows(x).tolist() == _numpy_rows(x).tolist() == [True, True, True, False]
    assert finite_rows(view).tolist() == _numpy_rows(view.contiguous()).tolist()
    assert not all_finite(x) and all_finite(x[:3])


def test_one_dimensional_and_empty():
    t = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    assert finite_rows(t).tolist() == [True, False, True, False]
    assert not all_finite(t)
    assert all_finite(torch.empty(0)) and finite_rows(torch.empty(0, 3)).shape == (0,)
    assert finite_rows(torch.empty(2, 0)).tolist() == [True, True]
