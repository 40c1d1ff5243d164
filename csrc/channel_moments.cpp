// Host side of channel_moments shared by the CPU and CUDA kernels (see channel_moments.h).
#include "channel_moments.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "macros.h"

namespace chanaxis {

static constexpr const char* kOp = "channel_moments";

MomentsPlan plan_channel_moments(const at::Tensor& x_in, const c10::optional<at::Tensor>& target,
                                 const c10::optional<at::Tensor>& positions,
                                 c10::string_view mode, int64_t channel_dim,
                                 bool skip_nonfinite) {
  CHANAXIS_CHECK(x_in.dim() == 2 || x_in.dim() == 4, kOp,
                 "x must be 2-D [N, C] or 4-D [N, C, H, W] / [N, H, W, C], got ", x_in.dim(),
                 "-D with shape ", x_in.sizes());
  CHANAXIS_CHECK_FLOATING(x_in, kOp, "x");
  CHANAXIS_CHECK(mode == "all" || mode == "positions" || mode == "gap", kOp,
                 "mode must be 'all', 'positions' or 'gap', got '", std::string(mode), "'");
  CHANAXIS_CHECK(channel_dim >= -x_in.dim() && channel_dim < x_in.dim(), kOp,
                 "channel_dim ", channel_dim, " is out of range for ", x_in.dim(), "-D x");
  const int64_t cdim = channel_dim < 0 ? channel_dim + x_in.dim() : channel_dim;

  MomentsPlan plan;
  plan.skip_nonfinite = skip_nonfinite;
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
    const int64_t L = plan.x.size(2) * plan.x.size(3);
    const auto range = at::aminmax(pos);
    const int64_t lo = std::get<0>(range).item<int64_t>();
    const int64_t hi = std::get<1>(range).item<int64_t>();
    CHANAXIS_CHECK(lo >= 0 && hi < L, kOp, "positions must index the H*W = ", L,
                   " positions of an image, got values in [", lo, ", ", hi, "]");
    plan.positions = pos.contiguous();
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
  constexpr int64_t kScratchDoubles = int64_t{1} << 22;  // 32 MB
  return std::max<int64_t>(1024, kScratchDoubles / D);
}

void accumulate_upper_panels(const at::Tensor& zt, const at::Tensor& comoment) {
  // Row panel [i, i + B) times columns [i, D): the upper triangle plus the diagonal blocks'
  // lower halves, about (P + 1) / (2P) of the full product for P panels. Small layers go in one
  // product, where the panel overheads outweigh the saving.
  const int64_t D = zt.size(0);
  if (D <= 96) {
    comoment.addmm_(zt, zt.t());
    return;
  }
  const int64_t panels = D >= 384 ? 8 : 4;
  const int64_t B = (D + panels - 1) / panels;
  for (int64_t i = 0; i < D; i += B) {
    const int64_t b = std::min(B, D - i);
    at::Tensor out = comoment.narrow(0, i, b).narrow(1, i, D - i);
    out.addmm_(zt.narrow(0, i, b), zt.narrow(0, i, D - i).t());
  }
}

bool check_nonfinite(const std::vector<ChannelSum>& sums, int64_t C, bool skip_nonfinite) {
  const auto bad = std::find_if(sums.begin(), sums.end(),
                                [](const ChannelSum& s) { return !s.finite(); });
  if (bad == sums.end()) return false;
  const int64_t first = bad - sums.begin();
  CHANAXIS_CHECK(skip_nonfinite, kOp,
                 first < C ? "x has NaN/Inf values (first in channel " + std::to_string(first) +
                                 ", or values whose float64 sum overflows)"
                           : std::string("target has NaN/Inf values"),
                 "; pass skip_nonfinite=True to drop the samples that contain them");
  return true;
}

at::Tensor means_from_sums(const std::vector<ChannelSum>& sums, int64_t count,
                           c10::Device device) {
  at::Tensor mean = at::empty({static_cast<int64_t>(sums.size())}, at::kDouble);
  double* m = mean.data_ptr<double>();
  for (size_t c = 0; c < sums.size(); ++c) m[c] = sums[c].mean(count);
  return mean.to(device);
}

}  // namespace chanaxis
