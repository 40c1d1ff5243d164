// pooled_means on the CPU: the float64 mean of every row of x [N, C, S] (mode "gap"'s global
// average pooling of a read-out, S = H * W), any floating dtype and strides.
// PyTorch (reference.pooled_means): x.double().mean(2), which first copies the whole map to
// float64 (or, a few images at a time, still two passes over memory).
// Algorithm: at::parallel_for over the N * C rows; each row is read once, widened to float64 in
// the loop and summed in vector lanes (AVX2 / AVX-512 clones), so a read-out costs one pass at
// memory speed. The sum's order is fixed for a given CPU (its vector width), not the same bits
// as torch's mean (about 1e-16 relative).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../pooled_means.h"
#include "wide_clones.h"

namespace chanaxis {
namespace {

#if defined(_OPENMP)
#define CHANAXIS_SIMD_SUM _Pragma("omp simd reduction(+ : s)")
#else
#define CHANAXIS_SIMD_SUM
#endif

template <typename scalar_t>
CHANAXIS_WIDE_CLONES void row_means(const scalar_t* x, const PooledRows& g, int64_t r0, int64_t r1,
                                    double* out) {
  const double inv = 1.0 / static_cast<double>(g.S);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* p = x + g.row_offset(r);
    double s = 0.0;
    if (g.sS == 1) {
      CHANAXIS_SIMD_SUM
      for (int64_t j = 0; j < g.S; ++j) s += static_cast<double>(p[j]);
    } else {
      CHANAXIS_SIMD_SUM
      for (int64_t j = 0; j < g.S; ++j) s += static_cast<double>(p[j * g.sS]);
    }
    out[r] = s * inv;
  }
}
#undef CHANAXIS_SIMD_SUM

struct CpuLaunch {
  template <typename scalar_t>
  void operator()(const scalar_t* x, const PooledRows& g, int64_t rows, double* out) const {
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / g.S);  // ~32 k values a task
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { row_means(x, g, r0, r1, out); });
  }
};

}  // namespace

at::Tensor pooled_means_cpu(const at::Tensor& x) { return pooled_means_run(x, CpuLaunch()); }

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) { m.impl("pooled_means", &pooled_means_cpu); }

}  // namespace chanaxis
