// Host side of channel_moments shared by the CPU and CUDA kernels: argument checks, the row layout,
// and the two-pass pipeline. Only the three passes over the data (pooling, channel sums, centring)
// are device code; the co-moment product goes through at::addmm (MKL / cuBLAS).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <string>
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
  bool float32 = false;  // precision "float32": the centred chunks are multiplied in float32
  // The range of positions is checked by the first pass on the device (a flag read with the other
  // pass-1 results) instead of by the plan (which would synchronise): CUDA.
  bool deferred_range_check = false;
  int64_t N = 0, C = 0, D = 0;  // D = C + (target given)
};

// Checks the arguments. With defer_range_check the positions' range is not checked here (no
// host-device synchronisation); the backend's pass 1 must then report it (Pass1::positions_ok).
MomentsPlan plan_channel_moments(const at::Tensor& x, const c10::optional<at::Tensor>& target,
                                 const c10::optional<at::Tensor>& positions,
                                 c10::string_view mode, int64_t channel_dim, bool skip_nonfinite,
                                 c10::string_view precision, bool defer_range_check = false);

// The range error for positions that index outside H*W (computes their range: error path only).
[[noreturn]] void fail_positions_range(const MomentsPlan& plan);

// Row layout of a 4-D [N, C, H, W] or 2-D [N, C] tensor (positions: contiguous [N, P] or undefined).
RowLayout make_row_layout(const at::Tensor& x, const at::Tensor& positions);

// How many rows are centred and multiplied at a time: bounds the float64 scratch to about 32 MB.
int64_t rows_per_chunk(int64_t D);

// comoment[i:, i:] panels of the upper triangle = beta * themselves + zt[i] zt^T, for a centred
// chunk zt [D, k] (beta = 0: the panels are overwritten, whatever they held).
void accumulate_upper_panels(const at::Tensor& zt, const at::Tensor& comoment, double beta = 1.0);

// acc's upper-triangle panels += part's (the panels accumulate_upper_panels writes).
void add_upper_panels(const at::Tensor& part, const at::Tensor& acc);

// The float64 symmetric matrix whose upper triangle (diagonal included) is upper's; the lower
// triangle of upper is not read.
at::Tensor symmetric_from_upper(const at::Tensor& upper);

// Error out (or, under skip_nonfinite, report that a row mask is needed) for non-finite values;
// first_bad is the first column whose pass-1 sum is not finite, or -1. Returns true when rows
// must be masked.
bool check_nonfinite(int64_t first_bad, int64_t C, bool skip_nonfinite);

// The first column of `sums` that is not finite, or -1.
int64_t first_nonfinite(const std::vector<ChannelSum>& sums);

// Means from pass-1 sums over `count` rows; float64 [D] on the CPU.
at::Tensor means_from_sums(const std::vector<ChannelSum>& sums, int64_t count);

// Sets float32 matrix products to full IEEE float32 (no TF32 / bfloat16 shortcuts, which a user
// may have enabled globally with torch.set_float32_matmul_precision) for its lifetime.
class Float32MatmulGuard {
 public:
  Float32MatmulGuard();
  ~Float32MatmulGuard();
  Float32MatmulGuard(const Float32MatmulGuard&) = delete;
  Float32MatmulGuard& operator=(const Float32MatmulGuard&) = delete;

 private:
  std::string restore_;  // the precision to restore, or empty when nothing was changed
};

template <typename scalar_t>
RowReader<scalar_t> make_row_reader(const at::Tensor& x, const RowLayout& L, const at::Tensor& t) {
  return {x.const_data_ptr<scalar_t>(), t.defined() ? t.const_data_ptr<double>() : nullptr, L.C,
          L.sC};
}

// What pass 1 tells the host: the means (float64 [D] on x's device) and, read back in one
// transfer on a GPU, whether the values and the positions are valid.
struct Pass1 {
  at::Tensor mean;
  int64_t first_bad = -1;    // first column with a NaN/Inf (or an overflowing sum), or -1
  bool positions_ok = true;  // false when a position lies outside H*W (deferred range check)
};

