// The hot loops of the CPU back end, compiled once per instruction-set level.
//
// Everything below the per-level entry points is always_inline, so each entry point's body (and
// every template it instantiates) is compiled and auto-vectorised for that entry point's target.
// The loops are branch-free: the conditional updates are written as selects of values computed
// unconditionally, which the vectoriser turns into blends / masked moves; the arithmetic is the
// scalar definition (one multiply, one add, one rounding each) in every lane.
#include "fk_cpu_internal.h"

namespace fkcpu {
namespace {

template <int DT>
struct Elem;
template <>
struct Elem<FK_F32> {
  typedef float type;
  static FK_ALWAYS_INLINE float widen(float x) { return x; }
};
template <>
struct Elem<FK_BF16> {
  typedef uint16_t type;
  static FK_ALWAYS_INLINE float widen(uint16_t x) { return bf16_to_f32(x); }
};
template <>
struct Elem<FK_F16> {
  typedef uint16_t type;
  static FK_ALWAYS_INLINE float widen(uint16_t x) { return f16_to_f32(x); }
};

#define FK_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))

constexpr int64_t kChunk = 64;  // gate-skip granularity (elements)

FK_ALWAYS_INLINE uint32_t is_nonfinite(float x) {  // exponent all ones <=> inf or nan
  return (f32_to_bits(x) & 0x7f800000u) == 0x7f800000u;
}
FK_ALWAYS_INLINE bool is_nonzero(float x) {  // x != 0 (NaN included), as an integer test
  return (f32_to_bits(x) & 0x7fffffffu) != 0u;
}

/* One client over a contiguous run. TRACK: also report whether an active value is non-finite
 * (the fast path leaves it out; callers re-run a tile with TRACK only when its num turned out
 * non-finite, which an active non-finite value always causes). */
template <int DT, bool NZ, bool GATED, bool TRACK>
static FK_ALWAYS_INLINE uint32_t accum_run(float* __restrict num, float* __restrict den,
                                            const typename Elem<DT>::type* __restrict v,
                                            const uint8_t* __restrict gate, int64_t n, float w) {
  uint32_t bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float x = Elem<DT>::widen(v[j]);
    bool a = true;
    if (GATED) a = gate[j] != 0;
    if (NZ) a = a & is_nonzero(x);
    const float t = w * x;
    const float s = num[j] + t;
    const float d = den[j] + w;
    num[j] = a ? s : num[j];
    den[j] = a ? d : den[j];
    if (TRACK) bad |= (uint32_t)a & is_nonfinite(x);
  }
  return bad;
}

static FK_ALWAYS_INLINE uint64_t load_u64(const uint8_t* p) {
  uint64_t u;
  std::memcpy(&u, p, 8);
  return u;
}

template <int DT, bool NZ, bool TRACK>
static FK_ALWAYS_INLINE uint32_t accum_gated(float* num, float* den, const void* vp,
                                              const uint8_t* gate, int64_t n, float w) {
  typedef typename Elem<DT>::type T;
  const T* v = static_cast<const T*>(vp);
  uint32_t bad = 0;
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    uint64_t any = 0, all = ~0ull;
    for (int q = 0; q < kChunk / 8; ++q) {
      const uint64_t u = load_u64(gate + j + 8 * q);
      any |= u;
      all &= u;
    }
    if (any == 0) continue;                       // dead chunk: values never read
    if (all == 0x0101010101010101ull)             // every byte is 1 (bool masks): no gate loads
      bad |= accum_run<DT, NZ, false, TRACK>(num + j, den + j, v + j, nullptr, kChunk, w);
    else
      bad |= accum_run<DT, NZ, true, TRACK>(num + j, den + j, v + j, gate + j, kChunk, w);
  }
  if (j < n) bad |= accum_run<DT, NZ, true, TRACK>(num + j, den + j, v + j, gate + j, n - j, w);
  return bad;
}

template <int DT, bool NZ, bool TRACK>
static FK_ALWAYS_INLINE uint32_t accum_any(float* num, float* den, const void* v,
                                            const uint8_t* gate, int64_t n, float w) {
  if (gate) return accum_gated<DT, NZ, TRACK>(num, den, v, gate, n, w);
  return accum_run<DT, NZ, false, TRACK>(num, den, static_cast<const typename Elem<DT>::type*>(v),
                                         nullptr, n, w);
}

template <bool TRACK>
static FK_ALWAYS_INLINE uint32_t accum_body_t(float* num, float* den, const void* v, int dtype,
                                               const uint8_t* gate, int64_t n, float w, int nonzero) {
  switch (dtype * 2 + (nonzero ? 1 : 0)) {
    case FK_F32 * 2: return accum_any<FK_F32, false, TRACK>(num, den, v, gate, n, w);
    case FK_F32 * 2 + 1: return accum_any<FK_F32, true, TRACK>(num, den, v, gate, n, w);
    case FK_BF16 * 2: return accum_any<FK_BF16, false, TRACK>(num, den, v, gate, n, w);
    case FK_BF16 * 2 + 1: return accum_any<FK_BF16, true, TRACK>(num, den, v, gate, n, w);
    case FK_F16 * 2: return accum_any<FK_F16, false, TRACK>(num, den, v, gate, n, w);
    default: return accum_any<FK_F16, true, TRACK>(num, den, v, gate, n, w);
  }
}

