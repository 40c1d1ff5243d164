// CHANAXIS_WIDE_CLONES: on x86-64 with GCC, compile a function (and, with flatten, everything it
// inlines) three times, for AVX-512 and AVX2 CPUs and the baseline, the clone picked when the
// library loads. The baseline x86-64 build vectorises two doubles wide; the clones four and eight.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CHANAXIS_WIDE_CLONES \
  __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CHANAXIS_WIDE_CLONES
#endif
