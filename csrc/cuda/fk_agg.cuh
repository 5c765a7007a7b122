/*
 * fk_agg.cuh -- building blocks of the aggregation kernels (dense, structured, compact).
 *
 * Exactness: every accumulation step is  t = w * v  (rounded), num = num + t, den = den + w,
 * written with the _rn intrinsics so no multiply-add is ever contracted (the build also passes
 * -fmad=false), and the finalize step uses IEEE division (__fdiv_rn). Clients are visited in
 * order k = 0..K-1 by every thread, so results are bit-identical to the oracle and run to run.
 */
#ifndef FK_AGG_CUH
#define FK_AGG_CUH

#include <stdint.h>

#include "fk_cuda_common.cuh"
#ifndef FK_HOST_EMU
#include <cuda_fp16.h>
#endif

namespace fk {

/* Kernel-side copy of fk_accum_args plus alignment facts computed on the host. */
struct AggArgs {
  int64_t K;
  int64_t P;
  const void* const* rows;
  const float* weights;
  const float* g;
  float* out;
  const float* init_num;
  const float* init_den;
  float* acc_num;
  float* acc_den;
  int32_t* flags;
  int fvec;  // 1 when every float array in use is 16-byte aligned
};

constexpr int kAggThreads = 256;  // threads per block of every aggregation kernel
constexpr int kClientUnroll = 4;  // clients whose loads are issued before the first use

/* Element size of update dtype DT (FK_F32 / FK_BF16 / FK_F16), and V: elements per 16 bytes. */
template <int DT>
struct Vec {
  static constexpr int bytes = (DT == FK_F32) ? 4 : 2;
  static constexpr int V = 16 / bytes;
};

/* A group of E contiguous elements of dtype DT packed in NW 32-bit words (8 or 16 bytes). */
template <int DT, int E>
struct Group {
  static constexpr int bytes = E * Vec<DT>::bytes;
  static constexpr int NW = bytes / 4;
  static_assert(bytes == 8 || bytes == 16, "a group is 8 or 16 bytes");
};

/* Element j (compile-time after unrolling) of a packed group, widened exactly. */
template <int DT, int NW>
__device__ __forceinline__ float elem(const uint32_t (&w)[NW], int j) {
  if (DT == FK_F32) {
    return __uint_as_float(w[j]);
  } else {
    const uint32_t h = (w[j >> 1] >> ((j & 1) * 16)) & 0xffffu;
    if (DT == FK_BF16) return __uint_as_float(h << 16);
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
  }
}

/* Loads one element of dtype DT (at element index idx of `row`) as its raw bits. */
template <int DT>
__device__ __forceinline__ uint32_t load_bits(const void* row, int64_t idx) {
  if (DT == FK_F32) return __ldg(static_cast<const unsigned int*>(row) + idx);
  return static_cast<uint32_t>(__ldg(static_cast<const unsigned short*>(row) + idx));
}

template <int DT>
__device__ __forceinline__ float bits_to_float(uint32_t b) {
  if (DT == FK_F32) return __uint_as_float(b);
  if (DT == FK_BF16) return __uint_as_float(b << 16);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}

/* Loads the group of E elements starting at element p0 of `row` (p0 a multiple of E), with the
 * widest accesses the row's alignment class `ac` allows (the group's byte offset is a multiple of
 * its size, so only the row base matters). nv < E: partial tail group, loaded element by element
 * (missing elements are zero and never used). */
template <int DT, int E>
__device__ __forceinline__ void load_group(const void* row, int64_t p0, int nv, int ac,
                                           uint32_t (&w)[Group<DT, E>::NW]) {
  constexpr int GB = Group<DT, E>::bytes;
  constexpr int NW = Group<DT, E>::NW;
  const char* p = static_cast<const char*>(row) + p0 * Vec<DT>::bytes;
  if (nv == E) {
    bool done = false;
    if constexpr (GB == 16) {
      if (ac >= 16) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
        done = true;
      }
    }
    if (done) {
    } else if (ac >= 8) {
#pragma unroll
      for (int q = 0; q < NW / 2; ++q) {
        const uint2 x = __ldg(reinterpret_cast<const uint2*>(p) + q);
        w[2 * q] = x.x;
        w[2 * q + 1] = x.y;
      }
    } else if (ac == 4) {
#pragma unroll
      for (int q = 0; q < NW; ++q) w[q] = __ldg(reinterpret_cast<const unsigned int*>(p) + q);
    } else {  // 2-byte aligned (16-bit dtypes at odd element offsets)
#pragma unroll
      for (int q = 0; q < NW; ++q) {
        const uint32_t lo = __ldg(reinterpret_cast<const unsigned short*>(p) + 2 * q);
        const uint32_t hi = __ldg(reinterpret_cast<const unsigned short*>(p) + 2 * q + 1);
        w[q] = lo | (hi << 16);
      }
    }
  } else {
#pragma unroll
    for (int q = 0; q < NW; ++q) w[q] = 0u;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      if (j < nv) {
        const uint32_t b = load_bits<DT>(row, p0 + j);
        if (DT == FK_F32) {
          w[j] = b;
        } else {
          w[j >> 1] |= b << ((j & 1) * 16);
        }
      }
    }
  }
}

