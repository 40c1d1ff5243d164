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

// How many rows are centred and multiplied at a time: bounds the float64 scratch to about 2 MB
// (at least 1,024 rows).
int64_t rows_per_chunk(int64_t D);

// comoment[i:, i:] panels of the upper triangle = beta * themselves + zt[i] zt^T, for a centred
// chunk zt [D, k] (beta = 0: the panels are overwritten, whatever they held).
void accumulate_upper_panels(const at::Tensor& zt, const at::Tensor& comoment, double beta = 1.0);

// acc's upper-triangle panels += part's (the panels accumulate_upper_panels writes); assign: =.
void add_upper_panels(const at::Tensor& part, const at::Tensor& acc, bool assign = false);

// In place: every entry of the lower triangle of the float64 [D, D] m becomes its upper mirror,
// and every entry is v + 0.0 (v from the upper triangle, diagonal included), the bits of
// triu() + triu(1)^T; the lower triangle is not read.
void symmetrize_upper_(const at::Tensor& m);

// The argument checks of channel_moments_fold_'s running statistics: count int64 [], mean float64
// [D] and comoment float64 [D, D], contiguous, on x's device.
void check_running(const MomentsPlan& plan, const at::Tensor& count, const at::Tensor& mean,
                   const at::Tensor& comoment);

// The pairwise update's terms of a fold (Chan et al.), float64 on the device (the running count
// is never read on the host): n_a = count, n = n_a + n_b, d = mean_b - mean, w = n_a n_b / n.
struct FoldTerms {
  at::Tensor n, d, w;
};
FoldTerms fold_terms(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& mean_b,
                     int64_t n_b);

// The end of a fold, with the batch's co-moment (and, when rank_one_done, the rank-one term
// w d d^T) already added to comoment's upper panels: comoment += w d d^T (upper panels) unless
// rank_one_done; mean += d n_b / n; count = n.
void finish_fold(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& comoment,
                 const FoldTerms& t, int64_t n_b, bool rank_one_done);

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
// The rows of one batch after pass 1: the tensor they are read from and its layout, the mask of
// kept rows (undefined: all), how many there are and their means (float64 [D] on the device).
struct Batch {
  at::Tensor x, mask, mean;
  RowLayout layout;
  int64_t rows = 0, count = 0;
};

// Pass 1 of a batch (sums, means, the NaN/Inf and range checks, the row mask under
// skip_nonfinite). Returns false when the batch has no rows at all (H * W = 0).
template <class Backend>
bool prepare_batch(Backend& backend, const MomentsPlan& plan, Batch& b) {
  if (!plan.gap && (plan.x.dim() == 4 ? plan.x.size(2) * plan.x.size(3) : 1) == 0) {
    // No rows (H * W = 0): nothing to launch, and no launch arithmetic may divide by a row count.
    if (plan.positions.defined()) fail_positions_range(plan);  // no position is inside H*W = 0
    return false;
  }
  at::Tensor positions;
  b.x = backend.source(plan, positions);
  b.layout = make_row_layout(b.x, positions);
  b.rows = b.layout.rows();
  b.count = b.rows;
  Pass1 p1 = backend.pass1(b.x, b.layout, plan.target, b.mask, b.count);
  if (!p1.positions_ok) fail_positions_range(plan);
  if (check_nonfinite(p1.first_bad, plan.C, plan.skip_nonfinite)) {
    b.mask = backend.row_mask(b.x, b.layout, plan.target);
    b.count = b.mask.sum().template item<int64_t>();  // only on this (exceptional) path
    p1 = backend.pass1(b.x, b.layout, plan.target, b.mask, b.count);
    check_nonfinite(p1.first_bad, plan.C, /*skip_nonfinite=*/false);  // what is left must be finite
  }
  b.mean = p1.mean;
  return true;
}

