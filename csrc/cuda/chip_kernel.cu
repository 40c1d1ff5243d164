// chip_drops on CUDA.
// PyTorch: out[i, c] = svdvals(A[i]).sum() - svdvals(A[i] with row c zeroed).sum()
// Algorithm: one Gram eigendecomposition per image through ATen (cuBLAS, cuSOLVER; chip.cpp),
// then one thread per (image, channel) equation running the CPU's code (common/secular.h) for all
// m interlaced roots. Each thread's deflated poles live in a global scratch laid out [2m, rows],
// so that the threads of a warp, which sweep their poles in step, load adjacent doubles; the
// scratch is capped by launching the rows in chunks.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../chip.h"

namespace chanaxis {
namespace {

constexpr int kThreads = 64;
constexpr int64_t kScratchDoubles = int64_t(1) << 24;  // 128 MiB

template <class Row>
__global__ void chip_kernel(int64_t first, int64_t rows, int64_t m, double* scratch, Row row) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows) return;
  row(first + t, secular::StridedVec{scratch + t, rows}, secular::StridedVec{scratch + m * rows + t, rows});
}

struct CudaLaunch {
  at::TensorOptions options;
  template <class Row>
  void operator()(int64_t rows, int64_t m, const Row& row) const {
    const int64_t chunk = std::max<int64_t>(kThreads, std::min(rows, kScratchDoubles / (2 * m)));
    at::Tensor scratch = at::empty({2 * m * std::min(rows, chunk)}, options);
    for (int64_t first = 0; first < rows; first += chunk) {
      const int64_t n = std::min(chunk, rows - first);
      const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
      chip_kernel<Row><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          first, n, m, scratch.data_ptr<double>(), row);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

at::Tensor chip_drops_cuda(const at::Tensor& A) {
  c10::cuda::CUDAGuard guard(A.device());
  return chip_drops_run(A, CudaLaunch{A.options().dtype(at::kDouble)});
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CUDA, m) { m.impl("chip_drops", &chip_drops_cuda); }

}  // namespace chanaxis
