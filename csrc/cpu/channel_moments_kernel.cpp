// channel_moments on the CPU.
// PyTorch: z = rows(x) (+ target column); mean = z.mean(0); comoment = (z - mean).T @ (z - mean)
// Algorithm (pipeline in channel_moments.h): pass 1 sums every channel in float64, pass 2 writes
// centred float64 chunks channel-major, and MKL accumulates their upper-triangle panels. The
// passes stream x once each, whatever its layout:
//   planes   NCHW-like, every position: channel c of image n is one contiguous run of H*W values;
//            tasks own channels.
//   rows     channels-last / [N, C]: the C values of a row are contiguous; tasks own rows (sums)
//            or tiles of rows (centring, a transpose through L1/L2).
//   generic  any strides, sampled positions, masked rows: tiles of rows whose offsets are
//            computed once and reused by a block of channels.
// The target column (one value per image) is handled apart from the channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../channel_moments.h"
#include "../pooled_means.h"
#include "wide_clones.h"

namespace chanaxis {
namespace {

constexpr int64_t kTile = 256;         // rows of a generic tile
constexpr int64_t kChannelBlock = 16;  // channels of a generic block
constexpr int64_t kRowTile = 64;       // rows of a channels-last centring tile

enum class Path { planes, rows, generic };

Path choose_path(const RowLayout& L, bool masked) {
  if (masked) return Path::generic;
  if (!L.positions && L.rows_per_image > 1 && L.sW == 1 && (L.rows_per_image == L.W || L.sH == L.W))
    return Path::planes;
  if (L.sC == 1) return Path::rows;
  return Path::generic;
}

#if defined(_OPENMP)
#define CHANAXIS_SIMD(...) _Pragma(CHANAXIS_STR(omp simd __VA_ARGS__))
#define CHANAXIS_STR(x) #x
#else
#define CHANAXIS_SIMD(...)
#endif

// Channel c's sum, minimum and maximum over its N planes of P contiguous values (the planes
// path), widened to float64 and reduced in vector lanes (AVX2 / AVX-512 clones). The order of
// additions is fixed for a given CPU (its vector width). Minimum and maximum are read only when
// the sum is finite (every value finite), where their order does not matter.
template <typename scalar_t>
CHANAXIS_WIDE_CLONES ChannelSum sum_planes(const scalar_t* x, int64_t N, int64_t sN, int64_t P) {
  ChannelSum out = ChannelSum::empty();
  for (int64_t n = 0; n < N; ++n) {
    const scalar_t* p = x + n * sN;
    double s = 0.0, lo = out.lo, hi = out.hi;
    CHANAXIS_SIMD(reduction(+ : s) reduction(min : lo) reduction(max : hi))
    for (int64_t i = 0; i < P; ++i) {
      const double v = static_cast<double>(p[i]);
      s += v;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    out.sum += s;
    out.lo = lo;
    out.hi = hi;
  }
  return out;
}

// zc[r] = x's value of row r minus mu, rows [row0, row1) of one channel's planes (P values each).
template <typename scalar_t, typename out_t>
CHANAXIS_WIDE_CLONES void centre_planes(const scalar_t* x, int64_t sN, int64_t P, double mu,
                                        int64_t row0, int64_t row1, out_t* zc) {
  for (int64_t n = row0 / P; n * P < row1; ++n) {
    const scalar_t* src = x + n * sN;
    const int64_t r0 = std::max(row0, n * P), r1 = std::min(row1, (n + 1) * P);
    out_t* dst = zc + n * P;  // dst[i] is row n * P + i, i = r - n * P
    CHANAXIS_SIMD()
    for (int64_t i = r0 - n * P; i < r1 - n * P; ++i)
      dst[i] = static_cast<out_t>(static_cast<double>(src[i]) - mu);
  }
}

// Calls f(c0, c1, r0, r1, off, img) for every tile of rows [r0, r1) and block of channels [c0, c1)
// of [0, C), with the tile's row offsets off[] and images img[]; blocks run in parallel.
template <class F>
void for_each_tile(const RowLayout& L, int64_t row_begin, int64_t row_end, const F& f) {
  const int64_t blocks = (L.C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    int64_t off[kTile], img[kTile];
    for (int64_t r0 = row_begin; r0 < row_end; r0 += kTile) {
      const int64_t r1 = std::min(r0 + kTile, row_end);
      for (int64_t r = r0; r < r1; ++r) {
        off[r - r0] = L.row_offset(r);
        img[r - r0] = L.image_of(r);
      }
      for (int64_t b = b0; b < b1; ++b)
        f(b * kChannelBlock, std::min(L.C, (b + 1) * kChannelBlock), r0, r1, off, img);
    }
  });
}

template <typename scalar_t>
void channel_sums(const scalar_t* x, const RowLayout& L, const uint8_t* keep,
                  std::vector<ChannelSum>& out) {
  const int64_t L_img = L.rows_per_image;
  switch (choose_path(L, keep != nullptr)) {
    case Path::planes:
      at::parallel_for(0, L.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) out[c] = sum_planes(x + c * L.sC, L.N, L.sN, L_img);
      });
      return;
    case Path::rows: {
      // Fixed row ranges, each summed into its own partial and combined in order: deterministic.
      const int64_t rows = L.rows();
      const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(64, rows / 512));
      std::vector<ChannelSum> partial(parts * L.C, ChannelSum::empty());
      at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          ChannelSum* acc = partial.data() + p * L.C;
          for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
            const scalar_t* row = x + L.row_offset(r);
            for (int64_t c = 0; c < L.C; ++c) acc[c].add(static_cast<double>(row[c]));
          }
        }
      });
      for (int64_t p = 0; p < parts; ++p)
        for (int64_t c = 0; c < L.C; ++c) out[c].combine(partial[p * L.C + c]);
      return;
    }
    case Path::generic:
      for_each_tile(L, 0, L.rows(), [&](int64_t c0, int64_t c1, int64_t r0, int64_t r1,
                                        const int64_t* off, const int64_t*) {
        for (int64_t c = c0; c < c1; ++c) {
          ChannelSum s = out[c];
          for (int64_t r = r0; r < r1; ++r)
            if (!keep || keep[r]) s.add(static_cast<double>(x[off[r - r0] + c * L.sC]));
          out[c] = s;
        }
      });
      return;
  }
}

