/*
 * fk_host_emu.cuh -- lets a host C++ compiler build the synchronisation-free kernels of this
 * directory (dense, structured, compact and the key transforms of the sort) for testing without
 * a GPU: tests/test_cuda_build.py compiles them with g++ -DFK_HOST_EMU and runs every thread of
 * the grid one after the other, comparing with the torch oracle bit for bit.
 *
 * Only what those kernels use is provided. Arithmetic intrinsics map to plain IEEE float
 * operations (the harness is built with -ffp-contract=off, so nothing is fused); __ldg is a plain
 * load; blockIdx/threadIdx/blockDim/gridDim are thread-local variables set by the harness.
 * Launchers and extern "C" entry points are excluded with #ifndef FK_HOST_EMU.
 */
#ifndef FK_HOST_EMU_CUH
#define FK_HOST_EMU_CUH

#include <math.h>
#include <stdint.h>
#include <string.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

typedef void* cudaStream_t;
typedef int cudaError_t;

struct fk_emu_dim3 {
  unsigned x, y, z;
};
extern thread_local fk_emu_dim3 blockIdx, threadIdx, blockDim, gridDim;

struct uint4 {
  unsigned int x, y, z, w;
};
struct uint2 {
  unsigned int x, y;
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

template <typename T>
inline T __ldg(const T* p) {
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __ll2float_rn(long long v) { return static_cast<float>(v); }
inline double __ll2double_rn(long long v) { return static_cast<double>(v); }

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline double __longlong_as_double(long long v) {
  double d;
  memcpy(&d, &v, 8);
  return d;
}

struct fk_emu_half {
  unsigned short bits;
};
inline fk_emu_half __ushort_as_half(unsigned short b) { return fk_emu_half{b}; }
/* Exact IEEE binary16 -> binary32 widening. */
inline float __half2float(fk_emu_half h) {
  const unsigned int s = (h.bits >> 15) & 1u, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  unsigned int out;
  if (e == 0x1fu) {
    out = (s << 31) | 0x7f800000u | (m << 13);  // Inf / NaN (payload kept)
  } else if (e != 0u) {
    out = (s << 31) | ((e + 112u) << 23) | (m << 13);
  } else if (m == 0u) {
    out = s << 31;
  } else {  // subnormal: normalise
    int ee = -1;
    unsigned int mm = m;
    do {
      ++ee;
      mm <<= 1;
    } while ((mm & 0x400u) == 0u);
    out = (s << 31) | ((112u - static_cast<unsigned int>(ee)) << 23) | ((mm & 0x3ffu) << 13);
  }
  return __uint_as_float(out);
}

#endif /* FK_HOST_EMU_CUH */
