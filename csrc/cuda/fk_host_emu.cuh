/*
 * fk_host_emu.cuh -- a host emulation of the little of CUDA this directory uses, so that a plain
 * C++20 compiler can build every .cu file of csrc/cuda and run the real fk_cuda_* entry points on
 * CPU memory, without a GPU (tests/test_cuda_build.py: g++ -DFK_HOST_EMU, results compared bit for
 * bit with the torch oracle). Never part of the real build.
 *
 *   - a launch (fk::launch) runs each block's threads as fibers on the calling host thread (the
 *     blocks of the grid one after the other); __syncthreads is a barrier of the block's fibers,
 *     the warp intrinsics used here (__shfl_xor_sync, __match_any_sync) exchange through per-warp
 *     buffers and barriers;
 *   - __shared__ variables are function-local statics (one block at a time, so one copy suffices);
 *     dynamic shared memory is a per-launch buffer filled with a garbage pattern;
 *   - atomics are GCC __atomic builtins; arithmetic intrinsics are plain IEEE float operations
 *     (built with -ffp-contract=off, nothing is fused);
 *   - the CUB block primitives used (BlockScan, BlockReduce, BlockRadixSort) and the host-called
 *     DeviceRadixSort::SortPairs are replaced by straightforward implementations with the same
 *     contracts (stable sorts on the requested bit range);
 *   - the runtime calls used have complete host implementations: memory is malloc'ed (and filled
 *     with a garbage pattern, so a read of memory that was never written shows up as a wrong
 *     result), copies are memcpy, every stream is synchronous, and fk_emu_capturing makes streams
 *     report an active graph capture.
 */
#ifndef FK_HOST_EMU_CUH
#define FK_HOST_EMU_CUH

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

/* ---- runtime types and their host implementations ------------------------------------------ */

typedef void* cudaStream_t;
typedef int cudaError_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMemoryPoolsSupported,
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrComputeCapabilityMinor
};
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
struct cudaFuncAttributes {
  int dummy;
};

inline int fk_emu_capturing = 0;  // tests: pretend every stream is being captured

inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaStreamGetDevice(cudaStream_t, int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int* v) { *v = 13000; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 3 : a == cudaDevAttrMemoryPoolsSupported ? 1
     : a == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
  return cudaSuccess;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* st) {
  *st = fk_emu_capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes*, F) { return cudaSuccess; }
inline cudaError_t cudaMalloc(void** p, size_t n) {
  const size_t sz = (n + 255) / 256 * 256 + 256;
  *p = aligned_alloc(256, sz);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  memset(*p, 0xA5, sz);  // garbage: reading memory never written shows up
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) { return cudaMalloc(p, n); }
inline cudaError_t cudaFree(void* p) { free(p); return cudaSuccess; }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { free(p); return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  memcpy(d, s, n);
  return cudaSuccess;
}

/* ---- vector types --------------------------------------------------------------------------- */

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct fk_emu_uint3 {
  unsigned x, y, z;
};
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

/* ---- the launch machinery -----------------------------------------------------------------
 * The threads of a block are fibers (ucontext) run by the calling host thread, round robin: a
 * fiber runs until it waits at a barrier (__syncthreads, or a warp-level exchange), then the next
 * one runs. Deterministic, and no OS threads. A pass in which no barrier completes and no fiber
 * ends is a deadlock (e.g. a __syncthreads that some threads skip): reported, then abort(). */

struct fk_emu_barrier {
  unsigned n = 0, arrived = 0;
  unsigned long long gen = 0;
};
struct fk_emu_warp {
  fk_emu_barrier bar;
  unsigned long long xch[32];
};
struct fk_emu_launch_ctx {
  ucontext_t sched;
  std::vector<ucontext_t> uc;
  std::vector<char> finished;
  unsigned cur = 0;
  const std::function<void()>* body = nullptr;
  fk_emu_barrier block_bar;
  std::vector<fk_emu_warp> warps;
  std::vector<unsigned char> dyn;
  unsigned long long progress = 0;
  dim3 block, grid;
};

inline thread_local fk_emu_uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
inline thread_local fk_emu_launch_ctx* fk_emu_ctx = nullptr;

inline void* fk_emu_dynamic_smem() { return fk_emu_ctx->dyn.data(); }

inline void fk_emu_yield() {
  fk_emu_launch_ctx* c = fk_emu_ctx;
  swapcontext(&c->uc[c->cur], &c->sched);
}

inline void fk_emu_wait(fk_emu_barrier& b) {
  const unsigned long long g = b.gen;
  if (++b.arrived == b.n) {
    b.arrived = 0;
    ++b.gen;
    ++fk_emu_ctx->progress;
    return;
  }
  while (b.gen == g) fk_emu_yield();
}

inline void __syncthreads() { fk_emu_wait(fk_emu_ctx->block_bar); }

