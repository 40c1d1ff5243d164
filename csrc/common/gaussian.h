// Gaussian information measures of a covariance matrix (METHOD.md §3), shared by the CPU and CUDA
// kernels of gaussian_mi_pairs, peer_overlap_mean, pair_target_excess, triplet_target_excess and
// target_excess. Each op is one functor below, called once per output row: by at::parallel_for on
// the CPU and by one CUDA thread per row, so the CPU tests exercise all of the math.
//
// Notation: S covariance, read from its upper triangle only (so (i, j) and (j, i) read the same
// value); in cov_t the target T is the last index. rho_ij = S_ij / sqrt(S_ii S_jj), 0 when either
// variance is 0 (a constant channel), clipped to [-0.999, 0.999]; MI in nats.
//   R_X(i, j)   = -1/2 log(1 - rho_ij^2)            (peer overlap; I(T; Y_i) is the same with j = T)
//   I(T; Y_A)   = 1/2 log( (S_TT + e) det(S_AA + e I) / det(S_{TA,TA} + e I) ),  A = 2 or 3 channels
// with jitter e added to the diagonal of every submatrix, S_TT (a 1x1 determinant) included. The
// three determinants are then minors of the one matrix S + e I, which is positive definite with
// eigenvalues >= e when S is a covariance, so the value is the exact MI of that Gaussian:
// 0 <= I(T; Y_A) <= 1/2 log((S_TT + e) / e), and adding a channel to A never lowers it. It is
// 1/2 log((S_TT + e) / v) with v = det(S_{TA,TA} + e I) / det(S_AA + e I) the conditional variance
// of T given Y_A, clamped to [e, S_TT + e] (bounds that hold in exact arithmetic; the clamp only
// absorbs rounding). When det(S_AA + e I) <= 0 the channel set is singular below the jitter's
// resolution (variances beyond ~1e6 for e = 1e-10, or a matrix that is not positive
// semi-definite) and v = S_TT + e, i.e. I = 0. Every result is therefore finite, never NaN.
//
// Speed: the kernels work with rho^2 and conditional variances and take one log per output
// (S2 = 1/2 log((S_TT + e)(1 - rho_best^2) / v_ij), S3 = 1/2 log(min pair v / v_ijk)); the
// float64 references in chanaxis_fast/reference.py write the same quantities as differences of
// MIs, and agree to rounding. The diagonal, the inverse variances and the target column are
// passed as contiguous vectors, so a pair reads one entry of the matrix itself.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "fp.h"

