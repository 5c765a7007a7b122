// AVX2 multi-client kernel for the dense, structured and compact entry points (explicit intrinsics).
//
// The AVX2 counterpart of multi_avx512.cpp, for the many machines with AVX2 and no AVX-512 (AMD
// Zen 2/3, Intel before Skylake-X / Ice Lake). Blocks of 32 elements: num/den live in 8 ymm
// registers while all G clients of the group are added in order, so every client streams through
// its row once and the accumulators go back to memory once per group, not once per client.
// Per client and 8 lanes: one (widening) load, the inactive-lane mask (gate bytes == 0 and/or the
// non-zero test, both integer compares like the portable kernels), one multiply, two adds and two
// blends that keep num/den where the client is inactive -- the same IEEE operations in the same
// order as the scalar definition (t = w*x rounded, then num + t; den + w), so the result is
// bit-identical to every other kernel. There is no FMA: "fma" is not in the target list (so the
// compiler cannot emit one) and the build uses -ffp-contract=off.
//
// Widening: bf16 by a 16-bit shift (exact); f16 by F16C's vcvtph2ps, which is exact (every f16,
// subnormals included, is a normal float32; checked with MXCSR.DAZ|FTZ set: the half-precision
// subnormals still come out exact) and differs from the integer widening of f16_to_f32 only in
// quieting a signalling NaN -- which w * x does anyway, so num/den are bit-identical.
//
// Gate skipping: a client's all-zero 32-element gate blocks are not read (finer than the 64
// elements the interface promises); inside a block with some active lane every value is loaded and
// the inactive lanes are blended away. The last n % 32 elements run 8 lanes at a time, then scalar.
// Non-finite flags are not tracked here: callers use the tracking kernels for the rare re-run.
#include "fk_cpu_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define FK_AVX2_TARGET __attribute__((target("avx2,bmi,bmi2,popcnt,f16c")))
#define FK_AVX2_INLINE FK_AVX2_TARGET inline __attribute__((always_inline))

namespace fkcpu {
namespace {

/* 8 values from element j of a row of dtype DT, widened exactly to float32 */
template <int DT>
FK_AVX2_INLINE __m256 load8(const void* p, int64_t j) {
  if (DT == FK_F32) return _mm256_loadu_ps(static_cast<const float*>(p) + j);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + j));
  if (DT == FK_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

/* all-ones in the lanes whose gate byte (8 bytes at g) is zero */
FK_AVX2_INLINE __m256i dead_lanes(const uint8_t* g) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(g)));
  return _mm256_cmpeq_epi32(b, _mm256_setzero_si256());
}

/* One client over Q groups of 8 lanes starting at element j. USE_GATE: lanes whose gate byte is
 * zero are inactive; NZ: lanes whose value is +-0 are inactive (an integer test: NaN is active,
 * and DAZ cannot turn a subnormal into zero). */
template <int DT, bool NZ, bool USE_GATE, int Q>
FK_AVX2_INLINE void add_client(__m256 (&nm)[Q], __m256 (&dn)[Q], const void* v, const uint8_t* g, __m256 wc,
                               int64_t j) {
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  for (int q = 0; q < Q; ++q) {
    const __m256 x = load8<DT>(v, j + 8 * q);
    const __m256 t = _mm256_mul_ps(wc, x);      // w * x, rounded
    const __m256 s = _mm256_add_ps(nm[q], t);   // num + t, rounded
    const __m256 d = _mm256_add_ps(dn[q], wc);  // den + w
    if (!NZ && !USE_GATE) {
      nm[q] = s;
      dn[q] = d;
      continue;
    }
    __m256i dead;
    if (NZ) {
      dead = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x), absmask), _mm256_setzero_si256());
      if (USE_GATE) dead = _mm256_or_si256(dead, dead_lanes(g + 8 * q));
    } else {
      dead = dead_lanes(g + 8 * q);
    }
    nm[q] = _mm256_blendv_ps(s, nm[q], _mm256_castsi256_ps(dead));
    dn[q] = _mm256_blendv_ps(d, dn[q], _mm256_castsi256_ps(dead));
  }
}

/* All G clients, in order, over the 8*Q elements [j, j + 8Q): num/den loaded once, stored once. */
template <int DT, bool NZ, bool GATED, int Q>
FK_AVX2_INLINE void block(float* num, float* den, const void* const* v, const uint8_t* const* gates,
                          const float* w, int64_t j, int G) {
  __m256 nm[Q], dn[Q];
  for (int q = 0; q < Q; ++q) {
    nm[q] = _mm256_loadu_ps(num + j + 8 * q);
    dn[q] = _mm256_loadu_ps(den + j + 8 * q);
  }
  for (int c = 0; c < G; ++c) {
    const __m256 wc = _mm256_set1_ps(w[c]);
    if (GATED) {
      const uint8_t* g = gates[c] + j;
      bool full;
      if (Q == 4) {  // 32 gate bytes: all zero -> skip the client; none zero -> no blends
        const __m256i gb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
        const uint32_t zm = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(gb, _mm256_setzero_si256()));
        if (zm == 0xffffffffu) continue;  // dead block: the client's values are not read
        full = zm == 0;
      } else {
        uint64_t u[Q];
        uint64_t any = 0;
        for (int q = 0; q < Q; ++q) {
          std::memcpy(&u[q], g + 8 * q, 8);
          any |= u[q];
        }
        if (!any) continue;
        full = false;
      }
      if (full) add_client<DT, NZ, false, Q>(nm, dn, v[c], nullptr, wc, j);
      else add_client<DT, NZ, true, Q>(nm, dn, v[c], g, wc, j);
    } else {
      add_client<DT, NZ, false, Q>(nm, dn, v[c], nullptr, wc, j);
    }
  }
  for (int q = 0; q < Q; ++q) {
    _mm256_storeu_ps(num + j + 8 * q, nm[q]);
    _mm256_storeu_ps(den + j + 8 * q, dn[q]);
  }
}

template <int DT>
FK_AVX2_INLINE float widen1(const void* p, int64_t j) {
  if (DT == FK_F32) return static_cast<const float*>(p)[j];
  const uint16_t h = static_cast<const uint16_t*>(p)[j];
  return DT == FK_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

template <int DT, bool NZ, bool GATED>
FK_AVX2_TARGET void multi_t(float* num, float* den, const void* const* v, const uint8_t* const* gates,
                            const float* w, int64_t n, int G) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) block<DT, NZ, GATED, 4>(num, den, v, gates, w, j, G);
  for (; j + 8 <= n; j += 8) block<DT, NZ, GATED, 1>(num, den, v, gates, w, j, G);
  // the last n % 8 elements: the scalar definition, element by element, clients in order
  for (; j < n; ++j) {
    float nm = num[j], dn = den[j];
    for (int c = 0; c < G; ++c) {
      if (GATED && gates[c][j] == 0) continue;
      const float x = widen1<DT>(v[c], j);
      if (NZ && (f32_to_bits(x) & 0x7fffffffu) == 0u) continue;
      const float t = w[c] * x;
      nm = nm + t;
      dn = dn + w[c];
    }
    num[j] = nm;
    den[j] = dn;
  }
}

}  // namespace

FK_DEFINE_ACCUM_MULTI(accum_multi_avx2)

}  // namespace fkcpu

#endif  // __x86_64__
