// map_ranks on the CPU.
// PyTorch: out[i, c] = torch.linalg.matrix_rank(x[i, c], rtol=rtol)
// Algorithm: per map, a float64 copy reduced to bidiagonal form by Householder reflections and
// two Sturm counts (common/rank.h), with no per-matrix library call: the small maps of a CNN
// (4 x 4 to 32 x 32) cost LAPACK more in call overhead than in arithmetic. at::parallel_for over
// the N * C maps, each thread with its own scratch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../map_ranks.h"
#include "wide_clones.h"

namespace chanaxis {
namespace {

template <class Row>
CHANAXIS_WIDE_CLONES void rank_rows(const Row& row, int64_t r0, int64_t r1, double* scratch) {
  const DenseVec w{scratch};
  for (int64_t r = r0; r < r1; ++r) row(r, w);
}

struct CpuLaunch {
  int64_t cost;  // flops of one map, about
  template <class Row>
  void operator()(int64_t rows, int64_t work, const Row& row) const {
    const int64_t grain = std::max<int64_t>(1, 200000 / std::max<int64_t>(1, cost));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<double> scratch(work);
      rank_rows(row, r0, r1, scratch.data());
    });
  }
};

at::Tensor map_ranks_cpu(const at::Tensor& x, double rtol) {
  const int64_t H = x.dim() == 4 ? x.size(2) : 0, W = x.dim() == 4 ? x.size(3) : 0;
  return map_ranks_run(x, rtol, CpuLaunch{3 * H * W * std::min(H, W)});
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) { m.impl("map_ranks", &map_ranks_cpu); }

}  // namespace chanaxis
