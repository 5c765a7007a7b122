/*
 * dense.cu -- fk_cuda_dense: masked mean with dense masks (or the non-zero rule).
 *
 * Design: one thread owns one 16-byte group of contiguous elements (4 fp32 / 8 bf16 / 8 fp16),
 * keeps num/den for them in registers, and walks the clients k = 0..K-1 in order. The loads of
 * kClientUnroll clients are issued before the first of them is used (memory-level parallelism),
 * then they are accumulated in client order. A client with weight 0 is never read; with dense
 * masks, a client whose mask bytes are all 0 on the group is not read either. 16-byte loads are
 * used whenever a row's base address allows (views at odd offsets fall back to 8/4/2-byte loads
 * of the same bytes), the tail group element by element.
 */
#include "fk_agg.cuh"

namespace fk {
namespace {

template <int DT, bool MASKS>
__global__ void __launch_bounds__(kAggThreads)
    dense_kernel(const AggArgs a, const uint8_t* const* __restrict__ masks) {
  constexpr int V = Vec<DT>::V;
  constexpr int U = kClientUnroll;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kAggThreads + threadIdx.x) * V;
  if (p0 >= a.P) return;
  const int nv = (a.P - p0 < V) ? static_cast<int>(a.P - p0) : V;
  const uint32_t valid = (1u << nv) - 1u;

  float num[V], den[V];
  start_contig<V>(a, p0, nv, num, den);

  for (int64_t k0 = 0; k0 < a.K; k0 += U) {
    uint32_t w[U][Group<DT, V>::NW];
    float wk[U];
    const void* rp[U];
    const uint8_t* mp[U];
    uint32_t live[U];
    // Weights and row (and mask) pointers of U clients first, so that their data loads are
    // issued back to back once these few cached loads have landed.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u;
      wk[u] = 0.f;
      rp[u] = nullptr;
      mp[u] = nullptr;
      if (k < a.K) {
        wk[u] = __ldg(a.weights + k);
        rp[u] = row_ptr(a.rows, k);
        if (MASKS)
          mp[u] = static_cast<const uint8_t*>(row_ptr(reinterpret_cast<const void* const*>(masks), k));
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      live[u] = 0u;
#pragma unroll
      for (int q = 0; q < Group<DT, V>::NW; ++q) w[u][q] = 0u;
      if (wk[u] != 0.f) {  // also false for k >= K (wk = 0): never read
        uint32_t bits = valid;
        if (MASKS) bits = load_mask_bits<V>(mp[u], p0, nv);
        live[u] = bits;
        if (bits != 0u) load_group<DT, V>(rp[u], p0, nv, align_class(rp[u]), w[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (live[u] != 0u) {
        bool bad = false;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if ((live[u] >> j) & 1u) {
            const float v = elem<DT, Group<DT, V>::NW>(w[u], j);
            if (MASKS || v != 0.f) {
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

template <int DT, bool MASKS>
int launch_dense(const AggArgs& a, const uint8_t* const* masks, cudaStream_t s) {
  unsigned grid = 0;
  FK_TRY(agg_grid(ceil_div(a.P, Vec<DT>::V), &grid, "fk_cuda_dense"));
  launch(dense_kernel<DT, MASKS>, grid, kAggThreads, 0, s, a, masks);
  return check_launch("fk_cuda_dense: kernel launch");
}

template <int DT>
int dispatch_dense(const AggArgs& a, const uint8_t* const* masks, cudaStream_t s) {
  if (masks != nullptr) return launch_dense<DT, true>(a, masks, s);
  return launch_dense<DT, false>(a, masks, s);
}
}  // namespace
}  // namespace fk

extern "C" int fk_cuda_dense(const fk_accum_args* args, const uint8_t* const* masks, void* stream) {
  using namespace fk;
  AggArgs a;
  FK_TRY(make_agg_args(args, "fk_cuda_dense", &a));
  FK_TRY(enter(stream, "fk_cuda_dense"));
  if (a.P == 0) return FK_OK;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args->dtype) {
    case FK_F32: return dispatch_dense<FK_F32>(a, masks, s);
    case FK_BF16: return dispatch_dense<FK_BF16>(a, masks, s);
    default: return dispatch_dense<FK_F16>(a, masks, s);
  }
}
