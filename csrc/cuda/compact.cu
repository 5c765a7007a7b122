/*
 * compact.cu -- fk_cuda_compact: masked mean over compact uploads (deterministic gather).
 *
 * Design: a block owns kAggThreads * kCompactElems consecutive elements of the flat buffer and
 * thread t handles elements base + j * kAggThreads + t (j < kCompactElems), so each gather
 * instruction of a warp reads 32 consecutive dense elements, which map to (mostly) consecutive
 * compact positions: coalesced scalar loads. Per element, once: segment, (o, i, r) and gating
 * neurons. Per client k (in order; weight 0 = never read): seg_off/seg_cols of the segment (loaded
 * once per distinct segment), po = inv[k, out] and pi = inv[k, in] (loaded once per distinct
 * neuron), then one value load where active. No atomics, no scatter: every output element is
 * produced by exactly one thread, so results are bit-identical run to run.
 *
 * Index assumptions: rows, cols and inner of each segment and N are < 2^31 (po, pi, o, i, r are
 * held in 32 bits); offsets and products are 64-bit.
 */
#include <limits.h>

#include <type_traits>

#include "fk_agg.cuh"
#include "fk_segments.cuh"

namespace fk {
namespace {

constexpr int kCompactElems = 4;   // elements per thread, one after the other, kAggThreads apart
constexpr int kCompactUnroll = 4;  // clients whose gathers are in flight together

/* IDX32: P < 2^31, so every in-range compact index fits in 32 bits (each client's compact values
 * are at most P); the 32-bit index math keeps registers (and occupancy) in check. */
template <int DT, bool IDX32>
__global__ void __launch_bounds__(kAggThreads, 4)
    compact_kernel(const AggArgs a, const fk_segment* __restrict__ segs, int64_t S, int64_t N,
                   const int32_t* __restrict__ inv, const int64_t* __restrict__ seg_off,
                   const int64_t* __restrict__ seg_cols) {
  using I = typename std::conditional<IDX32, int32_t, int64_t>::type;
  constexpr int U = kCompactUnroll;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kAggThreads * kCompactElems) + threadIdx.x;
  SegCursor c;
  bool have = false;
#pragma unroll 1
  for (int j = 0; j < kCompactElems; ++j) {
    const int64_t p = base + static_cast<int64_t>(j) * kAggThreads;
    if (p >= a.P) break;
    if (!have) {
      seg_seek(segs, S, p, c);
      have = true;
    } else {  // p is kAggThreads past the previous element: move forward
      while (c.s + 1 < S && p - c.off >= c.len) seg_load(segs, c.s + 1, c);
      c.local = p - c.off;
      c.ok = c.local >= 0 && c.local < c.len;
      if (c.ok) seg_decompose(c);
    }
    int64_t nout, nin;
    bool dead;
    seg_neurons(c, N, nout, nin, dead);
    // gating neuron index when that dim is gated, else ~o / ~i (negative: ungated)
    const int32_t eo = nout >= 0 ? static_cast<int32_t>(nout) : ~static_cast<int32_t>(c.o);
    const int32_t ei = nin >= 0 ? static_cast<int32_t>(nin) : ~static_cast<int32_t>(c.i);
    const I er = static_cast<I>(c.r), inner = static_cast<I>(c.inner);
    const int64_t s = c.s;

    float num = a.init_num != nullptr ? a.init_num[p] : 0.f;
    float den = a.init_den != nullptr ? a.init_den[p] : 0.f;
    const int64_t K = dead ? 0 : a.K;
    for (int64_t k0 = 0; k0 < K; k0 += U) {
      float wk[U];
      const void* rp[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        wk[u] = 0.f;
        rp[u] = nullptr;
        if (k0 + u < K) {
          wk[u] = __ldg(a.weights + k0 + u);
          rp[u] = row_ptr(a.rows, k0 + u);
        }
      }
      uint32_t vb[U];
      uint32_t act = 0u;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        vb[u] = 0u;
        if (wk[u] != 0.f) {  // false for k >= K: never read
          const int64_t k = k0 + u;
          const int64_t so = __ldg(seg_off + k * S + s);
          const I nc = static_cast<I>(__ldg(seg_cols + k * S + s));
          const int32_t po = eo >= 0 ? __ldg(inv + k * N + eo) : ~eo;
          const int32_t pi = ei >= 0 ? __ldg(inv + k * N + ei) : ~ei;
          if (so >= 0 && po >= 0 && pi >= 0) {
            const I idx = static_cast<I>(so) + (static_cast<I>(po) * nc + static_cast<I>(pi)) * inner + er;
            vb[u] = load_bits<DT>(rp[u], idx);
            act |= 1u << u;
          }
        }
      }
      bool bad[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        bad[u] = false;
        if ((act >> u) & 1u) {
          const float v = bits_to_float<DT>(vb[u]);
          bad[u] = !is_finite_bits(v);
          accumulate(num, den, wk[u], v);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (bad[u]) a.flags[k0 + u] = 1;
    }
    if (a.out != nullptr) {
      a.out[p] = finalize_one(a.g[p], num, den);
    } else {
      a.acc_num[p] = num;
      a.acc_den[p] = den;
    }
  }
}

template <int DT>
int launch_compact(const AggArgs& a, const fk_segment* segs, int64_t S, int64_t N, const int32_t* inv,
                   const int64_t* seg_off, const int64_t* seg_cols, cudaStream_t s) {
  unsigned grid = 0;
  FK_TRY(agg_grid(ceil_div(a.P, kCompactElems), &grid, "fk_cuda_compact"));
  if (a.P < 0x7fffffffLL)
    launch(compact_kernel<DT, true>, grid, kAggThreads, 0, s, a, segs, S, N, inv, seg_off, seg_cols);
  else
    launch(compact_kernel<DT, false>, grid, kAggThreads, 0, s, a, segs, S, N, inv, seg_off, seg_cols);
  return check_launch("fk_cuda_compact: kernel launch");
}
}  // namespace
}  // namespace fk

extern "C" int fk_cuda_compact(const fk_accum_args* args, const fk_segment* segs, int64_t S, int64_t N,
                               const int32_t* inv, const int64_t* seg_off, const int64_t* seg_cols,
                               void* stream) {
  using namespace fk;
  const char* who = "fk_cuda_compact";
  AggArgs a;
  FK_TRY(make_agg_args(args, who, &a));
  if (S < 1 || segs == nullptr) return fail(FK_EINVAL, "%s: need S >= 1 segments (got %lld)", who, (long long)S);
  if (S > 0x7fffffffLL) return fail(FK_EINVAL, "%s: too many segments", who);
  if (N < 0 || N > 0x7fffffffLL) return fail(FK_EINVAL, "%s: N must be in [0, 2^31) (got %lld)", who, (long long)N);
  if (a.K > 0 && (seg_off == nullptr || seg_cols == nullptr || (N > 0 && inv == nullptr)))
    return fail(FK_EINVAL, "%s: inv, seg_off and seg_cols are required", who);
  FK_TRY(enter(stream, who));
  if (a.P == 0) return FK_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args->dtype) {
    case FK_F32: return launch_compact<FK_F32>(a, segs, S, N, inv, seg_off, seg_cols, s);
    case FK_BF16: return launch_compact<FK_BF16>(a, segs, S, N, inv, seg_off, seg_cols, s);
    default: return launch_compact<FK_F16>(a, segs, S, N, inv, seg_off, seg_cols, s);
  }
}