inline void fk_emu_trampoline() {
  fk_emu_launch_ctx* c = fk_emu_ctx;
  (*c->body)();
  c->finished[c->cur] = 1;  // returning resumes uc_link: the scheduler
}

inline void fk_emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  constexpr size_t kStack = 128 * 1024;
  const unsigned n = block.x * block.y * block.z;
  static std::vector<char> stacks;  // reused by every launch (fibers never outlive one)
  if (stacks.size() < n * kStack) stacks.resize(n * kStack);
  fk_emu_launch_ctx ctx;
  ctx.uc.resize(n);
  ctx.finished.assign(n, 0);
  ctx.body = &body;
  ctx.block_bar.n = n;
  ctx.warps.resize((n + 31) / 32);
  for (auto& w : ctx.warps) w.bar.n = 32;
  ctx.dyn.assign(smem + 16, 0xCD);  // dynamic shared memory starts as garbage
  ctx.block = block;
  ctx.grid = grid;
  fk_emu_launch_ctx* saved = fk_emu_ctx;
  fk_emu_ctx = &ctx;
  blockDim = block;
  gridDim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        for (unsigned t = 0; t < n; ++t) {
          ctx.finished[t] = 0;
          getcontext(&ctx.uc[t]);
          ctx.uc[t].uc_stack.ss_sp = stacks.data() + static_cast<size_t>(t) * kStack;
          ctx.uc[t].uc_stack.ss_size = kStack;
          ctx.uc[t].uc_link = &ctx.sched;
          makecontext(&ctx.uc[t], fk_emu_trampoline, 0);
        }
        unsigned remaining = n;
        while (remaining > 0) {
          const unsigned long long before = ctx.progress;
          for (unsigned t = 0; t < n; ++t) {
            if (ctx.finished[t]) continue;
            ctx.cur = t;
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            swapcontext(&ctx.sched, &ctx.uc[t]);
            if (ctx.finished[t]) {
              --remaining;
              ++ctx.progress;
            }
          }
          if (remaining > 0 && ctx.progress == before) {
            fprintf(stderr, "fk_host_emu: deadlock in block (%u, %u, %u): %u threads wait on barriers that cannot "
                    "complete\n", bx, by, bz, remaining);
            abort();
          }
        }
      }
  fk_emu_ctx = saved;
}

/* ---- warp intrinsics (all 32 lanes take part, as in every use here) ------------------------- */

inline fk_emu_warp& fk_emu_my_warp() { return fk_emu_ctx->warps[threadIdx.x / 32]; }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  fk_emu_warp& w = fk_emu_my_warp();
  const unsigned lane = threadIdx.x & 31u;
  unsigned long long bits = 0;
  memcpy(&bits, &v, sizeof(T));
  w.xch[lane] = bits;
  fk_emu_wait(w.bar);
  const unsigned long long got = w.xch[lane ^ static_cast<unsigned>(lane_mask)];
  fk_emu_wait(w.bar);
  T r;
  memcpy(&r, &got, sizeof(T));
  return r;
}

inline unsigned __match_any_sync(unsigned, unsigned v) {
  fk_emu_warp& w = fk_emu_my_warp();
  const unsigned lane = threadIdx.x & 31u;
  w.xch[lane] = v;
  fk_emu_wait(w.bar);
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (w.xch[l] == v) m |= 1u << l;
  fk_emu_wait(w.bar);
  return m;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

/* ---- atomics ----------------------------------------------------------------------------------- */

template <typename T>
inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
template <typename T>
inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }

/* ---- loads and arithmetic intrinsics ------------------------------------------------------- */

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

/* ---- CUB stand-ins ------------------------------------------------------------------------------ */

namespace cub {

template <typename T, int BLOCK>
class BlockScan {
 public:
  struct TempStorage {
    T vals[BLOCK * 16];
    T agg;
  };
  explicit BlockScan(TempStorage& s) : s_(s) {}

  template <int IPT>
  void ExclusiveSum(T (&in)[IPT], T (&out)[IPT], T& aggregate) {
    static_assert(IPT <= 16, "emulated BlockScan: at most 16 items per thread");
    const unsigned t = threadIdx.x;
    for (int j = 0; j < IPT; ++j) s_.vals[t * IPT + j] = in[j];
    __syncthreads();
    if (t == 0) {
      T acc = T(0);
      for (int i = 0; i < BLOCK * IPT; ++i) {
        const T v = s_.vals[i];
        s_.vals[i] = acc;
        acc = static_cast<T>(acc + v);
      }
      s_.agg = acc;
    }
    __syncthreads();
    for (int j = 0; j < IPT; ++j) out[j] = s_.vals[t * IPT + j];
    aggregate = s_.agg;
    __syncthreads();
  }
  template <int IPT>
  void ExclusiveSum(T (&in)[IPT], T (&out)[IPT]) {
    T a;
    ExclusiveSum(in, out, a);
  }
  void ExclusiveSum(T in, T& out) {
    T a[1] = {in}, o[1];
    ExclusiveSum(a, o);
    out = o[0];
  }
  void InclusiveSum(T in, T& out, T& aggregate) {
    T a[1] = {in}, o[1];
    ExclusiveSum(a, o, aggregate);
    out = static_cast<T>(o[0] + in);
  }

