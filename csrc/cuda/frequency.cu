/*
 * frequency.cu -- fk_cuda_frequency_update and fk_cuda_nested_masks.
 *
 * frequency_update, dense masks: one thread per 4 neurons, clients in a loop (4-byte mask loads
 * when the rows allow), the integer count added in freq's dtype exactly as torch's
 * freq.add_(count.to(freq.dtype)) does (round-to-nearest conversion, wrap-around integers).
 *
 * frequency_update, nested form, O(N + K): count(n) = #{k : sizes[k] > rank[n]} = K - H(rank[n])
 * where H(r) = #{k : sizes[k] <= r} is the inclusive prefix sum of the histogram of the sizes
 * (clamped to [0, N], which changes no count for ranks in [0, N)). Small N: one block, table in
 * shared memory, one launch. Large N: histogram (integer atomics: exact, order-independent),
 * inclusive scan (fk_scan.cuh), gather -- in stream-ordered temporary memory.
 *
 * nested_masks: rank[order[r]] = r, then out[s, n] = rank[n] < sizes[s]; every byte of out is
 * written. Small N: each block builds rank in shared memory (one launch); large N: rank in
 * temporary memory.
 */
#include <limits.h>

#ifndef FK_HOST_EMU
#include <cub/block/block_scan.cuh>
#endif

#include "fk_cuda_common.cuh"
#include "fk_scan.cuh"

namespace fk {
namespace {

constexpr int kFreqThreads = 256;
constexpr int kSmallThreads = 1024;
constexpr int64_t kSmallTable = 12000;  // (N + 1) ints of shared memory, under the 48 KB default

template <typename F>
struct Adder;
template <>
struct Adder<float> {
  static __device__ __forceinline__ float add(float f, long long c) { return __fadd_rn(f, __ll2float_rn(c)); }
};
template <>
struct Adder<double> {
  static __device__ __forceinline__ double add(double f, long long c) { return __dadd_rn(f, __ll2double_rn(c)); }
};
template <>
struct Adder<int32_t> {
  static __device__ __forceinline__ int32_t add(int32_t f, long long c) {
    return static_cast<int32_t>(static_cast<uint32_t>(f) + static_cast<uint32_t>(static_cast<unsigned long long>(c)));
  }
};
template <>
struct Adder<int64_t> {
  static __device__ __forceinline__ int64_t add(int64_t f, long long c) {
    return static_cast<int64_t>(static_cast<unsigned long long>(f) + static_cast<unsigned long long>(c));
  }
};

/* ---- dense masks ---------------------------------------------------------------------------- */

template <typename F>
__global__ void __launch_bounds__(kFreqThreads)
    freq_masks_kernel(F* __restrict__ freq, const uint8_t* __restrict__ masks, int64_t K, int64_t N,
                      bool words) {
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kFreqThreads + threadIdx.x) * 4;
  if (n0 >= N) return;
  long long c0 = 0, c1 = 0, c2 = 0, c3 = 0;
  if (words) {  // N % 4 == 0 and masks 4-byte aligned: every row's word at n0 is aligned
    const unsigned int* m = reinterpret_cast<const unsigned int*>(masks + n0);
    const int64_t stride = N / 4;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      unsigned int x[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) x[u] = __ldg(m + (k + u) * stride);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        c0 += (x[u] & 0xffu) != 0u;
        c1 += (x[u] & 0xff00u) != 0u;
        c2 += (x[u] & 0xff0000u) != 0u;
        c3 += (x[u] & 0xff000000u) != 0u;
      }
    }
    for (; k < K; ++k) {
      const unsigned int x = __ldg(m + k * stride);
      c0 += (x & 0xffu) != 0u;
      c1 += (x & 0xff00u) != 0u;
      c2 += (x & 0xff0000u) != 0u;
      c3 += (x & 0xff000000u) != 0u;
    }
  } else {
    const int nv = (N - n0 < 4) ? static_cast<int>(N - n0) : 4;
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t* m = masks + k * N + n0;
      c0 += __ldg(m) != 0;
      if (nv > 1) c1 += __ldg(m + 1) != 0;
      if (nv > 2) c2 += __ldg(m + 2) != 0;
      if (nv > 3) c3 += __ldg(m + 3) != 0;
    }
  }
  const long long c[4] = {c0, c1, c2, c3};
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (n0 + j < N) freq[n0 + j] = Adder<F>::add(freq[n0 + j], c[j]);
}

/* ---- nested form ---------------------------------------------------------------------------- */

__device__ __forceinline__ int clamp_size(long long s, long long N) {
  return static_cast<int>(s < 0 ? 0 : (s > N ? N : s));
}

/* count for a neuron of rank r, given H = inclusive prefix of the clamped size histogram */
__device__ __forceinline__ long long nested_count(int r, long long K, int N, const int* H) {
  if (r < 0) return K;
  if (r >= N) return 0;
  return K - H[r];
}

