"""Shared test helpers: the devices to run on and the tolerances per dtype."""

import pytest
import torch

import chanaxis_fast

# CPU always; CUDA when the kernels were compiled and a GPU is present (otherwise skipped, never failed).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and chanaxis_fast.build_info()["cuda_kernels"]),
        reason="needs a GPU and the CUDA kernels")),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# The kernels read every input exactly (float16/bfloat16/float32 are exact in float64) and
# accumulate in float64, so against a float64 computation on the same (upcast) values the
# tolerance is a float64 one whatever the input dtype.
RTOL = 1e-10
ATOL = 1e-10


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=""):
    actual = torch.as_tensor(actual, dtype=torch.float64).cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64).cpu()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg or None)
