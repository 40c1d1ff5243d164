// Gaussian information measures of a covariance matrix (METHOD.md §3), shared by the CPU and CUDA
// kernels of gaussian_mi_pairs, peer_overlap_mean, pair_target_excess, triplet_target_excess and
// target_excess. Each op is one functor below, called once per output row: by at::parallel_for on
// the CPU and by one CUDA thread per row, so the CPU tests exercise all of the math.
//
// Notation: S covariance, read from its upper triangle only (so (i, j) and (j, i) read the same
// value); rho_ij = S_ij / sqrt(S_ii S_jj), 0 when either variance is 0 (a constant channel), then
// clipped to [-0.999, 0.999]; MI in nats.
//   R_X(i, j)   = -1/2 log(1 - rho_ij^2)            (peer overlap; I(T; Y_i) is the same with j = T)
//   I(T; Y_A)   = 1/2 log( (S_TT + e) det(S_AA + e I) / det(S_{TA,TA} + e I) ),  A = 2 or 3 channels
// with jitter e added to the diagonal of every submatrix, S_TT (a 1x1 determinant) included. The
// three determinants are then minors of the one matrix S + e I, which is positive definite with
// eigenvalues >= e when S is a covariance, so the value is the exact MI of that Gaussian:
// 0 <= I(T; Y_A) <= 1/2 log((S_TT + e) / e), and adding a channel to A never lowers it. It is
// computed as 1/2 log((S_TT + e) / v) with v = det(S_{TA,TA} + e I) / det(S_AA + e I) the conditional
// variance of T given Y_A, clamped to [e, S_TT + e] (bounds that hold in exact arithmetic; the
// clamp only absorbs rounding). When det(S_AA + e I) <= 0 the channel set is singular below the
// jitter's resolution (variances beyond ~1e6 for e = 1e-10, or a matrix that is not positive
// semi-definite) and the set is given I = 0. Every result is therefore finite, never NaN.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace chanaxis {
namespace gaussian {

constexpr double kRhoClip = 0.999;  // METHOD.md §3: every correlation is clipped before a log

// Symmetric matrix of float64 with any strides; (i, j) reads the upper triangle.
struct SymView {
  const double* p;
  int64_t s0, s1;
  C10_HOST_DEVICE double operator()(int64_t i, int64_t j) const {
    return i <= j ? p[i * s0 + j * s1] : p[j * s0 + i * s1];
  }
};

// Correlation of a covariance entry, 0 when a variance is 0, clipped to [-kRhoClip, kRhoClip].
C10_HOST_DEVICE inline double clipped_correlation(double sij, double sii, double sjj) {
  if (!(sii > 0.0) || !(sjj > 0.0)) return 0.0;
  const double r = sij / (::sqrt(sii) * ::sqrt(sjj));
  return r > kRhoClip ? kRhoClip : (r < -kRhoClip ? -kRhoClip : r);
}

// -1/2 log(1 - rho^2) of a clipped correlation: at most 3.107 nats.
C10_HOST_DEVICE inline double mi_of_correlation(double rho) { return -0.5 * ::log1p(-rho * rho); }

// Pairwise Gaussian MI of entries (i, j) of S: R_X(i, j) between channels, I(T; Y_i) with j = T.
C10_HOST_DEVICE inline double pair_mi(const SymView& S, int64_t i, int64_t j) {
  return mi_of_correlation(clipped_correlation(S(i, j), S(i, i), S(j, j)));
}

// Closed-form determinants of 1x1 .. 4x4 matrices (here always symmetric submatrices).
C10_HOST_DEVICE inline double det(const double (&m)[1][1]) { return m[0][0]; }

C10_HOST_DEVICE inline double det(const double (&m)[2][2]) {
  return m[0][0] * m[1][1] - m[0][1] * m[1][0];
}

C10_HOST_DEVICE inline double det(const double (&m)[3][3]) {
  return m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) -
         m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0]) +
         m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
}

