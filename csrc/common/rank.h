// The rank of a small matrix by Householder bidiagonalisation and Sturm counts, shared by the CPU
// and CUDA kernels of map_ranks (one call per matrix: at::parallel_for on the CPU, one CUDA
// thread per matrix), so the CPU tests exercise all of the math.
//
// rank(A) = #{i : sigma_i > rtol * sigma_max}, torch.linalg.matrix_rank's definition with atol = 0.
// 1. A (rows x cols, any strides, any floating dtype) is copied into float64 scratch as an M x n
//    row-major matrix, M = max(rows, cols), n = min (transposed when rows < cols), divided by the
//    power of two at or above its largest |entry| (exact; no square over- or underflows).
// 2. Householder reflections from the left and the right reduce it to an upper bidiagonal B
//    (diagonal d_0..d_{n-1}, superdiagonal e_0..e_{n-2}) with the same singular values, each
//    known to about eps * sigma_max (backward stability, as LAPACK's dgebrd): the accuracy of an
//    SVD. Singular values do not depend on signs, so only |d_k| and |e_k| are kept.
// 3. sigma_max^2 is the largest eigenvalue of the tridiagonal B^T B (diagonal d_j^2 + e_{j-1}^2,
//    off-diagonal d_j e_j), bracketed between its largest diagonal entry and its Gershgorin bound
//    (at most twice apart) and narrowed by multisection with Sturm counts (three independent
//    counts per pass, a quarter of the bracket each) to about 1e-10 relative. Squaring costs
//    accuracy only in the small eigenvalues, which this step does not use.
// 4. The rank is one Sturm count at tol = rtol * sigma_max on the Golub-Kahan matrix
//    [[0, B], [B^T, 0]] (zero diagonal, off-diagonal d_0, e_0, d_1, e_1, ..., d_{n-1}; its
//    eigenvalues are +-sigma_i): #{eigenvalues < tol} = n + #{sigma_i < tol}, which resolves small
//    singular values to their own accuracy (no squares; Demmel & Kahan), so that a float32 map's
//    rank is decided on its exact singular values rather than on a float32 SVD's.
// Cost: about (8/3) n^3 + 4 (M - n) n^2 flops for the reduction, O(n) per Sturm count.
//
// Operation order is fixed (no reassociation; every sum runs in index order), so the CPU and the
// CUDA kernels count the same bits.
#pragma once

#include <c10/macros/Macros.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "scratch.h"

