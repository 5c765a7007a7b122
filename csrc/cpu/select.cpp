// Neuron selection on the CPU: fk_cpu_frequency_update, fk_cpu_stable_argsort, fk_cpu_nested_masks.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "fk_cpu_internal.h"

using namespace fkcpu;

namespace {

/* freq[n] += count[n] in freq's dtype (the count converted to that dtype first, like
 * torch's freq.add_(count.to(freq.dtype))). Integer adds wrap like torch's. */
void add_counts(void* freq, int32_t dt, const int64_t* count, int64_t n0, int64_t n1) {
  switch (dt) {
    case FK_KEY_F32: {
      float* f = static_cast<float*>(freq);
      for (int64_t n = n0; n < n1; ++n) f[n] = f[n] + (float)count[n - n0];
      break;
    }
    case FK_KEY_F64: {
      double* f = static_cast<double*>(freq);
      for (int64_t n = n0; n < n1; ++n) f[n] = f[n] + (double)count[n - n0];
      break;
    }
    case FK_KEY_I32: {
      int32_t* f = static_cast<int32_t*>(freq);
      for (int64_t n = n0; n < n1; ++n) f[n] = (int32_t)((uint32_t)f[n] + (uint32_t)count[n - n0]);
      break;
    }
    default: {
      int64_t* f = static_cast<int64_t*>(freq);
      for (int64_t n = n0; n < n1; ++n) f[n] = (int64_t)((uint64_t)f[n] + (uint64_t)count[n - n0]);
      break;
    }
  }
}

constexpr int64_t kFreqChunk = 4096;

}  // namespace

extern "C" int fk_cpu_frequency_update(void* freq, int32_t freq_dtype, const uint8_t* masks,
                                       const int32_t* rank, const int32_t* sizes, int64_t K, int64_t N,
                                       int nthreads) {
  const char* fn = "fk_cpu_frequency_update";
  try {
    if (freq_dtype < FK_KEY_F32 || freq_dtype > FK_KEY_I64)
      return fail(FK_EINVAL, "%s: freq_dtype must be one of FK_KEY_* (got %d)", fn, (int)freq_dtype);
    if (K < 0 || N < 0) return fail(FK_EINVAL, "%s: K and N must be >= 0", fn);
    if ((masks != nullptr) == (rank != nullptr || sizes != nullptr))
      return fail(FK_EINVAL, "%s: give exactly one of masks or (rank, sizes)", fn);
    if (!masks && (!rank || !sizes)) return fail(FK_EINVAL, "%s: the nested form needs both rank and sizes", fn);
    if (N == 0) return FK_OK;
    if (!freq) return fail(FK_EINVAL, "%s: freq is NULL", fn);
    const int64_t nchunks = (N + kFreqChunk - 1) / kFreqChunk;

    if (masks) {
      const int nt = pick_threads(nthreads, K * N, int64_t(1) << 18);
      parallel_region(nt, [&] {
        std::vector<int64_t> cnt64(kFreqChunk);
        std::vector<uint16_t> cnt16(kFreqChunk);
#pragma omp for schedule(static)
        for (int64_t ch = 0; ch < nchunks; ++ch) {
          const int64_t n0 = ch * kFreqChunk, len = std::min(kFreqChunk, N - n0);
          std::fill(cnt64.begin(), cnt64.begin() + len, 0);
          // count in 16-bit lanes (vectorises), spilling to 64-bit every 65535 clients
          for (int64_t k0 = 0; k0 < K; k0 += 65535) {
            const int64_t k1 = std::min(K, k0 + 65535);
            std::fill(cnt16.begin(), cnt16.begin() + len, 0);
            uint16_t* c16 = cnt16.data();
            for (int64_t k = k0; k < k1; ++k) {
              const uint8_t* m = masks + k * N + n0;
              for (int64_t j = 0; j < len; ++j) c16[j] = (uint16_t)(c16[j] + (m[j] != 0));
            }
            for (int64_t j = 0; j < len; ++j) cnt64[j] += c16[j];
          }
          add_counts(freq, freq_dtype, cnt64.data(), n0, n0 + len);
        }
      });
      return FK_OK;
    }

    // Nested form, O(N + K): cnt_gt[r] = #{k : sizes[k] > r}, then freq[n] += cnt_gt[rank[n]].
    for (int64_t n = 0; n < N; ++n)
      if (rank[n] < 0 || rank[n] >= N) return fail(FK_EINVAL, "%s: rank[%lld] = %d is outside [0, N)", fn, (long long)n, (int)rank[n]);
    std::vector<int64_t> hist((size_t)N + 1, 0);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t s = std::min<int64_t>(std::max<int32_t>(sizes[k], 0), N);
      hist[s] += 1;
    }
    std::vector<int64_t> cnt_gt((size_t)N);
    int64_t run = 0;  // #{k : sizes[k] > r} = sum of hist[s] for s > r
    for (int64_t r = N - 1; r >= 0; --r) {
      run += hist[r + 1];
      cnt_gt[r] = run;
    }
    const int nt = pick_threads(nthreads, N, int64_t(1) << 18);
    parallel_region(nt, [&] {
      std::vector<int64_t> cnt(kFreqChunk);
#pragma omp for schedule(static)
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        const int64_t n0 = ch * kFreqChunk, len = std::min(kFreqChunk, N - n0);
        for (int64_t j = 0; j < len; ++j) cnt[j] = cnt_gt[rank[n0 + j]];
        add_counts(freq, freq_dtype, cnt.data(), n0, n0 + len);
      }
    });
    return FK_OK;
  } catch (const std::bad_alloc&) {
    return fail(FK_ENOMEM, "%s: out of memory", fn);
  }
}

