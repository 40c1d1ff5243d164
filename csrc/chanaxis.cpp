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
  m.def(
      "channel_moments(Tensor x, Tensor? target, Tensor? positions, str mode, int channel_dim, "
      "bool skip_nonfinite) -> (Tensor, Tensor, Tensor)");
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
