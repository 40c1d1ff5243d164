// channel_moments on CUDA.
// PyTorch: z = rows(x) (+ target column); mean = z.mean(0); comoment = (z - mean).T @ (z - mean)
// Algorithm: the pipeline of channel_moments.h. Mode "positions" first gathers the sampled rows
// into a [N, P, C] buffer (checking every position on the device); then every pass over the rows
// is laid out for the memory order of its input:
//   rows     (channel stride != 1: NCHW, every position) threads along the rows of one channel;
//   channels (channel stride == 1: [N, C], channels-last, the pooled rows of mode "gap", the
//            gathered rows) the 32 lanes of a warp along 32 neighbouring channels, so that a warp
//            reads one contiguous run of a row; the centring transposes 32 x 32 tiles through
//            shared memory so that its channel-major writes are coalesced as well.
// Pass 1 sums each channel over fixed slices of rows (one ChannelSum per slice), a fold kernel
// combines the slices in slice order (deterministic) into the means on the device, and the host
// reads back one small status tensor (first non-finite column, positions out of range): one
// host-device synchronisation per call, none for the means. The co-moment product is at::addmm
// (cuBLAS) on the upper-triangle panels, exactly as on the CPU. Row addressing and the per-value
// math are the common/moments.h functions that the CPU kernel runs.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../channel_moments.h"
#include "../pooled_means.h"

namespace chanaxis {
namespace {

constexpr int kThreads = 256;
constexpr int kLanes = 32;              // channels of a channel-path block (blockDim.x)
constexpr int kGroups = kThreads / 32;  // row groups of a channel-path block (blockDim.y)
constexpr int64_t kRowsPerSlice = 8192;
constexpr int64_t kMaxSlices = 128;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = int64_t{1} << 30;

// out[r, c] = x at row r's position, for the rows of mode "positions" ([N * P, C], c fastest: the
// writes are coalesced, and so are the reads of a channels-last x). A position outside
// [0, H * W) is never read: its row becomes 0 and *bad is set (the op then raises the range
// error), so a bad index cannot fault.
template <typename scalar_t>
__global__ void gather_kernel(const scalar_t* __restrict__ x, RowLayout L, int64_t plane,
                              scalar_t* __restrict__ out, int64_t* __restrict__ bad) {
  const int64_t total = L.rows() * L.C;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const int64_t r = e / L.C, c = e - r * L.C;
    const int64_t p = L.positions[r];
    if (p < 0 || p >= plane) {
      out[e] = scalar_t(0);
      *bad = 1;  // every writer writes 1: a benign race
    } else {
      out[e] = x[L.row_offset(r) + c * L.sC];
    }
  }
}

// partial[c, slice] = ChannelSum of column c over the kept rows of the slice; threads along rows.
template <typename scalar_t>
__global__ void sums_rows_kernel(RowReader<scalar_t> read, RowLayout L, int64_t D,
                                 const uint8_t* __restrict__ keep, int64_t rows_per_slice,
                                 ChannelSum* __restrict__ partial) {
  __shared__ ChannelSum shared[kThreads];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_slice;
  const int64_t r1 = r0 + rows_per_slice < L.rows() ? r0 + rows_per_slice : L.rows();
  // c depends on the block only, so every thread takes the same trips and reaches every barrier.
  for (int64_t c = blockIdx.y; c < D; c += gridDim.y) {
    ChannelSum s = ChannelSum::empty();
    for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x)
      if (!keep || keep[r]) s.add(read(c, L.row_offset(r), L.image_of(r)));
    shared[threadIdx.x] = s;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) shared[threadIdx.x].combine(shared[threadIdx.x + stride]);
      __syncthreads();
    }
    // Only thread 0 reads shared[0] and only it writes shared[0] in the next trip: no race.
    if (threadIdx.x == 0) partial[c * gridDim.x + blockIdx.x] = shared[0];
  }
}

