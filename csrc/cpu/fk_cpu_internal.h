/*
 * fk_cpu_internal.h -- private helpers of the C++/OpenMP back end (not part of the ABI).
 *
 * The span kernels (the only hot loops) are compiled three times, for a baseline x86-64 target, for
 * AVX2 and for AVX-512, and picked once at run time (fk_cpu_set_isa can force a lower level, which
 * the tests use to check every variant against the oracle). Every variant performs the same IEEE
 * float32 operations in the same order (multiply, then add, one rounding each; -ffp-contract=off
 * and no "fma" in any target list), so all of them are bit-identical to each other and to torch.
 */
#ifndef FEDRAC_CPU_INTERNAL_H
#define FEDRAC_CPU_INTERNAL_H

#include <cstddef>
#include <cstdint>
#include <cstring>

#include <omp.h>

#include "fedrac_kernels.h"

#define FK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fkcpu {

/* ---- errors (thread-local message read back by fk_last_error) -------------------------------- */
int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void clear_error();

/* ---- threads --------------------------------------------------------------------------------- */
/* Threads to use: nthreads <= 0 -> OpenMP default; never more than one per `min_work` units of
 * work (small calls run on the calling thread: a fork/join costs more than they do). */
int pick_threads(int nthreads, int64_t work, int64_t min_work);

/* Runs body() on nt threads (one OpenMP parallel region), or directly on the calling thread when
 * nt == 1 -- then orphaned `omp for` / `barrier` / `single` inside body run serially and no thread
 * team is started or woken (a small call costs no fork/join). Inside an enclosing parallel region
 * a (nested, hence one-thread) region is still opened, so orphaned constructs bind to it. */
template <class F>
inline void parallel_region(int nt, const F& body) {
  if (nt > 1 || omp_in_parallel()) {
#pragma omp parallel num_threads(nt)
    body();
  } else {
    body();
  }
}

