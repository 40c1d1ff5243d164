// Host side of map_ranks, shared by its CPU and CUDA kernels: the argument checks and the op
// body, which takes the device's row launcher. The per-matrix math is in common/rank.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>

#include <cmath>

#include "common/rank.h"
#include "macros.h"

namespace chanaxis {

// The op body. `launch(rows, work, row)` runs row(r, w) for r in [0, rows), with w
// (DenseVec or StridedVec) scratch for `work` doubles, on x's device.
template <class Launch>
at::Tensor map_ranks_run(const at::Tensor& x, double rtol, const Launch& launch) {
  constexpr const char* op = "map_ranks";
  CHANAXIS_CHECK(x.dim() == 4, op, "x must be 4-D [N, C, H, W] (one H x W map per image and channel), got ",
                 x.dim(), "-D with shape ", x.sizes());
  CHANAXIS_CHECK_FLOATING(x, op, "x");
  CHANAXIS_CHECK(std::isfinite(rtol) && rtol > 0, op, "rtol must be a positive finite number, got ", rtol);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({N, C}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  if (H == 0 || W == 0) return out.zero_();
  CHANAXIS_CHECK(all_finite(x), op, "x has NaN/Inf values");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    launch(N * C, rank::work_size(H, W),
           rank::MapRankRow<scalar_t>{x.const_data_ptr<scalar_t>(), C, H, W, x.stride(0), x.stride(1),
                                      x.stride(2), x.stride(3), rtol, out.data_ptr<int64_t>()});
  });
  return out;
}

}  // namespace chanaxis
