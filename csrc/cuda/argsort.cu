/*
 * argsort.cu -- fk_cuda_stable_argsort: order = stable ascending argsort of keys (ties by index).
 *
 * Keys are first mapped to unsigned integers whose order is the keys' order:
 *   ORD: IEEE floats with -0.0 normalised to +0.0 (torch treats them as equal), sign bit flipped
 *        for non-negative values and all bits flipped for negative ones; integers: sign flipped.
 *   INT: floats whose values are all integers in [-2^31, 2^31) (frequency tables): the int32
 *        value, sign flipped -- far fewer significant bits than the IEEE pattern.
 * Only the bits that differ between keys matter: with v = OR(rep) ^ AND(rep), sorting on bits
 * [lo, hi] of v (lowest/highest set bit) gives the same order, so a frequency table of small
 * integers sorts on ~log2(range) bits instead of 32 or 64.
 *
 * Paths:
 *   N <= kSmallN: one block (CUB BlockRadixSort, stable), range found in-block: one launch,
 *                 no workspace use, no host synchronisation.
 *   larger N: a range pass (OR/AND reduction), then -- unless the stream is being captured into
 *     a CUDA graph, where the full bit range is used instead -- the 16 bytes of result are copied
 *     to the host (one stream synchronisation) to plan the sort:
 *       0 significant bits: order = arange;
 *       1..16 bits: one or two stable counting passes of 8 bits (per-tile histograms, a
 *         deterministic scan, then each 4096-key tile is stably sorted in shared memory and
 *         scattered): ~20 bytes of traffic per key for one pass (read key, write int64 index);
 *       otherwise: CUB DeviceRadixSort::SortPairs (LSD = stable) on the compressed 32- or 64-bit
 *         keys with 32-bit index payloads, end_bit = number of significant bits.
 * N is limited to < 2^31 (32-bit index payloads).
 */
#include <limits.h>

#ifndef FK_HOST_EMU
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#endif

#include <type_traits>

#include "fk_cuda_common.cuh"
#include "fk_keys.cuh"
#include "fk_scan.cuh"

