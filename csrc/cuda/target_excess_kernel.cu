// Gaussian-MI ops on CUDA: gaussian_mi_pairs, peer_overlap_mean, pair_target_excess,
// triplet_target_excess, target_excess.
// PyTorch (pair_target_excess): M = cov_t[[i, j, T]][:, [i, j, T]] + jitter * I;
//   S2 = max(0, 1/2 log(M_TT det M[:2, :2] / det M) - max(I(T;Y_i), I(T;Y_j)))
// Algorithm: one thread per output row (grid-stride loop) calling the row functors of
// common/gaussian.h, the code the CPU kernels run; this file is only launch scaffolding. Rows are
// independent, so there is no shared memory and no synchronisation. peer_overlap_mean and
// target_excess give a thread a whole channel (an O(C) loop, plus bounded insertion into its own
// rows of the [C, partners] scratch): C threads, enough for a per-layer op, and results are the
// CPU's summation order exactly.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../target_excess.h"

namespace chanaxis {
namespace {

using namespace gaussian;

constexpr int kRowThreads = 256;
// Per-channel rows loop over all C channels: small blocks spread a layer's C threads over more SMs.
constexpr int kChannelThreads = 64;
constexpr int64_t kMaxBlocks = 65535;

template <class Row>
__global__ void rows_kernel(int64_t n, Row row) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += step)
    row(r);
}

template <class Row>
void launch_rows(int64_t n, int threads, const Row& row) {
  if (n == 0) return;  // an empty grid is an invalid launch configuration
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks);
  rows_kernel<Row><<<static_cast<unsigned>(blocks), threads, 0,
                     c10::cuda::getCurrentCUDAStream()>>>(n, row);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The dispatcher picks these kernels when either tensor is on a GPU; guard that one, so that a
// mismatch reaches the argument checks (which name both devices) instead of the guard.
c10::Device gpu_of(const at::Tensor& a, const at::Tensor& b) {
  return a.is_cuda() ? a.device() : b.device();
}

constexpr const char* kCovShape = "[C, C] (C >= 1 channels)";
constexpr const char* kCovTShape = "[C + 1, C + 1] (C >= 1 channels, then the target)";

}  // namespace

at::Tensor gaussian_mi_pairs_cuda(const at::Tensor& cov, const at::Tensor& pairs) {
  constexpr const char* op = "gaussian_mi_pairs";
  c10::cuda::CUDAGuard guard(gpu_of(cov, pairs));
  const CheckedCovariance S = checked_covariance(cov, op, "cov", 1, kCovShape);
  const at::Tensor rows = checked_index_rows(pairs, 2, S.size(), S.values, op, "pairs", false);
  at::Tensor out = at::empty({rows.size(0)}, S.options());
  launch_rows(rows.size(0), kRowThreads,
              MiPairsRow{S.view(), rows.const_data_ptr<int64_t>(), out.data_ptr<double>()});
  return out;
}

at::Tensor peer_overlap_mean_cuda(const at::Tensor& cov) {
  constexpr const char* op = "peer_overlap_mean";
  c10::cuda::CUDAGuard guard(cov.device());
  const CheckedCovariance S = checked_covariance(cov, op, "cov", 1, kCovShape);
  const int64_t C = S.size();
  at::Tensor out = at::empty({C}, S.options());
  launch_rows(C, kChannelThreads, PeerOverlapMeanRow{S.view(), out.data_ptr<double>()});
  return out;
}

at::Tensor pair_target_excess_cuda(const at::Tensor& cov_t, const at::Tensor& pairs,
                                   double jitter) {
  constexpr const char* op = "pair_target_excess";
  c10::cuda::CUDAGuard guard(gpu_of(cov_t, pairs));
  const CheckedCovariance S = checked_covariance(cov_t, op, "cov_t", 2, kCovTShape);
  const int64_t C = S.size() - 1;
  const at::Tensor rows = checked_index_rows(pairs, 2, C, S.values, op, "pairs", true);
  check_jitter(jitter, op);
  at::Tensor out = at::empty({rows.size(0)}, S.options());
  launch_rows(rows.size(0), kRowThreads,
              PairExcessRow{S.view(), rows.const_data_ptr<int64_t>(), jitter,
                            out.data_ptr<double>()});
  return out;
}

at::Tensor triplet_target_excess_cuda(const at::Tensor& cov_t, const at::Tensor& triplets,
                                      double jitter) {
  constexpr const char* op = "triplet_target_excess";
  c10::cuda::CUDAGuard guard(gpu_of(cov_t, triplets));
  const CheckedCovariance S = checked_covariance(cov_t, op, "cov_t", 2, kCovTShape);
  const int64_t C = S.size() - 1;
  const at::Tensor rows = checked_index_rows(triplets, 3, C, S.values, op, "triplets", true);
  check_jitter(jitter, op);
  at::Tensor out = at::empty({rows.size(0)}, S.options());
  launch_rows(rows.size(0), kRowThreads,
              TripletExcessRow{S.view(), rows.const_data_ptr<int64_t>(), jitter,
                               out.data_ptr<double>()});
  return out;
}

std::tuple<at::Tensor, at::Tensor> target_excess_cuda(const at::Tensor& cov_t, int64_t partners,
                                                      int64_t top, double jitter) {
  constexpr const char* op = "target_excess";
  c10::cuda::CUDAGuard guard(cov_t.device());
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
  launch_rows(C, kChannelThreads,
              TargetExcessRow{S.view(), partners, top_cap, jitter, keys.data_ptr<double>(),
                              best.data_ptr<double>(), chosen.data_ptr<int64_t>(),
                              te.data_ptr<double>()});
  return {te, chosen};
}

TORCH_LIBRARY_IMPL(chanaxis_fast, CUDA, m) {
  m.impl("gaussian_mi_pairs", &gaussian_mi_pairs_cuda);
  m.impl("peer_overlap_mean", &peer_overlap_mean_cuda);
  m.impl("pair_target_excess", &pair_target_excess_cuda);
  m.impl("triplet_target_excess", &triplet_target_excess_cuda);
  m.impl("target_excess", &target_excess_cuda);
}

}  // namespace chanaxis
