// explained_variance on the CPU.
// PyTorch (row b, S = the entries of peers[b] that are not -1, t = targets[b]):
//   out[b] = (P[t, S] @ torch.linalg.solve(P[S][:, S] + ridge * I, P[S, t])).clamp(0, 1)
// Algorithm: at::parallel_for over rows; each row is one small Cholesky factorisation of A_SS in
// row order with the target's entries computed alongside (common/hull.h explained_variance_row),
// O(K^3) per row; peers that are linear combinations of earlier ones (residual <= 1e-12) add 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../peer_hulls.h"

namespace chanaxis {
namespace {

at::Tensor explained_variance_cpu(const at::Tensor& corr, const at::Tensor& targets,
                                  const at::Tensor& peers, double ridge) {
  const ExplainedVariancePlan plan = plan_explained_variance(corr, targets, peers, ridge);
  at::Tensor out = at::empty({plan.B}, plan.P.options());
  const double* P = plan.P.const_data_ptr<double>();
  const int64_t* t = plan.targets.const_data_ptr<int64_t>();
  const int64_t* p = plan.peers.const_data_ptr<int64_t>();
  double* o = out.data_ptr<double>();
  const int64_t K = plan.K;
  at::parallel_for(0, plan.B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<double> L(K * K + K);
    std::vector<int64_t> kept(K);
    for (int64_t b = b0; b < b1; ++b)
      o[b] = hull::explained_variance_row(P, plan.C, plan.ridge, t[b], p + b * K, K, L.data(),
                                          L.data() + K * K, kept.data());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) {
  m.impl("explained_variance", &explained_variance_cpu);
}

}  // namespace chanaxis
