// Host side of peer_hulls and explained_variance shared by the CPU and CUDA kernels: argument
// checks, packing of a batch of layers, E_full from one Cholesky factorisation per layer (ATen:
// LAPACK / cuSOLVER), and the output tensors. The greedy selection and the small solves are
// device code running the common/hull.h math.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <tuple>

#include "common/hull.h"

namespace chanaxis {

struct HullsPlan {
  at::Tensor P_all;   // float64, the symmetrised matrices packed one after the other (row-major)
  at::Tensor layers;  // int64 [L, 3] on the device: (matrix offset, first output row, C_l)
  at::Tensor e_full;  // float64 [total]
  int64_t num_layers = 0;
  int64_t total = 0;      // sum of C_l: one output row per channel of every layer
  int64_t max_C = 0;
  int64_t max_size = 0;
  int64_t max_steps = 0;  // min(max_size, max_C - 1): the most peers any hull can take
  int64_t width = 0;      // max(1, max_steps): columns of hull_members / hull_ev
  double eps = 0.0;
  double ridge = 0.0;
};

HullsPlan plan_peer_hulls(at::TensorList corr, int64_t max_size, double eps, double ridge);

// (e_full, hull_size = 0, hull_members = -1, hull_ev = NaN, saturated = false): the kernels
// overwrite the entries of the steps that were taken.
using HullsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
HullsOutputs make_hulls_outputs(const HullsPlan& plan);

struct ExplainedVariancePlan {
  at::Tensor P;        // float64 [C, C] symmetrised, contiguous
  at::Tensor targets;  // int64 [B] contiguous
  at::Tensor peers;    // int64 [B, K] contiguous
  int64_t C = 0, B = 0, K = 0;
  double ridge = 0.0;
};

ExplainedVariancePlan plan_explained_variance(const at::Tensor& corr, const at::Tensor& targets,
                                              const at::Tensor& peers, double ridge);

}  // namespace chanaxis