namespace fk {
namespace {

/* Loads items first..first+IPT-1 of p (blocked), 16-byte vectors when whole and aligned. */
template <typename T, int IPT>
__device__ __forceinline__ void load_blocked(const T* __restrict__ p, int64_t first, int64_t n,
                                             T (&out)[IPT], T fill) {
  constexpr int BYTES = static_cast<int>(sizeof(T)) * IPT;
  if constexpr (BYTES % 16 == 0) {
    if (first + IPT <= n && (reinterpret_cast<uintptr_t>(p + first) & 15) == 0) {
      union {
        uint4 v[BYTES / 16];
        T t[IPT];
      } u;
      const uint4* q = reinterpret_cast<const uint4*>(p + first);
#pragma unroll
      for (int i = 0; i < BYTES / 16; ++i) u.v[i] = __ldg(q + i);
#pragma unroll
      for (int j = 0; j < IPT; ++j) out[j] = u.t[j];
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < IPT; ++j) out[j] = first + j < n ? p[first + j] : fill;
}

/* ---- small N: one block ------------------------------------------------------------------- */

constexpr int kSmallThreads = 512;
constexpr int kSmallItems = 8;
constexpr int64_t kSmallN = kSmallThreads * kSmallItems;

template <int KD>
__global__ void __launch_bounds__(kSmallThreads)
    small_sort_kernel(const typename KeyTraits<KD>::Raw* __restrict__ keys, int64_t* __restrict__ order, int n) {
  using Raw = typename KeyTraits<KD>::Raw;
  constexpr bool wide = KeyTraits<KD>::width == 64;
  constexpr unsigned long long wmask = wide ? ~0ull : 0xffffffffull;
  using Sort32 = cub::BlockRadixSort<unsigned int, kSmallThreads, kSmallItems, unsigned int>;
  using Sort64 = cub::BlockRadixSort<unsigned long long, kSmallThreads, kSmallItems, unsigned int>;
  struct Storage64 {
    typename Sort64::TempStorage s;
  };
  struct Empty {};
  __shared__ union {
    typename Sort32::TempStorage s32;
    typename std::conditional<wide, Storage64, Empty>::type s64;
  } tmp;
  __shared__ RangeAcc acc;

  const int t = threadIdx.x;
  if (t == 0) acc = RangeAcc{0ull, 0ull, 0u, 0u, 0u, 0u};
  Raw raw[kSmallItems];
  const int q0 = t * kSmallItems;
  load_blocked<Raw, kSmallItems>(keys, q0, n, raw, Raw(0));
  unsigned long long or_o = 0ull, nor_o = 0ull;
  unsigned int or_i = 0u, nor_i = 0u, nonint = 0u;
#pragma unroll
  for (int j = 0; j < kSmallItems; ++j) {
    if (q0 + j < n) {
      const unsigned long long o = ord_rep<KD>(raw[j]);
      or_o |= o;
      nor_o |= ~o & wmask;
      if (KeyTraits<KD>::is_float) {
        unsigned int r;
        if (int_rep<KD>(raw[j], r)) {
          or_i |= r;
          nor_i |= ~r;
        } else {
          nonint = 1u;
        }
      }
    }
  }
  __syncthreads();
  if (or_o) atomicOr(&acc.or_o, or_o);
  if (nor_o) atomicOr(&acc.nor_o, nor_o);
  if (or_i) atomicOr(&acc.or_i, or_i);
  if (nor_i) atomicOr(&acc.nor_i, nor_i);
  if (nonint) atomicOr(&acc.nonint, nonint);
  __syncthreads();
  const Plan plan = make_plan(acc, KeyTraits<KD>::is_float, KeyTraits<KD>::width);
  unsigned int v[kSmallItems];
#pragma unroll
  for (int j = 0; j < kSmallItems; ++j) v[j] = static_cast<unsigned int>(q0 + j);
  if (plan.nbits == 0) {  // all keys equal
#pragma unroll
    for (int j = 0; j < kSmallItems; ++j)
      if (q0 + j < n) order[q0 + j] = q0 + j;
    return;
  }
  if (!wide || plan.nbits <= 32) {
    unsigned int k[kSmallItems];
#pragma unroll
    for (int j = 0; j < kSmallItems; ++j)  // padding sorts last (all ones, and later positions)
      k[j] = q0 + j < n ? static_cast<unsigned int>(plan_key<KD>(raw[j], plan.mode, plan.lo)) : 0xffffffffu;
    Sort32(tmp.s32).Sort(k, v, 0, plan.nbits);
  } else {
    if constexpr (wide) {
      unsigned long long k[kSmallItems];
#pragma unroll
      for (int j = 0; j < kSmallItems; ++j)
        k[j] = q0 + j < n ? plan_key<KD>(raw[j], plan.mode, plan.lo) : ~0ull;
      Sort64(tmp.s64.s).Sort(k, v, 0, plan.nbits);
    }
  }
#pragma unroll
  for (int j = 0; j < kSmallItems; ++j)  // blocked: sorted position q0 + j
    if (q0 + j < n) order[q0 + j] = v[j];
}

/* ---- large N: range pass -------------------------------------------------------------------- */

constexpr int kRangeThreads = 256;

__device__ __forceinline__ unsigned long long warp_or64(unsigned long long x) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x |= __shfl_xor_sync(0xffffffffu, x, d);
  return x;
}

__device__ __forceinline__ unsigned int warp_or32(unsigned int x) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x |= __shfl_xor_sync(0xffffffffu, x, d);
  return x;
}

template <int KD>
__global__ void __launch_bounds__(kRangeThreads)
    range_kernel(const typename KeyTraits<KD>::Raw* __restrict__ keys, int64_t n, RangeAcc* __restrict__ acc) {
  constexpr unsigned long long wmask = KeyTraits<KD>::width == 64 ? ~0ull : 0xffffffffull;
  unsigned long long or_o = 0ull, nor_o = 0ull;
  unsigned int or_i = 0u, nor_i = 0u, nonint = 0u;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRangeThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRangeThreads + threadIdx.x; i < n; i += stride) {
    const typename KeyTraits<KD>::Raw b = __ldg(keys + i);
    const unsigned long long o = ord_rep<KD>(b);
    or_o |= o;
    nor_o |= ~o & wmask;
    if (KeyTraits<KD>::is_float) {
      unsigned int r;
      if (int_rep<KD>(b, r)) {
        or_i |= r;
        nor_i |= ~r;
      } else {
        nonint = 1u;
      }
    }
  }
  or_o = warp_or64(or_o);
  nor_o = warp_or64(nor_o);
  or_i = warp_or32(or_i);
  nor_i = warp_or32(nor_i);
  nonint = warp_or32(nonint);
  if ((threadIdx.x & 31) == 0) {
    if (or_o) atomicOr(&acc->or_o, or_o);
    if (nor_o) atomicOr(&acc->nor_o, nor_o);
    if (or_i) atomicOr(&acc->or_i, or_i);
    if (nor_i) atomicOr(&acc->nor_i, nor_i);
    if (nonint) atomicOr(&acc->nonint, nonint);
  }
}