/* Loads the V mask bytes of a dense mask row at p0 into a bitmask (bit j = byte j != 0). */
template <int V>
__device__ __forceinline__ uint32_t load_mask_bits(const uint8_t* m, int64_t p0, int nv) {
  const uint8_t* p = m + p0;
  uint32_t bits = 0;
  if (nv == V && (reinterpret_cast<uintptr_t>(p) & (V - 1)) == 0) {
    if (V == 4) {
      const uint32_t x = __ldg(reinterpret_cast<const unsigned int*>(p));
#pragma unroll
      for (int j = 0; j < 4; ++j) bits |= (((x >> (8 * j)) & 0xffu) != 0u ? 1u : 0u) << j;
    } else {
      const unsigned long long x = __ldg(reinterpret_cast<const unsigned long long*>(p));
#pragma unroll
      for (int j = 0; j < V; ++j) bits |= (((x >> (8 * j)) & 0xffull) != 0ull ? 1u : 0u) << j;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < nv) bits |= (__ldg(p + j) != 0 ? 1u : 0u) << j;
    }
  }
  return bits;
}

__device__ __forceinline__ bool is_finite_bits(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

/* One accumulation step (exactly the oracle's): num += w*v, den += w. */
__device__ __forceinline__ void accumulate(float& num, float& den, float w, float v) {
  num = __fadd_rn(num, __fmul_rn(w, v));
  den = __fadd_rn(den, w);
}

/* Starting num/den for V contiguous elements p0..p0+nv-1. Plain loads (not __ldg): init_* may
 * alias acc_*, which this kernel writes (each element by the thread that read it). */
template <int V>
__device__ __forceinline__ void start_contig(const AggArgs& a, int64_t p0, int nv, float (&num)[V],
                                             float (&den)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) { num[j] = 0.f; den[j] = 0.f; }
  const bool full = a.fvec && nv == V;
  if (a.init_num != nullptr) {
    if (full) {
#pragma unroll
      for (int q = 0; q < V / 4; ++q) {
        const float4 x = *(reinterpret_cast<const float4*>(a.init_num + p0) + q);
        num[4 * q] = x.x; num[4 * q + 1] = x.y; num[4 * q + 2] = x.z; num[4 * q + 3] = x.w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) if (j < nv) num[j] = a.init_num[p0 + j];
    }
  }
  if (a.init_den != nullptr) {
    if (full) {
#pragma unroll
      for (int q = 0; q < V / 4; ++q) {
        const float4 x = *(reinterpret_cast<const float4*>(a.init_den + p0) + q);
        den[4 * q] = x.x; den[4 * q + 1] = x.y; den[4 * q + 2] = x.z; den[4 * q + 3] = x.w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) if (j < nv) den[j] = a.init_den[p0 + j];
    }
  }
}

/* Finalize (out = den > 0 ? g + num/den : g) or accumulate (acc_* = num/den) for V contiguous
 * elements. Plain loads (not __ldg) for g: out may alias g (same thread reads, then writes). */
__device__ __forceinline__ float finalize_one(float g, float num, float den) {
  return den > 0.f ? __fadd_rn(g, __fdiv_rn(num, den)) : g;
}

template <int V>
__device__ __forceinline__ void finish_contig(const AggArgs& a, int64_t p0, int nv,
                                              const float (&num)[V], const float (&den)[V]) {
  const bool full = a.fvec && nv == V;
  if (a.out != nullptr) {
    if (full) {
#pragma unroll
      for (int q = 0; q < V / 4; ++q) {
        const float4 gv = *(reinterpret_cast<const float4*>(a.g + p0) + q);
        float4 r;
        r.x = finalize_one(gv.x, num[4 * q], den[4 * q]);
        r.y = finalize_one(gv.y, num[4 * q + 1], den[4 * q + 1]);
        r.z = finalize_one(gv.z, num[4 * q + 2], den[4 * q + 2]);
        r.w = finalize_one(gv.w, num[4 * q + 3], den[4 * q + 3]);
        *(reinterpret_cast<float4*>(a.out + p0) + q) = r;
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j < nv) a.out[p0 + j] = finalize_one(a.g[p0 + j], num[j], den[j]);
    }
  } else {
    if (full) {
#pragma unroll
      for (int q = 0; q < V / 4; ++q) {
        *(reinterpret_cast<float4*>(a.acc_num + p0) + q) =
            make_float4(num[4 * q], num[4 * q + 1], num[4 * q + 2], num[4 * q + 3]);
        *(reinterpret_cast<float4*>(a.acc_den + p0) + q) =
            make_float4(den[4 * q], den[4 * q + 1], den[4 * q + 2], den[4 * q + 3]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (j < nv) {
          a.acc_num[p0 + j] = num[j];
          a.acc_den[p0 + j] = den[j];
        }
      }
    }
  }
}

__device__ __forceinline__ const void* row_ptr(const void* const* rows, int64_t k) {
  return reinterpret_cast<const void*>(
      __ldg(reinterpret_cast<const unsigned long long*>(rows) + k));
}

/* Host side: validates the common arguments and builds AggArgs. Returns FK_OK or FK_EINVAL. */
int make_agg_args(const fk_accum_args* a, const char* who, AggArgs* out);

/* Host side: grid size for `threads_needed` threads of kAggThreads per block. */
int agg_grid(int64_t threads_needed, unsigned* grid, const char* who);

}  // namespace fk

#endif /* FK_AGG_CUH */
