/*
 * fk_keys.cuh -- order-preserving unsigned images of sort keys, and the sort plan (which bits of
 * the image differ between keys). Used by argsort.cu; host-compilable (tests run these functions
 * through fk_host_emu.cuh to check the images against torch's ordering).
 *
 *   ORD: IEEE floats with -0.0 normalised to +0.0, sign bit flipped for non-negative values and
 *        all bits flipped for negative ones; integers: sign bit flipped.
 *   INT: float keys whose values are all integers in [-2^31, 2^31): the int32 value, sign flipped.
 */
#ifndef FK_KEYS_CUH
#define FK_KEYS_CUH

#include <stdint.h>

#include "fk_cuda_common.cuh"

namespace fk {
namespace {

enum { MODE_ORD = 0, MODE_INT = 1 };

template <int KD>
struct KeyTraits;
template <>
struct KeyTraits<FK_KEY_F32> {
  using Raw = unsigned int;
  static constexpr bool is_float = true;
  static constexpr int width = 32;
};
template <>
struct KeyTraits<FK_KEY_F64> {
  using Raw = unsigned long long;
  static constexpr bool is_float = true;
  static constexpr int width = 64;
};
template <>
struct KeyTraits<FK_KEY_I32> {
  using Raw = unsigned int;
  static constexpr bool is_float = false;
  static constexpr int width = 32;
};
template <>
struct KeyTraits<FK_KEY_I64> {
  using Raw = unsigned long long;
  static constexpr bool is_float = false;
  static constexpr int width = 64;
};

/* Order-preserving unsigned image of a key (ORD). */
template <int KD>
__device__ __forceinline__ unsigned long long ord_rep(typename KeyTraits<KD>::Raw b) {
  if constexpr (KD == FK_KEY_F32) {
    if (b == 0x80000000u) b = 0u;  // -0.0 -> +0.0
    return (b & 0x80000000u) ? static_cast<unsigned long long>(~b) : static_cast<unsigned long long>(b | 0x80000000u);
  } else if constexpr (KD == FK_KEY_F64) {
    if (b == 0x8000000000000000ull) b = 0ull;
    return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
  } else if constexpr (KD == FK_KEY_I32) {
    return static_cast<unsigned long long>(b ^ 0x80000000u);
  } else {
    return b ^ 0x8000000000000000ull;
  }
}

/* INT image of a float key; false when the key is not an integer in [-2^31, 2^31). */
template <int KD>
__device__ __forceinline__ bool int_rep(typename KeyTraits<KD>::Raw b, unsigned int& r) {
  if constexpr (KD == FK_KEY_F32) {
    const float x = __uint_as_float(b);
    if (x == truncf(x) && x >= -2147483648.0f && x < 2147483648.0f) {
      r = static_cast<unsigned int>(static_cast<int>(x)) ^ 0x80000000u;
      return true;
    }
    return false;
  } else if constexpr (KD == FK_KEY_F64) {
    const double x = __longlong_as_double(static_cast<long long>(b));
    if (x == trunc(x) && x >= -2147483648.0 && x < 2147483648.0) {
      r = static_cast<unsigned int>(static_cast<int>(x)) ^ 0x80000000u;
      return true;
    }
    return false;
  } else {
    r = 0u;
    return false;
  }
}

/* The key as sorted: image (per plan.mode) shifted right by plan.lo. */
template <int KD>
__device__ __forceinline__ unsigned long long plan_key(typename KeyTraits<KD>::Raw b, int mode, int lo) {
  unsigned long long r;
  if constexpr (KeyTraits<KD>::is_float) {
    if (mode == MODE_INT) {
      unsigned int ri = 0u;
      (void)int_rep<KD>(b, ri);
      r = ri;
    } else {
      r = ord_rep<KD>(b);
    }
  } else {
    r = ord_rep<KD>(b);
  }
  return r >> lo;
}

/* OR-accumulated facts about all keys (AND(x) is kept as OR(~x), so one memset to 0 starts it). */
struct RangeAcc {
  unsigned long long or_o, nor_o;  // ORD image: OR of rep, OR of ~rep (within the key width)
  unsigned int or_i, nor_i;        // INT image, over keys where it exists
  unsigned int nonint;             // some key has no INT image
  unsigned int pad;
};

struct Plan {
  int mode;
  int lo;
  int nbits;  // significant bits; 0 = all keys equal
};

__host__ __device__ inline int ctz64(unsigned long long x) {
#ifdef __CUDA_ARCH__
  return __ffsll(static_cast<long long>(x)) - 1;
#else
  return __builtin_ctzll(x);
#endif
}

__host__ __device__ inline int clz64(unsigned long long x) {
#ifdef __CUDA_ARCH__
  return __clzll(static_cast<long long>(x));
#else
  return __builtin_clzll(x);
#endif
}

__host__ __device__ inline Plan make_plan(const RangeAcc& r, bool is_float, int width) {
  const unsigned long long wmask = width == 64 ? ~0ull : ((1ull << width) - 1ull);
  const unsigned long long var_o = (r.or_o ^ (~r.nor_o & wmask)) & wmask;
  Plan p{MODE_ORD, 0, 0};
  if (var_o != 0ull) {
    p.lo = ctz64(var_o);
    p.nbits = 64 - clz64(var_o) - p.lo;
  }
  if (is_float && r.nonint == 0u) {
    const unsigned long long var_i = static_cast<unsigned long long>(r.or_i ^ ~r.nor_i);
    Plan q{MODE_INT, 0, 0};
    if (var_i != 0ull) {
      q.lo = ctz64(var_i);
      q.nbits = 64 - clz64(var_i) - q.lo;
    }
    if (q.nbits <= p.nbits) p = q;
  }
  return p;
}

}  // namespace
}  // namespace fk

#endif /* FK_KEYS_CUH */