__global__ void arange_kernel(int64_t* __restrict__ order, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) order[i] = i;
}

__global__ void widen_kernel(const unsigned int* __restrict__ idx, int64_t* __restrict__ order, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) order[i] = static_cast<int64_t>(__ldg(idx + i));
}

/* CUB path input: compressed keys and the index payload. */
template <int KD, typename KeyT>
__global__ void transform_kernel(const typename KeyTraits<KD>::Raw* __restrict__ keys, int64_t n, int mode,
                                 int lo, KeyT* __restrict__ kout, unsigned int* __restrict__ vout) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    kout[i] = static_cast<KeyT>(plan_key<KD>(__ldg(keys + i), mode, lo));
    vout[i] = static_cast<unsigned int>(i);
  }
}

/* ---- large N: stable counting passes (8 bits each) ----------------------------------------- */

constexpr int kTileThreads = 256;
constexpr int kTileItems = 16;
constexpr int64_t kTile = kTileThreads * kTileItems;  // 4096 keys per tile
constexpr int kDigits = 256;

/* SRC 0: digits from the original keys; SRC 1: from the 16-bit keys of the previous pass. */
template <int KD, int SRC>
__global__ void __launch_bounds__(kTileThreads)
    tile_hist_kernel(const void* __restrict__ keys, int64_t n, int mode, int lo, int shift, int64_t T,
                     unsigned int* __restrict__ counts) {
  __shared__ unsigned int h[kTileThreads / 32][kDigits];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  for (int i = t; i < (kTileThreads / 32) * kDigits; i += kTileThreads) (&h[0][0])[i] = 0u;
  __syncthreads();
  const int64_t tile_base = static_cast<int64_t>(blockIdx.x) * kTile;
#pragma unroll 4
  for (int it = 0; it < kTileItems; ++it) {
    const int64_t i = tile_base + it * kTileThreads + t;  // striped: coalesced
    unsigned int d = kDigits;                             // sentinel: no key
    if (i < n) {
      unsigned int k16;
      if (SRC == 0) {
        k16 = static_cast<unsigned int>(
                  plan_key<KD>(__ldg(static_cast<const typename KeyTraits<KD>::Raw*>(keys) + i), mode, lo)) &
              0xffffu;
      } else {
        k16 = __ldg(static_cast<const unsigned short*>(keys) + i);
      }
      d = (k16 >> shift) & 0xffu;
    }
    // warp-aggregated increments: heavy ties cost one shared atomic per distinct digit and warp
    const unsigned int peers = __match_any_sync(0xffffffffu, d);
    if (d < kDigits && lane == __ffs(peers) - 1) atomicAdd(&h[warp][d], static_cast<unsigned int>(__popc(peers)));
  }
  __syncthreads();
  unsigned int c = 0u;
#pragma unroll
  for (int w = 0; w < kTileThreads / 32; ++w) c += h[w][t];
  counts[static_cast<int64_t>(t) * T + blockIdx.x] = c;  // digit-major: scan gives global starts
}

