// Host side of pooled_means, shared by its CPU and CUDA kernels: the argument checks and the op
// body, which takes the device's launcher. Row r of x [N, C, S] (r = n * C + c) starts at
// row_offset(r) and holds S values sS apart.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>

#include <limits>

#include "macros.h"

namespace chanaxis {

struct PooledRows {
  int64_t C, S, sN, sC, sS;
  C10_HOST_DEVICE int64_t row_offset(int64_t r) const { return (r / C) * sN + (r % C) * sC; }
};

// `launch(x_data, rows, out)` (templated on the element type) writes out[r] = the float64 mean of
// row r for r in [0, rows), on x's device.
// The op's kernels (csrc/cpu, csrc/cuda), also mode "gap" of channel_moments: x [N, C, S] ->
// float64 [N, C].
at::Tensor pooled_means_cpu(const at::Tensor& x);
at::Tensor pooled_means_cuda(const at::Tensor& x);

template <class Launch>
at::Tensor pooled_means_run(const at::Tensor& x, const Launch& launch) {
  constexpr const char* op = "pooled_means";
  CHANAXIS_CHECK(x.dim() == 3, op, "x must be 3-D [N, C, S] (one row of S values per image and "
                 "channel), got ", x.dim(), "-D with shape ", x.sizes());
  CHANAXIS_CHECK_FLOATING(x, op, "x");
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  at::Tensor out = at::empty({N, C}, x.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  if (S == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // as torch's mean
  const PooledRows rows{C, S, x.stride(0), x.stride(1), x.stride(2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    launch(x.const_data_ptr<scalar_t>(), rows, N * C, out.data_ptr<double>());
  });
  return out;
}

}  // namespace chanaxis
