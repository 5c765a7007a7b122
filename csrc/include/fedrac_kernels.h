/*
 * fedrac_kernels.h -- the one C ABI shared by the CPU (C++/OpenMP) and CUDA back ends.
 *
 * No torch headers anywhere in csrc/: every entry point takes raw pointers, sizes and (CUDA) a
 * stream, so one build serves every torch version and rebuilds in seconds. The pybind11 modules in
 * csrc/bind/ expose these functions to Python with pointers passed as integers.
 *
 * Semantics (identical in every back end, and in the pure-torch oracle
 * fedrac_kernels/backends/torch_ref.py, which is the definition):
 *
 *   For every element p, in client order k = 0..K-1 and in float32:
 *       if weights[k] == 0: client k is skipped and its row is never read
 *       v      = (float) rows[k][p]                       (bf16 / fp16 widened exactly)
 *       active = gate(k, p) [&& v != 0 for the non-zero rule]
 *       if active:
 *           if !isfinite(v): flags[k] = 1
 *           t   = weights[k] * v        (rounded to float32: NO fused multiply-add)
 *           num = num + t
 *           den = den + weights[k]
 *   num/den start from init_num/init_den when those are given, else from 0.
 *   Finalize mode (out != NULL): out[p] = den > 0 ? g[p] + num / den : g[p]   (IEEE division)
 *   Accumulate mode (out == NULL): acc_num[p] = num, acc_den[p] = den (acc_* may equal init_*,
 *   or be other buffers, so a caller can keep its state untouched until it accepts the result).
 *
 * The fixed order and the absence of FMA contraction make every back end bit-identical to the
 * oracle and to itself run after run (no atomics on float data). Build with -ffp-contract=off
 * (g++) and -fmad=false (nvcc).
 *
 * Return value: FK_OK or an error code; fk_last_error() gives a message (thread-local).
 */
#ifndef FEDRAC_KERNELS_H
#define FEDRAC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* update-value dtypes */
#define FK_F32 0
#define FK_BF16 1
#define FK_F16 2

/* frequency-table / sort-key dtypes */
#define FK_KEY_F32 0
#define FK_KEY_F64 1
#define FK_KEY_I32 2
#define FK_KEY_I64 3

/* status codes */
#define FK_OK 0
#define FK_EINVAL 1
#define FK_ECUDA 2
#define FK_ENOMEM 3

/* One parameter tensor inside the flat buffer, viewed as [rows, cols, inner].
 * Element (o, i, r) lives at offset + (o * cols + i) * inner + r.
 * 1-D tensors (biases): rows = length, cols = 1, inner = 1.
 * out_off / in_off: index of the first neuron of the group gating dim 0 / dim 1 in the flat
 * neuron numbering [0, N), or -1 when that dim is not gated (always live).
 * Passed from Python as a contiguous int64 tensor [S, 6] with exactly this layout. */
typedef struct fk_segment {
  int64_t offset;
  int64_t rows;
  int64_t cols;
  int64_t inner;
  int64_t out_off;
  int64_t in_off;
} fk_segment;

/* Arguments common to every aggregation entry point. CUDA: every pointer is a device pointer,
 * and rows points to a device array of K device pointers. */
typedef struct fk_accum_args {
  int64_t K;                /* clients */
  int64_t P;                /* parameters (length of g/out/acc_*) */
  int32_t dtype;            /* FK_F32 / FK_BF16 / FK_F16: dtype of the update values */
  const void* const* rows;  /* K pointers: dense/structured: 1-D rows of length P; compact: each
                               client's concatenated compact values */
  const float* weights;     /* [K], >= 0 */
  const float* g;           /* [P] global parameters (finalize mode), else NULL */
  float* out;               /* [P] finalize-mode output (may equal g), or NULL = accumulate mode */
  const float* init_num;    /* [P] initial numerator, or NULL = start from 0 */
  const float* init_den;    /* [P] initial denominator, or NULL = start from 0 */
  float* acc_num;           /* [P] accumulate mode: receives num (may equal init_num) */
  float* acc_den;           /* [P] accumulate mode: receives den (may equal init_den) */
  int32_t* flags;           /* [K] set to 1 for a client with a non-finite active value */
} fk_accum_args;

const char* fk_last_error(void);

/* ---- CPU (C++ / OpenMP). nthreads <= 0: OpenMP default. ---------------------------------- */