// The same with lanes along 32 neighbouring channels (channel stride 1) and kGroups row groups;
// the groups are combined in group order.
template <typename scalar_t>
__global__ void sums_channels_kernel(RowReader<scalar_t> read, RowLayout L, int64_t D,
                                     const uint8_t* __restrict__ keep, int64_t rows_per_slice,
                                     ChannelSum* __restrict__ partial) {
  __shared__ ChannelSum shared[kGroups][kLanes];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_slice;
  const int64_t r1 = r0 + rows_per_slice < L.rows() ? r0 + rows_per_slice : L.rows();
  for (int64_t tile = blockIdx.y; tile * kLanes < D; tile += gridDim.y) {
    const int64_t c = tile * kLanes + threadIdx.x;
    ChannelSum s = ChannelSum::empty();
    if (c < D)
      for (int64_t r = r0 + threadIdx.y; r < r1; r += kGroups)
        if (!keep || keep[r]) s.add(read(c, L.row_offset(r), L.image_of(r)));
    shared[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < D) {
      for (int g = 1; g < kGroups; ++g) s.combine(shared[g][threadIdx.x]);
      partial[c * gridDim.x + blockIdx.x] = s;
    }
    __syncthreads();  // shared is rewritten by the next tile
  }
}

// Column c: the slices combined in slice order, its mean over `count` rows, and the lowest
// non-finite column in *first_bad (atomicMin: the same result whatever the order).
__global__ void fold_kernel(const ChannelSum* __restrict__ partial, int64_t D, int64_t slices,
                            int64_t count, double* __restrict__ mean,
                            unsigned long long* __restrict__ first_bad) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= D) return;
  ChannelSum s = ChannelSum::empty();
  for (int64_t k = 0; k < slices; ++k) s.combine(partial[c * slices + k]);
  mean[c] = s.mean(count);
  if (!s.finite()) atomicMin(first_bad, static_cast<unsigned long long>(c));
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

// zt[c, r - row0] for rows row0 .. row0 + k; threads along rows (channel stride != 1), so that
// reads and writes are both coalesced.
template <typename scalar_t, typename out_t>
__global__ void centre_rows_kernel(RowReader<scalar_t> read, RowLayout L,
                                   const uint8_t* __restrict__ keep, const double* __restrict__ mean,
                                   int64_t D, int64_t row0, int64_t k, int64_t ld,
                                   out_t* __restrict__ zt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= k) return;
  const int64_t r = row0 + i;
  const int64_t off = L.row_offset(r), img = L.image_of(r);
  const bool kept = !keep || keep[r];
  for (int64_t c = blockIdx.y; c < D; c += gridDim.y)
    zt[c * ld + i] = static_cast<out_t>(centred(read(c, off, img), mean[c], kept));
}

// The same for channel stride 1: a 32-row x 32-channel tile is read along channels (a warp reads
// 32 neighbouring values of one row) into shared memory and written along rows.
template <typename scalar_t, typename out_t>
__global__ void centre_channels_kernel(RowReader<scalar_t> read, RowLayout L,
                                       const uint8_t* __restrict__ keep,
                                       const double* __restrict__ mean, int64_t D, int64_t row0,
                                       int64_t k, int64_t ld, out_t* __restrict__ zt) {
  __shared__ double tile[kLanes][kLanes + 1];  // +1: no bank conflicts on the transposed read
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kLanes;
  for (int64_t ct = blockIdx.y; ct * kLanes < D; ct += gridDim.y) {
    const int64_t c = ct * kLanes + threadIdx.x;
    for (int j = threadIdx.y; j < kLanes; j += kGroups) {
      const int64_t i = i0 + j;
      double v = 0.0;
      if (i < k && c < D) {
        const int64_t r = row0 + i;
        v = centred(read(c, L.row_offset(r), L.image_of(r)), mean[c], !keep || keep[r]);
      }
      tile[j][threadIdx.x] = v;
    }
    __syncthreads();
    const int64_t i = i0 + threadIdx.x;
    for (int j = threadIdx.y; j < kLanes; j += kGroups) {
      const int64_t cc = ct * kLanes + j;
      if (cc < D && i < k) zt[cc * ld + i] = static_cast<out_t>(tile[threadIdx.x][j]);
    }
    __syncthreads();  // the tile is rewritten by the next channel tile
  }
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }
unsigned grid_y(int64_t n) { return static_cast<unsigned>(std::min<int64_t>(n, kMaxGridY)); }

