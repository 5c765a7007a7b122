/*
 * aggregate_common.cu -- host-side argument checks shared by the aggregation entry points.
 */
#include "fk_agg.cuh"

namespace fk {

static bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int make_agg_args(const fk_accum_args* a, const char* who, AggArgs* out) {
  if (a == nullptr) return fail(FK_EINVAL, "%s: args is NULL", who);
  if (a->K < 0) return fail(FK_EINVAL, "%s: K must be >= 0 (got %lld)", who, (long long)a->K);
  if (a->P < 0) return fail(FK_EINVAL, "%s: P must be >= 0 (got %lld)", who, (long long)a->P);
  if (a->dtype != FK_F32 && a->dtype != FK_BF16 && a->dtype != FK_F16)
    return fail(FK_EINVAL, "%s: unknown update dtype %d", who, (int)a->dtype);
  if (a->K > 0 && (a->rows == nullptr || a->weights == nullptr || a->flags == nullptr))
    return fail(FK_EINVAL, "%s: rows, weights and flags are required when K > 0", who);
  if (a->out != nullptr) {
    if (a->g == nullptr) return fail(FK_EINVAL, "%s: finalize mode (out != NULL) needs g", who);
  } else if (a->acc_num == nullptr || a->acc_den == nullptr) {
    return fail(FK_EINVAL, "%s: accumulate mode (out == NULL) needs acc_num and acc_den", who);
  }
  out->K = a->K;
  out->P = a->P;
  out->rows = a->rows;
  out->weights = a->weights;
  out->g = a->g;
  out->out = a->out;
  out->init_num = a->init_num;
  out->init_den = a->init_den;
  out->acc_num = a->out != nullptr ? nullptr : a->acc_num;
  out->acc_den = a->out != nullptr ? nullptr : a->acc_den;
  out->flags = a->flags;
  const void* fl[6] = {out->g, out->out, out->init_num, out->init_den, out->acc_num, out->acc_den};
  int ok = 1;
  for (const void* p : fl)
    if (p != nullptr && !aligned16(p)) ok = 0;
  out->fvec = ok;
  return FK_OK;
}

int agg_grid(int64_t threads_needed, unsigned* grid, const char* who) {
  const int64_t blocks = ceil_div(threads_needed, kAggThreads);
  if (blocks > 0x7fffffffLL) return fail(FK_EINVAL, "%s: problem too large for one launch", who);
  *grid = static_cast<unsigned>(blocks < 1 ? 1 : blocks);
  return FK_OK;
}

}  // namespace fk
