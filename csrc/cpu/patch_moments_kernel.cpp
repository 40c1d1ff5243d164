// patch_moments on the CPU: SFVR's input statistics (METHOD.md §4), every input channel's k x k
// patches at a conv's sampled output positions, reduced to count, mean and centred co-moment.
// PyTorch (reference.patch_moments): rows = F.unfold(x, kernel, dilation, padding, stride)
//   [N, C * k2, Ho * Wo] at the positions; per channel mean and (rows - mean)^T (rows - mean).
// Algorithm: tasks own blocks of channels; each reads its channels' patches straight from x (any
// strides, zero padding as zeros, no gathered copy), one plane (image, channel) at a time, into a
// small float64 buffer; there the plane's column sums (which also test it for NaN/Inf), mean and
// centred co-moment are formed with the sums in registers, and merged into the channel's running
// statistics. The row geometry (image, top-left input pixel) is computed once for all channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../macros.h"

namespace chanaxis {
namespace {

constexpr const char* kOp = "patch_moments";

// The rows (image, output position) of a call: where each patch starts in x and whether all of
// it lies inside the image (then its taps are read at base + tap[k], without bounds checks).
struct Geometry {
  int64_t kh, kw, dh, dw, H, W, sC, sH, sW;
  std::vector<int64_t> base;    // offset of tap (0, 0) in channel 0 (may point outside the image)
  std::vector<int64_t> top, left;  // input row and column of tap (0, 0)
  std::vector<uint8_t> inside;  // the whole patch is inside the image
  std::vector<int64_t> tap;     // offset of tap k from tap (0, 0)
  int64_t rows() const { return static_cast<int64_t>(base.size()); }
};

// The k2 values of row r's patch in the channel at xc (0 outside the image).
template <typename scalar_t, int K2>
__attribute__((always_inline)) inline void read_patch(const scalar_t* xc, const Geometry& g, int64_t r, int64_t k2, double* v) {
  const scalar_t* p = xc + g.base[r];
  if (g.inside[r]) {
    for (int64_t k = 0; k < (K2 > 0 ? K2 : k2); ++k) v[k] = static_cast<double>(p[g.tap[k]]);
    return;
  }
  int64_t k = 0;
  for (int64_t a = 0; a < g.kh; ++a) {
    const int64_t ih = g.top[r] + a * g.dh;
    const bool row_in = ih >= 0 && ih < g.H;
    for (int64_t b = 0; b < g.kw; ++b, ++k) {
      const int64_t iw = g.left[r] + b * g.dw;
      v[k] = row_in && iw >= 0 && iw < g.W ? static_cast<double>(p[g.tap[k]]) : 0.0;
    }
  }
}

// Clones for AVX2 and AVX-512 CPUs (picked when the library loads) run the products four and
// eight doubles wide; the baseline build two.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CHANAXIS_PATCH_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CHANAXIS_PATCH_CLONES
#endif

// Row stride of the patch buffer and of the plane's co-moment: a fixed k2 is padded with zeros
// to a multiple of 4, so that each row's rank-one update is whole vector operations (3 x 3: 12,
// three AVX2 multiplies and adds per row of the block instead of nine scalar ones).
template <int K2>
constexpr int64_t padded(int64_t k2) {
  return K2 > 0 ? (K2 + 3) / 4 * 4 : k2;
}

// sums[k] = the sum of column k of buf [nb, S] over its rows (vectorised over k; padding 0).
template <int K2>
__attribute__((always_inline)) inline void column_sums(const double* __restrict buf, int64_t nb,
                                                       int64_t k2, double* __restrict sums) {
  if constexpr (K2 > 0) {
    constexpr int64_t SS = padded<K2>(K2);
    double a[SS] = {};
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t l = 0; l < SS; ++l) a[l] += buf[i * SS + l];
    for (int64_t l = 0; l < SS; ++l) sums[l] = a[l];
  } else {
    for (int64_t l = 0; l < k2; ++l) sums[l] = 0.0;
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t l = 0; l < k2; ++l) sums[l] += buf[i * k2 + l];
  }
}