template <int KD, int SRC, int DST>
__global__ void __launch_bounds__(kTileThreads)
    tile_scatter_kernel(const void* __restrict__ keys, const unsigned int* __restrict__ idx_in, int64_t n,
                        int mode, int lo, int shift, int64_t T, const unsigned int* __restrict__ counts,
                        const unsigned int* __restrict__ offsets, int64_t* __restrict__ order,
                        unsigned short* __restrict__ keys_out, unsigned int* __restrict__ idx_out) {
  using Sort = cub::BlockRadixSort<unsigned short, kTileThreads, kTileItems, unsigned int>;
  using Scan = cub::BlockScan<unsigned int, kTileThreads>;
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ unsigned int gbase[kDigits], lbase[kDigits];
  const int t = threadIdx.x;
  const int64_t tile_base = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t valid = (n - tile_base < kTile) ? n - tile_base : kTile;
  {
    const int64_t at = static_cast<int64_t>(t) * T + blockIdx.x;
    const unsigned int c = counts[at];
    unsigned int ex;
    Scan(tmp.scan).ExclusiveSum(c, ex);
    lbase[t] = ex;
    gbase[t] = offsets[at];
  }
  __syncthreads();  // bases visible; tmp free for the sort

  unsigned short k[kTileItems];
  unsigned int v[kTileItems];
  const int q0 = t * kTileItems;
  if (SRC == 0) {
    using Raw = typename KeyTraits<KD>::Raw;
    Raw raw[kTileItems];
    load_blocked<Raw, kTileItems>(static_cast<const Raw*>(keys) + tile_base, q0, valid, raw, Raw(0));
#pragma unroll
    for (int j = 0; j < kTileItems; ++j) {
      const bool ok = q0 + j < valid;  // padding: digit 255 and last in the tile, never written
      k[j] = ok ? static_cast<unsigned short>(plan_key<KD>(raw[j], mode, lo) & 0xffffull) : 0xffff;
      v[j] = ok ? static_cast<unsigned int>(tile_base + q0 + j) : 0xffffffffu;
    }
  } else {
    load_blocked<unsigned short, kTileItems>(static_cast<const unsigned short*>(keys) + tile_base, q0, valid, k,
                                             static_cast<unsigned short>(0xffff));
    load_blocked<unsigned int, kTileItems>(idx_in + tile_base, q0, valid, v, 0xffffffffu);
  }
  Sort(tmp.sort).SortBlockedToStriped(k, v, shift, shift + 8);
#pragma unroll
  for (int j = 0; j < kTileItems; ++j) {
    const int q = j * kTileThreads + t;  // striped: sorted position within the tile
    if (q < valid) {
      const unsigned int d = (static_cast<unsigned int>(k[j]) >> shift) & 0xffu;
      const int64_t pos = static_cast<int64_t>(gbase[d]) + (q - static_cast<int64_t>(lbase[d]));
      if (DST == 0) {
        order[pos] = static_cast<int64_t>(v[j]);
      } else {
        keys_out[pos] = k[j];
        idx_out[pos] = v[j];
      }
    }
  }
}

/* ---- host side ------------------------------------------------------------------------------- */

struct Layout {
  size_t params, keyA, idxA, keyB, idxB, cub_tmp, cub_bytes, counts, offsets, scan_tmp, total;
  int64_t T;
};