/* ================================ stable argsort ================================================ */
/*
 * Keys are mapped to unsigned integers whose order is the keys' order, then shifted down by their
 * minimum so that only the bits that vary are sorted:
 *   integers            -> two's complement with the sign bit flipped;
 *   floats, all integral -> the integer value (so a float32 frequency table 0..5000 has a 13-bit
 *                          range, not the ~31 bits its bit patterns span);
 *   other floats        -> the bit pattern, all bits flipped for negatives, sign bit set for the
 *                          rest; -0.0 is first turned into +0.0 so that the two zeros tie, as in torch.
 * Then a stable LSD radix sort with the index as payload. When key bits + index bits fit in 64,
 * key and index travel packed in one word (16 B of traffic per element and pass); otherwise in two
 * arrays. Each pass: per-thread histograms of contiguous chunks, offsets laid out digit-major then
 * thread-major, and an in-order scatter by each thread, which keeps the pass stable. A key range of
 * at most 2^11 (e.g. a frequency table), or up to 2^16 when N >= 4 * range, needs one pass: a
 * counting sort.
 */
namespace {

constexpr int kMaxDigitBits = 11;
constexpr int64_t kCacheMax = int64_t(1) << 20;  // words of sort scratch kept between calls

template <class K>
FK_ALWAYS_INLINE uint64_t ordered_bits(K x);
template <>
FK_ALWAYS_INLINE uint64_t ordered_bits<float>(float x) {
  uint32_t u = f32_to_bits(x);
  if (u == 0x80000000u) u = 0;  // -0.0 == +0.0
  return (u & 0x80000000u) ? (uint64_t)(~u) : (uint64_t)(u | 0x80000000u);
}
template <>
FK_ALWAYS_INLINE uint64_t ordered_bits<double>(double x) {
  uint64_t u;
  std::memcpy(&u, &x, 8);
  if (u == 0x8000000000000000ull) u = 0;
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
template <>
FK_ALWAYS_INLINE uint64_t ordered_bits<int32_t>(int32_t x) { return (uint64_t)(int64_t)x ^ 0x8000000000000000ull; }
template <>
FK_ALWAYS_INLINE uint64_t ordered_bits<int64_t>(int64_t x) { return (uint64_t)x ^ 0x8000000000000000ull; }

/* the key as an order-preserving word; as_int: integral floats by value */
template <class K>
FK_ALWAYS_INLINE uint64_t map_key(K x, bool as_int) {
  if (std::is_floating_point<K>::value && as_int) return (uint64_t)(int64_t)x ^ 0x8000000000000000ull;
  return ordered_bits<K>(x);
}

int bit_width(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }

struct RadixPlan {
  int passes = 0;
  int bits[8] = {0};  // digit width per pass
};

RadixPlan plan_digits(int kb, int64_t N) {
  RadixPlan p;
  p.passes = (kb + kMaxDigitBits - 1) / kMaxDigitBits;
  if (p.passes > 1 && kb <= 16 && (int64_t(4) << kb) <= N) p.passes = 1;  // one wide counting pass
  int left = kb;
  for (int q = 0; q < p.passes; ++q) {
    const int b = (left + (p.passes - q) - 1) / (p.passes - q);
    p.bits[q] = b;
    left -= b;
  }
  return p;
}

/* One stable counting pass, called by every thread of the team (or serially): digit(i) is element
 * i's digit, put(pos, i) moves element i to position pos. hist holds nb counters per thread. */
template <class Digit, class Put>
void radix_pass(int64_t N, int nb, int64_t* hist, const Digit& digit, const Put& put) {
  const int nt = omp_get_num_threads();
  const int tid = omp_get_thread_num();
  const int64_t lo = N * tid / nt, hi = N * (tid + 1) / nt;
  int64_t* h = hist + (int64_t)tid * nb;
  std::fill(h, h + nb, 0);
  for (int64_t i = lo; i < hi; ++i) ++h[digit(i)];
#pragma omp barrier
#pragma omp single
  {
    int64_t run = 0;
    for (int b = 0; b < nb; ++b)
      for (int t = 0; t < nt; ++t) {
        const int64_t c = hist[(int64_t)t * nb + b];
        hist[(int64_t)t * nb + b] = run;
        run += c;
      }
  }  // implicit barrier
  for (int64_t i = lo; i < hi; ++i) put(h[digit(i)]++, i);
#pragma omp barrier
}

/* Scratch words, reused between calls on the same thread up to kCacheMax words each (avoids the
 * page faults of fresh allocations for repeated mid-size sorts). */
struct WordBuf {
  std::unique_ptr<uint64_t[]> owned;
  uint64_t* p = nullptr;
  WordBuf(int64_t n, std::vector<uint64_t>& cache) {
    if (n <= kCacheMax) {
      if ((int64_t)cache.size() < n) cache.resize((size_t)n);
      p = cache.data();
    } else {
      owned.reset(new uint64_t[(size_t)n]);
      p = owned.get();
    }
  }
};
thread_local std::vector<uint64_t> t_cacheA, t_cacheB;

/* min / max of x[0, n) and, for floats, whether one is NaN / one is not an integer below 2^62
 * (2^31 for float32), in simple loops the compiler vectorises. */
template <class K>
void scan_keys(const K* __restrict x, int64_t n, K& mn, K& mx, int& nan, int& nonint) {
  K a = mn, b = mx;
  for (int64_t i = 0; i < n; ++i) {
    a = x[i] < a ? x[i] : a;
    b = x[i] > b ? x[i] : b;
  }
  mn = a;
  mx = b;
  if (!std::is_floating_point<K>::value) return;
  int bad = 0, nonint_l = 0;
  if (sizeof(K) == 4) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = (float)x[i];
      const bool small = std::fabs(v) < 0x1p31f;
      const float vc = small ? v : 0.0f;
      bad |= v != v;
      nonint_l |= (!small) | ((float)(int32_t)vc != v);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const double v = (double)x[i];
      const bool small = std::fabs(v) < 0x1p62;
      const double vc = small ? v : 0.0;
      bad |= v != v;
      nonint_l |= (!small) | ((double)(int64_t)vc != v);
    }
  }
  nan |= bad;
  nonint |= nonint_l;
}

