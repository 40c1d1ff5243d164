// Host side of chip_drops: argument checks and the per-image spectra (see chip.h).
#include "chip.h"

#include <ATen/ATen.h>

#include "macros.h"

namespace chanaxis {
namespace {

// The Gram matrix's eigensolver resolves eigenvalues only to about eps * d_max: below about
// kSmallBlock * d_max the eigenvectors of each image are mixed within their (accurate) subspace,
// and those of a rank-deficient float32 map (singular values at 1e-7 sigma_max) come out with
// relative errors near 1e-2. So the leading columns below that are diagonalised again, from the
// Gram matrix of their images Y (entries at their own scale, not at d_max's): the rotation R of
// eigh(Y_p^T Y_p) turns vecs_p and Y_p into vecs_p R and Y_p R. Repeated on the block's own
// small part until it is one column, or negligible (below eps^2 d_max, where deflation merges
// it). One block for the batch: as wide as the widest image's (a wider block only recomputes
// some larger values as accurately as before).
constexpr double kSmallBlock = 1e-6;

// [N, m] sums over dim 1 of Y [N, *, m] squared (at::mul: ATen's square is a pow, 3-4x slower here)
at::Tensor squared_column_norms(const at::Tensor& Y) { return at::mul(Y, Y).sum(1); }

void resolve_small_block(at::Tensor& vecs, at::Tensor& Y, at::Tensor& d) {
  const at::Tensor negligible = d.amax(1, true) * (16.0 * secular::kEps * secular::kEps);
  int64_t p = d.size(1);
  while (true) {
    const at::Tensor block = d.narrow(1, 0, p);
    const at::Tensor top = block.amax(1, true);
    p = ((block < top * kSmallBlock) & (top > negligible)).sum(1).max().item<int64_t>();
    if (p < 2) return;
    const at::Tensor Yp = Y.narrow(2, 0, p);
    const at::Tensor R = std::get<1>(at::linalg_eigh(at::bmm(Yp.transpose(1, 2), Yp)));
    vecs.narrow(2, 0, p).copy_(at::bmm(vecs.narrow(2, 0, p), R));
    Y.narrow(2, 0, p).copy_(at::bmm(Yp, R));
    d.narrow(1, 0, p).copy_(squared_column_norms(Y.narrow(2, 0, p)));
  }
}

}  // namespace

ChipSpectra chip_spectra(const at::Tensor& A) {
  constexpr const char* op = "chip_drops";
  CHANAXIS_CHECK(A.dim() == 3, op, "A must be 3-D [N, C, S] (one C x S feature matrix per image), got ",
                 A.dim(), "-D with shape ", A.sizes());
  CHANAXIS_CHECK_FLOATING(A, op, "A");
  CHANAXIS_CHECK(A.size(1) >= 1 && A.size(2) >= 1, op,
                 "A must have at least one channel and one position (C, S >= 1), got shape ",
                 A.sizes());
  const int64_t N = A.size(0), C = A.size(1), S = A.size(2), m = std::min(C, S);
  const secular::Form form = C <= S ? secular::Form::projection : secular::Form::downdate;
  const auto f64 = A.options().dtype(at::kDouble);
  if (N == 0)
    return {at::empty({0, m}, f64), at::empty({0, m}, f64.dtype(at::kLong)),
            at::empty({0, C, m}, f64), at::empty({0, C}, f64), at::empty({0}, f64), form};
  at::Tensor X = A.to(at::kDouble);
  CHANAXIS_CHECK(all_finite(X), op, "A has NaN/Inf values");

  const at::Tensor peak = X.abs().amax({1, 2});
  const at::Tensor e = at::where(peak > 0, at::floor(at::log2(peak)), at::zeros_like(peak));
  X = X * at::exp2(-e).view({N, 1, 1});
  const at::Tensor Xt = X.transpose(1, 2);
  const bool projection = form == secular::Form::projection;
  // Eigenvectors of the Gram matrix [N, m, m] (ascending), their images Y [N, *, m] under the
  // other side of A (A^T U or A V) and d = the squared column norms of Y.
  at::Tensor vecs = std::get<1>(at::linalg_eigh(projection ? at::bmm(X, Xt) : at::bmm(Xt, X)));
  at::Tensor Y = at::bmm(projection ? Xt : X, vecs);
  at::Tensor d = squared_column_norms(Y);
  resolve_small_block(vecs, Y, d);
  auto [sorted, order] = d.sort(-1);
  const at::Tensor basis = projection ? vecs : Y;
  return {sorted.contiguous(), order.contiguous(), basis.contiguous(), at::mul(X, X).sum(2).sqrt_(),
          at::exp2(e), form};
}

}  // namespace chanaxis
