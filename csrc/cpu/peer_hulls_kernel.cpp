// peer_hulls on the CPU.
// PyTorch (one target i, one step): j* = argmax_{j not in S + {i}} E_i(S + {j}) with
//   E_i(S) = P[i, S] @ torch.linalg.solve(P[S][:, S] + ridge * I, P[S, i]); stop at
//   E_i(S) >= (1 - eps) * E_full(i) or |S| = max_size.
// Algorithm: E_full of every channel from one Cholesky factorisation per layer (peer_hulls.cpp);
// then every channel of every layer is an independent greedy selection (at::parallel_for over
// channels, one scratch buffer per task) that keeps the partial covariances c, v of all
// candidates and adds one Cholesky column u per step (common/hull.h): O(C k) per step, no solve.
// Ties (gains within 1e-12 relative of the best) go to the lowest channel index.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../peer_hulls.h"

namespace chanaxis {
namespace {

void peer_hulls_target(const hull::HullTarget& T, double e_full, const HullsPlan& plan,
                       double* scratch, int64_t* members, double* ev, int64_t& hull_size,
                       bool& saturated) {
  const int64_t C = T.C;
  double* u = scratch;
  double* c = u + plan.max_steps * C;
  double* v = c + C;
  double* g = v + C;
  for (int64_t j = 0; j < C; ++j) hull::hull_init(T, plan.ridge, j, c, v);
  hull::HullState st;
  while (st.wants_more(e_full, plan.eps, plan.max_size)) {
    double best = 0.0;
    for (int64_t j = 0; j < C; ++j) {
      g[j] = hull::residual_gain(c[j], v[j]);
      best = g[j] > best ? g[j] : best;
    }
    if (!(best > 0.0)) break;  // no candidate left, or none adds anything
    int64_t s = 0;
    while (!hull::ties_best(g[s], best)) ++s;
    const double inv_root_v = hull::inverse_root(v[s]);
    // The new column row by row of u (vectorisable), each entry in hull_column_entry's order.
    const int64_t k = st.size;
    double* uk = u + k * C;
    for (int64_t j = 0; j < C; ++j) uk[j] = hull::column_start(T, plan.ridge, s, j);
    for (int64_t l = 0; l < k; ++l) {
      const double* ul = u + l * C;
      const double uls = ul[s];
      for (int64_t j = 0; j < C; ++j) uk[j] = hull::column_step(uk[j], ul[j], uls);
    }
    for (int64_t j = 0; j < C; ++j) uk[j] = hull::column_finish(uk[j], inv_root_v);
    for (int64_t j = 0; j < C; ++j) hull::hull_downdate(T, uk, s, j, c, v);
    members[k] = s;
    ev[k] = st.add(g[s]);
  }
  hull_size = st.size;
  saturated = st.saturated;
}

HullsOutputs peer_hulls_cpu(at::TensorList corr, int64_t max_size, double eps, double ridge) {
  const HullsPlan plan = plan_peer_hulls(corr, max_size, eps, ridge);
  HullsOutputs out = make_hulls_outputs(plan);
  const double* P_all = plan.P_all.const_data_ptr<double>();
  const int64_t* layers = plan.layers.const_data_ptr<int64_t>();
  const double* e_full = plan.e_full.const_data_ptr<double>();
  int64_t* hull_size = std::get<1>(out).data_ptr<int64_t>();
  int64_t* members = std::get<2>(out).data_ptr<int64_t>();
  double* ev = std::get<3>(out).data_ptr<double>();
  bool* saturated = std::get<4>(out).data_ptr<bool>();
  at::parallel_for(0, plan.total, 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> scratch(hull::scratch_doubles(plan.max_steps, plan.max_C));
    for (int64_t t = t0; t < t1; ++t) {
      const hull::HullTarget T = hull::locate_target(P_all, layers, plan.num_layers, t);
      peer_hulls_target(T, e_full[t], plan, scratch.data(), members + t * plan.width,
                        ev + t * plan.width, hull_size[t], saturated[t]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) {
  m.impl("peer_hulls", &peer_hulls_cpu);
}

}  // namespace chanaxis
