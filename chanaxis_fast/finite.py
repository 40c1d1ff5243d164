"""NaN/Inf tests by one sum: a sum of finite values is finite unless it overflows, so one float32
(float64 for float64 input) sum decides, and the exact ``isfinite`` pass over every value runs only
when a sum is not finite (NaN/Inf, or finite values too large to add up). The C++ ops do the same
(``chanaxis::all_finite`` in ``csrc/macros.h``)."""

import torch
from torch import Tensor


def _sum_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def all_finite(x: Tensor) -> bool:
    """Whether every value of ``x`` (any shape, strides and float dtype) is finite."""
    return bool(torch.isfinite(x.sum(dtype=_sum_dtype(x)))) or bool(torch.isfinite(x).all())


def finite_rows(x: Tensor) -> Tensor:
    """bool [x.shape[0]]: whether every value of ``x[i]`` is finite, for each i (one sum per row;
    no copy of x, whatever its strides)."""
    if x.dim() < 2:
        return torch.isfinite(x).reshape(x.shape[:1])
    ok = torch.isfinite(x.sum(dim=tuple(range(1, x.dim())), dtype=_sum_dtype(x)))
    if not bool(ok.all()):
        ok = torch.isfinite(x).flatten(1).all(1)
    return ok