template <typename F>
__global__ void __launch_bounds__(kSmallThreads)
    freq_nested_small_kernel(F* __restrict__ freq, const int32_t* __restrict__ rank,
                             const int32_t* __restrict__ sizes, int64_t K, int N) {
  FK_DYNAMIC_SMEM(int, table);  // N + 1 entries
  using Scan = cub::BlockScan<int, kSmallThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int carry;
  const int t = threadIdx.x;
  for (int i = t; i <= N; i += kSmallThreads) table[i] = 0;
  if (t == 0) carry = 0;
  __syncthreads();
  for (int64_t k = t; k < K; k += kSmallThreads) atomicAdd(&table[clamp_size(__ldg(sizes + k), N)], 1);
  __syncthreads();
  for (int base = 0; base <= N; base += kSmallThreads) {
    const int i = base + t;
    const int v = i <= N ? table[i] : 0;
    int incl, total;
    Scan(scan_tmp).InclusiveSum(v, incl, total);
    if (i <= N) table[i] = incl + carry;
    __syncthreads();
    if (t == 0) carry += total;
    __syncthreads();
  }
  for (int n = t; n < N; n += kSmallThreads)
    freq[n] = Adder<F>::add(freq[n], nested_count(__ldg(rank + n), K, N, table));
}

__global__ void size_hist_kernel(int* __restrict__ table, const int32_t* __restrict__ sizes, int64_t K,
                                 int N) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < K) atomicAdd(&table[clamp_size(__ldg(sizes + k), N)], 1);
}

template <typename F>
__global__ void __launch_bounds__(kFreqThreads)
    freq_nested_apply_kernel(F* __restrict__ freq, const int32_t* __restrict__ rank,
                             const int* __restrict__ H, int64_t K, int N) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kFreqThreads + threadIdx.x;
  if (n < N) freq[n] = Adder<F>::add(freq[n], nested_count(__ldg(rank + n), K, N, H));
}

template <typename F>
int frequency_typed(F* freq, const uint8_t* masks, const int32_t* rank, const int32_t* sizes,
                    int64_t K, int64_t N, cudaStream_t s) {
  const char* who = "fk_cuda_frequency_update";
  if (masks != nullptr) {
    const int64_t threads = ceil_div(N, 4);
    const int64_t blocks = ceil_div(threads, kFreqThreads);
    const bool words = (N % 4 == 0) && ((reinterpret_cast<uintptr_t>(masks) & 3) == 0);
    launch(freq_masks_kernel<F>, static_cast<unsigned>(blocks), kFreqThreads, 0, s, freq, masks, K, N, words);
    return check_launch(who);
  }
  const int n = static_cast<int>(N);
  if (N + 1 <= kSmallTable) {
    launch(freq_nested_small_kernel<F>, 1, kSmallThreads, (N + 1) * sizeof(int), s, freq, rank, sizes, K, n);
    return check_launch(who);
  }
  // large N: table in temporary memory
  const size_t table_bytes = align_up(static_cast<size_t>(N + 1) * sizeof(int), 256);
  TempBuffer tmp;
  FK_TRY(tmp.alloc(table_bytes + scan_u32_tmp_bytes(N + 1), s, "fk_cuda_frequency_update: temporary memory"));
  int* table = static_cast<int*>(tmp.get());
  void* scan_tmp = static_cast<char*>(tmp.get()) + table_bytes;
  const cudaError_t e = cudaMemsetAsync(table, 0, static_cast<size_t>(N + 1) * sizeof(int), s);
  if (e != cudaSuccess) return cuda_fail(e, "fk_cuda_frequency_update: memset");
  if (K > 0) {
    launch(size_hist_kernel, static_cast<unsigned>(ceil_div(K, 256)), 256, 0, s, table, sizes, K, n);
    FK_TRY(check_launch(who));
  }
  FK_TRY(scan_u32(reinterpret_cast<unsigned*>(table), reinterpret_cast<unsigned*>(table), N + 1, true,
                  scan_tmp, s, who));
  launch(freq_nested_apply_kernel<F>, static_cast<unsigned>(ceil_div(N, kFreqThreads)), kFreqThreads, 0, s, freq, rank,
         table, K, n);
  return check_launch(who);
}

/* ---- nested masks --------------------------------------------------------------------------- */

constexpr int kMaskThreads = 256;

__device__ __forceinline__ int64_t clamp_size64(int64_t v, int64_t N) { return v < 0 ? 0 : (v > N ? N : v); }

__global__ void __launch_bounds__(kMaskThreads)
    nested_masks_small_kernel(uint8_t* __restrict__ out, const int64_t* __restrict__ order,
                              const int64_t* __restrict__ sizes, int64_t S, int N) {
  FK_DYNAMIC_SMEM(int, rank_s);  // N entries
  for (int n = threadIdx.x; n < N; n += kMaskThreads) rank_s[n] = INT_MAX;
  __syncthreads();
  for (int r = threadIdx.x; r < N; r += kMaskThreads) {
    const int64_t n = __ldg(order + r);
    if (n >= 0 && n < N) rank_s[n] = r;
  }
  __syncthreads();
  for (int64_t s = blockIdx.x; s < S; s += gridDim.x) {
    const int64_t sz = clamp_size64(__ldg(sizes + s), N);
    uint8_t* row = out + s * N;
    for (int n = threadIdx.x; n < N; n += kMaskThreads) row[n] = rank_s[n] < sz ? 1 : 0;
  }
}

