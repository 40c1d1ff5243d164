// pooled_means on CUDA.
// PyTorch: out[n, c] = x[n, c].double().mean()
// Algorithm: one block of kThreads threads per row (grid-stride over the rows); each thread sums
// every kThreads-th value of the row in float64 (adjacent threads read adjacent values), then a
// block reduction (block_reduce.cuh). The row layout is the host's (pooled_means.h).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../pooled_means.h"
#include "block_reduce.cuh"

namespace chanaxis {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};

template <typename scalar_t>
__global__ void pooled_means_kernel(const scalar_t* x, PooledRows g, int64_t rows, double* out) {
  __shared__ double warp_vals[kThreads / 32];
  __shared__ double total;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // uniform per block
    const scalar_t* p = x + g.row_offset(r);
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < g.S; j += kThreads) s += static_cast<double>(p[j * g.sS]);
    s = cuda::block_reduce<kThreads>(s, SumOp(), warp_vals, &total);
    if (threadIdx.x == 0) out[r] = s / static_cast<double>(g.S);
  }
}

struct CudaLaunch {
  template <typename scalar_t>
  void operator()(const scalar_t* x, const PooledRows& g, int64_t rows, double* out) const {
    const unsigned blocks = static_cast<unsigned>(std::min(rows, kMaxBlocks));
    pooled_means_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x, g, rows, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

at::Tensor pooled_means_cuda(const at::Tensor& x) {
  c10::cuda::CUDAGuard guard(x.device());
  return pooled_means_run(x, CudaLaunch());
}

TORCH_LIBRARY_IMPL(chanaxis_fast, CUDA, m) { m.impl("pooled_means", &pooled_means_cuda); }

}  // namespace chanaxis
