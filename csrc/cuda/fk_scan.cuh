/*
 * fk_scan.cuh -- a small deterministic device-wide prefix sum over unsigned 32-bit values
 * (reduce-then-scan: chunk sums, one-block scan of the sums, chunk scans), used where the
 * CUB device scan would do (its sm_90 scan kernel spills a few bytes under -fmad=false builds,
 * and this keeps every kernel of the module spill-free). Integer arithmetic: exact and
 * order-independent. Three launches; in place allowed (in == out).
 */
#ifndef FK_SCAN_CUH
#define FK_SCAN_CUH

#include <stdint.h>

#ifndef FK_HOST_EMU
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#endif

#include "fk_cuda_common.cuh"

namespace fk {
namespace {

constexpr int kScanThreads = 1024;
constexpr int kScanItems = 4;
constexpr int64_t kScanChunk = kScanThreads * kScanItems;

__global__ void __launch_bounds__(kScanThreads)
    scan_chunk_sums_kernel(const unsigned* __restrict__ in, int64_t n, unsigned* __restrict__ sums) {
  using Reduce = cub::BlockReduce<unsigned, kScanThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kScanChunk + threadIdx.x * kScanItems;
  unsigned acc = 0u;
#pragma unroll
  for (int i = 0; i < kScanItems; ++i)
    if (base + i < n) acc += in[base + i];
  const unsigned total = Reduce(tmp).Sum(acc);
  if (threadIdx.x == 0) sums[blockIdx.x] = total;
}

/* One block: exclusive prefix sum of sums[0..nb) in place. */
__global__ void __launch_bounds__(kScanThreads) scan_sums_kernel(unsigned* __restrict__ sums, int64_t nb) {
  using Scan = cub::BlockScan<unsigned, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ unsigned carry;
  if (threadIdx.x == 0) carry = 0u;
  __syncthreads();
  for (int64_t b0 = 0; b0 < nb; b0 += kScanChunk) {
    unsigned v[kScanItems], o[kScanItems];
    const int64_t base = b0 + threadIdx.x * kScanItems;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) v[i] = base + i < nb ? sums[base + i] : 0u;
    unsigned total;
    Scan(tmp).ExclusiveSum(v, o, total);
    const unsigned c = carry;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i)
      if (base + i < nb) sums[base + i] = o[i] + c;
    __syncthreads();
    if (threadIdx.x == 0) carry = c + total;
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kScanThreads)
    scan_chunks_kernel(const unsigned* in, unsigned* out, int64_t n, const unsigned* __restrict__ sums,
                       bool inclusive) {
  using Scan = cub::BlockScan<unsigned, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kScanChunk + threadIdx.x * kScanItems;
  unsigned v[kScanItems], o[kScanItems];
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) v[i] = base + i < n ? in[base + i] : 0u;
  Scan(tmp).ExclusiveSum(v, o);
  const unsigned prefix = sums[blockIdx.x];
#pragma unroll
  for (int i = 0; i < kScanItems; ++i)
    if (base + i < n) out[base + i] = prefix + o[i] + (inclusive ? v[i] : 0u);
}

/* Bytes of temporary memory scan_u32 needs for n items. */
inline size_t scan_u32_tmp_bytes(int64_t n) {
  return static_cast<size_t>(ceil_div(n < 1 ? 1 : n, kScanChunk)) * sizeof(unsigned);
}

/* out[i] = sum(in[0..i]) (inclusive) or sum(in[0..i)) (exclusive); tmp: scan_u32_tmp_bytes(n). */
inline int scan_u32(const unsigned* in, unsigned* out, int64_t n, bool inclusive, void* tmp,
                    cudaStream_t s, const char* who) {
  if (n <= 0) return FK_OK;
  const int64_t nb = ceil_div(n, kScanChunk);
  if (nb > 0x7fffffffLL) return fail(FK_EINVAL, "%s: scan too large", who);
  unsigned* sums = static_cast<unsigned*>(tmp);
  launch(scan_chunk_sums_kernel, static_cast<unsigned>(nb), kScanThreads, 0, s, in, n, sums);
  FK_TRY(check_launch(who));
  launch(scan_sums_kernel, 1, kScanThreads, 0, s, sums, nb);
  FK_TRY(check_launch(who));
  launch(scan_chunks_kernel, static_cast<unsigned>(nb), kScanThreads, 0, s, in, out, n, sums, inclusive);
  return check_launch(who);
}

}  // namespace
}  // namespace fk

#endif /* FK_SCAN_CUH */
