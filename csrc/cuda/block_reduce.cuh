// Block-wide reductions for kernels launched with kThreads threads per block.
#pragma once

namespace chanaxis {
namespace cuda {

// Every thread of the block must call it (uniform control flow); all get the result. `warp_vals`
// is shared memory of threads / 32 entries, `result` one shared value. The second barrier
// publishes the result, and no thread can write warp_vals or result again before all have read
// it, since that happens only after the first barrier of the next call.
template <int kThreads, typename T, typename Op>
__device__ T block_reduce(T x, Op op, T* warp_vals, T* result) {
  static_assert(kThreads % 32 == 0, "whole warps");
  for (int d = 16; d > 0; d /= 2) x = op(x, __shfl_down_sync(0xffffffffu, x, d));
  if (threadIdx.x % 32 == 0) warp_vals[threadIdx.x / 32] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    T r = warp_vals[0];
    for (int w = 1; w < kThreads / 32; ++w) r = op(r, warp_vals[w]);
    *result = r;
  }
  __syncthreads();
  return *result;
}

}  // namespace cuda
}  // namespace chanaxis