 private:
  TempStorage& s_;
};

template <typename T, int BLOCK>
class BlockReduce {
 public:
  struct TempStorage {
    T vals[BLOCK];
  };
  explicit BlockReduce(TempStorage& s) : s_(s) {}
  T Sum(T v) {
    s_.vals[threadIdx.x] = v;
    __syncthreads();
    T acc = T(0);
    for (int i = 0; i < BLOCK; ++i) acc = static_cast<T>(acc + s_.vals[i]);
    __syncthreads();
    return acc;  // CUB defines the result for thread 0 only; here every thread has it
  }

 private:
  TempStorage& s_;
};

template <typename K>
inline K emu_digits(K key, int begin_bit, int end_bit) {
  const int nb = end_bit - begin_bit;
  const unsigned long long m = nb >= 64 ? ~0ull : ((1ull << nb) - 1ull);
  return static_cast<K>((static_cast<unsigned long long>(key) >> begin_bit) & m);
}

template <typename K, int BLOCK, int IPT, typename V>
class BlockRadixSort {
 public:
  struct TempStorage {
    K keys[BLOCK * IPT];
    V vals[BLOCK * IPT];
  };
  explicit BlockRadixSort(TempStorage& s) : s_(s) {}
  void Sort(K (&k)[IPT], V (&v)[IPT], int begin_bit, int end_bit) { run(k, v, begin_bit, end_bit, false); }
  void SortBlockedToStriped(K (&k)[IPT], V (&v)[IPT], int begin_bit, int end_bit) {
    run(k, v, begin_bit, end_bit, true);
  }

 private:
  void run(K (&k)[IPT], V (&v)[IPT], int b, int e, bool striped) {
    const unsigned t = threadIdx.x;
    for (int j = 0; j < IPT; ++j) {  // input: blocked arrangement
      s_.keys[t * IPT + j] = k[j];
      s_.vals[t * IPT + j] = v[j];
    }
    __syncthreads();
    if (t == 0) {
      std::vector<int> idx(BLOCK * IPT);
      for (int i = 0; i < BLOCK * IPT; ++i) idx[i] = i;
      std::stable_sort(idx.begin(), idx.end(), [&](int x, int y) {
        return emu_digits(s_.keys[x], b, e) < emu_digits(s_.keys[y], b, e);
      });
      std::vector<K> ks(BLOCK * IPT);
      std::vector<V> vs(BLOCK * IPT);
      for (int i = 0; i < BLOCK * IPT; ++i) {
        ks[i] = s_.keys[idx[i]];
        vs[i] = s_.vals[idx[i]];
      }
      for (int i = 0; i < BLOCK * IPT; ++i) {
        s_.keys[i] = ks[i];
        s_.vals[i] = vs[i];
      }
    }
    __syncthreads();
    for (int j = 0; j < IPT; ++j) {
      const int q = striped ? j * BLOCK + static_cast<int>(t) : static_cast<int>(t) * IPT + j;
      k[j] = s_.keys[q];
      v[j] = s_.vals[q];
    }
    __syncthreads();
  }
  TempStorage& s_;
};

template <typename T>
struct DoubleBuffer {
  T* d_buffers[2];
  int selector;
  DoubleBuffer(T* a, T* b) : d_buffers{a, b}, selector(0) {}
  T* Current() { return d_buffers[selector]; }
  T* Alternate() { return d_buffers[selector ^ 1]; }
};

struct DeviceRadixSort {
  template <typename K, typename V, typename NumItemsT>
  static cudaError_t SortPairs(void* tmp, size_t& bytes, DoubleBuffer<K>& kb, DoubleBuffer<V>& vb, NumItemsT n,
                               int begin_bit, int end_bit, cudaStream_t) {
    if (tmp == nullptr) {
      bytes = 1024;
      return cudaSuccess;
    }
    std::vector<long long> idx(static_cast<size_t>(n));
    for (long long i = 0; i < static_cast<long long>(n); ++i) idx[i] = i;
    K* kc = kb.Current();
    V* vc = vb.Current();
    std::stable_sort(idx.begin(), idx.end(), [&](long long x, long long y) {
      return emu_digits(kc[x], begin_bit, end_bit) < emu_digits(kc[y], begin_bit, end_bit);
    });
    K* ka = kb.Alternate();
    V* va = vb.Alternate();
    for (long long i = 0; i < static_cast<long long>(n); ++i) {
      ka[i] = kc[idx[i]];
      va[i] = vc[idx[i]];
    }
    kb.selector ^= 1;
    vb.selector ^= 1;
    return cudaSuccess;
  }
};

}  // namespace cub

#endif /* FK_HOST_EMU_CUH */
