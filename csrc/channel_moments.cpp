// Host side of channel_moments shared by the CPU and CUDA kernels (see channel_moments.h).
#include "channel_moments.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>

#include "macros.h"

namespace chanaxis {

static constexpr const char* kOp = "channel_moments";

MomentsPlan plan_channel_moments(const at::Tensor& x_in, const c10::optional<at::Tensor>& target,
                                 const c10::optional<at::Tensor>& positions,
                                 c10::string_view mode, int64_t channel_dim, bool skip_nonfinite,
                                 c10::string_view precision, bool defer_range_check) {
  CHANAXIS_CHECK(x_in.dim() == 2 || x_in.dim() == 4, kOp,
                 "x must be 2-D [N, C] or 4-D [N, C, H, W] / [N, H, W, C], got ", x_in.dim(),
                 "-D with shape ", x_in.sizes());
  CHANAXIS_CHECK_FLOATING(x_in, kOp, "x");
  CHANAXIS_CHECK(mode == "all" || mode == "positions" || mode == "gap", kOp,
                 "mode must be 'all', 'positions' or 'gap', got '", std::string(mode), "'");
  CHANAXIS_CHECK(channel_dim >= -x_in.dim() && channel_dim < x_in.dim(), kOp,
                 "channel_dim ", channel_dim, " is out of range for ", x_in.dim(), "-D x");
  const int64_t cdim = channel_dim < 0 ? channel_dim + x_in.dim() : channel_dim;

  CHANAXIS_CHECK(precision == "float64" || precision == "float32", kOp,
                 "precision must be 'float64' or 'float32', got '", std::string(precision), "'");

  MomentsPlan plan;
  plan.skip_nonfinite = skip_nonfinite;
  plan.float32 = precision == "float32";
  if (x_in.dim() == 2) {
    CHANAXIS_CHECK(cdim == 1, kOp, "channel_dim of a 2-D x [N, C] must be 1 or -1, got ",
                   channel_dim);
    CHANAXIS_CHECK(mode == "all", kOp, "mode '", std::string(mode),
                   "' needs a 4-D x; a 2-D x [N, C] is already one sample per row");
    plan.x = x_in;
  } else {
    CHANAXIS_CHECK(cdim == 1 || cdim == 3, kOp,
                   "channel_dim of a 4-D x must be 1 ([N, C, H, W]) or 3 / -1 ([N, H, W, C]), got ",
                   channel_dim);
    plan.x = cdim == 1 ? x_in : x_in.movedim(3, 1);
  }
  plan.N = plan.x.size(0);
  plan.C = plan.x.size(1);
  CHANAXIS_CHECK(plan.N > 0, kOp, "x has no samples (N = 0): an empty batch has no statistics");
  CHANAXIS_CHECK(plan.C > 0, kOp, "x has no channels (C = 0), shape ", x_in.sizes());
  plan.gap = mode == "gap";

  const bool has_positions = positions.has_value() && positions->defined();
  CHANAXIS_CHECK(has_positions == (mode == "positions"), kOp,
                 has_positions ? "positions were given but mode is '" + std::string(mode) + "'"
                               : std::string("mode 'positions' needs a positions tensor [N, P]"));
  if (has_positions) {
    const at::Tensor& pos = *positions;
    CHANAXIS_CHECK_DTYPE(pos, at::kLong, kOp, "positions");
    CHANAXIS_CHECK_SAME_DEVICE(pos, plan.x, kOp, "positions", "x");
    CHANAXIS_CHECK(pos.dim() == 2 && pos.size(0) == plan.N, kOp,
                   "positions must be [N, P] = [", plan.N, ", P], got shape ", pos.sizes());
    CHANAXIS_CHECK(pos.size(1) > 0, kOp, "positions has no columns (P = 0)");
    plan.positions = pos.contiguous();
    plan.deferred_range_check = defer_range_check;
    if (!defer_range_check) {
      const auto range = at::aminmax(pos);
      const int64_t L = plan.x.size(2) * plan.x.size(3);
      if (std::get<0>(range).item<int64_t>() < 0 || std::get<1>(range).item<int64_t>() >= L)
        fail_positions_range(plan);
    }
  }

  if (target.has_value() && target->defined()) {
    const at::Tensor& t = *target;
    CHANAXIS_CHECK_FLOATING(t, kOp, "target");
    CHANAXIS_CHECK_SAME_DEVICE(t, plan.x, kOp, "target", "x");
    CHANAXIS_CHECK(t.dim() == 1 && t.size(0) == plan.N, kOp,
                   "target must be [N] = [", plan.N, "], one value per image, got shape ",
                   t.sizes());
    plan.target = t.to(at::kDouble).contiguous();
  }
  plan.D = plan.C + (plan.target.defined() ? 1 : 0);
  return plan;
}

void fail_positions_range(const MomentsPlan& plan) {
  const auto range = at::aminmax(plan.positions);
  CHANAXIS_CHECK(false, kOp, "positions must index the H*W = ", plan.x.size(2) * plan.x.size(3),
                 " positions of an image, got values in [", std::get<0>(range).item<int64_t>(), ", ",
                 std::get<1>(range).item<int64_t>(), "]");
  std::abort();  // not reached: CHANAXIS_CHECK(false, ...) throws
}

RowLayout make_row_layout(const at::Tensor& x, const at::Tensor& positions) {
  RowLayout L;
  L.N = x.size(0);
  L.C = x.size(1);
  L.sN = x.stride(0);
  L.sC = x.stride(1);
  if (x.dim() == 4) {
    L.W = x.size(3);
    L.sH = x.stride(2);
    L.sW = x.stride(3);
    L.rows_per_image = x.size(2) * x.size(3);
  }
  if (positions.defined()) {
    L.positions = positions.data_ptr<int64_t>();
    L.rows_per_image = positions.size(1);
  }
  return L;
}

int64_t rows_per_chunk(int64_t D) {
  // 2 MB: the centred chunk is still in cache when the GEMM reads it (32 MB was about 10 % slower
  // on a 128 x 64 x 32 x 32 batch; 1-8 MB measured the same, interleaved in one run)
  constexpr int64_t kScratchDoubles = int64_t{1} << 18;
  return std::max<int64_t>(1024, kScratchDoubles / D);
}

namespace {
// Row panels [i, i + B) x columns [i, D) of the upper triangle; one panel for small layers, where
// the panel overheads outweigh the saving. At most max_panels (float32 products: 4, whose wider
// panels MKL runs faster than 8 thin ones; float64: 8 from D = 384, as tuned in issue 2).
template <class F>
void for_each_upper_panel(int64_t D, int64_t max_panels, const F& f) {
  if (D <= 96) {
    f(0, D);
    return;
  }
  const int64_t panels = std::min<int64_t>(max_panels, D >= 384 ? 8 : 4);
  const int64_t B = (D + panels - 1) / panels;
  for (int64_t i = 0; i < D; i += B) f(i, std::min(B, D - i));
}
}  // namespace

void accumulate_upper_panels(const at::Tensor& zt, const at::Tensor& comoment, double beta) {
  // Row panel [i, i + B) times columns [i, D): the upper triangle plus the diagonal blocks'
  // lower halves, about (P + 1) / (2P) of the full product for P panels.
  const int64_t D = zt.size(0);
  const int64_t max_panels = zt.scalar_type() == at::kFloat ? 4 : 8;
  for_each_upper_panel(D, max_panels, [&](int64_t i, int64_t b) {
    if (b == D) {
      comoment.addmm_(zt, zt.t(), beta);
      return;
    }
    at::Tensor out = comoment.narrow(0, i, b).narrow(1, i, D - i);
    out.addmm_(zt.narrow(0, i, b), zt.narrow(0, i, D - i).t(), beta);
  });
}

void add_upper_panels(const at::Tensor& part, const at::Tensor& acc, bool assign) {
  const int64_t D = part.size(0);
  const int64_t max_panels = part.scalar_type() == at::kFloat ? 4 : 8;
  if (acc.is_cpu() && part.scalar_type() == at::kFloat && acc.scalar_type() == at::kDouble &&
      part.is_contiguous() && acc.is_contiguous()) {
    // One pass, float32 read and widened in the loop (TensorIterator would first copy the panel
    // to a float64 temporary): the same values as add_ / copy_.
    const float* p = part.const_data_ptr<float>();
    double* a = acc.data_ptr<double>();
    for_each_upper_panel(D, max_panels, [&](int64_t i, int64_t b) {
      at::parallel_for(i, i + b, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float* pr = p + r * D;
          double* ar = a + r * D;
          if (assign)
            for (int64_t j = i; j < D; ++j) ar[j] = static_cast<double>(pr[j]);
          else
            for (int64_t j = i; j < D; ++j) ar[j] += static_cast<double>(pr[j]);
        }
      });
    });
    return;
  }
  for_each_upper_panel(D, max_panels, [&](int64_t i, int64_t b) {
    at::Tensor out = acc.narrow(0, i, b).narrow(1, i, D - i);
    const at::Tensor in = part.narrow(0, i, b).narrow(1, i, D - i);
    if (assign)
      out.copy_(in);
    else
      out.add_(in);
  });
}