// Laplace expansion along the first two rows: 2x2 minors of rows 0-1 times the complementary
// minors of rows 2-3.
C10_HOST_DEVICE inline double det(const double (&m)[4][4]) {
  const double s0 = m[0][0] * m[1][1] - m[1][0] * m[0][1];
  const double s1 = m[0][0] * m[1][2] - m[1][0] * m[0][2];
  const double s2 = m[0][0] * m[1][3] - m[1][0] * m[0][3];
  const double s3 = m[0][1] * m[1][2] - m[1][1] * m[0][2];
  const double s4 = m[0][1] * m[1][3] - m[1][1] * m[0][3];
  const double s5 = m[0][2] * m[1][3] - m[1][2] * m[0][3];
  const double c5 = m[2][2] * m[3][3] - m[3][2] * m[2][3];
  const double c4 = m[2][1] * m[3][3] - m[3][1] * m[2][3];
  const double c3 = m[2][1] * m[3][2] - m[3][1] * m[2][2];
  const double c2 = m[2][0] * m[3][3] - m[3][0] * m[2][3];
  const double c1 = m[2][0] * m[3][2] - m[3][0] * m[2][2];
  const double c0 = m[2][0] * m[3][1] - m[3][0] * m[2][1];
  return s0 * c5 - s1 * c4 + s2 * c3 + s3 * c2 - s4 * c1 + s5 * c0;
}

// 1/2 log(var_t / v), v = det_ta / det_a clamped to [jitter, var_t]; var_t = S_TT + jitter.
C10_HOST_DEVICE inline double mi_from_determinants(double var_t, double det_a, double det_ta,
                                                   double jitter) {
  if (!(det_a > 0.0)) return 0.0;
  double v = det_ta / det_a;
  if (!(v >= jitter)) v = jitter;  // NaN included
  if (v > var_t) v = var_t;
  return 0.5 * ::log(var_t / v);
}

// I(T; Y_ch[0..N)) with jitter on every diagonal entry (see the header comment). T is ordered last.
template <int N>
C10_HOST_DEVICE inline double target_mi(const SymView& S, int64_t t, const int64_t (&ch)[N],
                                        double jitter) {
  double a[N][N];
  double ta[N + 1][N + 1];
  for (int r = 0; r < N; ++r) {
    for (int c = 0; c < N; ++c) {
      a[r][c] = S(ch[r], ch[c]) + (r == c ? jitter : 0.0);
      ta[r][c] = a[r][c];
    }
    ta[r][N] = ta[N][r] = S(ch[r], t);
  }
  ta[N][N] = S(t, t) + jitter;
  return mi_from_determinants(ta[N][N], det(a), det(ta), jitter);
}

C10_HOST_DEVICE inline void sort2(int64_t& a, int64_t& b) {
  if (b < a) {
    const int64_t x = a;
    a = b;
    b = x;
  }
}

// S2(i, j) = max(0, I(T; Y_i, Y_j) - max(I(T; Y_i), I(T; Y_j))), T = index t (the last of cov_t).
// The channels are sorted first, so every order of (i, j) gives the same bits.
C10_HOST_DEVICE inline double pair_excess(const SymView& S, int64_t t, int64_t i, int64_t j,
                                          double jitter) {
  sort2(i, j);
  const int64_t ch[2] = {i, j};
  const double single_i = pair_mi(S, i, t);
  const double single_j = pair_mi(S, j, t);
  const double excess = target_mi<2>(S, t, ch, jitter) - (single_i > single_j ? single_i : single_j);
  return excess > 0.0 ? excess : 0.0;
}

// S3(i, j, k) = I(T; Y_i, Y_j, Y_k) - max of I(T; pair) over its three pairs, not floored: it is
// >= 0 in exact arithmetic (one jittered matrix), so a negative value is rounding and is kept to
// leave means unbiased. Channels are sorted first, so every order gives the same bits.
C10_HOST_DEVICE inline double triplet_excess(const SymView& S, int64_t t, int64_t i, int64_t j,
                                             int64_t k, double jitter) {
  sort2(i, j);
  sort2(j, k);
  sort2(i, j);
  const int64_t ijk[3] = {i, j, k};
  const int64_t ij[2] = {i, j}, ik[2] = {i, k}, jk[2] = {j, k};
  double best = target_mi<2>(S, t, ij, jitter);
  const double mik = target_mi<2>(S, t, ik, jitter);
  const double mjk = target_mi<2>(S, t, jk, jitter);
  best = mik > best ? mik : best;
  best = mjk > best ? mjk : best;
  return target_mi<3>(S, t, ijk, jitter) - best;
}