/* ---- instruction-set levels ------------------------------------------------------------------ */
enum Isa : int { ISA_BASE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
Isa detected_isa();
Isa active_isa();
/* Force a level <= the detected one; returns the previous level, or -1 if not supported. */
int set_isa(int level);
const char* isa_name(int level);

/* Span kernels. One client's contribution over n contiguous elements:
 *   x = widen(v[j]); a = (gate == NULL || gate[j] != 0) && (!nonzero || x != 0)
 *   if a: num[j] = num[j] + w*x; den[j] = den[j] + w
 * With track != 0, returns nonzero iff some active x is not finite (else returns 0: the fast path
 * does no such test; an active non-finite value always leaves num non-finite, so callers test num
 * once per tile and re-run the tile with track = 1 only then). Gated spans skip 64-element chunks
 * whose gate bytes are all zero (their values are never read). */
typedef uint32_t (*accum_fn)(float* num, float* den, const void* v, int dtype, const uint8_t* gate,
                             int64_t n, float w, int nonzero, int track);
/* G (1..4) clients at once, added in order c = 0..G-1 (bit-identical to G accum calls), without
 * non-finite tracking: gates == NULL: the non-zero rule; else client c is active where
 * gates[c][j] != 0 (all-zero 64-element chunks of a client are not read). The levels without a
 * multi-client kernel have one. */
typedef void (*accum_group_fn)(float* num, float* den, const void* const* v, int dtype,
                               const uint8_t* const* gates, const float* w, int64_t n, int G);
/* Any number of clients (G >= 1) at once, added in order, without non-finite tracking: client c
 * is active where (gates == NULL || gates[c][j] != 0) && (!nonzero || x != 0); a client's
 * all-zero 64-element gate chunks are not read. The AVX2 and AVX-512 levels have one (hand-written
 * intrinsics: multi_avx2.cpp, multi_avx512.cpp); the base level has accum_group instead. */
typedef void (*accum_multi_fn)(float* num, float* den, const void* const* v, int dtype,
                               const uint8_t* const* gates, const float* w, int64_t n, int G, int nonzero);
/* 1 iff some x[j] is inf or nan */
typedef int (*any_nonfinite_fn)(const float* x, int64_t n);
/* out[j] = den[j] > 0 ? g[j] + num[j] / den[j] : g[j]   (out may equal g) */
typedef void (*finalize_fn)(float* out, const float* g, const float* num, const float* den, int64_t n);
/* dst[j] = widen(src[j]) */
typedef void (*widen_fn)(float* dst, const void* src, int dtype, int64_t n);

struct SpanKernels {
  accum_fn accum;
  accum_group_fn accum_group;  // NULL where the level has accum_multi
  accum_multi_fn accum_multi;  // NULL where the level has none
  any_nonfinite_fn any_nonfinite;
  finalize_fn finalize;
  widen_fn widen;
};
#if defined(__x86_64__)
void accum_multi_avx2(float* num, float* den, const void* const* v, int dtype, const uint8_t* const* gates,
                      const float* w, int64_t n, int G, int nonzero);
void accum_multi_avx512(float* num, float* den, const void* const* v, int dtype, const uint8_t* const* gates,
                        const float* w, int64_t n, int G, int nonzero);
#endif
/* accum_multi_fn over a level's kernel template: Kernel::run<DT, NONZERO, GATED>(num, den, v, gates, w,
 * n, G) instantiated for the 3 update dtypes x the non-zero rule x gates present, chosen at run time. */
template <class Kernel, int DT>
void accum_multi_flags(float* num, float* den, const void* const* v, const uint8_t* const* gates,
                       const float* w, int64_t n, int G, int nonzero) {
  if (gates) {
    if (nonzero) Kernel::template run<DT, true, true>(num, den, v, gates, w, n, G);
    else Kernel::template run<DT, false, true>(num, den, v, gates, w, n, G);
  } else {
    if (nonzero) Kernel::template run<DT, true, false>(num, den, v, nullptr, w, n, G);
    else Kernel::template run<DT, false, false>(num, den, v, nullptr, w, n, G);
  }
}
template <class Kernel>
void accum_multi_dispatch(float* num, float* den, const void* const* v, int dtype, const uint8_t* const* gates,
                          const float* w, int64_t n, int G, int nonzero) {
  switch (dtype) {
    case FK_F32: accum_multi_flags<Kernel, FK_F32>(num, den, v, gates, w, n, G, nonzero); break;
    case FK_BF16: accum_multi_flags<Kernel, FK_BF16>(num, den, v, gates, w, n, G, nonzero); break;
    default: accum_multi_flags<Kernel, FK_F16>(num, den, v, gates, w, n, G, nonzero); break;
  }
}
/* Defines the accum_multi_fn NAME of a level over its file's kernel template multi_t<DT, NONZERO,
 * GATED>(num, den, v, gates, w, n, G); used at namespace fkcpu scope after that template. */
#define FK_DEFINE_ACCUM_MULTI(NAME)                                                                          \
  namespace {                                                                                               \
  struct NAME##_kernel {                                                                                    \
    template <int DT, bool NZ, bool GATED>                                                                  \
    static void run(float* num, float* den, const void* const* v, const uint8_t* const* gates, const float* w, \
                    int64_t n, int G) {                                                                     \
      multi_t<DT, NZ, GATED>(num, den, v, gates, w, n, G);                                                  \
    }                                                                                                       \
  };                                                                                                        \
  }                                                                                                         \
  void NAME(float* num, float* den, const void* const* v, int dtype, const uint8_t* const* gates, const float* w, \
            int64_t n, int G, int nonzero) {                                                                \
    accum_multi_dispatch<NAME##_kernel>(num, den, v, dtype, gates, w, n, G, nonzero);                       \
  }
const SpanKernels& span_kernels();  // for the active level
const SpanKernels& span_kernels_for(Isa level);

/* ---- exact narrow-float widening (no FP arithmetic on subnormals: immune to DAZ/FTZ) --------- */
static FK_ALWAYS_INLINE float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static FK_ALWAYS_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static FK_ALWAYS_INLINE float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }
static FK_ALWAYS_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  // normal: re-bias the exponent (15 -> 127) by an integer add; inf/nan: all-ones exponent.
  const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  const uint32_t special = (em << 13) | 0x7f800000u;
  // subnormal: m * 2^-24 with m < 1024 -> an exact int->float conversion and a power-of-two scale.
  const uint32_t sub = f32_to_bits((float)(int32_t)em * 0x1p-24f);
  const uint32_t mag = em < 0x0400u ? sub : (em >= 0x7c00u ? special : normal);
  return bits_to_f32(sign | mag);
}

static inline size_t dtype_size(int dtype) { return dtype == FK_F32 ? 4 : 2; }

}  // namespace fkcpu

/* Test / benchmark hooks exported to the binding (not part of the ABI). */
extern "C" {
int fk_cpu_set_isa(int level);  // returns the previous level, or -1
int fk_cpu_get_isa(void);
int fk_cpu_detected_isa(void);
const char* fk_cpu_isa_name(int level);
/* Gate-table budget (bytes) for the structured kernel; above it gates are built per tile. */
int64_t fk_cpu_set_gate_table_limit(int64_t bytes);
/* 1 if a*b+c is evaluated as two roundings in code compiled with an FMA-capable target. */
int fk_cpu_fp_contract_off(void);
}

#endif /* FEDRAC_CPU_INTERNAL_H */