// On entry mb holds the column sums of the nb patches in buf [nb, S] (row-major, S = padded(K),
// padding 0; column_sums); on exit their mean, and Mb their centred co-moment [K, S] (buf is
// centred in place; Mb's padding columns come out 0).
// The sums run over the rows innermost, in registers: three rows of Mb (3 x S doubles) per sweep
// over the patches. (Rows outermost, each row's rank-one update went through memory, a
// store-to-load chain per element of Mb: about 3x slower.)
template <int K2>
__attribute__((always_inline)) inline void plane_moments(double* __restrict buf, int64_t nb,
                                                         int64_t k2, double* __restrict mb,
                                                         double* __restrict Mb) {
  const int64_t K = K2 > 0 ? K2 : k2, S = padded<K2>(k2);
  const double inv = 1.0 / static_cast<double>(nb);
  for (int64_t k = 0; k < S; ++k) mb[k] *= inv;
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t k = 0; k < S; ++k) buf[i * S + k] -= mb[k];
  if constexpr (K2 > 0) {
    constexpr int64_t SS = padded<K2>(K2);
    int64_t k = 0;
    for (; k + 3 <= K2; k += 3) {
      double a0[SS] = {}, a1[SS] = {}, a2[SS] = {};
      for (int64_t i = 0; i < nb; ++i) {
        const double* __restrict v = buf + i * SS;
        const double v0 = v[k], v1 = v[k + 1], v2 = v[k + 2];
        for (int64_t l = 0; l < SS; ++l) {
          a0[l] += v0 * v[l];
          a1[l] += v1 * v[l];
          a2[l] += v2 * v[l];
        }
      }
      for (int64_t l = 0; l < SS; ++l) {
        Mb[k * SS + l] = a0[l];
        Mb[(k + 1) * SS + l] = a1[l];
        Mb[(k + 2) * SS + l] = a2[l];
      }
    }
    for (; k < K2; ++k) {
      double a0[SS] = {};
      for (int64_t i = 0; i < nb; ++i)
        for (int64_t l = 0; l < SS; ++l) a0[l] += buf[i * SS + k] * buf[i * SS + l];
      for (int64_t l = 0; l < SS; ++l) Mb[k * SS + l] = a0[l];
    }
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t l = 0; l < S; ++l) {
        double a = 0.0;
        for (int64_t i = 0; i < nb; ++i) a += buf[i * S + k] * buf[i * S + l];
        Mb[k * S + l] = a;
      }
  }
}

