/*
 * fk_segments.cuh -- walking the segment table (fk_segment rows) on the device.
 *
 * A cursor is positioned once per thread (binary search over the segment offsets, one integer
 * division pair) and then advanced element by element with increments only, so no division is
 * ever done per element-client pair. Inputs that do not tile [0, P) exactly are memory-safe:
 * elements outside every segment, or whose neuron index falls outside [0, N), are marked dead
 * (never active) instead of reading out of bounds.
 */
#ifndef FK_SEGMENTS_CUH
#define FK_SEGMENTS_CUH

#include <stdint.h>

#include "fk_cuda_common.cuh"

namespace fk {

struct SegCursor {
  int64_t s;      // segment index
  int64_t off;    // its first element
  int64_t len;    // rows * cols * inner (0 for an empty or malformed segment)
  int64_t cols, inner, oo, io;
  int64_t local;  // element index inside the segment
  int64_t o, i, r;
  bool ok;        // the element lies inside segment s
};

__device__ __forceinline__ void seg_load(const fk_segment* __restrict__ segs, int64_t s, SegCursor& c) {
  const fk_segment* g = segs + s;
  c.s = s;
  c.off = __ldg(&g->offset);
  const int64_t rows = __ldg(&g->rows);
  c.cols = __ldg(&g->cols);
  c.inner = __ldg(&g->inner);
  c.oo = __ldg(&g->out_off);
  c.io = __ldg(&g->in_off);
  c.len = (rows > 0 && c.cols > 0 && c.inner > 0) ? rows * c.cols * c.inner : 0;
}

/* Splits c.local into (o, i, r). */
__device__ __forceinline__ void seg_decompose(SegCursor& c) {
  const int64_t rowlen = c.cols * c.inner;
  if (c.local < 0x7fffffffLL && rowlen < 0x7fffffffLL) {
    const uint32_t l = static_cast<uint32_t>(c.local), rl = static_cast<uint32_t>(rowlen),
                   in = static_cast<uint32_t>(c.inner);
    const uint32_t o = l / rl, rem = l - o * rl, i = rem / in;
    c.o = o;
    c.i = i;
    c.r = rem - i * in;
  } else {
    c.o = c.local / rowlen;
    const int64_t rem = c.local - c.o * rowlen;
    c.i = rem / c.inner;
    c.r = rem - c.i * c.inner;
  }
}

/* Positions the cursor on element p (segments sorted by offset, segs[0].offset == 0). */
__device__ __forceinline__ void seg_seek(const fk_segment* __restrict__ segs, int64_t S, int64_t p,
                                         SegCursor& c) {
  int64_t lo = 0, hi = S - 1;  // last segment whose offset is <= p
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (__ldg(&segs[mid].offset) <= p) lo = mid; else hi = mid - 1;
  }
  seg_load(segs, lo, c);
  while (p - c.off >= c.len && c.s + 1 < S) seg_load(segs, c.s + 1, c);
  c.local = p - c.off;
  c.ok = c.local >= 0 && c.local < c.len;
  c.o = c.i = c.r = 0;
  if (c.ok) seg_decompose(c);
}

/* Moves the cursor to the next element. */
__device__ __forceinline__ void seg_next(const fk_segment* __restrict__ segs, int64_t S, SegCursor& c) {
  if (!c.ok) return;  // malformed table: stays dead
  ++c.local;
  if (++c.r == c.inner) {
    c.r = 0;
    if (++c.i == c.cols) {
      c.i = 0;
      ++c.o;
    }
  }
  if (c.local >= c.len) {
    bool found = false;
    while (c.s + 1 < S) {
      seg_load(segs, c.s + 1, c);
      if (c.len > 0) { found = true; break; }
    }
    c.local = 0;
    c.o = c.i = c.r = 0;
    c.ok = found;
  }
}

/* Flat neuron indices gating the cursor's element: -1 = that dim is ungated; sets dead when the
 * element is outside the table or an index is outside [0, N). */
__device__ __forceinline__ void seg_neurons(const SegCursor& c, int64_t N, int64_t& nout, int64_t& nin,
                                            bool& dead) {
  nout = c.oo >= 0 ? c.oo + c.o : -1;
  nin = c.io >= 0 ? c.io + c.i : -1;
  dead = !c.ok || nout >= N || nin >= N;
}

}  // namespace fk

#endif /* FK_SEGMENTS_CUH */
