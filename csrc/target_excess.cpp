// Host side of the Gaussian-MI ops: argument checks shared by the CPU and CUDA kernels.
#include "target_excess.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "macros.h"

namespace chanaxis {

at::Tensor checked_covariance(const at::Tensor& cov, const char* op, const char* name,
                              int64_t min_size, const char* what) {
  CHANAXIS_CHECK(cov.dim() == 2, op, name, " must be a 2-D matrix ", what, ", got ", cov.dim(),
                 "-D with shape ", cov.sizes());
  CHANAXIS_CHECK(cov.size(0) == cov.size(1), op, name, " must be square ", what, ", got shape ",
                 cov.sizes());
  CHANAXIS_CHECK(cov.size(0) >= min_size, op, name, " must be ", what, ", got shape ",
                 cov.sizes());
  CHANAXIS_CHECK_FLOATING(cov, op, name);
  at::Tensor S = cov.to(at::kDouble);
  if (S.numel() == 0) return S;
  CHANAXIS_CHECK(at::isfinite(S).all().item<bool>(), op, name, " has NaN/Inf values");
  const double largest = S.abs().max().item<double>();
  const double asym = (S - S.t()).abs().max().item<double>();
  CHANAXIS_CHECK(asym <= 1e-6 * largest, op, name, " must be symmetric, got |", name, " - ", name,
                 "^T| up to ", asym, " (largest entry ", largest, ")");
  const at::Tensor diag = S.diagonal();
  const double lowest = diag.min().item<double>();
  if (lowest < 0.0) {
    const int64_t at_index = diag.argmin().item<int64_t>();
    CHANAXIS_CHECK(false, op, name, " has a negative variance on its diagonal (index ", at_index,
                   ": ", lowest, ")");
  }
  return S;
}

gaussian::SymView sym_view(const at::Tensor& cov64) {
  return {cov64.const_data_ptr<double>(), cov64.stride(0), cov64.stride(1)};
}

at::Tensor checked_index_rows(const at::Tensor& idx, int64_t width, int64_t C, const at::Tensor& cov,
                              const char* op, const char* name, bool target_last) {
  CHANAXIS_CHECK_DTYPE(idx, at::kLong, op, name);
  CHANAXIS_CHECK_SAME_DEVICE(idx, cov, op, name, target_last ? "cov_t" : "cov");
  CHANAXIS_CHECK(idx.dim() == 2 && idx.size(1) == width, op, name, " must be [P, ", width,
                 "], got shape ", idx.sizes());
  at::Tensor rows = idx.contiguous();
  if (rows.size(0) == 0) return rows;
  const auto range = at::aminmax(rows);
  const int64_t lo = std::get<0>(range).item<int64_t>();
  const int64_t hi = std::get<1>(range).item<int64_t>();
  CHANAXIS_CHECK(lo >= 0 && hi < C, op, name, " must index channels 0..", C - 1, " (C = ", C, ")",
                 target_last ? "; index C is the target (last row/column of cov_t), not a channel"
                             : "",
                 ", got values in [", lo, ", ", hi, "]");
  at::Tensor repeated = rows.select(1, 0) == rows.select(1, 1);
  for (int64_t a = 0; a < width; ++a)
    for (int64_t b = a + 1; b < width; ++b)
      if (a > 0 || b > 1) repeated = repeated.logical_or_(rows.select(1, a) == rows.select(1, b));
  if (repeated.any().item<bool>()) {
    const int64_t p = repeated.nonzero().select(1, 0)[0].item<int64_t>();
    const at::Tensor row = rows[p].cpu();
    std::string values;
    for (int64_t a = 0; a < width; ++a)
      values += (a ? ", " : "") + std::to_string(row[a].item<int64_t>());
    CHANAXIS_CHECK(false, op, name, "[", p, "] = (", values,
                   ") repeats a channel; the channels of a row must differ");
  }
  return rows;
}

void check_jitter(double jitter, const char* op) {
  CHANAXIS_CHECK(std::isfinite(jitter) && jitter > 0.0, op,
                 "jitter must be a finite value > 0 (it keeps the determinants of collinear "
                 "channels positive), got ", jitter);
}

void check_at_least_one(int64_t value, const char* op, const char* name) {
  CHANAXIS_CHECK(value >= 1, op, name, " must be >= 1, got ", value);
}

}  // namespace chanaxis