template <class K>
int argsort_typed(const K* keys, int64_t* order, int64_t N, int nthreads) {
  const char* fn = "fk_cpu_stable_argsort";
  const bool is_float = std::is_floating_point<K>::value;
  // threads only for large N: the passes are short and each has barriers, which stall badly when
  // a thread is descheduled on a shared machine
  const int nt = pick_threads(nthreads, N, int64_t(1) << 21);

  // pass 0: min / max, NaN and integrality (floats)
  K kmin_v = keys[0], kmax_v = keys[0];
  int nan_seen = 0, nonint = 0;
  parallel_region(nt, [&] {
    K mn = keys[0], mx = keys[0];
    int nan_l = 0, nonint_l = 0;
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t lo = N * t / T, hi = N * (t + 1) / T;
    scan_keys(keys + lo, hi - lo, mn, mx, nan_l, nonint_l);
#pragma omp critical
    {
      kmin_v = mn < kmin_v ? mn : kmin_v;
      kmax_v = mx > kmax_v ? mx : kmax_v;
      nan_seen |= nan_l;
      nonint |= nonint_l;
    }
  });
  if (nan_seen) return fail(FK_EINVAL, "%s: keys contain NaN", fn);
  const bool as_int = is_float && !nonint;
  const uint64_t kmin = map_key<K>(kmin_v, as_int), kmax = map_key<K>(kmax_v, as_int);
  const int kb = bit_width(kmax - kmin);
  if (kb == 0) {  // all keys equal
    parallel_region(nt, [&] {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) order[i] = i;
    });
    return FK_OK;
  }
  const RadixPlan plan = plan_digits(kb, N);
  int maxb = 0;
  for (int q = 0; q < plan.passes; ++q) maxb = std::max(maxb, plan.bits[q]);
  std::vector<int64_t> hist((size_t)nt << maxb);
  const int ib = bit_width((uint64_t)(N - 1));  // index bits

  if (kb + ib <= 64) {
    // packed: word = (key - kmin) << ib | index
    WordBuf A(N, t_cacheA);
    WordBuf B(plan.passes > 1 ? N : 0, t_cacheB);
    const uint64_t imask = ib == 0 ? 0 : (~0ull >> (64 - ib));
    parallel_region(nt, [&] {
      uint64_t* s = A.p;
      uint64_t* d = B.p;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) s[i] = ((map_key<K>(keys[i], as_int) - kmin) << ib) | (uint64_t)i;
      int shift = ib;
      for (int q = 0; q < plan.passes; ++q) {
        const int b = plan.bits[q], sh = shift;
        const uint64_t dm = (1ull << b) - 1;
        auto digit = [&](int64_t i) { return (int)((s[i] >> sh) & dm); };
        if (q + 1 < plan.passes) {
          radix_pass(N, 1 << b, hist.data(), digit, [&](int64_t pos, int64_t i) { d[pos] = s[i]; });
          std::swap(s, d);
        } else {
          radix_pass(N, 1 << b, hist.data(), digit,
                     [&](int64_t pos, int64_t i) { order[pos] = (int64_t)(s[i] & imask); });
        }
        shift += b;
      }
    });
    return FK_OK;
  }

  // wide: keys and indices in separate arrays
  std::unique_ptr<uint64_t[]> KA(new uint64_t[(size_t)N]), KB(new uint64_t[(size_t)N]);
  std::unique_ptr<int64_t[]> IA(new int64_t[(size_t)N]);
  std::unique_ptr<int64_t[]> IB(plan.passes > 1 ? new int64_t[(size_t)N] : nullptr);
  parallel_region(nt, [&] {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      KA[i] = map_key<K>(keys[i], as_int) - kmin;
      IA[i] = i;
    }
    uint64_t* ks = KA.get();
    uint64_t* kd = KB.get();
    int64_t* is = IA.get();
    int64_t* id = IB.get();
    int shift = 0;
    for (int q = 0; q < plan.passes; ++q) {
      const int b = plan.bits[q], sh = shift;
      const uint64_t dm = (1ull << b) - 1;
      auto digit = [&](int64_t i) { return (int)((ks[i] >> sh) & dm); };
      if (q + 1 < plan.passes) {
        radix_pass(N, 1 << b, hist.data(), digit, [&](int64_t pos, int64_t i) {
          kd[pos] = ks[i];
          id[pos] = is[i];
        });
        std::swap(ks, kd);
        std::swap(is, id);
      } else {
        radix_pass(N, 1 << b, hist.data(), digit, [&](int64_t pos, int64_t i) { order[pos] = is[i]; });
      }
      shift += b;
    }
  });
  return FK_OK;
}

}  // namespace