// z[c * ld + r - row0] = the centred value in float64, stored as out_t (float64, or float32 for
// precision "float32": one rounding of the float64 difference).
template <typename scalar_t, typename out_t>
void centre_channels(const scalar_t* x, const RowLayout& L, const uint8_t* keep, const double* mu,
                     int64_t row0, int64_t k, out_t* z, int64_t ld) {
  const int64_t row1 = row0 + k;
  switch (choose_path(L, keep != nullptr)) {
    case Path::planes: {
      const int64_t P = L.rows_per_image;
      at::parallel_for(0, L.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          centre_planes(x + c * L.sC, L.sN, P, mu[c], row0, row1, z + c * ld - row0);
      });
      return;
    }
    case Path::rows:
      at::parallel_for(0, (k + kRowTile - 1) / kRowTile, 1, [&](int64_t t0, int64_t t1) {
        const scalar_t* src[kRowTile];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = row0 + t * kRowTile, r1 = std::min(row1, r0 + kRowTile);
          for (int64_t r = r0; r < r1; ++r) src[r - r0] = x + L.row_offset(r);
          for (int64_t c = 0; c < L.C; ++c) {
            out_t* zc = z + c * ld - row0;
            for (int64_t r = r0; r < r1; ++r)
              zc[r] = static_cast<out_t>(static_cast<double>(src[r - r0][c]) - mu[c]);
          }
        }
      });
      return;
    case Path::generic:
      for_each_tile(L, row0, row1, [&](int64_t c0, int64_t c1, int64_t r0, int64_t r1,
                                       const int64_t* off, const int64_t*) {
        for (int64_t c = c0; c < c1; ++c) {
          out_t* zc = z + c * ld - row0;
          for (int64_t r = r0; r < r1; ++r)
            zc[r] = static_cast<out_t>(
                centred(static_cast<double>(x[off[r - r0] + c * L.sC]), mu[c], !keep || keep[r]));
        }
      });
      return;
  }
}