static FK_ALWAYS_INLINE uint32_t accum_body(float* num, float* den, const void* v, int dtype,
                                             const uint8_t* gate, int64_t n, float w, int nonzero,
                                             int track) {
  return track ? accum_body_t<true>(num, den, v, dtype, gate, n, w, nonzero)
               : accum_body_t<false>(num, den, v, dtype, gate, n, w, nonzero);
}

/* G clients at once: num/den stay in registers across the G clients (added in client order), so
 * the tile buffers are loaded and stored once per G clients instead of once per client. NZ: the
 * non-zero rule; GATED: client c's gate bytes gp[c]. (No non-finite tracking: the rare re-run of a
 * tile goes client by client.) */
template <int DT, int G, bool NZ, bool GATED>
static FK_ALWAYS_INLINE void accum_group_t(float* __restrict num, float* __restrict den, const void* const* vp,
                                           const uint8_t* const* gp, const float* wp, int64_t off, int64_t n) {
  typedef typename Elem<DT>::type T;
  const T* __restrict v[G];
  const uint8_t* __restrict gt[G];
  float w[G];
  for (int c = 0; c < G; ++c) {
    v[c] = static_cast<const T*>(vp[c]) + off;
    gt[c] = GATED ? gp[c] + off : nullptr;
    w[c] = wp[c];
  }
  num += off;
  den += off;
  for (int64_t j = 0; j < n; ++j) {
    float nm = num[j], dn = den[j];
    // straight-line over c (G is a constant): the clients in order, num/den in registers
    auto step = [&](const int c) FK_ALWAYS_INLINE_LAMBDA {
      const float x = Elem<DT>::widen(v[c][j]);
      bool a = true;
      if (GATED) a = gt[c][j] != 0;
      if (NZ) a = a & is_nonzero(x);
      const float t = w[c] * x;
      const float s = nm + t;
      const float d = dn + w[c];
      nm = a ? s : nm;
      dn = a ? d : dn;
    };
    step(0);
    if (G > 1) step(1);
    if (G > 2) step(2);
    if (G > 3) step(3);
    num[j] = nm;
    den[j] = dn;
  }
}

/* G clients with gates, chunk by chunk: a chunk where every client's gate is all ones runs
 * ungated, one where none is all zeros runs gated, and one where some client's gate is all zeros
 * runs client by client (in order) so that the dead clients' values are not read. */
template <int DT, int G>
static FK_ALWAYS_INLINE void accum_masked_group_t(float* num, float* den, const void* const* vp,
                                                  const uint8_t* const* gp, const float* wp, int64_t n) {
  typedef typename Elem<DT>::type T;
  int64_t j = 0;
  for (; j + kChunk <= n; j += kChunk) {
    uint32_t dead = 0, full = 0;
    for (int c = 0; c < G; ++c) {
      uint64_t any = 0, all = ~0ull;
      for (int q = 0; q < kChunk / 8; ++q) {
        const uint64_t u = load_u64(gp[c] + j + 8 * q);
        any |= u;
        all &= u;
      }
      dead |= (any == 0 ? 1u : 0u) << c;
      full |= (all == 0x0101010101010101ull ? 1u : 0u) << c;
    }
    const uint32_t every = (1u << G) - 1;
    if (dead == every) continue;
    if (dead == 0) {
      if (full == every) accum_group_t<DT, G, false, false>(num, den, vp, gp, wp, j, kChunk);
      else accum_group_t<DT, G, false, true>(num, den, vp, gp, wp, j, kChunk);
      continue;
    }
    for (int c = 0; c < G; ++c) {
      if (dead >> c & 1u) continue;
      const T* v = static_cast<const T*>(vp[c]) + j;
      if (full >> c & 1u) accum_run<DT, false, false, false>(num + j, den + j, v, nullptr, kChunk, wp[c]);
      else accum_run<DT, false, true, false>(num + j, den + j, v, gp[c] + j, kChunk, wp[c]);
    }
  }
  if (j < n) accum_group_t<DT, G, false, true>(num, den, vp, gp, wp, j, n - j);
}

