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

constexpr int64_t kMaxBlocks = 65535;

template <class Row>
__global__ void rows_kernel(int64_t n, Row row) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += step)
    row(r);
}

// Cheap rows in blocks of 256; per-channel rows loop over all C channels, so small blocks spread a
// layer's C threads over more SMs.
struct CudaLaunch {
  template <class Row>
  void operator()(int64_t n, RowCost cost, const Row& row) const {
    if (n == 0) return;  // an empty grid is an invalid launch configuration
    const int threads = cost == RowCost::cheap ? 256 : 64;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks);
    rows_kernel<Row><<<static_cast<unsigned>(blocks), threads, 0,
                       c10::cuda::getCurrentCUDAStream()>>>(n, row);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The dispatcher picks these kernels when either tensor is on a GPU; guard that one, so that a
// mismatch reaches the argument checks (which name both devices) instead of the guard.
c10::Device gpu_of(const at::Tensor& a, const at::Tensor& b) {
  return a.is_cuda() ? a.device() : b.device();
}

at::Tensor gaussian_mi_pairs_cuda(const at::Tensor& cov, const at::Tensor& pairs) {
  c10::cuda::CUDAGuard guard(gpu_of(cov, pairs));
  return gaussian_mi_pairs_run(cov, pairs, CudaLaunch());
}

at::Tensor peer_overlap_mean_cuda(const at::Tensor& cov) {
  c10::cuda::CUDAGuard guard(cov.device());
  return peer_overlap_mean_run(cov, CudaLaunch());
}

at::Tensor pair_target_excess_cuda(const at::Tensor& cov_t, const at::Tensor& pairs,
                                   double jitter) {
  c10::cuda::CUDAGuard guard(gpu_of(cov_t, pairs));
  return target_excess_rows_run<gaussian::PairExcessRow>(cov_t, pairs, jitter, 2,
                                                         "pair_target_excess", "pairs", CudaLaunch());
}

at::Tensor triplet_target_excess_cuda(const at::Tensor& cov_t, const at::Tensor& triplets,
                                      double jitter) {
  c10::cuda::CUDAGuard guard(gpu_of(cov_t, triplets));
  return target_excess_rows_run<gaussian::TripletExcessRow>(
      cov_t, triplets, jitter, 3, "triplet_target_excess", "triplets", CudaLaunch());
}

std::tuple<at::Tensor, at::Tensor> target_excess_cuda(const at::Tensor& cov_t, int64_t partners,
                                                      int64_t top, double jitter) {
  c10::cuda::CUDAGuard guard(cov_t.device());
  return target_excess_run(cov_t, partners, top, jitter, CudaLaunch());
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CUDA, m) {
  m.impl("gaussian_mi_pairs", &gaussian_mi_pairs_cuda);
  m.impl("peer_overlap_mean", &peer_overlap_mean_cuda);
  m.impl("pair_target_excess", &pair_target_excess_cuda);
  m.impl("triplet_target_excess", &triplet_target_excess_cuda);
  m.impl("target_excess", &target_excess_cuda);
}

}  // namespace chanaxis
