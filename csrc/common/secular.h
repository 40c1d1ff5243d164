// Rank-one changes of a spectrum by the secular equation, shared by the CPU and CUDA kernels of
// chip_drops (one call per equation: at::parallel_for on the CPU, one CUDA thread per equation),
// so the CPU tests exercise all of the math.
//
// The problem. D = diag(d), 0 <= d_0 <= ... <= d_{m-1}, is the spectrum of a Gram matrix (the
// squared singular values of a matrix A), and A loses one row. The new squared singular values
// are the nonzero eigenvalues of either
//   downdate:   D - z z^T                  (z = V^T a_c, the lost row in the eigenbasis V), or
//   projection: P D P, P = I - u u^T       (u = row c of the eigenvectors U of A A^T, |u| = 1),
// and both are the roots mu of the secular equation
//   h(mu) = sum_j w_j / (d_j - mu) - rho = 0,   w_j = z_j^2, rho = 1 (downdate)
//                                                w_j = u_j^2, rho = 0 (projection; plus mu = 0),
// h increasing between its poles. By Cauchy interlacing there is exactly one root in each interval
// (d_{k-1}, d_k) and, for the downdate, one in (d_0 - sum w, d_0]; the projection's k = 0 slot is
// its root mu = 0. We return the drop sum_k sqrt(d_k) - sum_k sqrt(mu_k) (the drop of the
// nuclear norm) as the sum over k of sqrt(d_k) - sqrt(mu_k) = (d_k - mu_k) / (sqrt(d_k) +
// sqrt(mu_k)): every term is >= 0 and d_k - mu_k is computed directly, so nothing cancels.
//
// Deflation (before solving), each step bounded by eps * sqrt(d_max) in the result, the accuracy
// of an SVD of A itself:
// - a pole whose component is negligible is dropped (it stays an eigenvalue, its term is 0):
//   removing z_j changes the row by |z_j| and the nuclear norm of A_c by at most that, so the
//   downdate drops |z_j| <= eps sqrt(d_max); the projection drops sqrt(d_j) |u_j| <= eps
//   sqrt(d_max) when also u_j^2 <= eps (renormalising u then moves the rest by u_j^2 / 2);
// - poles with sqrt(d_j) within eps sqrt(d_max) of a kept pole (repeated eigenvalues, the zero
//   eigenvalues of a rank-deficient A) are merged into it with the sum of their weights: a
//   rotation in that eigenspace moves all of the weight to one pole and leaves the others as
//   exact eigenvalues.
// After deflation the poles are strictly increasing and every weight is positive.
//
// Root finding (one interval), after LAPACK's dlaed4: the root is computed as tau = mu - d_o
// relative to the nearer end pole o of its interval (the sign of h at the midpoint tells which),
// so that every d_j - mu is (d_j - d_o) - tau without cancellation. Each step fits
// A + B / (d_{k-1} - mu) + C / (d_k - mu) to the value, slope and curvature of h at the iterate
// and takes the root of that model in the interval (Gragg's scheme; cubic convergence, about 3.5
// evaluations of h per root on random spectra where dlaed4's quadratic "middle way" takes 4.3).
// The k = 0 root of the downdate has one end pole and takes the one-pole step of that model
// (quadratic). The root stays bracketed; a step that leaves the bracket is a bisection.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "scratch.h"

