// Host side of the Gaussian-MI ops: argument checks shared by the CPU and CUDA kernels. The values
// they need are gathered in one pass on the CPU (separate ATen reductions would cost more than the
// ops themselves) and with ATen reductions on the GPU; the messages are shared.
#include "target_excess.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "macros.h"

namespace chanaxis {
namespace {

struct CovSummary {
  bool finite = true;
  double largest = 0.0;    // max S_ii, the scale of the symmetry tolerance
  double asymmetry = 0.0;  // max |S_ij - S_ji|
  double lowest = std::numeric_limits<double>::infinity();  // min S_ii
  int64_t lowest_at = -1;
};

// Two passes over the upper triangle of an n x n row-major matrix (leading dimension ld), tile by
// tile, the transposed tile S_ji first copied into a local buffer so that both operands are read
// along rows. The fast pass only counts the entries that fail !(|S_ij - S_ji| <= tol): one
// comparison catches asymmetry and NaN/Inf alike (NaN compares false, Inf - x is Inf or NaN), and
// the loop vectorises. Only when it finds some does the exact pass compute what the error
// messages report.
constexpr int64_t kTile = 32;

template <class Visit>
void for_each_upper_tile_entry(const double* p, int64_t n, int64_t ld, int64_t i0, const Visit& visit) {
  double t[kTile * kTile];
  const int64_t i1 = std::min(i0 + kTile, n);
  for (int64_t j0 = i0; j0 < n; j0 += kTile) {
    const int64_t w = std::min(j0 + kTile, n) - j0;
    for (int64_t j = j0; j < j0 + w; ++j)  // t[i - i0][j - j0] = S_ji
      for (int64_t i = i0; i < i1; ++i) t[(i - i0) * kTile + (j - j0)] = p[j * ld + i];
    for (int64_t i = i0; i < i1; ++i) visit(p + i * ld + j0, t + (i - i0) * kTile, w);
  }
}

int64_t count_failures(const double* p, int64_t n, int64_t ld, double tol) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  std::vector<int64_t> bad(tiles, 0);
  at::parallel_for(0, tiles, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t count = 0;
      for_each_upper_tile_entry(p, n, ld, r * kTile, [&](const double* a, const double* b, int64_t w) {
        for (int64_t k = 0; k < w; ++k) count += !(std::fabs(a[k] - b[k]) <= tol);
      });
      bad[r] = count;
    }
  });
  int64_t total = 0;
  for (int64_t b : bad) total += b;
  return total;
}

CovSummary summarize_cpu(const at::Tensor& S_any) {
  const at::Tensor S = S_any.stride(1) == 1 ? S_any : S_any.contiguous();
  const double* p = S.const_data_ptr<double>();
  const int64_t n = S.size(0), ld = S.stride(0);
  CovSummary s;
  for (int64_t i = 0; i < n; ++i) {
    const double d = p[i * (ld + 1)];
    if (d < s.lowest) s.lowest = d, s.lowest_at = i;
    s.largest = std::max(s.largest, d);
  }
  if (count_failures(p, n, ld, 1e-6 * s.largest) == 0) return s;  // finite and symmetric
  double nonfinite = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    for_each_upper_tile_entry(p, n, ld, i0, [&](const double* a, const double* b, int64_t w) {
      for (int64_t k = 0; k < w; ++k) {
        nonfinite += (a[k] - a[k]) + (b[k] - b[k]);  // 0 for finite values, NaN otherwise
        s.asymmetry = std::max(s.asymmetry, std::fabs(a[k] - b[k]));
      }
    });
  }
  s.finite = nonfinite == 0.0;
  return s;
}

CovSummary summarize_aten(const at::Tensor& S) {
  CovSummary s;
  if (!at::isfinite(S).all().item<bool>()) return {false};
  s.largest = S.diagonal().max().item<double>();
  s.asymmetry = (S - S.t()).abs().max().item<double>();
  const at::Tensor diag = S.diagonal();
  s.lowest = diag.min().item<double>();
  s.lowest_at = diag.argmin().item<int64_t>();
  return s;
}

struct IndexSummary {
  int64_t lo, hi;
  int64_t first_repeat;  // first row that repeats a channel, or -1
};