template <int DT>
static FK_ALWAYS_INLINE void accum_group_d(float* num, float* den, const void* const* v, const uint8_t* const* gates,
                                           const float* w, int64_t n, int G) {
  if (gates) {
    switch (G) {
      case 1: accum_masked_group_t<DT, 1>(num, den, v, gates, w, n); return;
      case 2: accum_masked_group_t<DT, 2>(num, den, v, gates, w, n); return;
      case 3: accum_masked_group_t<DT, 3>(num, den, v, gates, w, n); return;
      default: accum_masked_group_t<DT, 4>(num, den, v, gates, w, n); return;
    }
  }
  switch (G) {
    case 1: accum_group_t<DT, 1, true, false>(num, den, v, nullptr, w, 0, n); return;
    case 2: accum_group_t<DT, 2, true, false>(num, den, v, nullptr, w, 0, n); return;
    case 3: accum_group_t<DT, 3, true, false>(num, den, v, nullptr, w, 0, n); return;
    default: accum_group_t<DT, 4, true, false>(num, den, v, nullptr, w, 0, n); return;
  }
}

static FK_ALWAYS_INLINE void accum_group_body(float* num, float* den, const void* const* v, int dtype,
                                              const uint8_t* const* gates, const float* w, int64_t n, int G) {
  if (dtype == FK_F32) accum_group_d<FK_F32>(num, den, v, gates, w, n, G);
  else if (dtype == FK_BF16) accum_group_d<FK_BF16>(num, den, v, gates, w, n, G);
  else accum_group_d<FK_F16>(num, den, v, gates, w, n, G);
}

static FK_ALWAYS_INLINE int any_nonfinite_body(const float* __restrict x, int64_t n) {
  uint32_t acc = 0;
  for (int64_t j = 0; j < n; ++j) acc |= is_nonfinite(x[j]);
  return acc != 0;
}

static FK_ALWAYS_INLINE void finalize_body(float* out, const float* g, const float* __restrict num,
                                            const float* __restrict den, int64_t n) {
  // out may alias g (element j is read before it is written), never num/den.
  for (int64_t j = 0; j < n; ++j) {
    const float d = den[j];
    const float gj = g[j];
    const float r = gj + num[j] / d;
    out[j] = d > 0.0f ? r : gj;
  }
}

template <int DT>
static FK_ALWAYS_INLINE void widen_run(float* __restrict dst, const void* src, int64_t n) {
  const typename Elem<DT>::type* __restrict s = static_cast<const typename Elem<DT>::type*>(src);
  for (int64_t j = 0; j < n; ++j) dst[j] = Elem<DT>::widen(s[j]);
}

static FK_ALWAYS_INLINE void widen_body(float* dst, const void* src, int dtype, int64_t n) {
  if (dtype == FK_F32)
    std::memcpy(dst, src, (size_t)n * 4);
  else if (dtype == FK_BF16)
    widen_run<FK_BF16>(dst, src, n);
  else
    widen_run<FK_F16>(dst, src, n);
}

#define FK_DEFINE_LEVEL(NAME, ATTR)                                                              \
  ATTR uint32_t accum_##NAME(float* num, float* den, const void* v, int dtype,                  \
                             const uint8_t* gate, int64_t n, float w, int nonzero, int track) {  \
    return accum_body(num, den, v, dtype, gate, n, w, nonzero, track);                           \
  }                                                                                              \
  ATTR int any_nonfinite_##NAME(const float* x, int64_t n) { return any_nonfinite_body(x, n); } \
  ATTR void finalize_##NAME(float* out, const float* g, const float* num, const float* den,     \
                            int64_t n) {                                                         \
    finalize_body(out, g, num, den, n);                                                          \
  }                                                                                              \
  ATTR void widen_##NAME(float* dst, const void* src, int dtype, int64_t n) {                   \
    widen_body(dst, src, dtype, n);                                                              \
  }

/* the 4-client group kernels, for the levels without a multi-client kernel */
#define FK_DEFINE_GROUP(NAME, ATTR)                                                              \
  ATTR void accum_group_##NAME(float* num, float* den, const void* const* v, int dtype,         \
                               const uint8_t* const* gates, const float* w, int64_t n, int G) {  \
    accum_group_body(num, den, v, dtype, gates, w, n, G);                                        \
  }

FK_DEFINE_LEVEL(base, )
FK_DEFINE_GROUP(base, )
#if defined(__x86_64__)
FK_DEFINE_LEVEL(avx2, __attribute__((target("avx2,bmi,bmi2,popcnt,f16c"))))
FK_DEFINE_LEVEL(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi,bmi2,popcnt,f16c"))))
#endif

}  // namespace

const SpanKernels& span_kernels_for(Isa level) {
#define FK_TABLE(NAME, GROUP, MULTI) {accum_##NAME, GROUP, MULTI, any_nonfinite_##NAME, finalize_##NAME, widen_##NAME}
  static const SpanKernels base = FK_TABLE(base, accum_group_base, nullptr);
#if defined(__x86_64__)
  static const SpanKernels avx2 = FK_TABLE(avx2, nullptr, accum_multi_avx2);
  static const SpanKernels avx512 = FK_TABLE(avx512, nullptr, accum_multi_avx512);
  if (level >= ISA_AVX512) return avx512;
  if (level == ISA_AVX2) return avx2;
#endif
  (void)level;
  return base;
}

}  // namespace fkcpu