template <typename KeyT>
int cub_sort_bytes(int64_t n, int end_bit, cudaStream_t s, size_t* bytes) {
  cub::DoubleBuffer<KeyT> kb(nullptr, nullptr);
  cub::DoubleBuffer<unsigned int> vb(nullptr, nullptr);
  *bytes = 0;
  const cudaError_t e =
      cub::DeviceRadixSort::SortPairs(nullptr, *bytes, kb, vb, static_cast<int>(n), 0, end_bit, s);
  if (e != cudaSuccess) return cuda_fail(e, "fk_cuda_stable_argsort: CUB workspace query");
  return FK_OK;
}

int make_layout(int key_dtype, int64_t n, cudaStream_t s, Layout* L) {
  const bool wide = key_dtype == FK_KEY_F64 || key_dtype == FK_KEY_I64;
  const size_t kw = wide ? 8 : 4, A = 256;
  size_t cub32 = 0, cub64 = 0;
  FK_TRY(cub_sort_bytes<unsigned int>(n, 32, s, &cub32));
  if (wide) FK_TRY(cub_sort_bytes<unsigned long long>(n, 64, s, &cub64));
  L->T = ceil_div(n, kTile);
  size_t off = 0;
  L->params = off;
  off += align_up(sizeof(RangeAcc), A);
  L->keyA = off;  // CUB keys, or the 16-bit keys between two counting passes
  off += align_up(static_cast<size_t>(n) * kw, A);
  L->idxA = off;
  off += align_up(static_cast<size_t>(n) * 4, A);
  const size_t u0 = off;  // union: CUB buffers | counting-pass tables
  L->keyB = u0;
  L->idxB = L->keyB + align_up(static_cast<size_t>(n) * kw, A);
  L->cub_tmp = L->idxB + align_up(static_cast<size_t>(n) * 4, A);
  L->cub_bytes = align_up(cub32 > cub64 ? cub32 : cub64, A);
  const size_t end_cub = L->cub_tmp + L->cub_bytes;
  const size_t nc = static_cast<size_t>(kDigits) * static_cast<size_t>(L->T);
  L->counts = u0;
  L->offsets = L->counts + align_up(nc * 4, A);
  L->scan_tmp = L->offsets + align_up(nc * 4, A);
  const size_t end_cnt = L->scan_tmp + align_up(scan_u32_tmp_bytes(static_cast<int64_t>(nc)), A);
  L->total = end_cub > end_cnt ? end_cub : end_cnt;
  return FK_OK;
}

template <int KD>
int counting_sort(const void* keys, int64_t* order, int64_t n, const Plan& plan, char* ws, const Layout& L,
                  cudaStream_t s) {
  const char* who = "fk_cuda_stable_argsort";
  unsigned int* counts = reinterpret_cast<unsigned int*>(ws + L.counts);
  unsigned int* offsets = reinterpret_cast<unsigned int*>(ws + L.offsets);
  void* scan_tmp = ws + L.scan_tmp;
  unsigned short* k16 = reinterpret_cast<unsigned short*>(ws + L.keyA);
  unsigned int* idx = reinterpret_cast<unsigned int*>(ws + L.idxA);
  const unsigned grid = static_cast<unsigned>(L.T);
  const int64_t nc = static_cast<int64_t>(kDigits) * L.T;
  const bool two = plan.nbits > 8;
  // pass 1: digits [0, 8) of the compressed key
  launch(tile_hist_kernel<KD, 0>, grid, kTileThreads, 0, s, keys, n, plan.mode, plan.lo, 0, L.T, counts);
  FK_TRY(check_launch(who));
  FK_TRY(scan_u32(counts, offsets, nc, false, scan_tmp, s, who));
  if (!two) {
    launch(tile_scatter_kernel<KD, 0, 0>, grid, kTileThreads, 0, s, keys, nullptr, n, plan.mode, plan.lo, 0, L.T,
           counts, offsets, order, nullptr, nullptr);
    return check_launch(who);
  }
  launch(tile_scatter_kernel<KD, 0, 1>, grid, kTileThreads, 0, s, keys, nullptr, n, plan.mode, plan.lo, 0, L.T, counts,
         offsets, nullptr, k16, idx);
  FK_TRY(check_launch(who));
  // pass 2: digits [8, 16) of the 16-bit keys written by pass 1 (independent of the key dtype,
  // so one instantiation serves all: KD is a placeholder there)
  launch(tile_hist_kernel<FK_KEY_I32, 1>, grid, kTileThreads, 0, s, k16, n, 0, 0, 8, L.T, counts);
  FK_TRY(check_launch(who));
  FK_TRY(scan_u32(counts, offsets, nc, false, scan_tmp, s, who));
  launch(tile_scatter_kernel<FK_KEY_I32, 1, 0>, grid, kTileThreads, 0, s, k16, idx, n, 0, 0, 8, L.T, counts, offsets,
         order, nullptr, nullptr);
  return check_launch(who);
}

