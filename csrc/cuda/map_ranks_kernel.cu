// map_ranks on CUDA.
// PyTorch: out[i, c] = torch.linalg.matrix_rank(x[i, c], rtol=rtol)
// Algorithm: one thread per map running the CPU's code (common/rank.h): a float64 copy reduced
// to bidiagonal form, then two Sturm counts. Each thread's scratch lives in global memory laid
// out [work, rows] (StridedVec), so that the threads of a warp, which walk their matrices in
// step, load adjacent doubles; the scratch is capped by launching the maps in chunks.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../map_ranks.h"

namespace chanaxis {
namespace {

constexpr int kThreads = 64;
constexpr int64_t kScratchDoubles = int64_t(1) << 24;  // 128 MiB

template <class Row>
__global__ void map_ranks_kernel(int64_t first, int64_t rows, double* scratch, Row row) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows) return;
  row(first + t, StridedVec{scratch + t, rows});
}

struct CudaLaunch {
  at::TensorOptions options;
  template <class Row>
  void operator()(int64_t rows, int64_t work, const Row& row) const {
    const int64_t chunk = std::max<int64_t>(kThreads, std::min(rows, kScratchDoubles / work));
    at::Tensor scratch = at::empty({work * std::min(rows, chunk)}, options);
    for (int64_t first = 0; first < rows; first += chunk) {
      const int64_t n = std::min(chunk, rows - first);
      const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
      map_ranks_kernel<Row><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          first, n, scratch.data_ptr<double>(), row);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
};

at::Tensor map_ranks_cuda(const at::Tensor& x, double rtol) {
  c10::cuda::CUDAGuard guard(x.device());
  return map_ranks_run(x, rtol, CudaLaunch{x.options().dtype(at::kDouble)});
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CUDA, m) { m.impl("map_ranks", &map_ranks_cuda); }

}  // namespace chanaxis
