// Host side of peer_hulls and explained_variance shared by the CPU and CUDA kernels (see peer_hulls.h).
#include "peer_hulls.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "macros.h"

namespace chanaxis {

namespace {

constexpr const char* kHullsOp = "peer_hulls";
constexpr const char* kEvOp = "explained_variance";
// |P_ij - P_ji| and |P_ii - 1| allowed in an input correlation matrix: float32 correlations
// computed with different summation orders differ by about 1e-6.
constexpr double kCorrTol = 1e-5;

void check_ridge(double ridge, const char* op) {
  CHANAXIS_CHECK(std::isfinite(ridge) && ridge >= 0.0, op,
                 "ridge must be a finite number >= 0, got ", ridge);
}

// (P + P^T) / 2 of a contiguous float64 P [C, C] and the facts the checks need. (a + b) * 0.5 is
// exactly symmetric, so the kernels may read either triangle; both versions compute the same bits.
struct CorrFacts {
  at::Tensor symmetric;
  bool finite;
  double asymmetry;  // max |P_ij - P_ji|
  double diagonal;   // max |P_ii - 1|
};

// CPU: one pass over pairs of tiles (i-block, j-block) and their mirrors, so that the transposed
// reads stay in cache.
CorrFacts symmetrise_cpu(const at::Tensor& P) {
  constexpr int64_t kTile = 64;
  const int64_t C = P.size(0);
  at::Tensor out = at::empty_like(P);
  const double* p = P.const_data_ptr<double>();
  double* o = out.data_ptr<double>();
  double asymmetry = 0.0, diagonal = 0.0, finite = 0.0;  // finite stays 0 unless a value is NaN/Inf
  for (int64_t i0 = 0; i0 < C; i0 += kTile) {
    for (int64_t j0 = i0; j0 < C; j0 += kTile) {
      for (int64_t i = i0; i < std::min(C, i0 + kTile); ++i) {
        for (int64_t j = std::max(j0, i); j < std::min(C, j0 + kTile); ++j) {
          const double a = p[i * C + j], b = p[j * C + i];
          finite += (a - a) + (b - b);  // NaN for NaN or +-Inf
          const double d = std::abs(a - b);
          asymmetry = d > asymmetry ? d : asymmetry;
          o[i * C + j] = o[j * C + i] = (a + b) * 0.5;
        }
      }
    }
    for (int64_t i = i0; i < std::min(C, i0 + kTile); ++i) {
      const double d = std::abs(p[i * C + i] - 1.0);
      diagonal = d > diagonal ? d : diagonal;
    }
  }
  return {out, finite == 0.0, asymmetry, diagonal};
}

CorrFacts symmetrise_device(const at::Tensor& P) {
  const at::Tensor Pt = P.t().contiguous();
  at::Tensor symmetric = P.add(Pt).mul_(0.5);
  // One transfer for the three facts (a NaN/Inf in P makes its symmetric part non-finite).
  const at::Tensor facts = at::stack({at::isfinite(symmetric).all().to(at::kDouble),
                                      P.sub(Pt).abs_().max(), (P.diagonal() - 1.0).abs().max()})
                               .cpu();
  const double* f = facts.const_data_ptr<double>();
  return {symmetric, f[0] == 1.0, f[1], f[2]};
}

// The checked correlation matrix as float64, symmetrised ((P + P^T) / 2 is exactly symmetric, so
// the kernels may read either triangle) and contiguous.
at::Tensor checked_correlation(const at::Tensor& corr, const char* op, const std::string& name) {
  CHANAXIS_CHECK(corr.dim() == 2, op, name, " must be 2-D [C, C], got ", corr.dim(),
                 "-D with shape ", corr.sizes());
  CHANAXIS_CHECK(corr.size(0) == corr.size(1), op, name, " must be square [C, C], got shape ",
                 corr.sizes());
  CHANAXIS_CHECK(corr.size(0) > 0, op, name, " has no channels (shape ", corr.sizes(), ")");
  CHANAXIS_CHECK(corr.scalar_type() == at::kFloat || corr.scalar_type() == at::kDouble, op, name,
                 " must be float32 or float64, got ", corr.scalar_type());
  const at::Tensor P = corr.to(at::kDouble).contiguous();
  const CorrFacts f = P.is_cpu() ? symmetrise_cpu(P) : symmetrise_device(P);
  CHANAXIS_CHECK(f.finite, op, name, " has NaN/Inf values");
  CHANAXIS_CHECK(f.asymmetry <= kCorrTol, op, name, " must be symmetric, but |", name, " - ", name,
                 ".T| reaches ", f.asymmetry, " (tolerance ", kCorrTol, ")");
  CHANAXIS_CHECK(f.diagonal <= kCorrTol, op, name,
                 " must be a correlation matrix with a unit diagonal, but |diagonal - 1| reaches ",
                 f.diagonal, " (tolerance ", kCorrTol, ")");
  return f.symmetric;
}

// E_full(i) = A_ii - 1 / (A^-1)_ii for every channel of one layer, from one Cholesky factorisation
// of A = P + ridge I (the Schur complement of A_{-i,-i}), clipped to [0, 1]; values below
// kReachTol are rounding noise and become 0. A single channel has no peers: E_full = 0.
at::Tensor full_explained_variance(const at::Tensor& P, double ridge, const std::string& name) {
  if (P.size(0) == 1) return at::zeros({1}, P.options());
  at::Tensor A = P.clone();
  A.diagonal().add_(ridge);
  const auto factor = at::linalg_cholesky_ex(A);
  const int64_t minor = std::get<1>(factor).item<int64_t>();
  CHANAXIS_CHECK(minor == 0, kHullsOp, name, " + ridge * I is not positive definite (its leading minor of order ",
                 minor, " is not), so E_full is undefined: ",
                 ridge == 0.0 ? "with ridge = 0 collinear channels (duplicates, or fewer samples "
                                "than channels) make it singular; pass ridge > 0"
                              : "it is not a valid correlation matrix (not positive semi-definite)");
  const at::Tensor inverse_diagonal = at::cholesky_inverse(std::get<0>(factor)).diagonal();
  const at::Tensor e = A.diagonal().sub(inverse_diagonal.reciprocal()).clamp_(0.0, 1.0);
  return e.masked_fill(e < hull::kReachTol, 0.0);
}

}  // namespace

HullsPlan plan_peer_hulls(at::TensorList corr, int64_t max_size, double eps, double ridge) {
  CHANAXIS_CHECK(!corr.empty(), kHullsOp, "corr must hold at least one matrix, got an empty list");
  CHANAXIS_CHECK(max_size >= 1, kHullsOp, "max_size must be >= 1, got ", max_size);
  CHANAXIS_CHECK(eps >= 0.0 && eps < 1.0, kHullsOp, "eps must be in [0, 1), got ", eps);
  check_ridge(ridge, kHullsOp);

  HullsPlan plan;
  plan.num_layers = static_cast<int64_t>(corr.size());
  plan.max_size = max_size;
  plan.eps = eps;
  plan.ridge = ridge;
  const c10::Device device = corr[0].device();
  at::Tensor layers = at::empty({plan.num_layers, 3}, at::kLong);
  int64_t* row = layers.data_ptr<int64_t>();
  std::vector<at::Tensor> mats, e_full;
  int64_t offset = 0;
  for (int64_t l = 0; l < plan.num_layers; ++l) {
    const std::string name = "corr[" + std::to_string(l) + "]";
    CHANAXIS_CHECK_SAME_DEVICE(corr[l], corr[0], kHullsOp, name, "corr[0]");
    const at::Tensor P = checked_correlation(corr[l], kHullsOp, name);
    const int64_t C = P.size(0);
    e_full.push_back(full_explained_variance(P, ridge, name));
    mats.push_back(P.view({-1}));
    row[3 * l] = offset;
    row[3 * l + 1] = plan.total;
    row[3 * l + 2] = C;
    offset += C * C;
    plan.total += C;
    plan.max_C = std::max(plan.max_C, C);
  }
  plan.max_steps = std::min(max_size, plan.max_C - 1);
  // No hull holds more than max_C - 1 peers: the outputs are that wide (at least 1), so a huge
  // max_size allocates nothing huge; max_size itself still decides saturation.
  plan.width = std::max<int64_t>(1, plan.max_steps);
  plan.P_all = at::cat(mats);
  plan.layers = layers.to(device);
  plan.e_full = at::cat(e_full);
  return plan;
}

HullsOutputs make_hulls_outputs(const HullsPlan& plan) {
  const auto f64 = plan.e_full.options();
  return {plan.e_full,
          at::zeros({plan.total}, f64.dtype(at::kLong)),
          at::full({plan.total, plan.width}, -1, f64.dtype(at::kLong)),
          at::full({plan.total, plan.width}, std::numeric_limits<double>::quiet_NaN(), f64),
          at::zeros({plan.total}, f64.dtype(at::kBool))};
}

ExplainedVariancePlan plan_explained_variance(const at::Tensor& corr, const at::Tensor& targets,
                                              const at::Tensor& peers, double ridge) {
  check_ridge(ridge, kEvOp);
  CHANAXIS_CHECK_DTYPE(targets, at::kLong, kEvOp, "targets");
  CHANAXIS_CHECK_DTYPE(peers, at::kLong, kEvOp, "peers");
  CHANAXIS_CHECK_SAME_DEVICE(targets, corr, kEvOp, "targets", "corr");
  CHANAXIS_CHECK_SAME_DEVICE(peers, corr, kEvOp, "peers", "corr");
  CHANAXIS_CHECK(targets.dim() == 1, kEvOp, "targets must be 1-D [B], got shape ", targets.sizes());
  const int64_t B = targets.size(0);
  CHANAXIS_CHECK(peers.dim() == 2 && peers.size(0) == B, kEvOp, "peers must be [B, K] = [", B,
                 ", K], one row per target, got shape ", peers.sizes());

  ExplainedVariancePlan plan;
  plan.P = checked_correlation(corr, kEvOp, "corr");
  plan.C = plan.P.size(0);
  plan.B = B;
  plan.K = peers.size(1);
  plan.ridge = ridge;
  plan.targets = targets.contiguous();
  plan.peers = peers.contiguous();
  if (B == 0) return plan;

  const auto t_range = at::aminmax(plan.targets);
  const int64_t t_lo = std::get<0>(t_range).item<int64_t>();
  const int64_t t_hi = std::get<1>(t_range).item<int64_t>();
  CHANAXIS_CHECK(t_lo >= 0 && t_hi < plan.C, kEvOp, "targets must be channel indices in [0, ",
                 plan.C, "), got values in [", t_lo, ", ", t_hi, "]");
  if (plan.K == 0) return plan;
  const auto p_range = at::aminmax(plan.peers);
  const int64_t p_lo = std::get<0>(p_range).item<int64_t>();
  const int64_t p_hi = std::get<1>(p_range).item<int64_t>();
  CHANAXIS_CHECK(p_lo >= -1 && p_hi < plan.C, kEvOp, "peers must be channel indices in [0, ",
                 plan.C, ") or -1 (padding), got values in [", p_lo, ", ", p_hi, "]");

  const at::Tensor own = plan.peers.eq(plan.targets.unsqueeze(1)).any(1);
  if (own.any().item<bool>()) {
    const int64_t r = own.nonzero().select(1, 0)[0].item<int64_t>();
    CHANAXIS_CHECK(false, kEvOp, "peers row ", r, " contains its own target ",
                   plan.targets[r].item<int64_t>(), "; a channel cannot be its own peer");
  }
  const at::Tensor sorted = std::get<0>(at::sort(plan.peers, 1));
  const at::Tensor next = sorted.narrow(1, 1, plan.K - 1);
  const at::Tensor repeated = next.eq(sorted.narrow(1, 0, plan.K - 1)).logical_and_(next.ge(0));
  if (repeated.any().item<bool>()) {
    const at::Tensor where = repeated.nonzero()[0].cpu();
    const int64_t r = where[0].item<int64_t>();
    CHANAXIS_CHECK(false, kEvOp, "peers row ", r, " repeats peer ",
                   next[r][where[1].item<int64_t>()].item<int64_t>(),
                   "; each peer may appear once per row");
  }
  return plan;
}

}  // namespace chanaxis