namespace chanaxis {
namespace rank {

// max of two non-NaN doubles, inlined (fmax's NaN rules make compilers call libm)
C10_HOST_DEVICE inline double max2(double a, double b) { return a > b ? a : b; }

// Scratch doubles one call needs: the M x n matrix, one vector of max(M, n) partial sums and the
// 2n - 1 entries of the Golub-Kahan off-diagonal.
C10_HOST_DEVICE inline int64_t work_size(int64_t rows, int64_t cols) {
  const int64_t M = rows > cols ? rows : cols, n = rows > cols ? cols : rows;
  return M * n + M + 2 * n;
}

// #{eigenvalues < x} of the symmetric tridiagonal with diagonal diag(j) and squared off-diagonal
// sq(j) (between j and j + 1), size `size`: the negative pivots of its LDL^T minus x, a pivot
// smaller than pivmin in magnitude taken as -pivmin (LAPACK's dlaebz).
template <class Diag, class Sq>
C10_HOST_DEVICE inline int64_t sturm_count(int64_t size, const Diag& diag, const Sq& sq, double x,
                                           double pivmin) {
  int64_t count = 0;
  double q = diag(0) - x;
  for (int64_t j = 0;; ++j) {
    if (fabs(q) < pivmin) q = -pivmin;
    count += q < 0;
    if (j + 1 == size) return count;
    q = (diag(j + 1) - x) - sq(j) / q;
  }
}

// sturm_count at three points at once: three independent recurrences in one loop, so that their
// divisions overlap (each count alone is one chain of dependent divisions).
template <class Diag, class Sq>
C10_HOST_DEVICE inline void sturm_counts3(int64_t size, const Diag& diag, const Sq& sq,
                                          const double* x, double pivmin, int64_t* count) {
  double q[3];
  for (int p = 0; p < 3; ++p) {
    q[p] = diag(0) - x[p];
    count[p] = 0;
  }
  for (int64_t j = 0;; ++j) {
    for (int p = 0; p < 3; ++p) {
      if (fabs(q[p]) < pivmin) q[p] = -pivmin;
      count[p] += q[p] < 0;
    }
    if (j + 1 == size) return;
    const double dj = diag(j + 1), sj = sq(j);
    for (int p = 0; p < 3; ++p) q[p] = (dj - x[p]) - sj / q[p];
  }
}

// Householder reflection of the `len` entries v(0), v(1), ... (v(0) the one to keep): returns
// alpha, with (I - tau u u^T) v = (alpha, 0, ..., 0), and leaves u in place of v (u(0) = 1,
// |u(i)| <= 1) and tau in [1, 2] in *tau (0 when v = 0: the identity). As LAPACK's dlarfg, the norm
// is taken at the scale of the largest entry and u is normalised by its first entry, so that
// entries near the underflow threshold (the remainder of a rank-deficient map shrinks by eps at
// every step) neither underflow in squares nor overflow in 1 / norm^2.
template <class Vec>
C10_HOST_DEVICE inline double householder(int64_t len, const Vec& v, double* tau) {
  double amax = 0;
  for (int64_t i = 0; i < len; ++i) amax = max2(amax, fabs(v(i)));
  if (amax == 0) {
    *tau = 0;
    return 0;
  }
  double ss = 0;
  for (int64_t i = 0; i < len; ++i) {
    const double r = v(i) / amax;
    ss += r * r;
  }
  const double norm = amax * sqrt(ss), x0 = v(0);
  const double head = x0 + copysign(norm, x0);  // no cancellation; |head| >= norm >= every |v(i)|
  for (int64_t i = 1; i < len; ++i) v(i) = v(i) / head;
  v(0) = 1;
  *tau = 1 + fabs(x0) / norm;
  return -copysign(norm, x0);
}

// The rank of the rows x cols matrix x[i * s_row + j * s_col] (see the header). W: scratch of
// work_size(rows, cols) doubles, w[k] a double& (dense on the CPU, strided per thread on CUDA).
template <class T, class W>
C10_HOST_DEVICE int64_t matrix_rank(const T* x, int64_t rows, int64_t cols, int64_t s_row,
                                    int64_t s_col, double rtol, const W& w) {
  const bool tall = rows >= cols;
  const int64_t M = tall ? rows : cols, n = tall ? cols : rows;
  if (n == 0) return 0;
  const int64_t sM = tall ? s_row : s_col, sn = tall ? s_col : s_row;
  const int64_t part = M * n, bidiag = M * n + M;  // offsets of the partial sums and of B

  // 1. Copy, scaled by a power of two.
  double peak = 0;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < n; ++j) peak = max2(peak, fabs(static_cast<double>(x[i * sM + j * sn])));
  if (peak == 0) return 0;
  int e;
  frexp(peak, &e);  // peak in [2^(e-1), 2^e)
  const double scale = ldexp(1.0, -e);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < n; ++j) w[i * n + j] = static_cast<double>(x[i * sM + j * sn]) * scale;

