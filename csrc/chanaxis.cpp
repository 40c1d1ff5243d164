// The one TORCH_LIBRARY block: every op schema of chanaxis_fast, and the Python module _C, which
// only carries the build facts (the ops are reached through torch.ops.chanaxis_fast).
#include <Python.h>
#include <torch/library.h>

#ifndef CHANAXIS_CUDA_ARCH_LIST
#define CHANAXIS_CUDA_ARCH_LIST ""
#endif
#ifndef CHANAXIS_CUDA_VERSION
#define CHANAXIS_CUDA_VERSION ""
#endif

TORCH_LIBRARY(chanaxis_fast, m) {
  // x [N, C, H, W] | [N, H, W, C] (channel_dim=-1) | [N, C]; target [N]; positions [N, P] int64.
  // Returns (count int64 [], mean float64 [D], comoment float64 [D, D]), D = C + (target given).
  // precision "float64" | "float32": the arithmetic of the co-moment product (ops.py).
  m.def(
      "channel_moments(Tensor x, Tensor? target, Tensor? positions, str mode, int channel_dim, "
      "bool skip_nonfinite, str precision=\"float64\") -> (Tensor, Tensor, Tensor)");
  // The same batch folded into running statistics in place (Chan et al.): count int64 [], mean
  // float64 [D], comoment float64 [D, D], on x's device; only comoment's upper triangle
  // (diagonal included) is read and kept up to date, the lower one is left stale. Nothing is
  // changed when the call raises (bad arguments, NaN/Inf without skip_nonfinite, positions out
  // of range).
  m.def(
      "channel_moments_fold_(Tensor x, Tensor? target, Tensor? positions, str mode, "
      "int channel_dim, bool skip_nonfinite, str precision, Tensor(a!) count, Tensor(b!) mean, "
      "Tensor(c!) comoment) -> ()");
  // corr: a list of L correlation matrices [C_l, C_l] (float32/float64, one device), processed in
  // one launch. Outputs are concatenated over the layers (sum C_l rows, member indices local to
  // each layer): (e_full float64 [sum C_l], hull_size int64 [sum C_l], hull_members int64
  // [sum C_l, W] (-1 padded), hull_ev float64 [sum C_l, W] (NaN padded), saturated bool
  // [sum C_l]), W = max(1, min(max_size, max_l C_l - 1)).
  m.def(
      "peer_hulls(Tensor[] corr, int max_size, float eps, float ridge) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // corr [C, C]; targets int64 [B]; peers int64 [B, K] (-1 = padding). Returns float64 [B].
  m.def("explained_variance(Tensor corr, Tensor targets, Tensor peers, float ridge) -> Tensor");

  // Gaussian MI of covariances (METHOD.md §3). cov [C, C]; cov_t [C + 1, C + 1] with the target
  // last; pairs [P, 2] / triplets [P, 3] int64 channel indices. Results float64.
  // R_X(i, j) of each pair -> [P]
  m.def("gaussian_mi_pairs(Tensor cov, Tensor pairs) -> Tensor");
  // mean over j != i of R_X(i, j) -> [C]
  m.def("peer_overlap_mean(Tensor cov) -> Tensor");
  // S2 of each pair -> [P]
  m.def("pair_target_excess(Tensor cov_t, Tensor pairs, float jitter) -> Tensor");
  // S3 of each triplet -> [P]
  m.def("triplet_target_excess(Tensor cov_t, Tensor triplets, float jitter) -> Tensor");
  // (TE float64 [C], partners int64 [C, partners] in decreasing R_X, -1 padded)
  m.def("target_excess(Tensor cov_t, int partners, int top, float jitter) -> (Tensor, Tensor)");

  // SFVR's input statistics (CPU kernel; on a GPU the Python fallback of extras/sfvr.py): the k x k
  // patches of every input channel of x [N, C, H, W] at the output positions [N, P] (flat,
  // h * out_width + w) of a conv with that kernel, stride, padding (zeros) and dilation.
  // Returns (count int64 [C], mean float64 [C, k2], comoment float64 [C, k2, k2]), k2 = kh * kw.
  m.def(
      "patch_moments(Tensor x, Tensor positions, int[2] kernel, int[2] stride, int[2] padding, "
      "int[2] dilation, int out_width, bool skip_nonfinite) -> (Tensor, Tensor, Tensor)");

  // CHIP: A [N, C, S] floating -> float64 [N, C], ||A_i||_* - ||A_i with row c zeroed||_*.
  m.def("chip_drops(Tensor A) -> Tensor");

  // HRank: x [N, C, H, W] floating (any strides) -> int64 [N, C], the rank of each H x W map,
  // #{singular values > rtol * the largest} (torch.linalg.matrix_rank with atol = 0); rtol > 0.
  m.def("map_ranks(Tensor x, float rtol) -> Tensor");

  // Mode "gap": x [N, C, S] floating (any strides) -> float64 [N, C], the mean of each row,
  // read once and summed in float64.
  m.def("pooled_means(Tensor x) -> Tensor");
}

namespace {

PyObject* build_flags(PyObject*, PyObject*) {
#ifdef CHANAXIS_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  return Py_BuildValue("{s:O,s:s,s:s}", "cuda_kernels", with_cuda, "cuda_arch_list",
                       CHANAXIS_CUDA_ARCH_LIST, "compiled_with_cuda", CHANAXIS_CUDA_VERSION);
}

PyMethodDef methods[] = {
    {"build_flags", build_flags, METH_NOARGS, "Compile-time facts of this build."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
