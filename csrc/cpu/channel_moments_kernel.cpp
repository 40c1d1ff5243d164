// channel_moments on the CPU.
// PyTorch: z = rows(x) (+ target column); mean = z.mean(0); comoment = (z - mean).T @ (z - mean)
// Algorithm: pass 1 sums every channel in float64 over tiles of rows (at::parallel_for over
// blocks of channels; a tile's row offsets are computed once and reused by the block's channels,
// so NCHW and channels-last inputs both stream through memory once); pass 2 writes centred
// float64 chunks channel-major and accumulates the upper-triangle panels with MKL (see
// channel_moments.h for the pipeline).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../channel_moments.h"

namespace chanaxis {
namespace {

constexpr int64_t kTile = 256;        // rows whose offsets are computed together
constexpr int64_t kChannelBlock = 16; // channels one task owns

// Calls f(c0, c1, r0, r1, off, img) for every tile of rows [r0, r1) and block of channels
// [c0, c1) of [0, D), with the tile's row offsets off[] and images img[]; blocks run in parallel.
template <class F>
void for_each_tile(const RowLayout& L, int64_t D, int64_t row_begin, int64_t row_end, const F& f) {
  const int64_t blocks = (D + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    int64_t off[kTile], img[kTile];
    for (int64_t r0 = row_begin; r0 < row_end; r0 += kTile) {
      const int64_t r1 = std::min(r0 + kTile, row_end);
      for (int64_t r = r0; r < r1; ++r) {
        off[r - r0] = L.row_offset(r);
        img[r - r0] = L.image_of(r);
      }
      for (int64_t b = b0; b < b1; ++b)
        f(b * kChannelBlock, std::min(D, (b + 1) * kChannelBlock), r0, r1, off, img);
    }
  });
}

struct CpuBackend {
  static at::Tensor pool(const MomentsPlan& plan) {
    const at::Tensor& x = plan.x;
    const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    at::Tensor out = at::empty({N, C}, x.options().dtype(at::kDouble));
    double* o = out.data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cpu", [&] {
      const scalar_t* p = x.const_data_ptr<scalar_t>();
      const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
      at::parallel_for(0, N * C, 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const scalar_t* q = p + (i / C) * sN + (i % C) * sC;
          double s = 0.0;
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w) s += static_cast<double>(q[h * sH + w * sW]);
          o[i] = s / static_cast<double>(H * W);
        }
      });
    });
    return out;
  }

  static std::vector<ChannelSum> sums(const at::Tensor& x, const RowLayout& L,
                                      const at::Tensor& t, const at::Tensor& mask) {
    const int64_t D = L.C + (t.defined() ? 1 : 0);
    std::vector<ChannelSum> out(D, ChannelSum::empty());
    const uint8_t* keep = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cpu", [&] {
      const auto read = make_row_reader<scalar_t>(x, L, t);
      for_each_tile(L, D, 0, L.rows(), [&](int64_t c0, int64_t c1, int64_t r0, int64_t r1,
                                           const int64_t* off, const int64_t* img) {
        for (int64_t c = c0; c < c1; ++c) {
          ChannelSum s = out[c];
          for (int64_t r = r0; r < r1; ++r)
            if (!keep || keep[r]) s.add(read(c, off[r - r0], img[r - r0]));
          out[c] = s;
        }
      });
    });
    return out;
  }

  static at::Tensor row_mask(const at::Tensor& x, const RowLayout& L, const at::Tensor& t) {
    const int64_t D = L.C + (t.defined() ? 1 : 0);
    at::Tensor mask = at::empty({L.rows()}, x.options().dtype(at::kByte));
    uint8_t* m = mask.data_ptr<uint8_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cpu", [&] {
      const auto read = make_row_reader<scalar_t>(x, L, t);
      at::parallel_for(0, L.rows(), kTile, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = L.row_offset(r), img = L.image_of(r);
          bool ok = true;
          for (int64_t c = 0; c < D && ok; ++c) ok = std::isfinite(read(c, off, img));
          m[r] = ok;
        }
      });
    });
    return mask;
  }

  static void centre(const at::Tensor& x, const RowLayout& L, const at::Tensor& t,
                     const at::Tensor& mask, const at::Tensor& mean, int64_t row0,
                     const at::Tensor& zt) {
    const int64_t D = zt.size(0), k = zt.size(1), ld = zt.stride(0);
    const uint8_t* keep = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
    const double* mu = mean.const_data_ptr<double>();
    double* z = zt.data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cpu", [&] {
      const auto read = make_row_reader<scalar_t>(x, L, t);
      for_each_tile(L, D, row0, row0 + k, [&](int64_t c0, int64_t c1, int64_t r0, int64_t r1,
                                               const int64_t* off, const int64_t* img) {
        for (int64_t c = c0; c < c1; ++c) {
          double* zc = z + c * ld - row0;
          for (int64_t r = r0; r < r1; ++r)
            zc[r] = centred(read(c, off[r - r0], img[r - r0]), mu[c], !keep || keep[r]);
        }
      });
    });
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_moments_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& positions, c10::string_view mode, int64_t channel_dim,
    bool skip_nonfinite) {
  const MomentsPlan plan =
      plan_channel_moments(x, target, positions, mode, channel_dim, skip_nonfinite);
  return run_channel_moments<CpuBackend>(plan);
}

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) {
  m.impl("channel_moments", &channel_moments_cpu);
}

}  // namespace chanaxis