__global__ void rank_scatter_kernel(int32_t* __restrict__ rank, const int64_t* __restrict__ order, int64_t N) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < N) {
    const int64_t n = __ldg(order + r);
    if (n >= 0 && n < N) rank[n] = static_cast<int32_t>(r);
  }
}

__global__ void __launch_bounds__(kMaskThreads)
    nested_masks_large_kernel(uint8_t* __restrict__ out, const int32_t* __restrict__ rank,
                              const int64_t* __restrict__ sizes, int64_t S, int64_t N) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kMaskThreads + threadIdx.x;
  if (n >= N) return;
  const int32_t r = __ldg(rank + n);
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const int64_t sz = clamp_size64(__ldg(sizes + s), N);
    out[s * N + n] = r < sz ? 1 : 0;
  }
}

}  // namespace
}  // namespace fk

extern "C" int fk_cuda_frequency_update(void* freq, int32_t freq_dtype, const uint8_t* masks,
                                        const int32_t* rank, const int32_t* sizes, int64_t K,
                                        int64_t N, void* stream) {
  using namespace fk;
  const char* who = "fk_cuda_frequency_update";
  if (K < 0 || K > 0x7fffffffLL) return fail(FK_EINVAL, "%s: K must be in [0, 2^31) (got %lld)", who, (long long)K);
  if (N < 0 || N >= 0x7fffffffLL)
    return fail(FK_EINVAL, "%s: N must be in [0, 2^31 - 1) (got %lld)", who, (long long)N);
  if (N > 0 && freq == nullptr) return fail(FK_EINVAL, "%s: freq is NULL", who);
  if ((masks != nullptr) == (rank != nullptr || sizes != nullptr))
    return fail(FK_EINVAL, "%s: give exactly one of masks or (rank, sizes)", who);
  if (masks == nullptr && (rank == nullptr || (K > 0 && sizes == nullptr)))
    return fail(FK_EINVAL, "%s: the nested form needs rank and sizes", who);
  FK_TRY(enter(stream, who));
  if (N == 0) return FK_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (freq_dtype) {
    case FK_KEY_F32: return frequency_typed<float>(static_cast<float*>(freq), masks, rank, sizes, K, N, s);
    case FK_KEY_F64: return frequency_typed<double>(static_cast<double*>(freq), masks, rank, sizes, K, N, s);
    case FK_KEY_I32: return frequency_typed<int32_t>(static_cast<int32_t*>(freq), masks, rank, sizes, K, N, s);
    case FK_KEY_I64: return frequency_typed<int64_t>(static_cast<int64_t*>(freq), masks, rank, sizes, K, N, s);
    default: return fail(FK_EINVAL, "%s: unknown freq dtype %d", who, (int)freq_dtype);
  }
}

extern "C" int fk_cuda_nested_masks(uint8_t* out, const int64_t* order, const int64_t* sizes, int64_t S,
                                    int64_t N, void* stream) {
  using namespace fk;
  const char* who = "fk_cuda_nested_masks";
  if (S < 0 || N < 0) return fail(FK_EINVAL, "%s: S and N must be >= 0", who);
  if (N > 0x7fffffffLL) return fail(FK_EINVAL, "%s: N must be < 2^31 (got %lld)", who, (long long)N);
  if (S > 0 && N > 0 && (out == nullptr || order == nullptr || sizes == nullptr))
    return fail(FK_EINVAL, "%s: out, order and sizes are required", who);
  FK_TRY(enter(stream, who));
  if (S == 0 || N == 0) return FK_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (N <= kSmallTable) {
    const int64_t cap = 4LL * sm_count();
    const unsigned grid = static_cast<unsigned>(S < cap ? S : cap);
    launch(nested_masks_small_kernel, grid, kMaskThreads, N * sizeof(int), s, out, order, sizes, S,
           static_cast<int>(N));
    return check_launch(who);
  }
  TempBuffer tmp;
  FK_TRY(tmp.alloc(static_cast<size_t>(N) * sizeof(int32_t), s, "fk_cuda_nested_masks: temporary memory"));
  int32_t* rank = static_cast<int32_t*>(tmp.get());
  cudaError_t e = cudaMemsetAsync(rank, 0x7f, static_cast<size_t>(N) * sizeof(int32_t), s);  // "never"
  if (e != cudaSuccess) return cuda_fail(e, "fk_cuda_nested_masks: memset");
  launch(rank_scatter_kernel, static_cast<unsigned>(ceil_div(N, 256)), 256, 0, s, rank, order, N);
  FK_TRY(check_launch(who));
  const unsigned gy = static_cast<unsigned>(S < 65535 ? S : 65535);
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kMaskThreads)), gy);
  launch(nested_masks_large_kernel, grid, kMaskThreads, 0, s, out, rank, sizes, S, N);
  return check_launch(who);
}
