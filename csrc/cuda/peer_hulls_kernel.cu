// peer_hulls on CUDA.
// PyTorch (one target i, one step): j* = argmax_{j not in S + {i}} E_i(S + {j}) with
//   E_i(S) = P[i, S] @ torch.linalg.solve(P[S][:, S] + ridge * I, P[S, i]); stop at
//   E_i(S) >= (1 - eps) * E_full(i) or |S| = max_size.
// Algorithm: E_full from one Cholesky factorisation per layer (at::linalg_cholesky_ex and
// at::cholesky_inverse, in peer_hulls.cpp); then ONE launch for every channel of every layer: a
// block of kThreads threads per target channel (grid-stride over the targets; each block owns a
// slot of global scratch for u [max_steps, C], c, v, g [C]), threads over the candidates j, one
// block reduction for the largest gain and one for the lowest index that ties it. Every value is
// computed by the common/hull.h functions, in the same order as on the CPU.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../peer_hulls.h"
#include "block_reduce.cuh"

namespace chanaxis {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;
constexpr int64_t kScratchBytes = int64_t{1} << 28;  // bound on the scratch slots: 256 MB

struct MaxOp {
  __device__ double operator()(double a, double b) const { return b > a ? b : a; }
};
struct MinOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return b < a ? b : a; }
};

__global__ void __launch_bounds__(kThreads) peer_hulls_kernel(
    const double* __restrict__ P_all, const int64_t* __restrict__ layers, int64_t num_layers,
    const double* __restrict__ e_full, int64_t total, int64_t max_size, int64_t max_steps,
    int64_t width,
    double eps, double ridge, double* __restrict__ scratch, int64_t slot_doubles,
    int64_t* __restrict__ hull_size, int64_t* __restrict__ members, double* __restrict__ ev,
    bool* __restrict__ saturated) {
  __shared__ double warp_gain[kThreads / 32];
  __shared__ int64_t warp_index[kThreads / 32];
  __shared__ double best_gain;
  __shared__ int64_t best_index;
  double* const u = scratch + static_cast<int64_t>(blockIdx.x) * slot_doubles;
  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const hull::HullTarget T = hull::locate_target(P_all, layers, num_layers, t);
    const int64_t C = T.C;
    double* const c = u + max_steps * C;
    double* const v = c + C;
    double* const g = v + C;
    for (int64_t j = threadIdx.x; j < C; j += kThreads) hull::hull_init(T, ridge, j, c, v);
    __syncthreads();
    // Every thread holds the same state and takes the same decisions: the loop is uniform.
    hull::HullState st;
    while (st.wants_more(e_full[t], eps, max_size)) {
      double best_local = 0.0;
      for (int64_t j = threadIdx.x; j < C; j += kThreads) {
        g[j] = hull::residual_gain(c[j], v[j]);
        best_local = g[j] > best_local ? g[j] : best_local;
      }
      const double best = cuda::block_reduce<kThreads>(best_local, MaxOp(), warp_gain, &best_gain);
      if (!(best > 0.0)) break;  // no candidate left, or none adds anything
      int64_t first = INT64_MAX;
      for (int64_t j = threadIdx.x; j < C; j += kThreads) {
        if (hull::ties_best(g[j], best)) {
          first = j;
          break;
        }
      }
      const int64_t s = cuda::block_reduce<kThreads>(first, MinOp(), warp_index, &best_index);
      const double gain = g[s];
      const double inv_root_v = hull::inverse_root(v[s]);
      double* const uk = u + st.size * C;
      for (int64_t j = threadIdx.x; j < C; j += kThreads)
        uk[j] = hull::hull_column_entry(T, ridge, u, st.size, s, j, inv_root_v);
      __syncthreads();  // u_k complete (the downdate reads u_k[i]); g[s], v[s] read by all
      for (int64_t j = threadIdx.x; j < C; j += kThreads) hull::hull_downdate(T, uk, s, j, c, v);
      const double e = st.add(gain);
      if (threadIdx.x == 0) {
        members[t * width + st.size - 1] = s;
        ev[t * width + st.size - 1] = e;
      }
      __syncthreads();  // c, v complete before the next step's gains
    }
    if (threadIdx.x == 0) {
      hull_size[t] = st.size;
      saturated[t] = st.saturated;
    }
    __syncthreads();  // the scratch slot is free for the block's next target
  }
}

HullsOutputs peer_hulls_cuda(at::TensorList corr, int64_t max_size, double eps, double ridge) {
  const HullsPlan plan = plan_peer_hulls(corr, max_size, eps, ridge);
  c10::cuda::CUDAGuard guard(plan.P_all.device());
  HullsOutputs out = make_hulls_outputs(plan);
  // A slot holds u [max_steps, C] plus c, v, g: (max_steps + 3) * max_C doubles, where
  // max_steps = min(max_size, max_C - 1), so it grows with max_size only up to about max_C^2
  // doubles (the CPU's per-task scratch is the same). The blocks (one slot each) are capped so
  // that all slots fit in kScratchBytes; one slot is always granted, since one target needs it.
  const int64_t slot = hull::scratch_doubles(plan.max_steps, plan.max_C);
  const int64_t blocks = hull::scratch_slots(plan.total, slot * static_cast<int64_t>(sizeof(double)),
                                             kScratchBytes, kMaxBlocks);
  at::Tensor scratch = at::empty({blocks * slot}, plan.P_all.options());
  peer_hulls_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                      c10::cuda::getCurrentCUDAStream()>>>(
      plan.P_all.const_data_ptr<double>(), plan.layers.const_data_ptr<int64_t>(),
      plan.num_layers, plan.e_full.const_data_ptr<double>(), plan.total, plan.max_size,
      plan.max_steps, plan.width, plan.eps, plan.ridge, scratch.data_ptr<double>(), slot,
      std::get<1>(out).data_ptr<int64_t>(), std::get<2>(out).data_ptr<int64_t>(),
      std::get<3>(out).data_ptr<double>(), std::get<4>(out).data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CUDA, m) {
  m.impl("peer_hulls", &peer_hulls_cuda);
}

}  // namespace chanaxis
