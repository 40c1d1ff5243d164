// Correctly rounded float64 operations that no compiler may fuse, shared by every kernel whose CPU
// and CUDA versions promise the same bits.
//
// nvcc contracts a * b + c into an FMA by default (one rounding instead of two), and so do host
// compilers on targets whose baseline has FMA (aarch64, x86-64 with -march=native) unless told
// otherwise. On the device these helpers are the _rn intrinsics, which are never contracted; on
// the host they are plain IEEE operations, and setup.py compiles the C++ sources with
// -ffp-contract=off (and the CUDA sources with --fmad=false as a second line of defence), so the
// CPU and CUDA kernels evaluate every expression written with them operation for operation alike.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace chanaxis {
namespace fp {

C10_HOST_DEVICE inline double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
C10_HOST_DEVICE inline double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline double div_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
C10_HOST_DEVICE inline double sqrt_rn(double a) {
#ifdef __CUDA_ARCH__
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// a * b - c * d with both products rounded (no FMA): the 2x2 minor of every determinant below.
C10_HOST_DEVICE inline double minor2(double a, double b, double c, double d) {
  return sub_rn(mul_rn(a, b), mul_rn(c, d));
}

}  // namespace fp
}  // namespace chanaxis