void symmetrize_upper_(const at::Tensor& m) {
  if (!m.is_cpu()) {
    m.copy_(m.triu().add_(m.triu(1).t()));
    return;
  }
  // Tiles of rows [i0, i1): task t writes the upper part of its rows and the mirrored columns
  // [i0, i1) of the rows below; it reads only the upper part of its own rows. Disjoint: no race.
  constexpr int64_t kTile = 64;
  const int64_t D = m.size(0);
  TORCH_INTERNAL_ASSERT(m.scalar_type() == at::kDouble && m.is_contiguous());
  double* o = m.data_ptr<double>();
  at::parallel_for(0, (D + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kTile, i1 = std::min(D, i0 + kTile);
      for (int64_t j0 = i0; j0 < D; j0 += kTile) {
        const int64_t j1 = std::min(D, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = std::max(i, j0); j < j1; ++j) {
            const double v = o[i * D + j] + 0.0;
            o[i * D + j] = v;
            o[j * D + i] = v;
          }
        }
      }
    }
  });
}

void check_running(const MomentsPlan& plan, const at::Tensor& count, const at::Tensor& mean,
                   const at::Tensor& comoment) {
  constexpr const char* op = "channel_moments_fold_";
  const int64_t D = plan.D;
  CHANAXIS_CHECK_DTYPE(count, at::kLong, op, "count");
  CHANAXIS_CHECK(count.dim() == 0, op, "count must be a 0-dim int64 tensor, got shape ", count.sizes());
  CHANAXIS_CHECK_DTYPE(mean, at::kDouble, op, "mean");
  CHANAXIS_CHECK(mean.dim() == 1 && mean.size(0) == D && mean.is_contiguous(), op,
                 "mean must be a contiguous [D] = [", D, "] tensor (D = C + target), got shape ",
                 mean.sizes());
  CHANAXIS_CHECK_DTYPE(comoment, at::kDouble, op, "comoment");
  CHANAXIS_CHECK(comoment.dim() == 2 && comoment.size(0) == D && comoment.size(1) == D &&
                     comoment.is_contiguous(),
                 op, "comoment must be a contiguous [D, D] = [", D, ", ", D,
                 "] tensor (D = C + target), got shape ", comoment.sizes());
  CHANAXIS_CHECK_SAME_DEVICE(count, plan.x, op, "count", "x");
  CHANAXIS_CHECK_SAME_DEVICE(mean, plan.x, op, "mean", "x");
  CHANAXIS_CHECK_SAME_DEVICE(comoment, plan.x, op, "comoment", "x");
}