// acc's upper-triangle panels (float64 [D, D]) += the co-moment of the batch's kept rows about
// their own means, chunk by chunk. overwrite: the panels are set (their old contents are never
// read, so acc may come from at::empty). Float64: each centred chunk's product goes straight into
// acc; extra (float64 [D], optional) is one more column of the first chunk, so that
// extra extra^T is added by the same GEMM (the fold's rank-one term: no pass of its own over the
// D x D panels). Float32 (extra must be undefined): centred in float64 and rounded once to
// float32, each chunk's product is a float32 GEMM (MKL / cuBLAS at full float32 precision) into
// the panels of a float32 scratch, overwritten for every chunk and added to acc in float64.
template <class Backend>
void accumulate_batch(Backend& backend, const MomentsPlan& plan, const Batch& b, const at::Tensor& acc,
                      bool overwrite, const at::Tensor& extra = at::Tensor()) {
  const auto f64 = plan.x.options().dtype(at::kDouble);
  const int64_t chunk = std::min(b.rows, rows_per_chunk(plan.D));
  if (plan.float32) {
    TORCH_INTERNAL_ASSERT(!extra.defined(), "accumulate_batch: no extra column in float32");
    const Float32MatmulGuard no_tf32;
    at::Tensor zt = at::empty({plan.D, chunk}, f64.dtype(at::kFloat));
    at::Tensor part = at::empty({plan.D, plan.D}, f64.dtype(at::kFloat));
    for (int64_t r0 = 0; r0 < b.rows; r0 += chunk) {
      const int64_t k = std::min(chunk, b.rows - r0);
      at::Tensor z = zt.narrow(1, 0, k);
      backend.centre(b.x, b.layout, plan.target, b.mask, b.mean, r0, z);
      accumulate_upper_panels(z, part, /*beta=*/0.0);
      add_upper_panels(part, acc, /*assign=*/overwrite && r0 == 0);
    }
    return;
  }
  const int64_t more = extra.defined() ? 1 : 0;
  // rows of the scratch 64-byte aligned with the extra column too (ld a multiple of 8 doubles)
  at::Tensor zt = at::empty({plan.D, (chunk + more + 7) / 8 * 8}, f64);
  for (int64_t r0 = 0; r0 < b.rows; r0 += chunk) {
    const int64_t k = std::min(chunk, b.rows - r0);
    backend.centre(b.x, b.layout, plan.target, b.mask, b.mean, r0, zt.narrow(1, 0, k));
    const int64_t extra_here = r0 == 0 ? more : 0;
    if (extra_here) zt.select(1, k).copy_(extra);
    accumulate_upper_panels(zt.narrow(1, 0, k + extra_here), acc,
                            overwrite && r0 == 0 ? 0.0 : 1.0);
  }
}

// channel_moments: (count, mean, comoment) of one batch.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_channel_moments(const MomentsPlan& plan) {
  const auto f64 = plan.x.options().dtype(at::kDouble);
  const auto count_options = plan.x.options().dtype(at::kLong);
  Backend backend;
  Batch b;
  if (!prepare_batch(backend, plan, b))
    return {at::full({}, 0, count_options), at::zeros({plan.D}, f64), at::zeros({plan.D, plan.D}, f64)};
  if (b.count == 0)
    return {at::full({}, b.count, count_options), b.mean, at::zeros({plan.D, plan.D}, f64)};
  at::Tensor comoment = at::empty({plan.D, plan.D}, f64);
  accumulate_batch(backend, plan, b, comoment, /*overwrite=*/true);
  symmetrize_upper_(comoment);
  // at::full fills on the device (no host-to-device copy to wait for).
  return {at::full({}, b.count, count_options), b.mean, comoment};
}

// channel_moments_fold_: the batch folded into running statistics (count int64 [], mean float64
// [D], comoment float64 [D, D], on x's device) in place, with the pairwise update of Chan et al.
// The batch's co-moment about its own means goes straight into comoment's upper panels, then
// the rank-one term w d d^T (float64: as one more column sqrt(w) d of the batch's first chunk, in
// the same GEMM; float32: a float64 pass of its own), the means and the count (finish_fold): no
// D x D temporary per batch and no pass over the lower triangle, which is neither read nor kept
// up to date (the caller mirrors the upper triangle when it reads the matrix:
// symmetrize_upper_). Every check (arguments, NaN/Inf, positions) runs before the running
// statistics are touched.
template <class Backend>
void run_channel_moments_fold(const MomentsPlan& plan, const at::Tensor& count, const at::Tensor& mean,
                              const at::Tensor& comoment) {
  check_running(plan, count, mean, comoment);
  Backend backend;
  Batch b;
  if (!prepare_batch(backend, plan, b) || b.count == 0) return;
  const FoldTerms t = fold_terms(count, mean, b.mean, b.count);
  if (plan.float32) {
    accumulate_batch(backend, plan, b, comoment, /*overwrite=*/false);
  } else {
    accumulate_batch(backend, plan, b, comoment, /*overwrite=*/false, t.d.mul(t.w.sqrt()));
  }
  finish_fold(count, mean, comoment, t, b.count, /*rank_one_done=*/!plan.float32);
}

}  // namespace chanaxis