// Backend (an object, which may keep device-side flags between the calls of one op call): device
// passes over a RowLayout whose x has element type scalar_t.
//   at::Tensor source(plan, positions&)                    -> the tensor the rows are read from, and
//                                                             the positions to lay it out with: x
//                                                             and plan.positions, the pooled [N, C]
//                                                             (mode "gap"), or (CUDA) the gathered
//                                                             rows of mode "positions"
//   Pass1 pass1(x, layout, t, mask, count)                 -> means over the kept rows, validity
//   at::Tensor row_mask(x, layout, t)                      -> [rows] uint8, 1 where every value is finite
//   void centre(x, layout, t, mask, mean, r0, zt)          -> zt[c, r - r0] = centred value, rows r0..
//                                                             (zt float64, or float32 for precision
//                                                             "float32": centred in float64, rounded)
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_channel_moments(const MomentsPlan& plan) {
  const auto f64 = plan.x.options().dtype(at::kDouble);
  const auto count_options = plan.x.options().dtype(at::kLong);
  if (!plan.gap && (plan.x.dim() == 4 ? plan.x.size(2) * plan.x.size(3) : 1) == 0) {
    // No rows (H * W = 0): nothing to launch, and no launch arithmetic may divide by a row count.
    if (plan.positions.defined()) fail_positions_range(plan);  // no position is inside H*W = 0
    return {at::full({}, 0, count_options), at::zeros({plan.D}, f64), at::zeros({plan.D, plan.D}, f64)};
  }
  Backend backend;
  at::Tensor positions;
  const at::Tensor x = backend.source(plan, positions);
  const RowLayout layout = make_row_layout(x, positions);
  const int64_t rows = layout.rows();

  at::Tensor mask;  // undefined: every row is kept
  int64_t count = rows;
  Pass1 p1 = backend.pass1(x, layout, plan.target, mask, count);
  if (!p1.positions_ok) fail_positions_range(plan);
  if (check_nonfinite(p1.first_bad, plan.C, plan.skip_nonfinite)) {
    mask = backend.row_mask(x, layout, plan.target);
    count = mask.sum().template item<int64_t>();  // only on this (exceptional) path
    p1 = backend.pass1(x, layout, plan.target, mask, count);
    check_nonfinite(p1.first_bad, plan.C, /*skip_nonfinite=*/false);  // what is left must be finite
  }
  if (count == 0)
    return {at::full({}, count, count_options), p1.mean, at::zeros({plan.D, plan.D}, f64)};
  at::Tensor comoment;
  const int64_t chunk = std::min(rows, rows_per_chunk(plan.D));
  if (plan.float32) {
    // Centred in float64 and rounded once to float32; each chunk's product is a float32 GEMM
    // (MKL / cuBLAS at full float32 precision) into the upper panels of `part`, overwritten
    // (beta = 0) for every chunk and folded into the float64 sum; one chunk needs no fold.
    const Float32MatmulGuard no_tf32;
    at::Tensor zt = at::empty({plan.D, chunk}, f64.dtype(at::kFloat));
    at::Tensor part = at::empty({plan.D, plan.D}, f64.dtype(at::kFloat));
    if (rows > chunk) comoment = at::zeros({plan.D, plan.D}, f64);
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t k = std::min(chunk, rows - r0);
      at::Tensor z = zt.narrow(1, 0, k);
      backend.centre(x, layout, plan.target, mask, p1.mean, r0, z);
      accumulate_upper_panels(z, part, /*beta=*/0.0);
      if (rows > chunk) add_upper_panels(part, comoment);
    }
    comoment = symmetric_from_upper(rows > chunk ? comoment : part);
  } else {
    comoment = at::zeros({plan.D, plan.D}, f64);
    at::Tensor zt = at::empty({plan.D, chunk}, f64);
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const int64_t k = std::min(chunk, rows - r0);
      at::Tensor z = zt.narrow(1, 0, k);
      backend.centre(x, layout, plan.target, mask, p1.mean, r0, z);
      accumulate_upper_panels(z, comoment);
    }
    comoment = symmetric_from_upper(comoment);
  }
  // at::full fills on the device (no host-to-device copy to wait for).
  return {at::full({}, count, count_options), p1.mean, comoment};
}

}  // namespace chanaxis