FoldTerms fold_terms(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& mean_b,
                     int64_t n_b) {
  const at::Tensor n_a = count.to(at::kDouble);
  const double nb = static_cast<double>(n_b);
  FoldTerms t;
  t.n = n_a + nb;
  t.d = mean_b - mean;
  t.w = (n_a * nb) / t.n;
  return t;
}

void finish_fold(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& comoment,
                 const FoldTerms& t, int64_t n_b, bool rank_one_done) {
  const int64_t D = mean.size(0);
  if (!rank_one_done) {
    const at::Tensor dw = t.d * t.w;
    for_each_upper_panel(D, 8, [&](int64_t i, int64_t b) {
      comoment.narrow(0, i, b).narrow(1, i, D - i).addr_(dw.narrow(0, i, b), t.d.narrow(0, i, D - i));
    });
  }
  mean.add_(t.d * (t.n.new_full({}, static_cast<double>(n_b)) / t.n));
  count.add_(n_b);
}

int64_t first_nonfinite(const std::vector<ChannelSum>& sums) {
  const auto bad = std::find_if(sums.begin(), sums.end(),
                                [](const ChannelSum& s) { return !s.finite(); });
  return bad == sums.end() ? -1 : static_cast<int64_t>(bad - sums.begin());
}

bool check_nonfinite(int64_t first, int64_t C, bool skip_nonfinite) {
  if (first < 0) return false;
  CHANAXIS_CHECK(skip_nonfinite, kOp,
                 first < C ? "x has NaN/Inf values (first in channel " + std::to_string(first) +
                                 ", or values whose float64 sum overflows)"
                           : std::string("target has NaN/Inf values"),
                 "; pass skip_nonfinite=True to drop the samples that contain them");
  return true;
}

at::Tensor means_from_sums(const std::vector<ChannelSum>& sums, int64_t count) {
  at::Tensor mean = at::empty({static_cast<int64_t>(sums.size())}, at::kDouble);
  double* m = mean.data_ptr<double>();
  for (size_t c = 0; c < sums.size(); ++c) m[c] = sums[c].mean(count);
  return mean;
}

namespace {
const char* precision_name(at::Float32MatmulPrecision p) {
  switch (p) {
    case at::Float32MatmulPrecision::HIGHEST: return "highest";
    case at::Float32MatmulPrecision::HIGH: return "high";
    case at::Float32MatmulPrecision::MEDIUM: return "medium";
  }
  return "highest";
}
}  // namespace

Float32MatmulGuard::Float32MatmulGuard() {
  auto& ctx = at::globalContext();
  const at::Float32MatmulPrecision now = ctx.float32MatmulPrecision();
  if (now != at::Float32MatmulPrecision::HIGHEST) {
    restore_ = precision_name(now);
    ctx.setFloat32MatmulPrecision("highest");
  }
}

Float32MatmulGuard::~Float32MatmulGuard() {
  if (!restore_.empty()) at::globalContext().setFloat32MatmulPrecision(restore_);
}

}  // namespace chanaxis
