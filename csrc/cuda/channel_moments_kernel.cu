// channel_moments on CUDA.
// PyTorch: z = rows(x) (+ target column); mean = z.mean(0); comoment = (z - mean).T @ (z - mean)
// Algorithm: the pipeline of channel_moments.h with three kernels: pool (one warp per image and
// channel), sums (per channel and slice of rows, block tree reduction of ChannelSum; the slices are
// combined on the host in a fixed order, so results are deterministic), centre (one thread per
// row and channel of a float64 chunk). The co-moment product is at::addmm (cuBLAS) on the
// upper-triangle panels, exactly as on the CPU. Row addressing and the per-value math are the
// common/moments.h functions that the CPU kernel runs.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../channel_moments.h"

namespace chanaxis {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerSlice = 8192;
constexpr int64_t kMaxSlices = 128;

template <typename scalar_t>
__global__ void pool_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, int64_t H,
                            int64_t W, int64_t sN, int64_t sC, int64_t sH, int64_t sW,
                            double* __restrict__ out) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= N * C) return;  // whole warps exit together: warp is uniform across a warp
  const scalar_t* q = x + (warp / C) * sN + (warp % C) * sC;
  double s = 0.0;
  for (int64_t p = lane; p < H * W; p += 32) s += static_cast<double>(q[(p / W) * sH + (p % W) * sW]);
  for (int d = 16; d > 0; d /= 2) s += __shfl_down_sync(0xffffffffu, s, d);
  if (lane == 0) out[warp] = s / static_cast<double>(H * W);
}

// partial[c, slice] = ChannelSum of column c over the kept rows of the slice.
template <typename scalar_t>
__global__ void sums_kernel(RowReader<scalar_t> read, RowLayout L, const uint8_t* __restrict__ keep,
                            int64_t rows_per_slice, ChannelSum* __restrict__ partial) {
  __shared__ ChannelSum shared[kThreads];
  const int64_t c = blockIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_slice;
  const int64_t r1 = r0 + rows_per_slice < L.rows() ? r0 + rows_per_slice : L.rows();
  ChannelSum s = ChannelSum::empty();
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x)
    if (!keep || keep[r]) s.add(read(c, L.row_offset(r), L.image_of(r)));
  shared[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x].combine(shared[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[c * gridDim.x + blockIdx.x] = shared[0];
}

template <typename scalar_t>
__global__ void row_mask_kernel(RowReader<scalar_t> read, RowLayout L, int64_t D,
                                uint8_t* __restrict__ mask) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= L.rows()) return;
  const int64_t off = L.row_offset(r), img = L.image_of(r);
  bool ok = true;
  for (int64_t c = 0; c < D && ok; ++c) {
    const double v = read(c, off, img);
    ok = v - v == 0.0;  // finite
  }
  mask[r] = ok;
}

// zt[c, r - row0] for rows row0 .. row0 + k; threads along rows so that writes are coalesced.
template <typename scalar_t>
__global__ void centre_kernel(RowReader<scalar_t> read, RowLayout L, const uint8_t* __restrict__ keep,
                              const double* __restrict__ mean, int64_t D, int64_t row0, int64_t k,
                              int64_t ld, double* __restrict__ zt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= k) return;
  const int64_t r = row0 + i;
  const int64_t off = L.row_offset(r), img = L.image_of(r);
  const bool kept = !keep || keep[r];
  for (int64_t c = blockIdx.y; c < D; c += gridDim.y)
    zt[c * ld + i] = centred(read(c, off, img), mean[c], kept);
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

struct CudaBackend {
  static at::Tensor pool(const MomentsPlan& plan) {
    const at::Tensor& x = plan.x;
    const int64_t N = x.size(0), C = x.size(1);
    at::Tensor out = at::empty({N, C}, x.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cuda", [&] {
      pool_kernel<scalar_t><<<blocks_for(N * C * 32), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), N, C, x.size(2), x.size(3), x.stride(0), x.stride(1),
          x.stride(2), x.stride(3), out.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }

  static std::vector<ChannelSum> sums(const at::Tensor& x, const RowLayout& L,
                                      const at::Tensor& t, const at::Tensor& mask) {
    const int64_t D = L.C + (t.defined() ? 1 : 0);
    const int64_t slices = std::min(kMaxSlices, (L.rows() + kRowsPerSlice - 1) / kRowsPerSlice);
    const int64_t per_slice = (L.rows() + slices - 1) / slices;
    TORCH_CHECK(D <= 65535, "channel_moments: CUDA kernel supports at most 65535 columns, got ", D);
    at::Tensor partial =
        at::empty({D, slices, static_cast<int64_t>(sizeof(ChannelSum))}, x.options().dtype(at::kByte));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cuda", [&] {
      const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(D));
      sums_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          make_row_reader<scalar_t>(x, L, t), L,
          mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr, per_slice,
          reinterpret_cast<ChannelSum*>(partial.data_ptr<uint8_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor host = partial.cpu();
    const auto* p = reinterpret_cast<const ChannelSum*>(host.const_data_ptr<uint8_t>());
    std::vector<ChannelSum> out(D, ChannelSum::empty());
    for (int64_t c = 0; c < D; ++c)
      for (int64_t s = 0; s < slices; ++s) out[c].combine(p[c * slices + s]);
    return out;
  }

  static at::Tensor row_mask(const at::Tensor& x, const RowLayout& L, const at::Tensor& t) {
    const int64_t D = L.C + (t.defined() ? 1 : 0);
    at::Tensor mask = at::empty({L.rows()}, x.options().dtype(at::kByte));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cuda", [&] {
      row_mask_kernel<scalar_t><<<blocks_for(L.rows()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          make_row_reader<scalar_t>(x, L, t), L, D, mask.data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return mask;
  }

  static void centre(const at::Tensor& x, const RowLayout& L, const at::Tensor& t,
                     const at::Tensor& mask, const at::Tensor& mean, int64_t row0,
                     const at::Tensor& zt) {
    const int64_t D = zt.size(0), k = zt.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cuda", [&] {
      const dim3 grid(static_cast<unsigned>(blocks_for(k)), static_cast<unsigned>(std::min<int64_t>(D, 65535)));
      centre_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          make_row_reader<scalar_t>(x, L, t), L,
          mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr, mean.const_data_ptr<double>(),
          D, row0, k, zt.stride(0), zt.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_moments_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& positions, c10::string_view mode, int64_t channel_dim,
    bool skip_nonfinite) {
  c10::cuda::CUDAGuard guard(x.device());
  const MomentsPlan plan =
      plan_channel_moments(x, target, positions, mode, channel_dim, skip_nonfinite);
  return run_channel_moments<CudaBackend>(plan);
}

TORCH_LIBRARY_IMPL(chanaxis_fast, CUDA, m) {
  m.impl("channel_moments", &channel_moments_cuda);
}

}  // namespace chanaxis