namespace chanaxis {
namespace secular {

constexpr double kEps = 2.220446049250313e-16;  // 2^-52
constexpr int kMaxIterations = 64;
// A step this small relative to tau ends the iteration without another evaluation of h: what
// remains after it is about the cube (square, for the one-pole step) of it, far below rounding.
constexpr double kSettledCubic = 1e-5;
constexpr double kSettledQuadratic = 1e-8;

// The deflated poles and weights of one equation live in scratch.h's DenseVec / StridedVec.
using chanaxis::DenseVec;
using chanaxis::StridedVec;

enum class Form : int { projection = 0, downdate = 1 };

// h and its derivatives at tau (relative to origin), sum over the poles of w_j / delta_j^p,
// delta_j = (d_j - origin) - tau. Nearly all of the op's time goes here, in one division per pole:
// on the CPU the loop is vectorised (its partial sums then depend on the vector width, so results
// may differ between CPUs in the last bits).
struct Sums {
  double h1;    // sum w / delta
  double size;  // sum |w / delta|, the scale of h's rounding error
  double h2;    // sum w / delta^2 = h'
  double h3;    // sum w / delta^3 = h'' / 2
};

#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define CHANAXIS_SIMD_REDUCTION _Pragma("omp simd reduction(+ : s1, sa, s2, s3)")
#else
#define CHANAXIS_SIMD_REDUCTION
#endif
template <class Vec>
C10_HOST_DEVICE inline Sums pole_sums(const Vec& d, const Vec& w, int64_t n, double origin,
                                      double tau) {
  double s1 = 0.0, sa = 0.0, s2 = 0.0, s3 = 0.0;
  CHANAXIS_SIMD_REDUCTION
  for (int64_t j = 0; j < n; ++j) {
    const double r = 1.0 / ((d[j] - origin) - tau), q = w[j] * r, q2 = q * r;
    s1 += q;
    sa += ::fabs(q);
    s2 += q2;
    s3 += q2 * r;
  }
  return {s1, sa, s2, s3};
}
#undef CHANAXIS_SIMD_REDUCTION

// How interval_root evaluates the pole sums: this portable loop everywhere; the CPU kernel passes
// its own for AVX-512 CPUs (a reciprocal estimate refined by Newton steps instead of a division).
struct PortablePoleSums {
  template <class Vec>
  C10_HOST_DEVICE static Sums eval(const Vec& d, const Vec& w, int64_t n, double origin,
                                   double tau) {
    return pole_sums(d, w, n, origin, tau);
  }
};

// The root of interval k and its distance to the interval's upper pole d_k (>= 0, accurate).
struct Root {
  double mu;
  double gap;
};

// The root of h in (d_{k-1}, d_k), or in (d_0 - weight_sum / rho, d_0) for k = 0 (rho > 0), for
// n strictly increasing poles with positive weights summing to weight_sum.
template <class PoleSums, class Vec>
C10_HOST_DEVICE inline Root interval_root(const Vec& d, const Vec& w, int64_t n, double rho,
                                          double weight_sum, int64_t k) {
  int64_t o;         // the origin pole
  double a, b, tau;  // the root lies in (a, b] relative to d_o; tau is the current iterate
  Sums f;
  if (k == 0) {
    // h(d_0 - W / rho) <= sum w_j / W - rho = 0: the bracket's lower end is not above the root.
    o = 0, a = -weight_sum / rho, b = 0.0, tau = a;
    f = PoleSums::eval(d, w, n, d[0], tau);
  } else {
    const double half = 0.5 * (d[k] - d[k - 1]);
    f = PoleSums::eval(d, w, n, d[k - 1], half);
    if (f.h1 - rho >= 0.0)
      o = k - 1, a = 0.0, b = half, tau = half;
    else  // the midpoint is d_k - half (up to rounding, which the bracket absorbs)
      o = k, a = -half, b = 0.0, tau = -half;
  }
  const double origin = d[o];
  for (int it = 0; it < kMaxIterations; ++it) {
    const double h = f.h1 - rho;
    if (::fabs(h) <= 8.0 * kEps * (f.size + rho)) break;  // at the rounding error of h's sum
    if (h < 0.0) a = tau; else b = tau;
    const double db = (d[k] - origin) - tau;  // > 0
    double step, settled_below;
    if (k == 0) {
      // h ~ Q + P / (db - s), matching value and slope.
      const double P = f.h2 * db * db, Q = h - f.h2 * db;
      step = Q < 0.0 ? db + P / Q : NAN;
      settled_below = kSettledQuadratic;
    } else {
      // h ~ A + B / (da - s) + C / (db - s), matching h, h' and h'' = 2 h3 (B, C >= 0 since every
      // pole below is at least |da| away, every pole above at least db). Times (da - s)(db - s):
      // A s^2 - (A (da + db) + B + C) s + da db h = 0, one root in (da, db).
      const double da = (d[k - 1] - origin) - tau;  // < 0
      const double inv_width = 1.0 / (db - da);
      const double Ba = da * da * (f.h3 * db - f.h2) * inv_width;  // B / da
      const double Cb = db * db * (f.h2 - f.h3 * da) * inv_width;  // C / db
      const double B = Ba * da, C = Cb * db, A = h - Ba - Cb;
      const double lin = -(A * (da + db) + B + C), c0 = da * db * h;
      const double disc = lin * lin - 4.0 * A * c0;
      const double t = -0.5 * (lin + ::copysign(::sqrt(disc > 0.0 ? disc : 0.0), lin));
      const double r1 = c0 / t, r2 = t / A;  // the two roots, each without cancellation
      step = (r1 > da && r1 < db) ? r1 : r2;
      settled_below = kSettledCubic;
    }
    double next = tau + step;
    bool settled = ::fabs(step) <= settled_below * ::fabs(next);
    if (!(next > a && next < b)) next = 0.5 * (a + b), settled = false;  // NaN steps included
    if (!(next > a && next < b)) break;  // the bracket is down to adjacent doubles
    tau = next;
    if (settled) break;
    f = PoleSums::eval(d, w, n, origin, tau);
  }
  const double gap = o == k ? -tau : (d[k] - d[k - 1]) - tau;
  return {origin + tau, gap};
}

// sum_j sqrt(d_j) - sum_k sqrt(mu_k) for d [m] ascending and >= 0 and the component vector
// (z for the downdate, u for the projection) whose j-th entry is v[order[j]] (d's sort order, so
// that the basis needs no reordered copy). ad, aw: scratch for m deflated poles and weights.
template <class PoleSums, class Vec>
C10_HOST_DEVICE inline double sqrt_spectrum_drop(const double* d, const double* v,
                                                 const int64_t* order, int64_t m, Form form,
                                                 const Vec& ad, const Vec& aw) {
  const double tol = kEps * ::sqrt(d[m - 1]);
  const bool downdate = form == Form::downdate;
  int64_t n = 0;
  double weight_sum = 0.0, kept_root = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    const double vj = v[order[j]], wj = vj * vj, root = ::sqrt(d[j]);
    const double z = downdate ? ::fabs(vj) : root * ::fabs(vj);
    if (z <= tol && (downdate || wj <= kEps)) continue;
    weight_sum += wj;
    if (n > 0 && root - kept_root <= tol) {
      aw[n - 1] += wj;
      continue;
    }
    ad[n] = d[j], aw[n] = wj, kept_root = root;
    ++n;
  }
  if (n == 0) return 0.0;
  const double rho = downdate ? 1.0 : 0.0;
  double drop = 0.0;
  int64_t k = 0;
  if (!downdate) drop = ::sqrt(ad[0]), k = 1;  // the projection's root mu = 0
  for (; k < n; ++k) {
    const Root r = interval_root<PoleSums>(ad, aw, n, rho, weight_sum, k);
    const double s = ::sqrt(ad[k]);
    drop += r.mu > 0.0 ? r.gap / (s + ::sqrt(r.mu)) : s;
  }
  return drop;
}

// chip_drops, one (image, channel) per call: out[i, c] = scale[i] * the drop of image i's
// spectrum d[i] when channel c's row is removed, clipped to [0, |row c|] (the nuclear norm moves
// by at most the norm of what is removed), so a zero row drops exactly 0.
struct ChipDropRow {
  const double* d;         // [N, m], ascending per image
  const int64_t* order;    // [N, m]: the basis column of each entry of d
  const double* basis;     // [N, C, m]: u (projection) or z (downdate) of each channel
  const double* row_norm;  // [N, C]
  const double* scale;     // [N]
  int64_t C, m;
  Form form;
  double* out;  // [N, C]
  template <class Vec, class PoleSums = PortablePoleSums>
  C10_HOST_DEVICE void operator()(int64_t r, const Vec& ad, const Vec& aw) const {
    const double bound = row_norm[r];
    double drop = 0.0;
    if (bound > 0.0) {
      const int64_t i = r / C;
      drop = sqrt_spectrum_drop<PoleSums>(d + i * m, basis + r * m, order + i * m, m, form, ad, aw);
      drop = drop < bound ? drop : bound;
    }
    out[r] = scale[r / C] * drop;
  }
};

}  // namespace secular
}  // namespace chanaxis
