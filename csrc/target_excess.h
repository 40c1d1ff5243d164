// Host side of the Gaussian-MI ops (gaussian_mi_pairs, peer_overlap_mean, pair_target_excess,
// triplet_target_excess, target_excess), shared by their CPU and CUDA kernels: the argument
// checks and the op bodies, which take the device's row launcher. The math is in
// common/gaussian.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <tuple>

#include "common/gaussian.h"

namespace chanaxis {

// A checked covariance argument, ready for the kernels of common/gaussian.h.
struct CheckedCovariance {
  at::Tensor values;   // float64 [n, n]
  at::Tensor var;      // float64 [n], its diagonal
  at::Tensor inv_var;  // float64 [n], 1 / S_ii or 0 for a constant channel
  at::Tensor last;     // float64 [n], its last column (the target column of cov_t)
  int64_t size() const { return values.size(0); }
  at::TensorOptions options() const { return values.options(); }
  gaussian::CovView view() const {
    return {values.const_data_ptr<double>(), size(),      values.stride(0),
            values.stride(1),                var.const_data_ptr<double>(),
            inv_var.const_data_ptr<double>(), last.const_data_ptr<double>()};
  }
};

// Checks that `cov` is a floating, finite, symmetric (to 1e-6 of its largest variance) [n, n] matrix
// with n >= min_size and a non-negative diagonal, and returns it as float64 (no copy when it
// already is) with the vectors the kernels read. `what` describes
// the expected shape for the messages, e.g. "[C + 1, C + 1] (C >= 1 channels, then the target)".
CheckedCovariance checked_covariance(const at::Tensor& cov, const char* op, const char* name,
                                     int64_t min_size, const char* what);

// `idx` as a contiguous int64 [P, width] tensor after checking its dtype, shape, device (cov's),
// that every entry indexes a channel in [0, C) and that no row repeats a channel. With
// target_last, the messages explain that index C of cov_t is the target.
at::Tensor checked_index_rows(const at::Tensor& idx, int64_t width, int64_t C, const at::Tensor& cov,
                              const char* op, const char* name, bool target_last);

void check_jitter(double jitter, const char* op);

void check_at_least_one(int64_t value, const char* op, const char* name);

// How expensive one row of a launch is: a few determinants, or an O(C) loop over a whole channel.
enum class RowCost { cheap, channel };

// The op bodies. `launch(n, cost, row)` runs row(r) for r in [0, n) on the tensors' device (the
// CPU kernels with at::parallel_for, the CUDA kernels one thread per row).
constexpr const char* kCovShape = "[C, C] (C >= 1 channels)";
constexpr const char* kCovTShape = "[C + 1, C + 1] (C >= 1 channels, then the target)";

template <class Launch>
at::Tensor gaussian_mi_pairs_run(const at::Tensor& cov, const at::Tensor& pairs, const Launch& launch) {
  constexpr const char* op = "gaussian_mi_pairs";
  const CheckedCovariance S = checked_covariance(cov, op, "cov", 1, kCovShape);
  const at::Tensor rows = checked_index_rows(pairs, 2, S.size(), S.values, op, "pairs", false);
  at::Tensor out = at::empty({rows.size(0)}, S.options());
  launch(rows.size(0), RowCost::cheap,
         gaussian::MiPairsRow{S.view(), rows.const_data_ptr<int64_t>(), out.data_ptr<double>()});
  return out;
}

template <class Launch>
at::Tensor peer_overlap_mean_run(const at::Tensor& cov, const Launch& launch) {
  const CheckedCovariance S = checked_covariance(cov, "peer_overlap_mean", "cov", 1, kCovShape);
  at::Tensor out = at::empty({S.size()}, S.options());
  launch(S.size(), RowCost::channel, gaussian::PeerOverlapMeanRow{S.view(), out.data_ptr<double>()});
  return out;
}

// pair_target_excess (Row = PairExcessRow, width 2) and triplet_target_excess (TripletExcessRow, 3).
template <class Row, class Launch>
at::Tensor target_excess_rows_run(const at::Tensor& cov_t, const at::Tensor& idx, double jitter,
                                  int64_t width, const char* op, const char* name,
                                  const Launch& launch) {
  const CheckedCovariance S = checked_covariance(cov_t, op, "cov_t", 2, kCovTShape);
  const at::Tensor rows = checked_index_rows(idx, width, S.size() - 1, S.values, op, name, true);
  check_jitter(jitter, op);
  at::Tensor out = at::empty({rows.size(0)}, S.options());
  launch(rows.size(0), RowCost::cheap,
         Row{S.view(), rows.const_data_ptr<int64_t>(), jitter, out.data_ptr<double>()});
  return out;
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor> target_excess_run(const at::Tensor& cov_t, int64_t partners,
                                                     int64_t top, double jitter,
                                                     const Launch& launch) {
  constexpr const char* op = "target_excess";
  const CheckedCovariance S = checked_covariance(cov_t, op, "cov_t", 2, kCovTShape);
  check_at_least_one(partners, op, "partners");
  check_at_least_one(top, op, "top");
  check_jitter(jitter, op);
  const int64_t C = S.size() - 1;
  // more partners than peers only pads: clamp, so that a huge request allocates nothing huge
  partners = std::min(partners, std::max<int64_t>(1, C - 1));
  const int64_t top_cap = std::min(top, partners);
  at::Tensor te = at::empty({C}, S.options());
  at::Tensor chosen = at::empty({C, partners}, S.options().dtype(at::kLong));
  at::Tensor keys = at::empty({C, partners}, S.options());
  at::Tensor best = at::empty({C, top_cap}, S.options());
  launch(C, RowCost::channel,
         gaussian::TargetExcessRow{S.view(), partners, top_cap, jitter, keys.data_ptr<double>(),
                                   best.data_ptr<double>(), chosen.data_ptr<int64_t>(),
                                   te.data_ptr<double>()});
  return {te, chosen};
}

}  // namespace chanaxis
