// Gaussian-MI ops on CUDA: gaussian_mi_pairs, peer_overlap_mean, pair_target_excess,
// triplet_target_excess, target_excess.
// PyTorch (pair_target_excess): M = cov_t[[i, j, T]][:, [i, j, T]] + jitter * I;
//   S2 = max(0, 1/2 log(M_TT det M[:2, :2] / det M) - max(I(T;Y_i), I(T;Y_j)))
// Algorithm: the row functors of common/gaussian.h, the code the CPU kernels run; this file is
// launch scaffolding. Cheap rows (pairs, triplets): one thread per row, grid-stride; rows are
// independent, so there is no shared memory and no synchronisation. Per-channel rows
// (peer_overlap_mean, target_excess: an O(C) loop over the peers): one warp per channel.
//   peer_overlap_mean: lane l runs strand l of PeerOverlapMeanRow, the strands are combined by
//     shuffles in the tree order the CPU uses: the CPU's additions in the CPU's order.
//   target_excess: the partners are chosen 32 candidates at a time: the lanes compute their
//     candidates' rho^2, a ballot keeps those that can enter the bounded list (all while it is not
//     full; then those above its current last key), and lane 0 offers them in increasing index.
//     A candidate left out would also have been rejected by the CPU's serial offer (the last key
//     only grows once the list is full), so the partners are the CPU's. Then the lanes compute the
//     partners' S2 (stored over the keys, which are no longer needed) and lane 0 selects and
//     averages the top ones in the CPU's order.
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
constexpr int kWarpThreads = 256;  // 8 channels per block for the per-channel kernels
constexpr unsigned kFull = 0xffffffffu;

template <class Row>
__global__ void rows_kernel(int64_t n, Row row) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += step)
    row(r);
}

// One warp per channel; `warp` and everything derived from it are uniform across the warp.
__global__ void peer_overlap_mean_kernel(gaussian::PeerOverlapMeanRow row) {
  const int64_t C = row.S.n;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; i < C;
       i += warps) {
    double s = row.strand(i, lane);
    for (int d = 16; d > 0; d /= 2) s += __shfl_down_sync(kFull, s, d);
    if (lane == 0) row.out[i] = row.finish(s);
  }
}

__global__ void target_excess_kernel(gaussian::TargetExcessRow row) {
  const gaussian::CovView& S = row.S;
  const int64_t C = S.n - 1, K = row.K;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; i < C;
       i += warps) {
    double* keys = row.partner_keys + i * K;
    int64_t* ids = row.partners + i * K;
    int64_t m = 0;  // list length, the same in every lane
    for (int64_t j0 = 0; j0 < C; j0 += 32) {
      const int64_t j = j0 + lane;
      const bool candidate = j < C && j != i;
      const double key = candidate ? gaussian::rho2(S, i, j) : 0.0;
      // Everything may enter a list that is not full; a full one only keys above its last.
      const bool enters = candidate && (m < K || key > keys[K - 1]);
      unsigned ballot = __ballot_sync(kFull, enters);
      while (ballot) {
        const int l = __ffs(ballot) - 1;
        ballot &= ballot - 1;
        const double kl = __shfl_sync(kFull, key, l);
        int64_t next = m;
        if (lane == 0) next = gaussian::offer(keys, ids, m, K, kl, j0 + l);
        m = __shfl_sync(kFull, next, 0);
      }
      __syncwarp();  // lane 0's list writes are seen by every lane's next threshold read
    }
    for (int64_t q = m + lane; q < K; q += 32) ids[q] = -1;
    for (int64_t q = lane; q < m; q += 32) keys[q] = gaussian::pair_excess(S, i, ids[q], row.jitter);
    __syncwarp();  // every S2 written before lane 0 reads them
    if (lane == 0) {
      double* b = row.best + i * row.top_cap;
      int64_t nb = 0;
      for (int64_t q = 0; q < m; ++q) nb = gaussian::offer(b, nullptr, nb, row.top_cap, keys[q], q);
      double sum = 0.0;
      for (int64_t q = 0; q < nb; ++q) sum += b[q];
      row.te[i] = nb > 0 ? sum / static_cast<double>(nb) : 0.0;
    }
    __syncwarp();
  }
}

// Cheap rows in blocks of 256, one thread each; per-channel rows one warp each.
struct CudaLaunch {
  template <class Kernel, class Row>
  static void per_channel(Kernel kernel, int64_t n, const Row& row) {
    if (n == 0) return;
    const int64_t blocks = std::min<int64_t>((n * 32 + kWarpThreads - 1) / kWarpThreads, kMaxBlocks);
    kernel<<<static_cast<unsigned>(blocks), kWarpThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(row);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void operator()(int64_t n, RowCost, const gaussian::PeerOverlapMeanRow& row) const {
    per_channel(peer_overlap_mean_kernel, n, row);
  }
  void operator()(int64_t n, RowCost, const gaussian::TargetExcessRow& row) const {
    per_channel(target_excess_kernel, n, row);
  }

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
