/*
 * structured.cu -- fk_cuda_structured: masked mean with masks given by neuron gates.
 *
 * Design (same thread mapping as dense.cu: one 16-byte group of contiguous elements per thread,
 * clients in order, kClientUnroll clients' loads in flight):
 *   - once per thread, outside the client loop: the segment of the group (binary search) and,
 *     for each element, its gating neurons; (o, i) advance by increments, never by a division per
 *     element. Nested form: the element's gate key is max(rank[out], rank[in]) (ungated dims
 *     contribute INT_MIN), so client k's gate is the single compare key < sizes[k].
 *     Mask form: the two neuron indices, with "same as the previous element" bits so a byte of
 *     neuron_masks is loaded once per distinct neuron and client, not once per element.
 *   - per client: the gate bits of the group first, and the client's row is read only where some
 *     element of the group is gated on (row skipping: rows of dead output neurons, and column
 *     ranges of dead input neurons, cost no memory traffic).
 */
#include <limits.h>

#include "fk_agg.cuh"
#include "fk_segments.cuh"

namespace fk {
namespace {

/* Elements per thread: 4 keeps the per-element gate state (and registers) small; the row loads
 * are 16 bytes for fp32 and 8 bytes for 16-bit dtypes. */
constexpr int kStructElems = 4;

template <int DT, bool NESTED, bool NONZERO>
__global__ void __launch_bounds__(kAggThreads)
    structured_kernel(const AggArgs a, const fk_segment* __restrict__ segs, int64_t S, int64_t N,
                      const uint8_t* __restrict__ nm, const int32_t* __restrict__ rank,
                      const int32_t* __restrict__ sizes) {
  constexpr int V = kStructElems;  // 16 bytes (fp32) or 8 bytes (bf16/fp16) per client row
  constexpr int NW = Group<DT, V>::NW;
  constexpr int U = kClientUnroll;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kAggThreads + threadIdx.x) * V;
  if (p0 >= a.P) return;
  const int nv = (a.P - p0 < V) ? static_cast<int>(a.P - p0) : V;

  // ---- per-element gate descriptors (computed once) ----
  int32_t key[V];             // nested: gate key (INT_MIN = always on, INT_MAX = never)
  int32_t no[V], ni[V];       // masks: neuron indices (-1 = ungated)
  uint32_t live = 0u;         // elements that exist and are not dead
  uint32_t same_o = 0u, same_i = 0u;  // masks: same neuron as element j-1
  {
    SegCursor c;
    seg_seek(segs, S, p0, c);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      key[j] = INT_MAX;
      no[j] = -1;
      ni[j] = -1;
      if (j < nv) {
        if (j > 0) seg_next(segs, S, c);
        int64_t nout, nin;
        bool dead;
        seg_neurons(c, N, nout, nin, dead);
        if (!dead) {
          live |= 1u << j;
          if (NESTED) {
            const int32_t ro = nout >= 0 ? __ldg(rank + nout) : INT_MIN;
            const int32_t ri = nin >= 0 ? __ldg(rank + nin) : INT_MIN;
            key[j] = ro > ri ? ro : ri;
          } else {
            no[j] = static_cast<int32_t>(nout);
            ni[j] = static_cast<int32_t>(nin);
            if (j > 0 && ((live >> (j - 1)) & 1u)) {
              if (no[j] == no[j - 1]) same_o |= 1u << j;
              if (ni[j] == ni[j - 1]) same_i |= 1u << j;
            }
          }
        }
      }
    }
  }

  float num[V], den[V];
  start_contig<V>(a, p0, nv, num, den);

