// Host/device math of peer_hulls and explained_variance, shared by the CPU and CUDA kernels.
//
// Notation (METHOD.md §3): P is a correlation matrix [C, C], A = P + ridge * I, and for a target
// channel i and a set S of its peers  E_i(S) = A_iS A_SS^-1 A_Si  (A_iS = P_iS since i is not in S).
//
// Both ops run the same Gram-Schmidt (left-looking Cholesky) on A restricted to the peers, in the
// order they are taken. With u_0..u_{k-1} the columns of that factor for the peers s_0..s_{k-1},
//   c_j = A_ij - sum_l u_l[i] u_l[j]     (partial covariance of the target and peer j given S)
//   v_j = A_jj - sum_l u_l[j]^2          (residual variance of peer j given S)
//   gain_j = c_j^2 / v_j = E_i(S + j) - E_i(S),   E_i(S) = sum of the gains of its steps,
//   u_k[j] = (A_{j s_k} - sum_{l<k} u_l[j] u_l[s_k]) / sqrt(v_{s_k}).
// Adding a peer costs O(C k) per target and never solves a system.
//
// Determinism: every operation goes through the *_rn helpers of common/fp.h, which on the device
// are the correctly rounded intrinsics (nvcc would otherwise contract a * b + c into an FMA) and on
// the host plain IEEE operations compiled with -ffp-contract=off. Each value is computed by one
// thread in a fixed order, so the CPU and CUDA kernels produce the same bits from the same inputs. The tie rule (kTieRelTol) is there for
// the float64 reference, which computes the same quantities in another order, and as a margin
// should a host compiler contract after all.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "fp.h"

namespace chanaxis {
namespace hull {

// Gains within this relative distance of the largest gain are ties; a tie goes to the lowest
// channel index. "Lowest index among the gains >= max * (1 - tol)" does not depend on the order
// in which candidates are visited, so serial and parallel reductions agree.
constexpr double kTieRelTol = 1e-12;
// A peer whose residual variance given the selected peers is <= this is (numerically) a linear
// combination of them: its gain is 0 and it is never selected. With ridge > 0 every residual
// variance is >= ridge, so this only matters for ridge (almost) 0 and collinear channels.
constexpr double kMinResidual = 1e-12;
// E_full below this is rounding noise of the Schur complement (a constant channel gives about
// 1e-16) and is reported as 0; a hull is complete when E >= (1 - eps) E_full - kReachTol, which
// lets eps = 0 finish when E reaches E_full up to rounding.
constexpr double kReachTol = 1e-12;

using fp::add_rn;
using fp::div_rn;
using fp::mul_rn;
using fp::sqrt_rn;
using fp::sub_rn;

C10_HOST_DEVICE inline double clip01(double x) { return x < 0.0 ? 0.0 : (x > 1.0 ? 1.0 : x); }

// A_jk of a row-major, exactly symmetric P [C, C] (row k is read, contiguous in j).
C10_HOST_DEVICE inline double a_entry(const double* P, int64_t C, double ridge, int64_t j,
                                      int64_t k) {
  const double p = P[k * C + j];
  return j == k ? add_rn(p, ridge) : p;
}

C10_HOST_DEVICE inline double residual_gain(double c, double v) {
  return v > kMinResidual ? div_rn(mul_rn(c, c), v) : 0.0;
}

// Whether `gain` ties the largest gain `best` (best > 0).
C10_HOST_DEVICE inline bool ties_best(double gain, double best) {
  return gain > 0.0 && gain >= sub_rn(best, mul_rn(best, kTieRelTol));
}

// Where target t of a batch of layers lives. layers is [L, 3] int64, row l = (offset of the
// layer's matrix in the packed buffer, offset of its first channel in the outputs, C_l).
struct HullTarget {
  const double* P;  // the layer's P [C, C]
  int64_t C;
  int64_t i;  // the target's channel within its layer
};

C10_HOST_DEVICE inline HullTarget locate_target(const double* P_all, const int64_t* layers,
                                                int64_t num_layers, int64_t t) {
  int64_t lo = 0, hi = num_layers - 1;  // the last layer whose first channel is <= t
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (layers[mid * 3 + 1] <= t) lo = mid; else hi = mid - 1;
  }
  return {P_all + layers[lo * 3], layers[lo * 3 + 2], t - layers[lo * 3 + 1]};
}

// Scratch of one target: u [max_steps, C], then c [C], v [C] and the gains g [C].
C10_HOST_DEVICE inline int64_t scratch_doubles(int64_t max_steps, int64_t C) {
  return (max_steps + 3) * C;
}

// Scratch of one explained_variance row: L [K, K], lt [K] (float64) and kept [K] (int64).
C10_HOST_DEVICE inline int64_t explained_variance_slot_bytes(int64_t K) {
  return (K * K + 2 * K) * static_cast<int64_t>(sizeof(double));
}

// How many scratch slots of slot_bytes a launch over `rows` independent rows gets: one per row,
// at most max_slots, within budget_bytes, and at least one (a single slot larger than the budget
// is what one row needs, on the CPU as well).
C10_HOST_DEVICE inline int64_t scratch_slots(int64_t rows, int64_t slot_bytes, int64_t budget_bytes,
                                             int64_t max_slots) {
  const int64_t fit = slot_bytes > 0 ? budget_bytes / slot_bytes : max_slots;
  int64_t n = rows < max_slots ? rows : max_slots;
  n = n < fit ? n : fit;
  return n > 1 ? n : 1;
}

// Start of target i, entry j: nothing selected, c_j = A_ij, v_j = A_jj; v_i = 0 keeps i out.
C10_HOST_DEVICE inline void hull_init(const HullTarget& T, double ridge, int64_t j, double* c,
                                      double* v) {
  c[j] = j == T.i ? 0.0 : T.P[T.i * T.C + j];
  v[j] = j == T.i ? 0.0 : a_entry(T.P, T.C, ridge, j, j);
}

// Entry j of the new column u_k for the selected peer s, in three phases so that the CPU can
// sweep whole rows of u (vectorised) while a GPU thread loops over l for its entries; both apply
// the same operations to every entry in the same order:
//   r = column_start(s, j); r = column_step(r, u_l[j], u_l[s]) for l = 0..k-1;
//   u_k[j] = column_finish(r, 1 / sqrt(v_s)).
C10_HOST_DEVICE inline double column_start(const HullTarget& T, double ridge, int64_t s,
                                           int64_t j) {
  return a_entry(T.P, T.C, ridge, j, s);
}
C10_HOST_DEVICE inline double column_step(double r, double u_lj, double u_ls) {
  return sub_rn(r, mul_rn(u_lj, u_ls));
}
C10_HOST_DEVICE inline double column_finish(double r, double inv_root_v) {
  return mul_rn(r, inv_root_v);
}
C10_HOST_DEVICE inline double inverse_root(double v) { return div_rn(1.0, sqrt_rn(v)); }

C10_HOST_DEVICE inline double hull_column_entry(const HullTarget& T, double ridge, const double* u,
                                                int64_t k, int64_t s, int64_t j,
                                                double inv_root_v) {
  double r = column_start(T, ridge, s, j);
  for (int64_t l = 0; l < k; ++l) r = column_step(r, u[l * T.C + j], u[l * T.C + s]);
  return column_finish(r, inv_root_v);
}

// Entry j of c and v once u_k (uk) is complete. The selected peer s, like the target and the
// peers selected before, is held at v = 0 so that it is never a candidate again.
C10_HOST_DEVICE inline void hull_downdate(const HullTarget& T, const double* uk, int64_t s,
                                          int64_t j, double* c, double* v) {
  c[j] = sub_rn(c[j], mul_rn(uk[T.i], uk[j]));
  v[j] = (j == s || !(v[j] > 0.0)) ? 0.0 : sub_rn(v[j], mul_rn(uk[j], uk[j]));
}

// Scalar state of one target's selection, updated identically by every thread that holds it.
struct HullState {
  double E = 0.0;  // E_i(S), the sum of the gains (not clipped)
  int64_t size = 0;
  bool saturated = false;

