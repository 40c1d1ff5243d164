// chip_drops on the CPU.
// PyTorch: out[i, c] = svdvals(A[i]).sum() - svdvals(A[i] with row c zeroed).sum()
// Algorithm: one Gram eigendecomposition per image (chip.cpp), then each (image, channel) solves
// its secular equation for all m interlaced roots (common/secular.h): O(m^2) per channel instead
// of an O(m^3) SVD. at::parallel_for over the N * C equations, each thread with its own scratch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <vector>

#include "../chip.h"
#include "wide_clones.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define CHANAXIS_CHIP_AVX512 1
#endif

namespace chanaxis {
namespace {

// Nearly all of the time is divisions in the solver's pole sums, which the baseline x86-64 build
// vectorises two doubles wide: the wide clones (the whole solver inlined into each) run them four
// and eight wide.
CHANAXIS_WIDE_CLONES void chip_rows(const secular::ChipDropRow& row, int64_t r0, int64_t r1,
                                    double* scratch) {
  const secular::DenseVec ad{scratch}, aw{scratch + row.m};
  for (int64_t r = r0; r < r1; ++r) row(r, ad, aw);
}

#ifdef CHANAXIS_CHIP_AVX512
// On AVX-512 CPUs the pole sums take 1 / delta from the 14-bit estimate VRCP14PD refined by two
// Newton steps (r += r (1 - delta r), each error squared: about 1 ulp in the end) instead of
// VDIVPD, whose throughput (one 8-wide division per 16 cycles) bounded the whole op: 1.3-1.7x
// faster per equation for m = 64-512 on the development CPU. (delta is never 0: the iterate
// stays strictly inside its interval, and the masked-off lanes of the tail add nothing.)
#define CHANAXIS_V4 __attribute__((target("arch=x86-64-v4"), always_inline)) inline
struct Avx512PoleSums {
  static CHANAXIS_V4 double lane_sum(__m512d v) {
    alignas(64) double t[8];
    _mm512_store_pd(t, v);
    return ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
  }
  static CHANAXIS_V4 void add(__m512d dj, __m512d wj, __mmask8 lanes, __m512d origin, __m512d tau,
                              __m512d& s1, __m512d& sa, __m512d& s2, __m512d& s3) {
    const __m512d one = _mm512_set1_pd(1.0);
    const __m512d x = _mm512_sub_pd(_mm512_sub_pd(dj, origin), tau);
    const __m512d r0 = _mm512_maskz_rcp14_pd(0xFF, x);  // (the unmasked form warns in GCC 12)
    __m512d r = _mm512_fmadd_pd(r0, _mm512_fnmadd_pd(x, r0, one), r0);
    r = _mm512_fmadd_pd(r, _mm512_fnmadd_pd(x, r, one), r);
    const __m512d q = _mm512_mul_pd(wj, r), q2 = _mm512_mul_pd(q, r);
    s1 = _mm512_mask_add_pd(s1, lanes, s1, q);
    sa = _mm512_mask_add_pd(sa, lanes, sa, _mm512_abs_pd(q));
    s2 = _mm512_mask_add_pd(s2, lanes, s2, q2);
    s3 = _mm512_mask3_fmadd_pd(q2, r, s3, lanes);  // s3 + q2 r in the lanes, s3 elsewhere
  }
  // not always_inline: the solver (compiled for the baseline) calls it; flatten inlines it into
  // chip_rows_avx512's copy of the solver anyway
  static __attribute__((target("arch=x86-64-v4"))) secular::Sums eval(const secular::DenseVec& d,
                                                                     const secular::DenseVec& w,
                                                                     int64_t n, double origin,
                                                                     double tau) {
    const __m512d vo = _mm512_set1_pd(origin), vt = _mm512_set1_pd(tau);
    __m512d s1 = _mm512_setzero_pd(), sa = s1, s2 = s1, s3 = s1;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      add(_mm512_loadu_pd(d.p + j), _mm512_loadu_pd(w.p + j), 0xFF, vo, vt, s1, sa, s2, s3);
    if (j < n) {
      const __mmask8 lanes = static_cast<__mmask8>((1u << (n - j)) - 1u);
      add(_mm512_maskz_loadu_pd(lanes, d.p + j), _mm512_maskz_loadu_pd(lanes, w.p + j), lanes, vo,
          vt, s1, sa, s2, s3);
    }
    return {lane_sum(s1), lane_sum(sa), lane_sum(s2), lane_sum(s3)};
  }
};
#undef CHANAXIS_V4

__attribute__((target("arch=x86-64-v4"), flatten)) void chip_rows_avx512(
    const secular::ChipDropRow& row, int64_t r0, int64_t r1, double* scratch) {
  const secular::DenseVec ad{scratch}, aw{scratch + row.m};
  for (int64_t r = r0; r < r1; ++r) row.operator()<secular::DenseVec, Avx512PoleSums>(r, ad, aw);
}

// AVX-512 CPUs take the reciprocal path unless CHANAXIS_CHIP_NO_RCP14 is set (the tests compare
// the two paths).
bool use_avx512() {
  static const bool use =
      __builtin_cpu_supports("x86-64-v4") && !std::getenv("CHANAXIS_CHIP_NO_RCP14");
  return use;
}
#endif

struct CpuLaunch {
  void operator()(int64_t rows, int64_t m, const secular::ChipDropRow& row) const {
    // An equation costs a few times m^2 divisions; keep chunks above ~100 k of them.
    const int64_t grain = std::max<int64_t>(1, 100000 / (m * m));
#ifdef CHANAXIS_CHIP_AVX512
    const bool fast = use_avx512();
#else
    const bool fast = false;
#endif
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<double> scratch(2 * m);
#ifdef CHANAXIS_CHIP_AVX512
      if (fast) return chip_rows_avx512(row, r0, r1, scratch.data());
#endif
      (void)fast;
      chip_rows(row, r0, r1, scratch.data());
    });
  }
};

at::Tensor chip_drops_cpu(const at::Tensor& A) { return chip_drops_run(A, CpuLaunch()); }

}  // namespace

TORCH_LIBRARY_IMPL(chanaxis_fast, CPU, m) { m.impl("chip_drops", &chip_drops_cpu); }

}  // namespace chanaxis
