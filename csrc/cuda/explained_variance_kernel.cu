// explained_variance on CUDA.
// PyTorch (row b, S = the entries of peers[b] that are not -1, t = targets[b]):
//   out[b] = (P[t, S] @ torch.linalg.solve(P[S][:, S] + ridge * I, P[S, t])).clamp(0, 1)
// Algorithm: one thread per row (grid-stride over `slots` threads, each owning a slot of global
// scratch for its K x K factor; slots = min(B, 65536, what fits in 256 MB, at least 1), so one row
// of K = 4096 takes one 134 MB slot, as on the CPU), running common/hull.h explained_variance_row exactly as the CPU does: one
// small Cholesky factorisation of A_SS per row, O(K^3); meant for hull-sized K.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../peer_hulls.h"

namespace chanaxis {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxThreads = int64_t{1} << 16;
constexpr int64_t kScratchBytes = int64_t{1} << 28;  // bound on the scratch slots: 256 MB

__global__ void __launch_bounds__(kThreads) explained_variance_kernel(
    const double* __restrict__ P, int64_t C, double ridge, const int64_t* __restrict__ targets,
    const int64_t* __restrict__ peers, int64_t B, int64_t K, int64_t slots,
    double* __restrict__ factor_scratch, int64_t* __restrict__ kept_scratch,
    double* __restrict__ out) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (slot >= slots) return;  // the last block may have threads without a slot
  const int64_t stride = slots;
  double* const L = factor_scratch + slot * (K * K + K);
  int64_t* const kept = kept_scratch + slot * K;
  for (int64_t b = slot; b < B; b += stride)
    out[b] = hull::explained_variance_row(P, C, ridge, targets[b], peers + b * K, K, L, L + K * K,
                                          kept);
}

at::Tensor explained_variance_cuda(const at::Tensor& corr, const at::Tensor& targets,
                                   const at::Tensor& peers, double ridge) {
  const ExplainedVariancePlan plan = plan_explained_variance(corr, targets, peers, ridge);
  c10::cuda::CUDAGuard guard(plan.P.device());
  at::Tensor out = at::empty({plan.B}, plan.P.options());
  if (plan.B == 0) return out;
  const int64_t K = plan.K;
  const int64_t slots = hull::scratch_slots(plan.B, hull::explained_variance_slot_bytes(K),
                                            kScratchBytes, kMaxThreads);
  const int64_t blocks = (slots + kThreads - 1) / kThreads;
  at::Tensor factor_scratch = at::empty({slots * (K * K + K)}, plan.P.options());
  at::Tensor kept_scratch = at::empty({slots * K}, plan.targets.options());
  explained_variance_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
      plan.P.const_data_ptr<double>(), plan.C, plan.ridge, plan.targets.const_data_ptr<int64_t>(),
      plan.peers.const_data_ptr<int64_t>(), plan.B, K, slots, factor_scratch.data_ptr<double>(),
      kept_scratch.data_ptr<int64_t>(), out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CUDA, m) {
  m.impl("explained_variance", &explained_variance_cuda);
}

}  // namespace chanaxis
