// Host/device math of channel_moments, shared by the CPU and CUDA kernels.
//
// A batch is read as rows: row r is one sample [Y_1..Y_C] (plus the target of its image).
//   mode "all":       rows = N * H * W, row (n, p) reads x[n, :, p / W, p % W]
//   mode "positions": rows = N * P,     row (n, q) reads x[n, :, pos[n, q] / W, pos[n, q] % W]
//   2-D x [N, C] and the pooled matrix of mode "gap" are read as H = W = 1.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>
#include <limits>

namespace chanaxis {

// Where the rows of a batch live. Offsets are in elements of x.
struct RowLayout {
  int64_t N = 0;              // images
  int64_t C = 0;              // channels
  int64_t W = 1;              // width, to split a flat position p into (p / W, p % W)
  int64_t rows_per_image = 1; // H * W, P or 1
  int64_t sN = 0, sC = 0, sH = 0, sW = 0;
  const int64_t* positions = nullptr; // [N, rows_per_image] row-major, or null for every position

  C10_HOST_DEVICE int64_t rows() const { return N * rows_per_image; }
  C10_HOST_DEVICE int64_t image_of(int64_t row) const { return row / rows_per_image; }
  // Offset of (row, channel 0).
  C10_HOST_DEVICE int64_t row_offset(int64_t row) const {
    const int64_t n = row / rows_per_image;
    const int64_t q = row - n * rows_per_image;
    const int64_t p = positions ? positions[row] : q;
    const int64_t h = p / W;
    return n * sN + h * sH + (p - h * W) * sW;
  }
};

// Per-channel summary of pass 1: the float64 sum over the used rows and the range. A channel whose
// minimum equals its maximum is constant and is centred to exactly 0 (sum / n can be an ulp off).
// NaN and +-Inf propagate into the sum, so a non-finite sum flags the channel without a branch in
// the hot loop.
struct ChannelSum {
  double sum;
  double lo;
  double hi;

  C10_HOST_DEVICE static ChannelSum empty() { return {0.0, std::numeric_limits<double>::infinity(),
                                                      -std::numeric_limits<double>::infinity()}; }
  C10_HOST_DEVICE void add(double v) {
    sum += v;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  C10_HOST_DEVICE void combine(const ChannelSum& o) {
    sum += o.sum;
    lo = o.lo < lo ? o.lo : lo;
    hi = o.hi > hi ? o.hi : hi;
  }
  // x - x is 0 exactly for finite x and NaN for NaN or +-Inf; the same on host and device.
  C10_HOST_DEVICE bool finite() const { return sum - sum == 0.0; }
  C10_HOST_DEVICE double mean(int64_t count) const {
    if (count <= 0) return 0.0;
    if (lo == hi) return lo;
    return sum / static_cast<double>(count);
  }
};

// Value of column c of a row: channel c of x, or the image's target for c == C.
template <typename scalar_t>
struct RowReader {
  const scalar_t* x;
  const double* t;  // [N] float64, or null
  int64_t C, sC;
  C10_HOST_DEVICE double operator()(int64_t c, int64_t row_offset, int64_t image) const {
    return c < C ? static_cast<double>(x[row_offset + c * sC]) : t[image];
  }
};

// Centred value of one sample; a skipped row (non-finite, under skip_nonfinite) contributes 0.
C10_HOST_DEVICE inline double centred(double v, double mean, bool keep) {
  return keep ? v - mean : 0.0;
}

}  // namespace chanaxis