template <int KD, typename KeyT>
int cub_sort(const void* keys, int64_t* order, int64_t n, const Plan& plan, char* ws, const Layout& L,
             cudaStream_t s) {
  const char* who = "fk_cuda_stable_argsort";
  KeyT* ka = reinterpret_cast<KeyT*>(ws + L.keyA);
  KeyT* kb = reinterpret_cast<KeyT*>(ws + L.keyB);
  unsigned int* va = reinterpret_cast<unsigned int*>(ws + L.idxA);
  unsigned int* vb = reinterpret_cast<unsigned int*>(ws + L.idxB);
  const unsigned grid = static_cast<unsigned>(ceil_div(n, 256));
  launch(transform_kernel<KD, KeyT>, grid, 256, 0, s, static_cast<const typename KeyTraits<KD>::Raw*>(keys), n,
         plan.mode, plan.lo, ka, va);
  FK_TRY(check_launch(who));
  cub::DoubleBuffer<KeyT> kbuf(ka, kb);
  cub::DoubleBuffer<unsigned int> vbuf(va, vb);
  size_t bytes = 0;
  cudaError_t e = cub::DeviceRadixSort::SortPairs(nullptr, bytes, kbuf, vbuf, static_cast<int>(n), 0, plan.nbits, s);
  if (e != cudaSuccess) return cuda_fail(e, "fk_cuda_stable_argsort: CUB workspace query");
  if (bytes > L.cub_bytes)
    return fail(FK_EINVAL, "%s: CUB needs %zu temporary bytes, %zu reserved", who, bytes, L.cub_bytes);
  bytes = L.cub_bytes;
  e = cub::DeviceRadixSort::SortPairs(ws + L.cub_tmp, bytes, kbuf, vbuf, static_cast<int>(n), 0, plan.nbits, s);
  if (e != cudaSuccess) return cuda_fail(e, "fk_cuda_stable_argsort: CUB SortPairs");
  launch(widen_kernel, grid, 256, 0, s, vbuf.Current(), order, n);
  return check_launch(who);
}

template <int KD>
int sort_large(const void* keys, int64_t* order, int64_t n, char* ws, const Layout& L, cudaStream_t s) {
  const char* who = "fk_cuda_stable_argsort";
  using Raw = typename KeyTraits<KD>::Raw;
  constexpr int width = KeyTraits<KD>::width;
  Plan plan{MODE_ORD, 0, width};
  if (!stream_capturing(s)) {
    RangeAcc* acc = reinterpret_cast<RangeAcc*>(ws + L.params);
    cudaError_t e = cudaMemsetAsync(acc, 0, sizeof(RangeAcc), s);
    if (e != cudaSuccess) return cuda_fail(e, "fk_cuda_stable_argsort: memset");
    const int64_t want = ceil_div(n, kRangeThreads * 8);
    const int64_t cap = 8LL * sm_count();
    launch(range_kernel<KD>, static_cast<unsigned>(want < cap ? want : cap), kRangeThreads, 0, s,
           static_cast<const Raw*>(keys), n, acc);
    FK_TRY(check_launch(who));
    RangeAcc h;
    e = cudaMemcpyAsync(&h, acc, sizeof(RangeAcc), cudaMemcpyDeviceToHost, s);
    if (e == cudaSuccess) e = cudaStreamSynchronize(s);
    if (e != cudaSuccess) return cuda_fail(e, "fk_cuda_stable_argsort: reading the key range");
    plan = make_plan(h, KeyTraits<KD>::is_float, width);
  }
  if (plan.nbits == 0) {
    launch(arange_kernel, static_cast<unsigned>(ceil_div(n, 256)), 256, 0, s, order, n);
    return check_launch(who);
  }
  if (plan.nbits <= 16) return counting_sort<KD>(keys, order, n, plan, ws, L, s);
  if (plan.nbits <= 32) return cub_sort<KD, unsigned int>(keys, order, n, plan, ws, L, s);
  if constexpr (width == 64) return cub_sort<KD, unsigned long long>(keys, order, n, plan, ws, L, s);
  return fail(FK_EINVAL, "%s: internal error (plan of %d bits)", who, plan.nbits);
}

