// Argument checks shared by every kernel. Each message names the op, the argument and what it got,
// e.g. "channel_moments: x must be 2-D or 4-D, got 3-D".
#pragma once

#include <c10/util/Exception.h>

// CHANAXIS_CHECK(cond, "op", "argument ...", values...) -> "op: argument ... values"
#define CHANAXIS_CHECK(cond, op, ...) TORCH_CHECK(cond, op, ": ", __VA_ARGS__)

#define CHANAXIS_CHECK_FLOATING(t, op, name)                                                 \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), op, ": ", name,                         \
              " must be a floating tensor (float16, bfloat16, float32 or float64), got ",      \
              (t).scalar_type())

#define CHANAXIS_CHECK_DTYPE(t, dtype, op, name)                                             \
  TORCH_CHECK((t).scalar_type() == (dtype), op, ": ", name, " must be ", (dtype), ", got ",    \
              (t).scalar_type())

#define CHANAXIS_CHECK_SAME_DEVICE(a, b, op, name_a, name_b)                                 \
  TORCH_CHECK((a).device() == (b).device(), op, ": ", name_a, " is on ", (a).device(),        \
              " but ", name_b, " is on ", (b).device())

#include <ATen/core/Tensor.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/sum.h>

namespace chanaxis {

// Whether every value of x is finite, in one reduction: a NaN or Inf makes the sum non-finite,
// and only a sum that overflowed on finite values needs the exact (three-pass) test.
inline bool all_finite(const at::Tensor& x) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (at::isfinite(x.sum(acc)).item<bool>()) return true;
  return at::isfinite(x).all().item<bool>();
}

}  // namespace chanaxis
