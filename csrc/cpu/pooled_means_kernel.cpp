// pooled_means on the CPU: the float64 mean of every row of x [N, C, S] (mode "gap"'s global
// average pooling of a read-out, S = H * W), any floating dtype and strides.
// PyTorch (reference.pooled_means): x.double().mean(2), which first copies the whole map to
// float64 (or, a few images at a time, still two passes over memory).
// Algorithm: at::parallel_for over the N * C rows; each row is read once, widened to float64 in
// the loop and summed in vector lanes (AVX2 / AVX-512 clones), so a read-out costs one pass at
// memory speed. The sum's order is fixed for a given CPU (its vector width), not the same bits
// as torch's mean (about 1e-16 relative).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "../macros.h"
#include "wide_clones.h"

namespace chanaxis {
namespace {

constexpr const char* kOp = "pooled_means";

#if defined(_OPENMP)
#define CHANAXIS_SIMD_SUM _Pragma("omp simd reduction(+ : s)")
#else
#define CHANAXIS_SIMD_SUM
#endif

// out[r] = the mean of row r (r in [r0, r1)) of x viewed as [N * C, S] with rows at
// (r / C) * sN + (r % C) * sC and entries sS apart.
template <typename scalar_t>
CHANAXIS_WIDE_CLONES void row_means(const scalar_t* x, int64_t C, int64_t S, int64_t sN,
                                    int64_t sC, int64_t sS, int64_t r0, int64_t r1, double* out) {
  const double inv = 1.0 / static_cast<double>(S);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* p = x + (r / C) * sN + (r % C) * sC;
    double s = 0.0;
    if (sS == 1) {
      CHANAXIS_SIMD_SUM
      for (int64_t j = 0; j < S; ++j) s += static_cast<double>(p[j]);
    } else {
      CHANAXIS_SIMD_SUM
      for (int64_t j = 0; j < S; ++j) s += static_cast<double>(p[j * sS]);
    }
    out[r] = s * inv;
  }
}
#undef CHANAXIS_SIMD_SUM

at::Tensor pooled_means_cpu(const at::Tensor& x) {
  CHANAXIS_CHECK(x.dim() == 3, kOp, "x must be 3-D [N, C, S] (one row of S values per image and "
                 "channel), got ", x.dim(), "-D with shape ", x.sizes());
  CHANAXIS_CHECK_FLOATING(x, kOp, "x");
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  at::Tensor out = at::empty({N, C}, x.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  if (S == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // as torch's mean
  double* o = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    // rows of at least ~32 k values per task
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / S);
    at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
      row_means<scalar_t>(p, C, S, x.stride(0), x.stride(1), x.stride(2), r0, r1, o);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) { m.impl("pooled_means", &pooled_means_cpu); }

}  // namespace chanaxis
