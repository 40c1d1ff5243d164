// Host side of channel_moments shared by the CPU and CUDA kernels: argument checks, the row layout,
// and the two-pass pipeline. Only the three passes over the data (pooling, channel sums, centring)
// are device code; the co-moment product goes through at::addmm (MKL / cuBLAS).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>
#include <vector>

#include "common/moments.h"

namespace chanaxis {

struct MomentsPlan {
  at::Tensor x;          // [N, C, H, W] (channel dim moved to 1; any strides) or [N, C]
  at::Tensor target;     // [N] float64 contiguous, or undefined
  at::Tensor positions;  // [N, P] int64 contiguous, or undefined
  bool gap = false;
  bool skip_nonfinite = false;
  int64_t N = 0, C = 0, D = 0;  // D = C + (target given)
};

MomentsPlan plan_channel_moments(const at::Tensor& x, const c10::optional<at::Tensor>& target,
                                 const c10::optional<at::Tensor>& positions,
                                 c10::string_view mode, int64_t channel_dim,
                                 bool skip_nonfinite);

// Row layout of a 4-D [N, C, H, W] or 2-D [N, C] tensor (positions: contiguous [N, P] or undefined).
RowLayout make_row_layout(const at::Tensor& x, const at::Tensor& positions);

// How many rows are centred and multiplied at a time: bounds the float64 scratch to about 32 MB.
int64_t rows_per_chunk(int64_t D);

// comoment[i:, i:] panels of the upper triangle += zt[i] zt^T, for a centred chunk zt [D, k].
void accumulate_upper_panels(const at::Tensor& zt, const at::Tensor& comoment);

// Error out (or, under skip_nonfinite, report that a row mask is needed) for non-finite values.
// Returns true when rows must be masked.
bool check_nonfinite(const std::vector<ChannelSum>& sums, int64_t C, bool skip_nonfinite);

// Means from pass-1 sums over `count` rows; float64 [D] on `device`.
at::Tensor means_from_sums(const std::vector<ChannelSum>& sums, int64_t count,
                           c10::Device device);

template <typename scalar_t>
RowReader<scalar_t> make_row_reader(const at::Tensor& x, const RowLayout& L, const at::Tensor& t) {
  return {x.const_data_ptr<scalar_t>(), t.defined() ? t.const_data_ptr<double>() : nullptr, L.C,
          L.sC};
}

// Backend: device passes over a RowLayout whose x has element type scalar_t.
//   at::Tensor pool(const MomentsPlan&)                    -> [N, C] float64 image means (mode "gap")
//   std::vector<ChannelSum> sums(x, layout, t, mask)       -> D channel sums over the kept rows
//   at::Tensor row_mask(x, layout, t)                      -> [rows] uint8, 1 where every value is finite
//   void centre(x, layout, t, mask, mean, r0, zt)          -> zt[c, r - r0] = centred value, rows r0..
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_channel_moments(const MomentsPlan& plan) {
  at::Tensor x = plan.gap ? Backend::pool(plan) : plan.x;
  const RowLayout layout = make_row_layout(x, plan.gap ? at::Tensor() : plan.positions);
  const int64_t rows = layout.rows();
  const auto f64 = x.options().dtype(at::kDouble);

  at::Tensor mask;  // undefined: every row is kept
  std::vector<ChannelSum> sums = Backend::sums(x, layout, plan.target, mask);
  int64_t count = rows;
  if (check_nonfinite(sums, plan.C, plan.skip_nonfinite)) {
    mask = Backend::row_mask(x, layout, plan.target);
    count = mask.sum().template item<int64_t>();
    sums = Backend::sums(x, layout, plan.target, mask);
    check_nonfinite(sums, plan.C, /*skip_nonfinite=*/false);  // what is left must be finite
  }
  at::Tensor mean = means_from_sums(sums, count, x.device());
  at::Tensor comoment = at::zeros({plan.D, plan.D}, f64);
  if (count > 0) {
    const int64_t chunk = std::min(rows, rows_per_chunk(plan.D));
    at::Tensor zt = at::empty({plan.D, chunk}, f64);
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t k = std::min(chunk, rows - r0);
      at::Tensor z = zt.narrow(1, 0, k);
      Backend::centre(x, layout, plan.target, mask, mean, r0, z);
      accumulate_upper_panels(z, comoment);
    }
    comoment = comoment.triu().add_(comoment.triu(1).t());
  }
  return {at::scalar_tensor(count, x.options().dtype(at::kLong)), mean, comoment};
}

}  // namespace chanaxis