  for (int64_t k0 = 0; k0 < a.K; k0 += U) {
    float wk[U];
    const void* rp[U];
    int32_t sz[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u;
      wk[u] = 0.f;
      rp[u] = nullptr;
      sz[u] = 0;
      if (k < a.K) {
        wk[u] = __ldg(a.weights + k);
        rp[u] = row_ptr(a.rows, k);
        if (NESTED) sz[u] = __ldg(sizes + k);
      }
    }
    // gate bits of the group for each client
    uint32_t gate[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      uint32_t bits = 0u;
      if (wk[u] != 0.f) {  // false for k >= K
        if (NESTED) {
#pragma unroll
          for (int j = 0; j < V; ++j) bits |= (key[j] < sz[u] ? 1u : 0u) << j;
        } else {
          const uint8_t* mk = nm + (k0 + u) * N;
          bool go = true, gi = true;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if ((live >> j) & 1u) {
              if (!((same_o >> j) & 1u)) go = no[j] < 0 || __ldg(mk + no[j]) != 0;
              if (!((same_i >> j) & 1u)) gi = ni[j] < 0 || __ldg(mk + ni[j]) != 0;
              bits |= (go && gi ? 1u : 0u) << j;
            }
          }
        }
        bits &= live;
      }
      gate[u] = bits;
    }
    // row data, only where some element is gated on
    uint32_t w[U][NW];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int q = 0; q < NW; ++q) w[u][q] = 0u;
      if (gate[u] != 0u) load_group<DT, V>(rp[u], p0, nv, align_class(rp[u]), w[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (gate[u] != 0u) {
        bool bad = false;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if ((gate[u] >> j) & 1u) {
            const float v = elem<DT, NW>(w[u], j);
            if (!NONZERO || v != 0.f) {
              if (!is_finite_bits(v)) bad = true;
              accumulate(num[j], den[j], wk[u], v);
            }
          }
        }
        if (bad) a.flags[k0 + u] = 1;
      }
    }
  }
  finish_contig<V>(a, p0, nv, num, den);
}

template <int DT, bool NESTED, bool NONZERO>
int launch_structured(const AggArgs& a, const fk_segment* segs, int64_t S, int64_t N,
                      const uint8_t* nm, const int32_t* rank, const int32_t* sizes, cudaStream_t s) {
  unsigned grid = 0;
  FK_TRY(agg_grid(ceil_div(a.P, kStructElems), &grid, "fk_cuda_structured"));
  launch(structured_kernel<DT, NESTED, NONZERO>, grid, kAggThreads, 0, s, a, segs, S, N, nm, rank, sizes);
  return check_launch("fk_cuda_structured: kernel launch");
}

template <int DT>
int dispatch_structured(const AggArgs& a, const fk_segment* segs, int64_t S, int64_t N,
                        const uint8_t* nm, const int32_t* rank, const int32_t* sizes, bool nonzero,
                        cudaStream_t s) {
  const bool nested = nm == nullptr;
  if (nested) {
    if (nonzero) return launch_structured<DT, true, true>(a, segs, S, N, nm, rank, sizes, s);
    return launch_structured<DT, true, false>(a, segs, S, N, nm, rank, sizes, s);
  }
  if (nonzero) return launch_structured<DT, false, true>(a, segs, S, N, nm, rank, sizes, s);
  return launch_structured<DT, false, false>(a, segs, S, N, nm, rank, sizes, s);
}
}  // namespace
}  // namespace fk

extern "C" int fk_cuda_structured(const fk_accum_args* args, const fk_segment* segs, int64_t S,
                                  int64_t N, const uint8_t* neuron_masks, const int32_t* rank,
                                  const int32_t* sizes, int nonzero_rule, void* stream) {
  using namespace fk;
  const char* who = "fk_cuda_structured";
  AggArgs a;
  FK_TRY(make_agg_args(args, who, &a));
  if (S < 1 || segs == nullptr) return fail(FK_EINVAL, "%s: need S >= 1 segments (got %lld)", who, (long long)S);
  if (N < 0 || N > 0x7fffffffLL) return fail(FK_EINVAL, "%s: N must be in [0, 2^31) (got %lld)", who, (long long)N);
  if ((neuron_masks != nullptr) == (rank != nullptr || sizes != nullptr))
    return fail(FK_EINVAL, "%s: give exactly one of neuron_masks or (rank, sizes)", who);
  if (neuron_masks == nullptr && (rank == nullptr || sizes == nullptr))
    return fail(FK_EINVAL, "%s: the nested form needs both rank and sizes", who);
  FK_TRY(enter(stream, who));
  if (a.P == 0) return FK_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool nz = nonzero_rule != 0;
  switch (args->dtype) {
    case FK_F32: return dispatch_structured<FK_F32>(a, segs, S, N, neuron_masks, rank, sizes, nz, s);
    case FK_BF16: return dispatch_structured<FK_BF16>(a, segs, S, N, neuron_masks, rank, sizes, nz, s);
    default: return dispatch_structured<FK_F16>(a, segs, S, N, neuron_masks, rank, sizes, nz, s);
  }
}
