// Host side of the Gaussian-MI ops (gaussian_mi_pairs, peer_overlap_mean, pair_target_excess,
// triplet_target_excess, target_excess), shared by their CPU and CUDA kernels: the argument checks.
// The math is in common/gaussian.h.
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace chanaxis