// Channels [c0, c1): count, mean [k2] and co-moment [k2, k2] (row-major, symmetric) of each.
// The block walks image by image and, within an image, channel by channel, so that x is read
// once, plane after plane: each plane's patches go to a small buffer, are reduced there in two
// passes (sums, then centred products, in cache) and the plane's (n, mean, M) is merged into its
// channel's running statistics by the pairwise update of Chan et al. (exact, as everywhere else).
// Reading every patch twice from x instead cost a cache miss per tap line and pass (the 16
// sampled positions of a 32 x 32 plane touch most of its lines; planes of one channel lie N
// strides apart). K2 > 0: k2 fixed at compile time (unrolled loops). bad[c] = 1 when a patch of
// channel c holds NaN/Inf and skip is off (its outputs are then unspecified).
template <typename scalar_t, int K2>
CHANAXIS_PATCH_CLONES void channel_block(const scalar_t* x, const Geometry& g, int64_t N, int64_t P,
                                         int64_t k2, int64_t c0, int64_t c1, bool skip,
                                         int64_t* count, double* mean, double* M, uint8_t* bad) {
  const int64_t K = K2 > 0 ? K2 : k2, S = padded<K2>(k2), B = c1 - c0;
  std::vector<double> buf(P * S, 0.0), mb(S), Mb(K * S), Ma(B * K * K, 0.0), ma(B * K, 0.0);
  std::vector<int64_t> n(B, 0);
  for (int64_t img = 0; img < N; ++img) {
    for (int64_t j = 0; j < B; ++j) {
      if (bad[c0 + j]) continue;
      const scalar_t* xc = x + (c0 + j) * g.sC;
      for (int64_t r = img * P; r < (img + 1) * P; ++r)
        read_patch<scalar_t, K2>(xc, g, r, k2, buf.data() + (r - img * P) * S);
      int64_t nb = P;
      // One test per plane: its column sums are finite unless a patch holds NaN/Inf (or the
      // sums overflow); only then are the rows tested one by one, and those that hold NaN/Inf
      // dropped (skip) or the channel marked bad.
      column_sums<K2>(buf.data(), P, K, mb.data());
      bool finite = true;
      for (int64_t k = 0; k < K; ++k) finite &= mb[k] - mb[k] == 0.0;
      if (!finite) {
        nb = 0;
        for (int64_t i = 0; i < P; ++i) {
          const double* v = buf.data() + i * S;
          bool row_ok = true;
          for (int64_t k = 0; k < K; ++k) row_ok &= std::isfinite(v[k]);
          if (!row_ok) {
            if (!skip) {
              bad[c0 + j] = 1;
              break;
            }
            continue;
          }
          if (nb != i) std::copy(v, v + S, buf.data() + nb * S);
          ++nb;
        }
        if (!bad[c0 + j]) column_sums<K2>(buf.data(), nb, K, mb.data());  // of the rows kept
      }
      if (bad[c0 + j] || nb == 0) continue;
      plane_moments<K2>(buf.data(), nb, K, mb.data(), Mb.data());
      // merge (n_a, mean_a, M_a) and (nb, mb, Mb)
      const double na = static_cast<double>(n[j]), nn = na + static_cast<double>(nb);
      const double wm = static_cast<double>(nb) / nn, wM = na * static_cast<double>(nb) / nn;
      double* mean_a = ma.data() + j * K;
      double* M_a = Ma.data() + j * K * K;
      for (int64_t k = 0; k < K; ++k) mb[k] -= mean_a[k];  // delta
      for (int64_t k = 0; k < K; ++k) {
        const double dk = mb[k] * wM;
        for (int64_t l = 0; l < K; ++l) M_a[k * K + l] += Mb[k * S + l] + dk * mb[l];
      }
      for (int64_t k = 0; k < K; ++k) mean_a[k] += mb[k] * wm;
      n[j] += nb;
    }
  }
  for (int64_t j = 0; j < B; ++j) {  // the upper triangle mirrored: exactly symmetric
    count[c0 + j] = n[j];
    const double* M_a = Ma.data() + j * K * K;
    double* Mj = M + (c0 + j) * K * K;
    for (int64_t k = 0; k < K; ++k) {
      mean[(c0 + j) * K + k] = ma[j * K + k];
      for (int64_t l = 0; l < K; ++l) Mj[k * K + l] = l >= k ? M_a[k * K + l] : M_a[l * K + k];
    }
  }
}

