// Gaussian-MI ops on the CPU: gaussian_mi_pairs, peer_overlap_mean, pair_target_excess,
// triplet_target_excess, target_excess.
// PyTorch (pair_target_excess): M = cov_t[[i, j, T]][:, [i, j, T]] + jitter * I;
//   S2 = max(0, 1/2 log(M_TT det M[:2, :2] / det M) - max(I(T;Y_i), I(T;Y_j)))
// Algorithm: each output row is independent; at::parallel_for over rows calls the row functors of
// common/gaussian.h (closed-form determinants, bounded partner selection), the same code the CUDA
// kernels run one thread per row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../target_excess.h"

namespace chanaxis {
namespace {

using namespace gaussian;

// Rows are cheap (a few determinants); channels of target_excess / peer_overlap_mean cost O(C).
constexpr int64_t kGrainRows = 1024;
constexpr int64_t kGrainChannels = 4;

template <class Row>
void for_each_row(int64_t n, int64_t grain, const Row& row) {
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(r);
  });
}

constexpr const char* kCovShape = "[C, C] (C >= 1 channels)";
constexpr const char* kCovTShape = "[C + 1, C + 1] (C >= 1 channels, then the target)";

}  // namespace

at::Tensor gaussian_mi_pairs_cpu(const at::Tensor& cov, const at::Tensor& pairs) {
  constexpr const char* op = "gaussian_mi_pairs";
  const CheckedCovariance S = checked_covariance(cov, op, "cov", 1, kCovShape);
  const at::Tensor rows = checked_index_rows(pairs, 2, S.size(), S.values, op, "pairs", false);
  at::Tensor out = at::empty({rows.size(0)}, S.options());
  for_each_row(rows.size(0), kGrainRows,
               MiPairsRow{S.view(), rows.const_data_ptr<int64_t>(), out.data_ptr<double>()});
  return out;
}

at::Tensor peer_overlap_mean_cpu(const at::Tensor& cov) {
  constexpr const char* op = "peer_overlap_mean";
  const CheckedCovariance S = checked_covariance(cov, op, "cov", 1, kCovShape);
  const int64_t C = S.size();
  at::Tensor out = at::empty({C}, S.options());
  for_each_row(C, kGrainChannels, PeerOverlapMeanRow{S.view(), out.data_ptr<double>()});
  return out;
}

at::Tensor pair_target_excess_cpu(const at::Tensor& cov_t, const at::Tensor& pairs, double jitter) {
  constexpr const char* op = "pair_target_excess";
  const CheckedCovariance S = checked_covariance(cov_t, op, "cov_t", 2, kCovTShape);
  const int64_t C = S.size() - 1;
  const at::Tensor rows = checked_index_rows(pairs, 2, C, S.values, op, "pairs", true);
  check_jitter(jitter, op);
  at::Tensor out = at::empty({rows.size(0)}, S.options());
  for_each_row(rows.size(0), kGrainRows,
               PairExcessRow{S.view(), rows.const_data_ptr<int64_t>(), jitter,
                             out.data_ptr<double>()});
  return out;
}

at::Tensor triplet_target_excess_cpu(const at::Tensor& cov_t, const at::Tensor& triplets,
                                     double jitter) {
  constexpr const char* op = "triplet_target_excess";
  const CheckedCovariance S = checked_covariance(cov_t, op, "cov_t", 2, kCovTShape);
  const int64_t C = S.size() - 1;
  const at::Tensor rows = checked_index_rows(triplets, 3, C, S.values, op, "triplets", true);
  check_jitter(jitter, op);
  at::Tensor out = at::empty({rows.size(0)}, S.options());
  for_each_row(rows.size(0), kGrainRows,
               TripletExcessRow{S.view(), rows.const_data_ptr<int64_t>(), jitter,
                                out.data_ptr<double>()});
  return out;
}

std::tuple<at::Tensor, at::Tensor> target_excess_cpu(const at::Tensor& cov_t, int64_t partners,
                                                     int64_t top, double jitter) {
  constexpr const char* op = "target_excess";
  const CheckedCovariance S = checked_covariance(cov_t, op, "cov_t", 2, kCovTShape);
  check_at_least_one(partners, op, "partners");
  check_at_least_one(top, op, "top");
  check_jitter(jitter, op);
  const int64_t C = S.size() - 1;
  const int64_t top_cap = std::min(top, partners);
  at::Tensor te = at::empty({C}, S.options());
  at::Tensor chosen = at::empty({C, partners}, S.options().dtype(at::kLong));
  at::Tensor keys = at::empty({C, partners}, S.options());
  at::Tensor best = at::empty({C, top_cap}, S.options());
  for_each_row(C, kGrainChannels,
               TargetExcessRow{S.view(), partners, top_cap, jitter, keys.data_ptr<double>(),
                               best.data_ptr<double>(), chosen.data_ptr<int64_t>(),
                               te.data_ptr<double>()});
  return {te, chosen};
}

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) {
  m.impl("gaussian_mi_pairs", &gaussian_mi_pairs_cpu);
  m.impl("peer_overlap_mean", &peer_overlap_mean_cpu);
  m.impl("pair_target_excess", &pair_target_excess_cpu);
  m.impl("triplet_target_excess", &triplet_target_excess_cpu);
  m.impl("target_excess", &target_excess_cpu);
}

}  // namespace chanaxis