// Bounded selection: keys[0..n) is sorted descending and holds at most cap entries; insert (key, id)
// if it ranks among them. Equal keys keep their insertion order, so scanning ids in increasing
// order breaks ties towards the lower id. ids may be null. Returns the new n.
C10_HOST_DEVICE inline int64_t insert_descending(double* keys, int64_t* ids, int64_t n, int64_t cap,
                                                 double key, int64_t id) {
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
  SymView S;
  const int64_t* pairs;  // [P, 2] contiguous
  double* out;
  C10_HOST_DEVICE void operator()(int64_t p) const {
    int64_t i = pairs[2 * p], j = pairs[2 * p + 1];
    sort2(i, j);
    out[p] = pair_mi(S, i, j);
  }
};

// out[i] = mean over j != i of R_X(i, j), summed in increasing j; 0 for a single channel.
struct PeerOverlapMeanRow {
  SymView S;
  int64_t C;
  double* out;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    double sum = 0.0;
    for (int64_t j = 0; j < C; ++j)
      if (j != i) sum += pair_mi(S, i, j);
    out[i] = C > 1 ? sum / static_cast<double>(C - 1) : 0.0;
  }
};

// out[p] = S2(pairs[p, 0], pairs[p, 1]).
struct PairExcessRow {
  SymView S;
  int64_t t;  // index of the target = C
  const int64_t* pairs;
  double jitter;
  double* out;
  C10_HOST_DEVICE void operator()(int64_t p) const {
    out[p] = pair_excess(S, t, pairs[2 * p], pairs[2 * p + 1], jitter);
  }
};

// out[p] = S3(triplets[p, 0], triplets[p, 1], triplets[p, 2]).
struct TripletExcessRow {
  SymView S;
  int64_t t;
  const int64_t* triplets;  // [P, 3] contiguous
  double jitter;
  double* out;
  C10_HOST_DEVICE void operator()(int64_t p) const {
    out[p] = triplet_excess(S, t, triplets[3 * p], triplets[3 * p + 1], triplets[3 * p + 2], jitter);
  }
};

// TE(i): the K channels j != i of highest R_X(i, j) (ties: lower j) become partners[i, :] in that
// order (-1 after the last when C - 1 < K); te[i] is the mean of the `top` largest S2(i, j) over
// them, 0 without partners. Scratch: partner_keys [C, K], best [C, top_cap], top_cap = min(top, K).
struct TargetExcessRow {
  SymView S;
  int64_t C, K, top_cap;
  double jitter;
  double* partner_keys;
  double* best;
  int64_t* partners;  // [C, K]
  double* te;         // [C]
  C10_HOST_DEVICE void operator()(int64_t i) const {
    double* keys = partner_keys + i * K;
    int64_t* ids = partners + i * K;
    int64_t m = 0;
    for (int64_t j = 0; j < C; ++j)
      if (j != i) m = insert_descending(keys, ids, m, K, pair_mi(S, i, j), j);
    for (int64_t q = m; q < K; ++q) ids[q] = -1;
    double* b = best + i * top_cap;
    int64_t nb = 0;
    for (int64_t q = 0; q < m; ++q)
      nb = insert_descending(b, nullptr, nb, top_cap, pair_excess(S, C, i, ids[q], jitter), 0);
    double sum = 0.0;
    for (int64_t q = 0; q < nb; ++q) sum += b[q];
    te[i] = nb > 0 ? sum / static_cast<double>(nb) : 0.0;
  }
};

}  // namespace gaussian
}  // namespace chanaxis