  // Whether to add another peer; marks the hull saturated when it is full below the threshold.
  C10_HOST_DEVICE bool wants_more(double e_full, double eps, int64_t max_size) {
    if (E >= sub_rn(mul_rn(sub_rn(1.0, eps), e_full), kReachTol)) return false;
    if (size == max_size) {
      saturated = true;
      return false;
    }
    return true;
  }

  // Records the step; returns E_i(S) clipped to [0, 1], the value reported for the step.
  C10_HOST_DEVICE double add(double gain) {
    E = add_rn(E, gain);
    ++size;
    return clip01(E);
  }
};

// E_t(peers) for one row of peer indices (entries < 0 are padding and skipped): the same
// factorisation in row order, the target's partial covariances computed alongside. A peer whose
// residual variance given the kept earlier peers is <= kMinResidual adds nothing and is dropped,
// as the greedy hull would never select it. Scratch: L [K, K] (row n = factor entries of the
// n-th kept peer, diagonal = 1 / sqrt of its residual variance), lt [K] (the target's entries),
// kept [K]. For the first k members of a hull this repeats the hull's arithmetic operation for
// operation, so the result equals its hull_ev[k - 1] exactly.
C10_HOST_DEVICE inline double explained_variance_row(const double* P, int64_t C, double ridge,
                                                     int64_t t, const int64_t* peers, int64_t K,
                                                     double* L, double* lt, int64_t* kept) {
  int64_t n = 0;
  double E = 0.0;
  for (int64_t a = 0; a < K; ++a) {
    const int64_t p = peers[a];
    if (p < 0) continue;
    double* row = L + n * K;
    for (int64_t m = 0; m < n; ++m) {
      double r = a_entry(P, C, ridge, p, kept[m]);
      for (int64_t l = 0; l < m; ++l) r = column_step(r, row[l], L[m * K + l]);
      row[m] = column_finish(r, L[m * K + m]);
    }
    double v = a_entry(P, C, ridge, p, p);
    double c = P[t * C + p];
    for (int64_t l = 0; l < n; ++l) {
      v = sub_rn(v, mul_rn(row[l], row[l]));
      c = sub_rn(c, mul_rn(lt[l], row[l]));
    }
    if (!(v > kMinResidual)) continue;
    E = add_rn(E, residual_gain(c, v));
    row[n] = inverse_root(v);
    lt[n] = column_finish(c, row[n]);
    kept[n] = p;
    ++n;
  }
  return clip01(E);
}

}  // namespace hull
}  // namespace chanaxis
