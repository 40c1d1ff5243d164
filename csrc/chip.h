// Host side of chip_drops, shared by its CPU and CUDA kernels: the argument checks, one Gram
// eigendecomposition per image (ATen: MKL/LAPACK or cuBLAS/cuSOLVER), and the op body, which
// takes the device's row launcher. The per-channel math is in common/secular.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/secular.h"

namespace chanaxis {

// The spectra of a checked batch A [N, C, S], m = min(C, S), each image divided by a power of two
// near its largest |entry| (exact, and no square over- or underflows):
// - C <= S (projection): A A^T = U diag(d) U^T; basis = U, row c of it is u;
// - C > S (downdate): A^T A = V diag(d) V^T; basis = A V, row c of it is z = V^T a_c.
// d is the squared column norms of A^T U (or A V) rather than the eigenvalues: those carry
// absolute errors of eps * d_max, which a square root turns into sqrt(eps) * sigma_max for the
// zero singular values of a rank-deficient A, while the norms of A^T u_k are off by about
// eps * sigma_max; eigenvectors of the small eigenvalues are resolved again at their own scale
// (chip.cpp). d is sorted ascending; order says which basis column goes with each entry.
struct ChipSpectra {
  at::Tensor d;         // float64 [N, m], ascending
  at::Tensor order;     // int64 [N, m], the basis column of each entry of d
  at::Tensor basis;     // float64 [N, C, m], contiguous
  at::Tensor row_norm;  // float64 [N, C], |row c| of the scaled A
  at::Tensor scale;     // float64 [N], the power of two to multiply the drops by
  secular::Form form;
};

ChipSpectra chip_spectra(const at::Tensor& A);

// The op body. `launch(rows, m, row)` runs row(r, ad, aw) for r in [0, rows), with ad, aw
// (secular::DenseVec or StridedVec) scratch for m doubles each, on the tensors' device.
template <class Launch>
at::Tensor chip_drops_run(const at::Tensor& A, const Launch& launch) {
  const ChipSpectra P = chip_spectra(A);
  const int64_t N = P.basis.size(0), C = P.basis.size(1), m = P.basis.size(2);
  at::Tensor out = at::empty({N, C}, P.basis.options());
  if (N == 0) return out;
  launch(N * C, m,
         secular::ChipDropRow{P.d.const_data_ptr<double>(), P.order.const_data_ptr<int64_t>(),
                              P.basis.const_data_ptr<double>(),
                              P.row_norm.const_data_ptr<double>(),
                              P.scale.const_data_ptr<double>(), C, m, P.form,
                              out.data_ptr<double>()});
  return out;
}

}  // namespace chanaxis