extern "C" int fk_cpu_stable_argsort(const void* keys, int32_t key_dtype, int64_t* order, int64_t N,
                                     int nthreads) {
  const char* fn = "fk_cpu_stable_argsort";
  try {
    if (N < 0) return fail(FK_EINVAL, "%s: N must be >= 0", fn);
    if (N == 0) return FK_OK;
    if (!keys || !order) return fail(FK_EINVAL, "%s: keys and order must be non-NULL", fn);
    switch (key_dtype) {
      case FK_KEY_F32: return argsort_typed(static_cast<const float*>(keys), order, N, nthreads);
      case FK_KEY_F64: return argsort_typed(static_cast<const double*>(keys), order, N, nthreads);
      case FK_KEY_I32: return argsort_typed(static_cast<const int32_t*>(keys), order, N, nthreads);
      case FK_KEY_I64: return argsort_typed(static_cast<const int64_t*>(keys), order, N, nthreads);
      default: return fail(FK_EINVAL, "%s: key_dtype must be one of FK_KEY_* (got %d)", fn, (int)key_dtype);
    }
  } catch (const std::bad_alloc&) {
    return fail(FK_ENOMEM, "%s: out of memory", fn);
  }
}

/* ================================ nested masks ================================================== */

extern "C" int fk_cpu_nested_masks(uint8_t* out, const int64_t* order, const int64_t* sizes, int64_t S,
                                   int64_t N, int nthreads) {
  const char* fn = "fk_cpu_nested_masks";
  try {
    if (S < 0 || N < 0) return fail(FK_EINVAL, "%s: S and N must be >= 0", fn);
    if (S == 0 || N == 0) return FK_OK;
    if (!out || !order || !sizes) return fail(FK_EINVAL, "%s: out, order and sizes must be non-NULL", fn);
    for (int64_t s = 0; s < S; ++s)
      if (sizes[s] < 0 || sizes[s] > N)
        return fail(FK_EINVAL, "%s: sizes[%lld] = %lld is outside [0, N]", fn, (long long)s, (long long)sizes[s]);
    // rank[order[j]] = j; a permutation check comes for free
    std::vector<int64_t> rank((size_t)N, -1);
    for (int64_t j = 0; j < N; ++j) {
      const int64_t n = order[j];
      if (n < 0 || n >= N) return fail(FK_EINVAL, "%s: order[%lld] = %lld is outside [0, N)", fn, (long long)j, (long long)n);
      if (rank[n] >= 0) return fail(FK_EINVAL, "%s: order is not a permutation (%lld repeats)", fn, (long long)n);
      rank[n] = j;
    }
    const int64_t chunk = 1 << 14;
    const int64_t nch = (N + chunk - 1) / chunk;
    const int nt = pick_threads(nthreads, S * N, int64_t(1) << 18);
    parallel_region(nt, [&] {
#pragma omp for collapse(2) schedule(static)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t ch = 0; ch < nch; ++ch) {
          const int64_t n0 = ch * chunk, n1 = std::min(N, n0 + chunk);
          const int64_t sz = sizes[s];
          const int64_t* rk = rank.data();
          uint8_t* o = out + s * N;
          for (int64_t n = n0; n < n1; ++n) o[n] = rk[n] < sz ? 1 : 0;
        }
    });
    return FK_OK;
  } catch (const std::bad_alloc&) {
    return fail(FK_ENOMEM, "%s: out of memory", fn);
  }
}