struct CudaBackend {
  at::Tensor positions_bad;  // int64 [1] on the device: a position outside H*W was met

  at::Tensor source(const MomentsPlan& plan, at::Tensor& positions) {
    positions_bad = at::zeros({1}, plan.x.options().dtype(at::kLong));
    if (plan.gap) return pool(plan);
    if (!plan.positions.defined()) return plan.x;
    // Gather the sampled rows into [N, P, C] and lay them out as [N, C, P, 1] (channel stride 1).
    const at::Tensor& x = plan.x;
    const RowLayout L = make_row_layout(x, plan.positions);
    at::Tensor g = at::empty({plan.N, plan.positions.size(1), plan.C}, x.options());
    const int64_t blocks = std::min(blocks_for(L.rows() * L.C), kMaxGridX);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cuda", [&] {
      gather_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0,
                                c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), L, x.size(2) * x.size(3), g.data_ptr<scalar_t>(),
          positions_bad.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return g.permute({0, 2, 1}).unsqueeze(3);
  }

  // mode "gap": the float64 mean of every map, by pooled_means' kernel
  static at::Tensor pool(const MomentsPlan& plan) { return pooled_means_cuda(plan.x.flatten(2)); }

  // rows > 0 here (run_channel_moments returns before any launch for an empty batch).
  Pass1 pass1(const at::Tensor& x, const RowLayout& L, const at::Tensor& t, const at::Tensor& mask,
              int64_t count) {
    const int64_t D = L.C + (t.defined() ? 1 : 0);
    const int64_t rows = L.rows();
    const int64_t slices = std::max<int64_t>(
        1, std::min(kMaxSlices, (rows + kRowsPerSlice - 1) / kRowsPerSlice));
    const int64_t per_slice = (rows + slices - 1) / slices;
    at::Tensor partial =
        at::empty({D, slices, static_cast<int64_t>(sizeof(ChannelSum))}, x.options().dtype(at::kByte));
    auto* p = reinterpret_cast<ChannelSum*>(partial.data_ptr<uint8_t>());
    const uint8_t* keep = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cuda", [&] {
      const auto read = make_row_reader<scalar_t>(x, L, t);
      if (L.sC == 1) {
        const dim3 grid(static_cast<unsigned>(slices), grid_y((D + kLanes - 1) / kLanes));
        sums_channels_kernel<scalar_t><<<grid, dim3(kLanes, kGroups), 0, stream>>>(
            read, L, D, keep, per_slice, p);
      } else {
        const dim3 grid(static_cast<unsigned>(slices), grid_y(D));
        sums_rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(read, L, D, keep, per_slice, p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    Pass1 out;
    out.mean = at::empty({D}, x.options().dtype(at::kDouble));
    at::Tensor first_bad = at::full({1}, D, x.options().dtype(at::kLong));
    fold_kernel<<<static_cast<unsigned>(blocks_for(D)), kThreads, 0, stream>>>(
        p, D, slices, count, out.mean.data_ptr<double>(),
        reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // The one synchronisation of the call: both flags in one transfer.
    const at::Tensor status = at::cat({first_bad, positions_bad}).cpu();
    const int64_t* s = status.const_data_ptr<int64_t>();
    out.first_bad = s[0] < D ? s[0] : -1;
    out.positions_ok = s[1] == 0;
    return out;
  }

  at::Tensor row_mask(const at::Tensor& x, const RowLayout& L, const at::Tensor& t) const {
    const int64_t D = L.C + (t.defined() ? 1 : 0);
    at::Tensor mask = at::empty({L.rows()}, x.options().dtype(at::kByte));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cuda", [&] {
      row_mask_kernel<scalar_t><<<blocks_for(L.rows()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          make_row_reader<scalar_t>(x, L, t), L, D, mask.data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return mask;
  }

  void centre(const at::Tensor& x, const RowLayout& L, const at::Tensor& t, const at::Tensor& mask,
              const at::Tensor& mean, int64_t row0, const at::Tensor& zt) const {
    if (zt.scalar_type() == at::kFloat)
      centre_into<float>(x, L, t, mask, mean, row0, zt);
    else
      centre_into<double>(x, L, t, mask, mean, row0, zt);
  }

  template <typename out_t>
  static void centre_into(const at::Tensor& x, const RowLayout& L, const at::Tensor& t,
                          const at::Tensor& mask, const at::Tensor& mean, int64_t row0,
                          const at::Tensor& zt) {
    const int64_t D = zt.size(0), k = zt.size(1);
    const uint8_t* keep = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cuda", [&] {
      const auto read = make_row_reader<scalar_t>(x, L, t);
      if (L.sC == 1) {
        const dim3 grid(static_cast<unsigned>((k + kLanes - 1) / kLanes), grid_y((D + kLanes - 1) / kLanes));
        centre_channels_kernel<scalar_t, out_t><<<grid, dim3(kLanes, kGroups), 0, stream>>>(
            read, L, keep, mean.const_data_ptr<double>(), D, row0, k, zt.stride(0),
            zt.data_ptr<out_t>());
      } else {
        const dim3 grid(static_cast<unsigned>(blocks_for(k)), grid_y(D));
        centre_rows_kernel<scalar_t, out_t><<<grid, kThreads, 0, stream>>>(
            read, L, keep, mean.const_data_ptr<double>(), D, row0, k, zt.stride(0),
            zt.data_ptr<out_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

// The dispatcher picks this kernel when any tensor argument is on a GPU; guard that one, so that
// a mixed-device call reaches the plan's device checks (which name both devices) instead of
// failing in the guard.
c10::Device gpu_of(const at::Tensor& x, const c10::optional<at::Tensor>& target,
                   const c10::optional<at::Tensor>& positions) {
  if (x.is_cuda()) return x.device();
  if (target.has_value() && target->defined() && target->is_cuda()) return target->device();
  if (positions.has_value() && positions->defined() && positions->is_cuda())
    return positions->device();
  return x.device();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_moments_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& positions, c10::string_view mode, int64_t channel_dim,
    bool skip_nonfinite, c10::string_view precision) {
  c10::cuda::CUDAGuard guard(gpu_of(x, target, positions));
  const MomentsPlan plan = plan_channel_moments(x, target, positions, mode, channel_dim,
                                                skip_nonfinite, precision,
                                                /*defer_range_check=*/true);
  return run_channel_moments<CudaBackend>(plan);
}

void channel_moments_fold_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& target,
                               const c10::optional<at::Tensor>& positions, c10::string_view mode,
                               int64_t channel_dim, bool skip_nonfinite, c10::string_view precision,
                               const at::Tensor& count, const at::Tensor& mean,
                               const at::Tensor& comoment) {
  c10::Device gpu = gpu_of(x, target, positions);
  for (const at::Tensor* t : {&count, &mean, &comoment})
    if (!gpu.is_cuda() && t->is_cuda()) gpu = t->device();
  c10::cuda::CUDAGuard guard(gpu);
  const MomentsPlan plan = plan_channel_moments(x, target, positions, mode, channel_dim,
                                                skip_nonfinite, precision,
                                                /*defer_range_check=*/true);
  run_channel_moments_fold<CudaBackend>(plan, count, mean, comoment);
}

TORCH_LIBRARY_IMPL(chanaxis_fast, CUDA, m) {
  m.impl("channel_moments", &channel_moments_cuda);
  m.impl("channel_moments_fold_", &channel_moments_fold_cuda);
}

}  // namespace chanaxis
