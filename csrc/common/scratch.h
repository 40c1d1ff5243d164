// Per-call scratch of the kernels whose logic is shared by the CPU and CUDA (secular.h, rank.h):
// contiguous on the CPU (a buffer per thread), interleaved across threads on CUDA (entry j of
// thread t at p[j * threads + t]) so that the threads of a warp, which walk their scratch in
// step, load adjacent doubles.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace chanaxis {

struct DenseVec {
  double* p;
  C10_HOST_DEVICE double& operator[](int64_t j) const { return p[j]; }
};
struct StridedVec {
  double* p;
  int64_t step;
  C10_HOST_DEVICE double& operator[](int64_t j) const { return p[j * step]; }
};

}  // namespace chanaxis