template <int KD>
int sort_small(const void* keys, int64_t* order, int64_t n, cudaStream_t s) {
  launch(small_sort_kernel<KD>, 1, kSmallThreads, 0, s, static_cast<const typename KeyTraits<KD>::Raw*>(keys), order,
         static_cast<int>(n));
  return check_launch("fk_cuda_stable_argsort");
}

}  // namespace
}  // namespace fk

extern "C" int fk_cuda_stable_argsort(const void* keys, int32_t key_dtype, int64_t* order, int64_t N,
                                      void* workspace, size_t* workspace_bytes, void* stream) {
  using namespace fk;
  const char* who = "fk_cuda_stable_argsort";
  if (key_dtype < FK_KEY_F32 || key_dtype > FK_KEY_I64)
    return fail(FK_EINVAL, "%s: unknown key dtype %d", who, (int)key_dtype);
  if (N < 0 || N > 0x7fffffffLL) return fail(FK_EINVAL, "%s: N must be in [0, 2^31) (got %lld)", who, (long long)N);
  if (workspace_bytes == nullptr) return fail(FK_EINVAL, "%s: workspace_bytes is NULL", who);
  FK_TRY(enter(stream, who));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  Layout L{};
  // never 0 (the second call always passes a real buffer); 256 bytes of slack let the layout start
  // at a 256-byte aligned address whatever the buffer's alignment
  size_t need = 256;
  if (N > kSmallN) {
    FK_TRY(make_layout(key_dtype, N, s, &L));
    need = L.total + 256;
  }
  if (workspace == nullptr) {
    *workspace_bytes = need;
    return FK_OK;
  }
  if (*workspace_bytes < need)
    return fail(FK_EINVAL, "%s: workspace of %zu bytes, %zu needed", who, *workspace_bytes, need);
  if (N == 0) return FK_OK;
  if (keys == nullptr || order == nullptr) return fail(FK_EINVAL, "%s: keys and order are required", who);
  char* ws = reinterpret_cast<char*>(align_up(reinterpret_cast<uintptr_t>(workspace), 256));
  if (N <= kSmallN) {
    switch (key_dtype) {
      case FK_KEY_F32: return sort_small<FK_KEY_F32>(keys, order, N, s);
      case FK_KEY_F64: return sort_small<FK_KEY_F64>(keys, order, N, s);
      case FK_KEY_I32: return sort_small<FK_KEY_I32>(keys, order, N, s);
      default: return sort_small<FK_KEY_I64>(keys, order, N, s);
    }
  }
  switch (key_dtype) {
    case FK_KEY_F32: return sort_large<FK_KEY_F32>(keys, order, N, ws, L, s);
    case FK_KEY_F64: return sort_large<FK_KEY_F64>(keys, order, N, ws, L, s);
    case FK_KEY_I32: return sort_large<FK_KEY_I32>(keys, order, N, ws, L, s);
    default: return sort_large<FK_KEY_I64>(keys, order, N, ws, L, s);
  }
}