  // 2. Bidiagonalise: B's entries go to w[bidiag + 2k] (d_k) and w[bidiag + 2k + 1] (e_k).
  for (int64_t k = 0; k < n; ++k) {
    double c;
    // From the left: column k, rows k..M-1; then the columns right of it.
    const double alpha = householder(M - k, [&](int64_t i) -> double& { return w[(k + i) * n + k]; }, &c);
    if (c != 0 && k + 1 < n) {
      for (int64_t j = k + 1; j < n; ++j) w[part + j] = 0;
      for (int64_t i = k; i < M; ++i) {
        const double u = w[i * n + k];
        for (int64_t j = k + 1; j < n; ++j) w[part + j] += u * w[i * n + j];
      }
      for (int64_t j = k + 1; j < n; ++j) w[part + j] *= c;
      for (int64_t i = k; i < M; ++i) {
        const double u = w[i * n + k];
        for (int64_t j = k + 1; j < n; ++j) w[i * n + j] -= w[part + j] * u;
      }
    }
    w[bidiag + 2 * k] = fabs(alpha);
    if (k + 1 == n) break;
    // From the right: row k, columns k+1..n-1; then the rows below it.
    const double beta = householder(n - k - 1, [&](int64_t j) -> double& { return w[k * n + k + 1 + j]; }, &c);
    if (c != 0 && k + 1 < M) {
      // the dot products of rows i with u, four rows at a time (independent sums in registers;
      // each still adds its terms in column order)
      int64_t i = k + 1;
      for (; i + 4 <= M; i += 4) {
        double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int64_t j = k + 1; j < n; ++j) {
          const double u = w[k * n + j];
          s0 += w[i * n + j] * u;
          s1 += w[(i + 1) * n + j] * u;
          s2 += w[(i + 2) * n + j] * u;
          s3 += w[(i + 3) * n + j] * u;
        }
        w[part + i] = s0;
        w[part + i + 1] = s1;
        w[part + i + 2] = s2;
        w[part + i + 3] = s3;
      }
      for (; i < M; ++i) {
        double s = 0;
        for (int64_t j = k + 1; j < n; ++j) s += w[i * n + j] * w[k * n + j];
        w[part + i] = s;
      }
      for (int64_t i = k + 1; i < M; ++i) {
        const double s = w[part + i] * c;
        for (int64_t j = k + 1; j < n; ++j) w[i * n + j] -= s * w[k * n + j];
      }
    }
    w[bidiag + 2 * k + 1] = fabs(beta);
  }
  const auto sq = [&](int64_t i) { return w[bidiag + i] * w[bidiag + i]; };  // (d_0, e_0, d_1, ...)^2
  double big = 1;
  for (int64_t i = 0; i < 2 * n - 1; ++i) big = max2(big, sq(i));
  const double pivmin = DBL_MIN * big;

  // 3. sigma_max^2, the largest eigenvalue of B^T B.
  const auto t = [&](int64_t j) { return j ? sq(2 * j) + sq(2 * j - 1) : sq(0); };
  const auto s2 = [&](int64_t j) { return sq(2 * j) * sq(2 * j + 1); };  // (d_j e_j)^2
  double lo = 0, hi = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double left = j ? sqrt(s2(j - 1)) : 0, right = j + 1 < n ? sqrt(s2(j)) : 0;
    lo = max2(lo, t(j));
    hi = max2(hi, t(j) + left + right);
  }
  for (int pass = 0; pass < 20 && hi - lo > hi * 1e-10; ++pass) {
    const double q = (hi - lo) * 0.25;
    double x[3] = {lo + q, lo + 2 * q, lo + 3 * q};
    int64_t below[3];
    sturm_counts3(n, t, s2, x, pivmin, below);
    if (below[0] == n) {
      hi = x[0];
    } else if (below[1] == n) {
      lo = x[0];
      hi = x[1];
    } else if (below[2] == n) {
      lo = x[1];
      hi = x[2];
    } else {
      lo = x[2];
    }
  }
  if (hi == 0) return 0;

  // 4. One count on the Golub-Kahan matrix.
  const double tol = rtol * sqrt(hi);
  const int64_t below = sturm_count(2 * n, [](int64_t) { return 0.0; }, sq, tol, pivmin);
  const int64_t r = 2 * n - below;
  return r < 0 ? 0 : (r > n ? n : r);
}

// One (image, channel) map of x [N, C, H, W] (any strides) per row r = image * C + channel.
template <class T>
struct MapRankRow {
  const T* x;
  int64_t C, H, W;
  int64_t s_image, s_channel, s_h, s_w;
  double rtol;
  int64_t* out;

  template <class Work>
  C10_HOST_DEVICE void operator()(int64_t r, const Work& w) const {
    const T* map = x + (r / C) * s_image + (r % C) * s_channel;
    out[r] = matrix_rank(map, H, W, s_h, s_w, rtol, w);
  }
};

}  // namespace rank
}  // namespace chanaxis