/* Dense masks: masks == NULL -> non-zero rule (active iff v != 0); else masks[k] points to a
 * bool/uint8 row of length P (active iff masks[k][p] != 0). */
int fk_cpu_dense(const fk_accum_args* a, const uint8_t* const* masks, int nthreads);

/* Structured masks from neuron gates. Exactly one of neuron_masks ([K, N] uint8, row-major) or
 * (rank [N], sizes [K]) is given; with the nested form neuron n is on for client k iff
 * rank[n] < sizes[k]. gate(k, p) = (out_off < 0 || on(k, out_off + o)) && (in_off < 0 || on(k, in_off + i)).
 * nonzero_rule != 0: active = gate && v != 0. Segments must tile [0, P) exactly. Rows whose gate
 * is off need not be read. */
int fk_cpu_structured(const fk_accum_args* a, const fk_segment* segs, int64_t S, int64_t N,
                      const uint8_t* neuron_masks, const int32_t* rank, const int32_t* sizes,
                      int nonzero_rule, int nthreads);

/* Compact uploads: client k sends, for segment s with seg_off[k*S+s] >= 0, the sub-tensor of its
 * kept rows x kept cols (x inner) starting at element seg_off[k*S+s] of its value buffer rows[k],
 * laid out [n_rows_k, seg_cols[k*S+s], inner] row-major. inv[k*N + n] = position of neuron n in
 * client k's sorted kept list of n's group, or -1. For element (o, i, r):
 *   po = out_off >= 0 ? inv[k*N + out_off + o] : o;  pi = in_off >= 0 ? inv[k*N + in_off + i] : i
 *   active iff seg_off >= 0 && po >= 0 && pi >= 0;  v = rows[k][seg_off + (po*seg_cols + pi)*inner + r]
 * (structural rule: every sent value counts, zeros included). */
int fk_cpu_compact(const fk_accum_args* a, const fk_segment* segs, int64_t S, int64_t N,
                   const int32_t* inv, const int64_t* seg_off, const int64_t* seg_cols, int nthreads);

/* freq[n] += #{k : masks[k*N+n] != 0}  or, nested form, #{k : sizes[k] > rank[n]}.
 * freq has dtype freq_dtype (FK_KEY_*); the integer count is added in that dtype. */
int fk_cpu_frequency_update(void* freq, int32_t freq_dtype, const uint8_t* masks,
                            const int32_t* rank, const int32_t* sizes, int64_t K, int64_t N,
                            int nthreads);

/* order = stable ascending argsort of keys (ties by lower index). Keys must not be NaN. */
int fk_cpu_stable_argsort(const void* keys, int32_t key_dtype, int64_t* order, int64_t N,
                          int nthreads);

/* out[s*N + n] = 1 iff n is in order[0 : sizes[s]]  (out is [S, N] uint8/bool, fully written). */
int fk_cpu_nested_masks(uint8_t* out, const int64_t* order, const int64_t* sizes, int64_t S,
                        int64_t N, int nthreads);

/* ---- CUDA. Same semantics; all pointers are device pointers; stream is a cudaStream_t. ------- */

int fk_cuda_dense(const fk_accum_args* a, const uint8_t* const* masks, void* stream);
int fk_cuda_structured(const fk_accum_args* a, const fk_segment* segs, int64_t S, int64_t N,
                       const uint8_t* neuron_masks, const int32_t* rank, const int32_t* sizes,
                       int nonzero_rule, void* stream);
int fk_cuda_compact(const fk_accum_args* a, const fk_segment* segs, int64_t S, int64_t N,
                    const int32_t* inv, const int64_t* seg_off, const int64_t* seg_cols,
                    void* stream);
int fk_cuda_frequency_update(void* freq, int32_t freq_dtype, const uint8_t* masks,
                             const int32_t* rank, const int32_t* sizes, int64_t K, int64_t N,
                             void* stream);
/* Two-call protocol: with workspace == NULL, writes the bytes needed to *workspace_bytes and
 * returns FK_OK without sorting; then call again with a device buffer of that size. */
int fk_cuda_stable_argsort(const void* keys, int32_t key_dtype, int64_t* order, int64_t N,
                           void* workspace, size_t* workspace_bytes, void* stream);
int fk_cuda_nested_masks(uint8_t* out, const int64_t* order, const int64_t* sizes, int64_t S,
                         int64_t N, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* FEDRAC_KERNELS_H */
