// Gaussian-MI ops on the CPU: gaussian_mi_pairs, peer_overlap_mean, pair_target_excess,
// triplet_target_excess, target_excess.
// PyTorch (pair_target_excess): M = cov_t[[i, j, T]][:, [i, j, T]] + jitter * I;
//   S2 = max(0, 1/2 log(M_TT det M[:2, :2] / det M) - max(I(T;Y_i), I(T;Y_j)))
// Algorithm: each output row is independent; at::parallel_for over rows calls the row functors of
// common/gaussian.h (closed-form determinants, bounded partner selection), the same code the CUDA
// kernels run one thread per row. The op bodies (checks, outputs) are in target_excess.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../target_excess.h"

namespace chanaxis {
namespace {

// Rows are cheap (a few determinants); channels of target_excess / peer_overlap_mean cost O(C).
struct CpuLaunch {
  template <class Row>
  void operator()(int64_t n, RowCost cost, const Row& row) const {
    at::parallel_for(0, n, cost == RowCost::cheap ? 1024 : 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row(r);
    });
  }
};

at::Tensor gaussian_mi_pairs_cpu(const at::Tensor& cov, const at::Tensor& pairs) {
  return gaussian_mi_pairs_run(cov, pairs, CpuLaunch());
}

at::Tensor peer_overlap_mean_cpu(const at::Tensor& cov) {
  return peer_overlap_mean_run(cov, CpuLaunch());
}

at::Tensor pair_target_excess_cpu(const at::Tensor& cov_t, const at::Tensor& pairs, double jitter) {
  return target_excess_rows_run<gaussian::PairExcessRow>(cov_t, pairs, jitter, 2,
                                                         "pair_target_excess", "pairs", CpuLaunch());
}

at::Tensor triplet_target_excess_cpu(const at::Tensor& cov_t, const at::Tensor& triplets,
                                     double jitter) {
  return target_excess_rows_run<gaussian::TripletExcessRow>(
      cov_t, triplets, jitter, 3, "triplet_target_excess", "triplets", CpuLaunch());
}

std::tuple<at::Tensor, at::Tensor> target_excess_cpu(const at::Tensor& cov_t, int64_t partners,
                                                     int64_t top, double jitter) {
  return target_excess_run(cov_t, partners, top, jitter, CpuLaunch());
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) {
  m.impl("gaussian_mi_pairs", &gaussian_mi_pairs_cpu);
  m.impl("peer_overlap_mean", &peer_overlap_mean_cpu);
  m.impl("pair_target_excess", &pair_target_excess_cpu);
  m.impl("triplet_target_excess", &triplet_target_excess_cpu);
  m.impl("target_excess", &target_excess_cpu);
}

}  // namespace chanaxis