namespace chanaxis {
namespace gaussian {

constexpr double kRhoClip = 0.999;  // METHOD.md §3: every correlation is clipped before a log
constexpr double kRho2Clip = kRhoClip * kRhoClip;

// A checked covariance [n, n] of float64 with any strides, and three contiguous vectors of it.
struct CovView {
  const double* p;
  int64_t n, s0, s1;
  const double* var;      // [n] S_ii
  const double* inv_var;  // [n] 1 / S_ii, or 0 for a constant channel
  const double* last;     // [n] S_{i, n-1}: the target column of cov_t
  // Entry (i, j), read from the upper triangle.
  C10_HOST_DEVICE double operator()(int64_t i, int64_t j) const {
    return i <= j ? p[i * s0 + j * s1] : p[j * s0 + i * s1];
  }
};

// rho^2 = (s / S_ii)(s / S_jj) for the covariance s of i and j, clipped to 0.999^2 (the square of
// the clipped |rho|); 0 when a variance is 0. Written as two ratios so that no product of entries
// overflows; a NaN from a matrix that is not positive semi-definite is clipped like +inf.
C10_HOST_DEVICE inline double clipped_rho2(double s, double inv_var_i, double inv_var_j) {
  const double r2 = (s * inv_var_i) * (s * inv_var_j);
  return r2 < kRho2Clip ? r2 : kRho2Clip;
}

C10_HOST_DEVICE inline double rho2(const CovView& S, int64_t i, int64_t j) {
  return clipped_rho2(S(i, j), S.inv_var[i], S.inv_var[j]);
}

// rho_{i,T}^2 with the target T = index n - 1.
C10_HOST_DEVICE inline double target_rho2(const CovView& S, int64_t i) {
  return clipped_rho2(S.last[i], S.inv_var[i], S.inv_var[S.n - 1]);
}

// Pairwise Gaussian MI -1/2 log(1 - rho_ij^2): R_X(i, j) between channels; at most 3.107 nats.
C10_HOST_DEVICE inline double pair_mi(const CovView& S, int64_t i, int64_t j) {
  return -0.5 * ::log1p(-rho2(S, i, j));
}

// Closed-form determinants of symmetric 2x2, 3x3 and 4x4 matrices, given their upper triangles
// a_rc (r <= c). Scalars rather than arrays keep every entry in a register. Every product and sum
// is one correctly rounded operation of common/fp.h, never an FMA: near-collinear covariances
// (jitter 1e-10) make these determinants cancel heavily, so a contracted evaluation on one
// device and an uncontracted one on the other would differ far beyond an ulp.
C10_HOST_DEVICE inline double det2(double a00, double a01, double a11) {
  return fp::minor2(a00, a11, a01, a01);
}

C10_HOST_DEVICE inline double det3(double a00, double a01, double a02, double a11, double a12,
                                   double a22) {
  using fp::add_rn;
  using fp::minor2;
  using fp::mul_rn;
  using fp::sub_rn;
  return add_rn(sub_rn(mul_rn(a00, minor2(a11, a22, a12, a12)),
                       mul_rn(a01, minor2(a01, a22, a12, a02))),
                mul_rn(a02, minor2(a01, a12, a11, a02)));
}

// Laplace expansion along the first two rows: the 2x2 minors s of rows 0-1 times the
// complementary minors c of rows 2-3.
C10_HOST_DEVICE inline double det4(double a00, double a01, double a02, double a03, double a11,
                                   double a12, double a13, double a22, double a23, double a33) {
  using fp::add_rn;
  using fp::minor2;
  using fp::mul_rn;
  using fp::sub_rn;
  const double s0 = minor2(a00, a11, a01, a01);
  const double s1 = minor2(a00, a12, a01, a02);
  const double s2 = minor2(a00, a13, a01, a03);
  const double s3 = minor2(a01, a12, a11, a02);
  const double s4 = minor2(a01, a13, a11, a03);
  const double s5 = minor2(a02, a13, a12, a03);
  const double c5 = minor2(a22, a33, a23, a23);
  const double c4 = minor2(a12, a33, a13, a23);
  const double c3 = minor2(a12, a23, a13, a22);
  const double c2 = minor2(a02, a33, a03, a23);
  const double c1 = minor2(a02, a23, a03, a22);
  const double c0 = minor2(a02, a13, a03, a12);
  // ((((s0 c5 - s1 c4) + s2 c3) + s3 c2) - s4 c1) + s5 c0, left to right as written before.
  double d = sub_rn(mul_rn(s0, c5), mul_rn(s1, c4));
  d = add_rn(d, mul_rn(s2, c3));
  d = add_rn(d, mul_rn(s3, c2));
  d = sub_rn(d, mul_rn(s4, c1));
  return add_rn(d, mul_rn(s5, c0));
}

// Var(T | Y_A) of the jittered matrix: det_ta / det_a clamped to [jitter, var_t], and var_t (no
// information) when det_a <= 0; var_t = S_TT + jitter.
C10_HOST_DEVICE inline double conditional_variance(double var_t, double det_a, double det_ta,
                                                   double jitter) {
  if (!(det_a > 0.0)) return var_t;
  double v = fp::div_rn(det_ta, det_a);
  if (!(v >= jitter)) v = jitter;  // NaN included
  return v < var_t ? v : var_t;
}

// Var(T | Y_i, Y_j) and Var(T | Y_i, Y_j, Y_k) from the jittered variances a_* = S_** + jitter,
// the covariances s_** between the channels and t_* with T, and var_t = S_TT + jitter (T ordered
// last in the determinants).
C10_HOST_DEVICE inline double conditional_variance2(double ai, double aj, double sij, double ti,
                                                    double tj, double var_t, double jitter) {
  return conditional_variance(var_t, det2(ai, sij, aj), det3(ai, sij, ti, aj, tj, var_t), jitter);
}

C10_HOST_DEVICE inline double conditional_variance3(double ai, double aj, double ak, double sij,
                                                    double sik, double sjk, double ti, double tj,
                                                    double tk, double var_t, double jitter) {
  return conditional_variance(var_t, det3(ai, sij, sik, aj, sjk, ak),
                              det4(ai, sij, sik, ti, aj, sjk, tj, ak, tk, var_t), jitter);
}

// Orders two indices; selects rather than branches (the order of a pair is unpredictable).
C10_HOST_DEVICE inline void sort2(int64_t& a, int64_t& b) {
  const int64_t lo = b < a ? b : a;
  b = b < a ? a : b;
  a = lo;
}

// S2(i, j) = max(0, I(T; Y_i, Y_j) - max(I(T; Y_i), I(T; Y_j))):
// 1/2 log(var_t / v_ij) - (-1/2 log(1 - rho_best^2)) in one log. The channels are sorted first,
// so every order of (i, j) gives the same bits.
C10_HOST_DEVICE inline double pair_excess(const CovView& S, int64_t i, int64_t j, double jitter) {
  sort2(i, j);
  const double var_t = S.var[S.n - 1] + jitter;
  const double v = conditional_variance2(S.var[i] + jitter, S.var[j] + jitter, S(i, j), S.last[i],
                                         S.last[j], var_t, jitter);
  const double ri = target_rho2(S, i), rj = target_rho2(S, j);
  const double ratio = var_t * (1.0 - (ri > rj ? ri : rj)) / v;
  return 0.5 * ::log(ratio > 1.0 ? ratio : 1.0);  // the floor at 0, without a branch
}

// S3(i, j, k) = I(T; Y_i, Y_j, Y_k) - max of I(T; pair) over its three pairs
// = 1/2 log(min pair v / v_ijk). Not floored: it is >= 0 in exact arithmetic (one jittered
// matrix), so a negative value is rounding and is kept to leave means unbiased. Channels are
// sorted first, so every order gives the same bits.
C10_HOST_DEVICE inline double triplet_excess(const CovView& S, int64_t i, int64_t j, int64_t k,
                                             double jitter) {
  sort2(i, j);
  sort2(j, k);
  sort2(i, j);
  const double var_t = S.var[S.n - 1] + jitter;
  const double ai = S.var[i] + jitter, aj = S.var[j] + jitter, ak = S.var[k] + jitter;
  const double sij = S(i, j), sik = S(i, k), sjk = S(j, k);
  const double ti = S.last[i], tj = S.last[j], tk = S.last[k];
  double best = conditional_variance2(ai, aj, sij, ti, tj, var_t, jitter);
  const double vik = conditional_variance2(ai, ak, sik, ti, tk, var_t, jitter);
  const double vjk = conditional_variance2(aj, ak, sjk, tj, tk, var_t, jitter);
  best = vik < best ? vik : best;
  best = vjk < best ? vjk : best;
  const double v = conditional_variance3(ai, aj, ak, sij, sik, sjk, ti, tj, tk, var_t, jitter);
  return 0.5 * ::log(best / v);
}

// Bounded selection: keys[0..n) is sorted descending and holds at most cap entries; inserts (key, id)
// if it ranks among them and returns the new n. Ids must be offered in increasing order: a new
// entry then goes after every kept entry of equal key, so ties keep the lower id. ids may be null.
C10_HOST_DEVICE inline int64_t offer(double* keys, int64_t* ids, int64_t n, int64_t cap, double key,
                                     int64_t id) {
  if (n == cap && !(key > keys[n - 1])) return n;
  int64_t pos = n < cap ? n : cap - 1;
  while (pos > 0 && key > keys[pos - 1]) {
    keys[pos] = keys[pos - 1];
    if (ids) ids[pos] = ids[pos - 1];
    --pos;
  }
  keys[pos] = key;
  if (ids) ids[pos] = id;
  return n < cap ? n + 1 : n;
}

// ---------------------------------------------------------------------------------------------
// One functor per op; operator()(r) computes output row r.

// out[p] = R_X(pairs[p, 0], pairs[p, 1]).
struct MiPairsRow {
  CovView S;
  const int64_t* pairs;  // [P, 2] contiguous
  double* out;
  C10_HOST_DEVICE void operator()(int64_t p) const {
    int64_t i = pairs[2 * p], j = pairs[2 * p + 1];
    sort2(i, j);
    out[p] = pair_mi(S, i, j);
  }
};

// out[i] = mean over j != i of R_X(i, j); 0 for a single channel (C = S.n). The sum of
// -1/2 log(1 - rho^2) is taken as -1/2 log of products of kProductBlock factors: one log per block
// instead of per pair, and each factor is >= 1 - 0.999^2, so a block's product stays above 1e-173
// (no underflow). The peers are split into kStrands interleaved strands (j = l, l + 32, ...), each
// with its own log-sum, combined by a pairwise tree (strand l += strand l + d for d = 16, 8, 4, 2,
// 1): the CPU runs the strands one after the other, the GPU one warp per channel with one strand
// per lane and the tree as shuffles, so both add the same numbers in the same order.
struct PeerOverlapMeanRow {
  static constexpr int kProductBlock = 64;
  static constexpr int kStrands = 32;
  CovView S;
  double* out;
  C10_HOST_DEVICE double strand(int64_t i, int lane) const {
    double log_sum = 0.0, product = 1.0;
    int in_block = 0;
    for (int64_t j = lane; j < S.n; j += kStrands) {
      if (j == i) continue;
      product *= 1.0 - rho2(S, i, j);
      if (++in_block == kProductBlock) {
        log_sum += ::log(product);
        product = 1.0;
        in_block = 0;
      }
    }
    return log_sum + ::log(product);
  }
  C10_HOST_DEVICE double finish(double log_sum) const {
    return S.n > 1 ? -0.5 * log_sum / static_cast<double>(S.n - 1) : 0.0;
  }
  C10_HOST_DEVICE void operator()(int64_t i) const {
    double part[kStrands];
    for (int l = 0; l < kStrands; ++l) part[l] = strand(i, l);
    for (int d = kStrands / 2; d > 0; d /= 2)
      for (int l = 0; l < d; ++l) part[l] += part[l + d];
    out[i] = finish(part[0]);
  }
};

// out[p] = S2(pairs[p, 0], pairs[p, 1]).
struct PairExcessRow {
  CovView S;
  const int64_t* pairs;  // [P, 2] contiguous
  double jitter;
  double* out;
  C10_HOST_DEVICE void operator()(int64_t p) const {
    out[p] = pair_excess(S, pairs[2 * p], pairs[2 * p + 1], jitter);
  }
};

// out[p] = S3(triplets[p, 0], triplets[p, 1], triplets[p, 2]).
struct TripletExcessRow {
  CovView S;
  const int64_t* triplets;  // [P, 3] contiguous
  double jitter;
  double* out;
  C10_HOST_DEVICE void operator()(int64_t p) const {
    out[p] = triplet_excess(S, triplets[3 * p], triplets[3 * p + 1], triplets[3 * p + 2], jitter);
  }
};

// TE(i) for the C = S.n - 1 channels of cov_t: the K channels j != i of highest R_X(i, j) (ties:
// lower j) become partners[i, :] in that order (-1 after the last when C - 1 < K); they are
// ranked by the clipped rho_ij^2, which R_X increases with, so no log is taken. te[i] is the mean
// of the `top` largest S2(i, j) over them, 0 without partners.
// Scratch: partner_keys [C, K], best [C, top_cap], top_cap = min(top, K).
struct TargetExcessRow {
  CovView S;
  int64_t K, top_cap;
  double jitter;
  double* partner_keys;
  double* best;
  int64_t* partners;  // [C, K]
  double* te;         // [C]
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t C = S.n - 1;
    double* keys = partner_keys + i * K;
    int64_t* ids = partners + i * K;
    int64_t m = 0;
    for (int64_t j = 0; j < C; ++j)
      if (j != i) m = offer(keys, ids, m, K, rho2(S, i, j), j);
    for (int64_t q = m; q < K; ++q) ids[q] = -1;
    double* b = best + i * top_cap;
    int64_t nb = 0;
    for (int64_t q = 0; q < m; ++q)
      nb = offer(b, nullptr, nb, top_cap, pair_excess(S, i, ids[q], jitter), q);
    double sum = 0.0;
    for (int64_t q = 0; q < nb; ++q) sum += b[q];
    te[i] = nb > 0 ? sum / static_cast<double>(nb) : 0.0;
  }
};

}  // namespace gaussian
}  // namespace chanaxis
