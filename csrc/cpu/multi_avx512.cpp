// AVX-512 multi-client kernel for the dense entry point (explicit intrinsics).
//
// Blocks of 64 elements: num/den live in 8 zmm registers while all G clients of the group are
// added in order, so every client streams through its row once and the accumulators never go
// back to memory between clients. Per client and 16 lanes: one (widening) load, the activity mask
// (gate bytes and/or the non-zero test, both as integer tests like the portable kernels), one
// multiply and two masked adds -- the same IEEE operations in the same order as the scalar
// definition, so the result is bit-identical to every other kernel. Non-finite flags are not
// tracked here: callers use the tracking kernels for the rare re-run of a tile.
#include "fk_cpu_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

// GCC 12 reports the deliberately undefined pass-through vectors inside the intrinsics headers
// (_mm512_undefined_*) as maybe-uninitialized; they are never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define FK_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi,bmi2,popcnt,f16c")))
#define FK_AVX512_INLINE FK_AVX512_TARGET inline __attribute__((always_inline))

namespace fkcpu {
namespace {

/* exact float16 -> float32 of 16 lanes with integer operations only (as f16_to_f32) */
FK_AVX512_INLINE __m512 widen_f16(__m256i h16) {
  const __m512i h = _mm512_cvtepu16_epi32(h16);
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(h, _mm512_set1_epi32(0x8000)), 16);
  const __m512i em = _mm512_and_si512(h, _mm512_set1_epi32(0x7fff));
  const __m512i sh = _mm512_slli_epi32(em, 13);
  const __m512i normal = _mm512_add_epi32(sh, _mm512_set1_epi32((127 - 15) << 23));
  const __m512i special = _mm512_or_si512(sh, _mm512_set1_epi32(0x7f800000));
  const __m512i sub = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(em), _mm512_set1_ps(0x1p-24f)));
  const __mmask16 is_sub = _mm512_cmplt_epi32_mask(em, _mm512_set1_epi32(0x0400));
  const __mmask16 is_special = _mm512_cmpge_epi32_mask(em, _mm512_set1_epi32(0x7c00));
  __m512i mag = _mm512_mask_blend_epi32(is_special, normal, special);
  mag = _mm512_mask_blend_epi32(is_sub, mag, sub);
  return _mm512_castsi512_ps(_mm512_or_si512(sign, mag));
}

/* 16 values from element j of a row of dtype DT, masked lanes not read */
template <int DT>
FK_AVX512_INLINE __m512 load16(const void* p, int64_t j, __mmask16 m) {
  if (DT == FK_F32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + j);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + j);
  if (DT == FK_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return widen_f16(h);
}

template <int DT, bool NZ, bool GATED>
FK_AVX512_TARGET void multi_t(float* num, float* den, const void* const* v, const uint8_t* const* gates,
                              const float* w, int64_t n, int G) {
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t rem = n - j;
    const __mmask64 bm = rem >= 64 ? ~0ull : ((1ull << rem) - 1);
    const __mmask16 b0 = (__mmask16)bm, b1 = (__mmask16)(bm >> 16), b2 = (__mmask16)(bm >> 32),
                    b3 = (__mmask16)(bm >> 48);
    __m512 n0 = _mm512_maskz_loadu_ps(b0, num + j), n1 = _mm512_maskz_loadu_ps(b1, num + j + 16);
    __m512 n2 = _mm512_maskz_loadu_ps(b2, num + j + 32), n3 = _mm512_maskz_loadu_ps(b3, num + j + 48);
    __m512 d0 = _mm512_maskz_loadu_ps(b0, den + j), d1 = _mm512_maskz_loadu_ps(b1, den + j + 16);
    __m512 d2 = _mm512_maskz_loadu_ps(b2, den + j + 32), d3 = _mm512_maskz_loadu_ps(b3, den + j + 48);
    for (int c = 0; c < G; ++c) {
      __mmask64 act = bm;
      if (GATED) {
        const __m512i gb = _mm512_maskz_loadu_epi8(bm, gates[c] + j);
        act = _mm512_test_epi8_mask(gb, gb);
        if (!act) continue;  // dead chunk: the client's values are not read
      }
      __mmask16 a0 = (__mmask16)act, a1 = (__mmask16)(act >> 16), a2 = (__mmask16)(act >> 32),
                a3 = (__mmask16)(act >> 48);
      const __m512 x0 = load16<DT>(v[c], j, a0), x1 = load16<DT>(v[c], j + 16, a1);
      const __m512 x2 = load16<DT>(v[c], j + 32, a2), x3 = load16<DT>(v[c], j + 48, a3);
      if (NZ) {  // x != 0 (NaN included), as an integer test
        a0 = _mm512_mask_test_epi32_mask(a0, _mm512_castps_si512(x0), absmask);
        a1 = _mm512_mask_test_epi32_mask(a1, _mm512_castps_si512(x1), absmask);
        a2 = _mm512_mask_test_epi32_mask(a2, _mm512_castps_si512(x2), absmask);
        a3 = _mm512_mask_test_epi32_mask(a3, _mm512_castps_si512(x3), absmask);
      }
      const __m512 wc = _mm512_set1_ps(w[c]);
      n0 = _mm512_mask_add_ps(n0, a0, n0, _mm512_mul_ps(wc, x0));
      n1 = _mm512_mask_add_ps(n1, a1, n1, _mm512_mul_ps(wc, x1));
      n2 = _mm512_mask_add_ps(n2, a2, n2, _mm512_mul_ps(wc, x2));
      n3 = _mm512_mask_add_ps(n3, a3, n3, _mm512_mul_ps(wc, x3));
      d0 = _mm512_mask_add_ps(d0, a0, d0, wc);
      d1 = _mm512_mask_add_ps(d1, a1, d1, wc);
      d2 = _mm512_mask_add_ps(d2, a2, d2, wc);
      d3 = _mm512_mask_add_ps(d3, a3, d3, wc);
    }
    _mm512_mask_storeu_ps(num + j, b0, n0);
    _mm512_mask_storeu_ps(num + j + 16, b1, n1);
    _mm512_mask_storeu_ps(num + j + 32, b2, n2);
    _mm512_mask_storeu_ps(num + j + 48, b3, n3);
    _mm512_mask_storeu_ps(den + j, b0, d0);
    _mm512_mask_storeu_ps(den + j + 16, b1, d1);
    _mm512_mask_storeu_ps(den + j + 32, b2, d2);
    _mm512_mask_storeu_ps(den + j + 48, b3, d3);
  }
}

}  // namespace

FK_DEFINE_ACCUM_MULTI(accum_multi_avx512)

}  // namespace fkcpu

#endif  // __x86_64__