struct CpuBackend {
  at::Tensor source(const MomentsPlan& plan, at::Tensor& positions) const {
    if (plan.gap) return pool(plan);
    positions = plan.positions;
    return plan.x;
  }

  // mode "gap": the float64 mean of every map, by pooled_means' kernel
  static at::Tensor pool(const MomentsPlan& plan) { return pooled_means_cpu(plan.x.flatten(2)); }

  static Pass1 pass1(const at::Tensor& x, const RowLayout& L, const at::Tensor& t,
                     const at::Tensor& mask, int64_t count) {
    const std::vector<ChannelSum> s = sums(x, L, t, mask);
    Pass1 p;
    p.first_bad = first_nonfinite(s);
    p.mean = means_from_sums(s, count);
    return p;
  }

  static std::vector<ChannelSum> sums(const at::Tensor& x, const RowLayout& L,
                                      const at::Tensor& t, const at::Tensor& mask) {
    std::vector<ChannelSum> out(L.C + (t.defined() ? 1 : 0), ChannelSum::empty());
    const uint8_t* keep = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cpu", [&] {
      channel_sums(x.const_data_ptr<scalar_t>(), L, keep, out);
    });
    if (t.defined()) {
      const double* tv = t.const_data_ptr<double>();
      for (int64_t r = 0; r < L.rows(); ++r)
        if (!keep || keep[r]) out[L.C].add(tv[L.image_of(r)]);
    }
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
    const int64_t k = zt.size(1), ld = zt.stride(0);
    const uint8_t* keep = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
    const double* mu = mean.const_data_ptr<double>();
    if (zt.scalar_type() == at::kFloat)
      centre_into(x, L, t, keep, mu, row0, k, zt.data_ptr<float>(), ld);
    else
      centre_into(x, L, t, keep, mu, row0, k, zt.data_ptr<double>(), ld);
  }

  template <typename out_t>
  static void centre_into(const at::Tensor& x, const RowLayout& L, const at::Tensor& t,
                          const uint8_t* keep, const double* mu, int64_t row0, int64_t k, out_t* z,
                          int64_t ld) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_moments_cpu", [&] {
      centre_channels(x.const_data_ptr<scalar_t>(), L, keep, mu, row0, k, z, ld);
    });
    if (t.defined()) {
      const double* tv = t.const_data_ptr<double>();
      out_t* zt_row = z + L.C * ld - row0;
      for (int64_t r = row0; r < row0 + k; ++r)
        zt_row[r] = static_cast<out_t>(centred(tv[L.image_of(r)], mu[L.C], !keep || keep[r]));
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_moments_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& positions, c10::string_view mode, int64_t channel_dim,
    bool skip_nonfinite, c10::string_view precision) {
  const MomentsPlan plan =
      plan_channel_moments(x, target, positions, mode, channel_dim, skip_nonfinite, precision);
  return run_channel_moments<CpuBackend>(plan);
}

void channel_moments_fold_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& target,
                              const c10::optional<at::Tensor>& positions, c10::string_view mode,
                              int64_t channel_dim, bool skip_nonfinite, c10::string_view precision,
                              const at::Tensor& count, const at::Tensor& mean,
                              const at::Tensor& comoment) {
  const MomentsPlan plan =
      plan_channel_moments(x, target, positions, mode, channel_dim, skip_nonfinite, precision);
  run_channel_moments_fold<CpuBackend>(plan, count, mean, comoment);
}

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) {
  m.impl("channel_moments", &channel_moments_cpu);
  m.impl("channel_moments_fold_", &channel_moments_fold_cpu);
}

}  // namespace chanaxis