template <typename scalar_t, int K2>
void run_channels(const scalar_t* x, const Geometry& g, int64_t N, int64_t P, int64_t C, int64_t k2,
                  bool skip, int64_t* cnt, double* mu, double* M, std::vector<uint8_t>& bad) {
  constexpr int64_t kBlock = 16;  // channels per task
  at::parallel_for(0, (C + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      channel_block<scalar_t, K2>(x, g, N, P, k2, b * kBlock, std::min(C, (b + 1) * kBlock), skip,
                                  cnt, mu, M, bad.data());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_moments_cpu(
    const at::Tensor& x, const at::Tensor& positions, at::IntArrayRef kernel, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_width, bool skip_nonfinite) {
  CHANAXIS_CHECK(x.dim() == 4, kOp, "x must be 4-D [N, C, H, W], got shape ", x.sizes());
  CHANAXIS_CHECK_FLOATING(x, kOp, "x");
  CHANAXIS_CHECK_DTYPE(positions, at::kLong, kOp, "positions");
  CHANAXIS_CHECK(positions.dim() == 2 && positions.size(0) == x.size(0), kOp,
                 "positions must be [N, P] = [", x.size(0), ", P], got shape ", positions.sizes());
  CHANAXIS_CHECK_SAME_DEVICE(positions, x, kOp, "positions", "x");
  for (auto [name, v] : {std::pair{"kernel", kernel}, std::pair{"stride", stride},
                         std::pair{"padding", padding}, std::pair{"dilation", dilation}})
    CHANAXIS_CHECK(v.size() == 2, kOp, name, " must have 2 values (h, w), got ", v.size());
  CHANAXIS_CHECK(kernel[0] > 0 && kernel[1] > 0 && stride[0] > 0 && stride[1] > 0 &&
                     dilation[0] > 0 && dilation[1] > 0 && padding[0] >= 0 && padding[1] >= 0,
                 kOp, "kernel, stride and dilation must be positive and padding >= 0, got kernel ",
                 kernel, ", stride ", stride, ", padding ", padding, ", dilation ", dilation);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) / stride[1] + 1;
  CHANAXIS_CHECK(Ho > 0 && Wo > 0 && out_width == Wo, kOp, "out_width must be the output width ",
                 Wo, " of a ", H, " x ", W, " input (output ", Ho, " x ", Wo, "), got ", out_width);
  const at::Tensor pos = positions.contiguous();
  if (pos.numel()) {
    const auto range = at::aminmax(pos);
    const int64_t lo = std::get<0>(range).item<int64_t>(), hi = std::get<1>(range).item<int64_t>();
    CHANAXIS_CHECK(lo >= 0 && hi < Ho * Wo, kOp, "positions must index the ", Ho, " x ", Wo,
                   " = ", Ho * Wo, " output positions, got values in [", lo, ", ", hi, "]");
  }

  Geometry g{kernel[0], kernel[1], dilation[0], dilation[1], H, W, x.stride(1), x.stride(2),
             x.stride(3), {}, {}, {}, {}, {}};
  const int64_t P = pos.size(1), R = N * P, k2 = kernel[0] * kernel[1];
  for (int64_t a = 0; a < g.kh; ++a)
    for (int64_t b = 0; b < g.kw; ++b) g.tap.push_back(a * g.dh * g.sH + b * g.dw * g.sW);
  g.base.resize(R);
  g.top.resize(R);
  g.left.resize(R);
  g.inside.resize(R);
  const int64_t* p = pos.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t top = p[r] / Wo * stride[0] - padding[0], left = p[r] % Wo * stride[1] - padding[1];
    g.top[r] = top;
    g.left[r] = left;
    g.base[r] = (r / P) * x.stride(0) + top * g.sH + left * g.sW;
    g.inside[r] = top >= 0 && top + (g.kh - 1) * g.dh < H && left >= 0 && left + (g.kw - 1) * g.dw < W;
  }

  at::Tensor count = at::empty({C}, x.options().dtype(at::kLong));
  at::Tensor mean = at::empty({C, k2}, x.options().dtype(at::kDouble));
  at::Tensor comoment = at::empty({C, k2, k2}, x.options().dtype(at::kDouble));
  int64_t* cnt = count.data_ptr<int64_t>();
  double* mu = mean.data_ptr<double>();
  double* M = comoment.data_ptr<double>();
  std::vector<uint8_t> bad(C, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (k2 == 9)
      run_channels<scalar_t, 9>(xp, g, N, P, C, k2, skip_nonfinite, cnt, mu, M, bad);
    else if (k2 == 1)
      run_channels<scalar_t, 1>(xp, g, N, P, C, k2, skip_nonfinite, cnt, mu, M, bad);
    else
      run_channels<scalar_t, 0>(xp, g, N, P, C, k2, skip_nonfinite, cnt, mu, M, bad);
  });
  for (int64_t c = 0; c < C; ++c)
    CHANAXIS_CHECK(!bad[c], kOp, "x has NaN/Inf values (first in input channel ", c,
                   "); pass skip_nonfinite=True to drop the patches that hold them");
  return {count, mean, comoment};
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) {
  m.impl("patch_moments", &patch_moments_cpu);
}

}  // namespace chanaxis