IndexSummary summarize_rows_cpu(const at::Tensor& rows) {
  constexpr int64_t kChunk = 4096;
  const int64_t* p = rows.const_data_ptr<int64_t>();
  const int64_t P = rows.size(0), w = rows.size(1);
  std::vector<IndexSummary> chunks((P + kChunk - 1) / kChunk, IndexSummary{p[0], p[0], -1});
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      IndexSummary& s = chunks[c];
      for (int64_t r = c * kChunk; r < std::min(P, (c + 1) * kChunk); ++r) {
        const int64_t* row = p + r * w;
        for (int64_t a = 0; a < w; ++a) {
          s.lo = std::min(s.lo, row[a]);
          s.hi = std::max(s.hi, row[a]);
          for (int64_t b = a + 1; b < w && s.first_repeat < 0; ++b)
            if (row[a] == row[b]) s.first_repeat = r;
        }
      }
    }
  });
  IndexSummary s = chunks[0];
  for (const IndexSummary& c : chunks) {
    s.lo = std::min(s.lo, c.lo);
    s.hi = std::max(s.hi, c.hi);
    if (s.first_repeat < 0) s.first_repeat = c.first_repeat;
  }
  return s;
}

IndexSummary summarize_rows_aten(const at::Tensor& rows) {
  const auto range = at::aminmax(rows);
  IndexSummary s{std::get<0>(range).item<int64_t>(), std::get<1>(range).item<int64_t>(), -1};
  const int64_t w = rows.size(1);
  at::Tensor repeated = at::zeros({rows.size(0)}, rows.options().dtype(at::kBool));
  for (int64_t a = 0; a < w; ++a)
    for (int64_t b = a + 1; b < w; ++b)
      repeated.logical_or_(rows.select(1, a) == rows.select(1, b));
  if (repeated.any().item<bool>())
    s.first_repeat = repeated.nonzero().select(1, 0)[0].item<int64_t>();
  return s;
}

}  // namespace

CheckedCovariance checked_covariance(const at::Tensor& cov, const char* op, const char* name,
                                     int64_t min_size, const char* what) {
  CHANAXIS_CHECK(cov.dim() == 2, op, name, " must be a 2-D matrix ", what, ", got ", cov.dim(),
                 "-D with shape ", cov.sizes());
  CHANAXIS_CHECK(cov.size(0) == cov.size(1), op, name, " must be square ", what, ", got shape ",
                 cov.sizes());
  CHANAXIS_CHECK(cov.size(0) >= min_size, op, name, " must be ", what, ", got shape ",
                 cov.sizes());
  CHANAXIS_CHECK_FLOATING(cov, op, name);
  at::Tensor S = cov.to(at::kDouble);
  const CovSummary s = S.is_cpu() ? summarize_cpu(S) : summarize_aten(S);
  CHANAXIS_CHECK(s.finite, op, name, " has NaN/Inf values");
  CHANAXIS_CHECK(s.asymmetry <= 1e-6 * s.largest, op, name, " must be symmetric, got |", name,
                 " - ", name, "^T| up to ", s.asymmetry, " (largest variance ", s.largest, ")");
  CHANAXIS_CHECK(s.lowest >= 0.0, op, name, " has a negative variance on its diagonal (index ",
                 s.lowest_at, ": ", s.lowest, ")");
  at::Tensor var = S.diagonal().contiguous();
  at::Tensor inv_var = at::where(var > 0, var.reciprocal(), at::zeros_like(var));
  return {S, var, inv_var, S.select(1, S.size(0) - 1).contiguous()};
}

at::Tensor checked_index_rows(const at::Tensor& idx, int64_t width, int64_t C, const at::Tensor& cov,
                              const char* op, const char* name, bool target_last) {
  CHANAXIS_CHECK_DTYPE(idx, at::kLong, op, name);
  CHANAXIS_CHECK_SAME_DEVICE(idx, cov, op, name, target_last ? "cov_t" : "cov");
  CHANAXIS_CHECK(idx.dim() == 2 && idx.size(1) == width, op, name, " must be [P, ", width,
                 "], got shape ", idx.sizes());
  at::Tensor rows = idx.contiguous();
  if (rows.size(0) == 0) return rows;
  const IndexSummary s = rows.is_cpu() ? summarize_rows_cpu(rows) : summarize_rows_aten(rows);
  CHANAXIS_CHECK(s.lo >= 0 && s.hi < C, op, name, " must index channels 0..", C - 1, " (C = ", C,
                 ")",
                 target_last ? "; index C is the target (last row/column of cov_t), not a channel"
                             : "",
                 ", got values in [", s.lo, ", ", s.hi, "]");
  if (s.first_repeat >= 0) {
    const at::Tensor row = rows[s.first_repeat].cpu();
    std::string values;
    for (int64_t a = 0; a < width; ++a)
      values += (a ? ", " : "") + std::to_string(row[a].item<int64_t>());
    CHANAXIS_CHECK(false, op, name, "[", s.first_repeat, "] = (", values,
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
