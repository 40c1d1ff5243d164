// chip_drops on the CPU.
// PyTorch: out[i, c] = svdvals(A[i]).sum() - svdvals(A[i] with row c zeroed).sum()
// Algorithm: one Gram eigendecomposition per image (chip.cpp), then each (image, channel) solves
// its secular equation for all m interlaced roots (common/secular.h): O(m^2) per channel instead
// of an O(m^3) SVD. at::parallel_for over the N * C equations, each thread with its own scratch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../chip.h"
#include "wide_clones.h"

namespace chanaxis {
namespace {

// Nearly all of the time is divisions in the solver's pole sums, which the baseline x86-64 build
// vectorises two doubles wide: the wide clones (the whole solver inlined into each) run them four
// and eight wide.
CHANAXIS_WIDE_CLONES void chip_rows(const secular::ChipDropRow& row, int64_t r0, int64_t r1,
                                    double* scratch) {
  const secular::DenseVec ad{scratch}, aw{scratch + row.m};
  for (int64_t r = r0; r < r1; ++r) row(r, ad, aw);
}

struct CpuLaunch {
  void operator()(int64_t rows, int64_t m, const secular::ChipDropRow& row) const {
    // An equation costs a few times m^2 divisions; keep chunks above ~100 k of them.
    const int64_t grain = std::max<int64_t>(1, 100000 / (m * m));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<double> scratch(2 * m);
      chip_rows(row, r0, r1, scratch.data());
    });
  }
};

at::Tensor chip_drops_cpu(const at::Tensor& A) { return chip_drops_run(A, CpuLaunch()); }

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) { m.impl("chip_drops", &chip_drops_cpu); }

}  // namespace chanaxis
