// Masked-mean aggregation on the CPU: fk_cpu_dense, fk_cpu_structured, fk_cpu_compact.
//
// Work is split over *elements* into tiles of at most kTile contiguous elements. One thread owns a
// tile, keeps its num/den in an L1-resident scratch buffer, and adds the clients into it in the
// fixed order k = 0..K-1 (never split over clients: the order of the float additions is what makes
// the result bit-identical to the oracle and run-to-run deterministic). Structured and compact
// tiles never cross a row of a segment unless they hold whole rows, so every index (row gate,
// column gates, compact source offsets) is worked out once per (tile, client) or once per call,
// never per element.
//
// Non-finite flags cost nothing on the fast path: a tile is first accumulated without looking for
// them; an active inf/nan always leaves num non-finite, so only a tile whose num ends non-finite
// is accumulated again (from its initial state) with the per-client test switched on.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <new>
#include <vector>

#include "fk_cpu_internal.h"

namespace fkcpu {
namespace {

constexpr int64_t kTile = 16384;          // elements per tile: num + den + vbuf + gate = 208 KB (L2)
constexpr int64_t kMinWork = 1 << 16;     // element-client updates per extra thread
constexpr int64_t kPackedRowsBelow = 64;  // gated rows shorter than this share one gate buffer
constexpr int64_t kMultiGroup = 10;       // clients per pass of the multi-client kernel
constexpr int64_t kMultiMinRow = 256;     // structured rows at least this long use it
// Dense with explicit masks: each client is two memory streams (values and mask bytes); a pass of
// 10 clients (20 streams) took 1.4-2.0x as long as two passes of 5 (AVX2 and AVX-512 multi-client
// kernels, K = 10 fp32, mlp10 / resnet10, 2026-11-21, benchmarks/RESULTS.md).
constexpr int64_t kMultiGroupMasked = kMultiGroup / 2;
int64_t g_gate_table_limit = int64_t(64) << 20;

/* Per-thread tile buffers, 64-byte aligned. */
struct Scratch {
  std::unique_ptr<float[]> fmem;
  std::unique_ptr<uint8_t[]> bmem;
  float* num;
  float* den;
  float* vbuf;
  uint8_t* gate;
  Scratch() : fmem(new float[3 * kTile + 16]), bmem(new uint8_t[kTile + 64]) {
    float* p = fmem.get();
    while (reinterpret_cast<uintptr_t>(p) % 64) ++p;
    num = p;
    den = p + kTile;
    vbuf = p + 2 * kTile;
    uint8_t* g = bmem.get();
    while (reinterpret_cast<uintptr_t>(g) % 64) ++g;
    gate = g;
  }
};

struct ScratchSet {
  std::vector<std::unique_ptr<Scratch>> owned;
  explicit ScratchSet(int nt) {
    for (int t = 0; t < nt; ++t) owned.emplace_back(new Scratch());
  }
  Scratch& mine() { return *owned[(size_t)omp_get_thread_num()]; }
};

/* What every aggregation entry point shares. */
struct Common {
  const fk_accum_args* a = nullptr;
  const SpanKernels* kern = nullptr;
  std::vector<int64_t> live;  // clients with weight != 0, in order
  size_t es = 4;              // bytes per update value

  const char* row(int64_t k, int64_t elem) const {
    return static_cast<const char*>(a->rows[k]) + (size_t)elem * es;
  }
  void flag(int64_t k) const { __atomic_store_n(&a->flags[k], 1, __ATOMIC_RELAXED); }

  /* Runs one tile: load the initial num/den, add the clients (`clients(track)`), and when num
   * ends non-finite start again with the per-client test on; then finalize or store. */
  template <class Clients>
  FK_ALWAYS_INLINE void tile(Scratch& sc, int64_t e0, int64_t n, const Clients& clients) const {
    begin(e0, n, sc);
    clients(0);
    if (kern->any_nonfinite(sc.num, n)) {
      begin(e0, n, sc);
      clients(1);
    }
    if (a->out) {
      kern->finalize(a->out + e0, a->g + e0, sc.num, sc.den, n);
    } else {
      std::memcpy(a->acc_num + e0, sc.num, (size_t)n * 4);
      std::memcpy(a->acc_den + e0, sc.den, (size_t)n * 4);
    }
  }
  FK_ALWAYS_INLINE void begin(int64_t e0, int64_t n, Scratch& sc) const {
    if (a->init_num) std::memcpy(sc.num, a->init_num + e0, (size_t)n * 4);
    else std::memset(sc.num, 0, (size_t)n * 4);
    if (a->init_den) std::memcpy(sc.den, a->init_den + e0, (size_t)n * 4);
    else std::memset(sc.den, 0, (size_t)n * 4);
  }
};

int check_args(const fk_accum_args* a, const char* fn, Common* c) {
  if (!a) return fail(FK_EINVAL, "%s: args is NULL", fn);
  if (a->K < 0 || a->P < 0)
    return fail(FK_EINVAL, "%s: K and P must be >= 0 (K=%lld, P=%lld)", fn, (long long)a->K, (long long)a->P);
  if (a->dtype != FK_F32 && a->dtype != FK_BF16 && a->dtype != FK_F16)
    return fail(FK_EINVAL, "%s: dtype must be FK_F32, FK_BF16 or FK_F16 (got %d)", fn, (int)a->dtype);
  if (a->K > 0 && (!a->rows || !a->weights || !a->flags))
    return fail(FK_EINVAL, "%s: rows, weights and flags must be non-NULL", fn);
  if (a->out) {
    if (a->P > 0 && !a->g) return fail(FK_EINVAL, "%s: finalize mode (out != NULL) needs g", fn);
  } else if (a->P > 0 && (!a->acc_num || !a->acc_den)) {
    return fail(FK_EINVAL, "%s: accumulate mode (out == NULL) needs acc_num and acc_den", fn);
  }
  c->a = a;
  c->kern = &span_kernels();
  c->es = dtype_size(a->dtype);
  c->live.clear();
  for (int64_t k = 0; k < a->K; ++k) {
    const float w = a->weights[k];
    if (!(w >= 0.0f) || std::isinf(w))
      return fail(FK_EINVAL, "%s: weights[%lld] = %g is not a finite value >= 0", fn, (long long)k, (double)w);
    if (w == 0.0f) continue;  // skipped entirely: its row is never read
    if (a->P > 0 && !a->rows[k]) return fail(FK_EINVAL, "%s: rows[%lld] is NULL", fn, (long long)k);
    c->live.push_back(k);
  }
  return FK_OK;
}

int threads_for(const Common& c, int nthreads) {
  return pick_threads(nthreads, c.a->P * std::max<int64_t>(1, (int64_t)c.live.size()), kMinWork);
}

/* ---- segments and their tiles --------------------------------------------------------------- */

struct Tile {
  int64_t seg;
  int64_t o0, o1;  // rows [o0, o1)
  int64_t j0, j1;  // elements [j0, j1) of each row; the whole row whenever o1 - o0 > 1
};

int check_segments(const fk_segment* segs, int64_t S, int64_t N, int64_t P, const char* fn) {
  if (S < 0 || N < 0) return fail(FK_EINVAL, "%s: S and N must be >= 0", fn);
  if (S > 0 && !segs) return fail(FK_EINVAL, "%s: segments is NULL", fn);
  int64_t pos = 0;
  for (int64_t s = 0; s < S; ++s) {
    const fk_segment& g = segs[s];
    if (g.rows < 0 || g.cols < 0 || g.inner < 0)
      return fail(FK_EINVAL, "%s: segment %lld has a negative extent", fn, (long long)s);
    if (g.offset != pos)
      return fail(FK_EINVAL,
                  "%s: segments must tile [0, P) in order: segment %lld starts at %lld, expected %lld", fn,
                  (long long)s, (long long)g.offset, (long long)pos);
    if (g.out_off >= 0 && g.out_off + g.rows > N)
      return fail(FK_EINVAL, "%s: segment %lld: out_off + rows > N", fn, (long long)s);
    if (g.in_off >= 0 && g.in_off + g.cols > N)
      return fail(FK_EINVAL, "%s: segment %lld: in_off + cols > N", fn, (long long)s);
    pos += g.rows * g.cols * g.inner;
  }
  if (pos != P)
    return fail(FK_EINVAL, "%s: segments cover %lld elements, P = %lld", fn, (long long)pos, (long long)P);
  return FK_OK;
}

/* Rows of at least kTile elements are cut into near-equal chunks (multiples of 16 elements);
 * shorter rows are grouped, whole, up to kTile elements per tile. */
std::vector<Tile> make_tiles(const fk_segment* segs, int64_t S) {
  std::vector<Tile> tiles;
  for (int64_t s = 0; s < S; ++s) {
    const fk_segment& g = segs[s];
    const int64_t L = g.cols * g.inner;
    if (L == 0 || g.rows == 0) continue;
    if (L >= kTile) {
      const int64_t nch = (L + kTile - 1) / kTile;
      const int64_t ch = ((L + nch - 1) / nch + 15) / 16 * 16;  // <= kTile
      for (int64_t o = 0; o < g.rows; ++o)
        for (int64_t j = 0; j < L; j += ch) tiles.push_back({s, o, o + 1, j, std::min(L, j + ch)});
    } else {
      const int64_t R = std::max<int64_t>(1, kTile / L);
      for (int64_t o = 0; o < g.rows; o += R) tiles.push_back({s, o, std::min(g.rows, o + R), 0, L});
    }
  }
  return tiles;
}

/* Neuron gates on(k, n), from either form. */
struct Gates {
  const uint8_t* nm;     // [K, N] or NULL
  const int32_t* rank;   // [N]
  const int32_t* sizes;  // [K]
  int64_t N;
  FK_ALWAYS_INLINE bool on(int64_t k, int64_t n) const { return nm ? nm[k * N + n] != 0 : rank[n] < sizes[k]; }
};

/* dst[j - j0] = colon(j / inner) for the row elements [j0, j1), walking whole columns. */
template <class ColOn>
FK_ALWAYS_INLINE void fill_row_gate(uint8_t* dst, int64_t j0, int64_t j1, int64_t inner, const ColOn& colon) {
  if (inner == 1) {
    for (int64_t j = j0; j < j1; ++j) dst[j - j0] = colon(j) ? 1 : 0;
    return;
  }
  int64_t i = j0 / inner;
  for (int64_t cs = i * inner; cs < j1; cs += inner, ++i) {
    const uint8_t v = colon(i) ? 1 : 0;
    const int64_t lo = std::max(cs, j0), hi = std::min(cs + inner, j1);
    for (int64_t j = lo; j < hi; ++j) dst[j - j0] = v;
  }
}

/* ---- structured ----------------------------------------------------------------------------- */

enum : uint8_t { GIN_OFF = 0, GIN_ON = 1, GIN_MIXED = 2 };  // column gates of a (segment, client)

struct Structured {
  const Common& c;
  const fk_segment* segs;
  int64_t S;
  Gates gates;
  int nonzero;
  int64_t nl;
  // per (segment, live client): column-gate state, and within budget the expanded row gate
  // (cols * inner bytes), shared by every row of the segment
  std::vector<uint8_t> gin_state;
  std::vector<int64_t> tab_base;
  std::vector<uint8_t> table;
  bool use_table = false;

  Structured(const Common& c_, const fk_segment* s_, int64_t S_, Gates g_, int nz)
      : c(c_), segs(s_), S(S_), gates(g_), nonzero(nz), nl((int64_t)c_.live.size()) {
    gin_state.assign((size_t)(S * std::max<int64_t>(nl, 1)), GIN_ON);
    tab_base.assign((size_t)S, -1);
    int64_t bytes = 0;
    for (int64_t s = 0; s < S; ++s)
      if (segs[s].in_off >= 0) {
        tab_base[s] = bytes;
        bytes += nl * segs[s].cols * segs[s].inner;
      }
    use_table = bytes <= g_gate_table_limit;
    if (use_table) table.resize((size_t)bytes);
  }

  /* column-gate state (and table row) of (segment s, live client li); run once per pair */
  void prepare(int64_t s, int64_t li) {
    const fk_segment& g = segs[s];
    if (g.in_off < 0) return;
    const int64_t k = c.live[li];
    int64_t cnt = 0;
    for (int64_t i = 0; i < g.cols; ++i) cnt += gates.on(k, g.in_off + i);
    const uint8_t st = cnt == 0 ? GIN_OFF : (cnt == g.cols ? GIN_ON : GIN_MIXED);
    gin_state[s * nl + li] = st;
    if (use_table && st == GIN_MIXED)
      fill_row_gate(table.data() + tab_base[s] + li * g.cols * g.inner, 0, g.cols * g.inner, g.inner,
                    [&](int64_t i) { return gates.on(k, g.in_off + i); });
  }

  FK_ALWAYS_INLINE bool row_on(const fk_segment& g, int64_t k, int64_t o) const {
    return g.out_off < 0 || gates.on(k, g.out_off + o);
  }

  /* all live clients over one tile */
  void clients(const Tile& tl, int64_t e0, Scratch& sc, int track) const {
    const fk_segment& g = segs[tl.seg];
    const int64_t L = g.cols * g.inner, W = tl.j1 - tl.j0, R = tl.o1 - tl.o0;
    if (!track && c.kern->accum_multi && W >= kMultiMinRow && (use_table || g.in_off < 0)) {
      clients_multi(tl, e0, sc);
      return;
    }
    const int dt = c.a->dtype;
    for (int64_t li = 0; li < nl; ++li) {
      const uint8_t st = gin_state[tl.seg * nl + li];
      if (st == GIN_OFF) continue;
      const int64_t k = c.live[li];
      const float w = c.a->weights[k];
      const char* v = c.row(k, e0);
      const size_t rowbytes = (size_t)L * c.es;
      uint32_t bad = 0;
      if (st == GIN_ON) {
        // no column gate: runs of live rows are contiguous spans (R > 1 only for whole rows)
        for (int64_t r = 0; r < R;) {
          if (!row_on(g, k, tl.o0 + r)) { ++r; continue; }
          int64_t r2 = r + 1;
          while (r2 < R && row_on(g, k, tl.o0 + r2)) ++r2;
          bad |= c.kern->accum(sc.num + r * W, sc.den + r * W, v + r * rowbytes, dt, nullptr, (r2 - r) * W, w,
                               nonzero, track);
          r = r2;
        }
      } else {
        const uint8_t* gin;
        if (use_table) {
          gin = table.data() + tab_base[tl.seg] + li * L + tl.j0;
        } else {
          fill_row_gate(sc.gate, tl.j0, tl.j1, g.inner, [&](int64_t i) { return gates.on(k, g.in_off + i); });
          gin = sc.gate;
        }
        if (R > 1 && L < kPackedRowsBelow) {
          // short rows: one gate buffer for the whole tile (row r = gin or zeros), one call.
          // Built backwards so that gin, when it is sc.gate's row 0 itself, is read before it changes.
          uint8_t* pg = sc.gate;
          for (int64_t r = R - 1; r >= 0; --r) {
            if (!row_on(g, k, tl.o0 + r)) std::memset(pg + r * L, 0, (size_t)L);
            else if (pg + r * L != gin) std::memcpy(pg + r * L, gin, (size_t)L);
          }
          bad = c.kern->accum(sc.num, sc.den, v, dt, pg, R * L, w, nonzero, track);
        } else {
          for (int64_t r = 0; r < R; ++r)
            if (row_on(g, k, tl.o0 + r))
              bad |= c.kern->accum(sc.num + r * W, sc.den + r * W, v + r * rowbytes, dt, gin, W, w, nonzero, track);
        }
      }
      if (bad) c.flag(k);
    }
  }

  /* Long rows with the multi-client kernel: per row, the clients whose row gate is on, in order
   * and in groups, each with its column gate (the all-ones row where it has none). */
  void clients_multi(const Tile& tl, int64_t e0, Scratch& sc) const {
    const fk_segment& g = segs[tl.seg];
    const int64_t L = g.cols * g.inner, W = tl.j1 - tl.j0, R = tl.o1 - tl.o0;
    const size_t rowbytes = (size_t)L * c.es;
    const void* v[kMultiGroup];
    const uint8_t* m[kMultiGroup];
    float w[kMultiGroup];
    for (int64_t r = 0; r < R; ++r) {
      const int64_t o = tl.o0 + r;
      bool gated = false;
      int G = 0;
      auto flush = [&] {
        if (G) c.kern->accum_multi(sc.num + r * W, sc.den + r * W, v, c.a->dtype, gated ? m : nullptr, w, W, G, nonzero);
        G = 0;
        gated = false;
      };
      for (int64_t li = 0; li < nl; ++li) {
        const uint8_t st = gin_state[tl.seg * nl + li];
        const int64_t k = c.live[li];
        if (st == GIN_OFF || !row_on(g, k, o)) continue;
        v[G] = c.row(k, e0) + r * rowbytes;
        w[G] = c.a->weights[k];
        if (st == GIN_MIXED) {
          m[G] = table.data() + tab_base[tl.seg] + li * L + tl.j0;
          gated = true;
        } else {
          m[G] = ones();
        }
        if (++G == kMultiGroup) flush();
      }
      flush();
    }
  }

  static const uint8_t* ones() {
    static const std::vector<uint8_t> buf((size_t)kTile, 1);
    return buf.data();
  }
};

/* ---- compact -------------------------------------------------------------------------------- */

struct Compact {
  const Common& c;
  const fk_segment* segs;
  int64_t S, N;
  const int32_t* inv;
  const int64_t* seg_off;
  const int64_t* seg_cols;

  /* Client values of row elements [j0, j1), the row's compact data starting at src, into vbuf
   * (float) and gate. pi = inv_in[i] is column i's compact column, or -1. Runs of columns with
   * consecutive pi are contiguous in the source and are widened as one span. */
  void gather_row(float* vbuf, uint8_t* gate, const char* src, const int32_t* inv_in, int64_t j0, int64_t j1,
                  int64_t inner) const {
    int64_t i = j0 / inner;
    int64_t cs = i * inner;
    while (cs < j1) {
      const int32_t pi = inv_in[i];
      int64_t i2 = i + 1, ce = cs + inner;
      const int64_t lo = std::max(cs, j0);
      if (pi < 0) {
        while (ce < j1 && inv_in[i2] < 0) { ++i2; ce += inner; }
        const int64_t hi = std::min(ce, j1);
        std::memset(gate + (lo - j0), 0, (size_t)(hi - lo));
      } else {
        while (ce < j1 && inv_in[i2] == pi + (int32_t)(i2 - i)) { ++i2; ce += inner; }
        const int64_t hi = std::min(ce, j1);
        const int64_t from = (int64_t)pi * inner + (lo - cs);
        c.kern->widen(vbuf + (lo - j0), src + (size_t)from * c.es, c.a->dtype, hi - lo);
        std::memset(gate + (lo - j0), 1, (size_t)(hi - lo));
      }
      i = i2;
      cs = ce;
    }
  }

  /* Long ungated-column rows with the multi-client kernel: per row, the clients that sent it. */
  void clients_multi(const Tile& tl, Scratch& sc) const {
    const int64_t s = tl.seg;
    const fk_segment& g = segs[s];
    const int64_t W = tl.j1 - tl.j0, R = tl.o1 - tl.o0;
    const void* v[kMultiGroup];
    float w[kMultiGroup];
    for (int64_t r = 0; r < R; ++r) {
      const int64_t o = tl.o0 + r;
      int G = 0;
      auto flush = [&] {
        if (G) c.kern->accum_multi(sc.num + r * W, sc.den + r * W, v, c.a->dtype, nullptr, w, W, G, 0);
        G = 0;
      };
      for (int64_t k : c.live) {
        const int64_t so = seg_off[k * S + s];
        if (so < 0) continue;
        const int64_t po = g.out_off >= 0 ? (int64_t)inv[k * N + g.out_off + o] : o;
        if (po < 0) continue;
        v[G] = c.row(k, so + po * seg_cols[k * S + s] * g.inner + tl.j0);
        w[G] = c.a->weights[k];
        if (++G == kMultiGroup) flush();
      }
      flush();
    }
  }

  void clients(const Tile& tl, Scratch& sc, int track) const {
    const int64_t s = tl.seg;
    const fk_segment& g = segs[s];
    const int64_t L = g.cols * g.inner, W = tl.j1 - tl.j0, R = tl.o1 - tl.o0;
    if (!track && c.kern->accum_multi && g.in_off < 0 && W >= kMultiMinRow) {
      clients_multi(tl, sc);
      return;
    }
    for (int64_t k : c.live) {
      const int64_t so = seg_off[k * S + s];
      if (so < 0) continue;
      const int64_t rowlen = seg_cols[k * S + s] * g.inner;  // elements per compact row
      const int32_t* inv_k = inv ? inv + k * N : nullptr;
      const float w = c.a->weights[k];
      auto po_of = [&](int64_t o) -> int64_t { return g.out_off >= 0 ? (int64_t)inv_k[g.out_off + o] : o; };
      uint32_t bad = 0;
      if (g.in_off < 0) {
        // pi = i: a live row is one contiguous source span; rows consecutive in both merge
        for (int64_t r = 0; r < R;) {
          const int64_t po = po_of(tl.o0 + r);
          if (po < 0) { ++r; continue; }
          int64_t r2 = r + 1;
          while (r2 < R && rowlen == L && po_of(tl.o0 + r2) == po + (r2 - r)) ++r2;
          bad |= c.kern->accum(sc.num + r * W, sc.den + r * W, c.row(k, so + po * rowlen + tl.j0), c.a->dtype,
                               nullptr, (r2 - r) * W, w, 0, track);
          r = r2;
        }
      } else {
        bool any = false;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t po = po_of(tl.o0 + r);
          if (po < 0) {
            std::memset(sc.gate + r * W, 0, (size_t)W);
            continue;
          }
          any = true;
          gather_row(sc.vbuf + r * W, sc.gate + r * W, c.row(k, so + po * rowlen), inv_k + g.in_off, tl.j0, tl.j1,
                     g.inner);
        }
        if (any) bad = c.kern->accum(sc.num, sc.den, sc.vbuf, FK_F32, sc.gate, R * W, w, 0, track);
      }
      if (bad) c.flag(k);
    }
  }
};

}  // namespace
}  // namespace fkcpu

using namespace fkcpu;

extern "C" int64_t fk_cpu_set_gate_table_limit(int64_t bytes) {
  const int64_t prev = g_gate_table_limit;
  if (bytes >= 0) g_gate_table_limit = bytes;
  return prev;
}

/* ================================ dense ========================================================= */

extern "C" int fk_cpu_dense(const fk_accum_args* a, const uint8_t* const* masks, int nthreads) {
  const char* fn = "fk_cpu_dense";
  try {
    Common c;
    int rc = check_args(a, fn, &c);
    if (rc) return rc;
    const int64_t P = a->P;
    if (masks)
      for (int64_t k : c.live)
        if (P > 0 && !masks[k]) return fail(FK_EINVAL, "%s: masks[%lld] is NULL", fn, (long long)k);
    if (P == 0) return FK_OK;
    const int64_t ntiles = (P + kTile - 1) / kTile;
    const int nt = threads_for(c, nthreads);
    ScratchSet scratch(nt);
    const std::vector<int64_t>& live = c.live;
    const int64_t nl = (int64_t)live.size();

    // dynamic: on a shared machine a descheduled thread must not hold half of the work
    parallel_region(nt, [&] {
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < ntiles; ++t) {
        Scratch& sc = scratch.mine();
        const int64_t e0 = t * kTile, n = std::min(kTile, P - e0);
        c.tile(sc, e0, n, [&](int track) {
          if (track) {  // the rare re-run that locates non-finite values: client by client
            for (int64_t k : live)
              if (c.kern->accum(sc.num, sc.den, c.row(k, e0), a->dtype, masks ? masks[k] + e0 : nullptr, n,
                                a->weights[k], masks ? 0 : 1, 1))
                c.flag(k);
            return;
          }
          // clients in groups (in order): several streams at once, num/den touched once per group;
          // with explicit masks, a client's all-zero 64-element mask chunks skip its values
          const bool multi = c.kern->accum_multi != nullptr;
          const int64_t gmax = multi ? (masks ? kMultiGroupMasked : kMultiGroup) : 4;
          const int64_t ngroups = (nl + gmax - 1) / gmax;
          for (int64_t q = 0, gi = 0; gi < ngroups; ++gi) {
            const int G = (int)((nl - q + (ngroups - gi) - 1) / (ngroups - gi));  // balanced sizes
            const void* v[kMultiGroup];
            const uint8_t* m[kMultiGroup];
            float w[kMultiGroup];
            for (int i = 0; i < G; ++i) {
              const int64_t k = live[q + i];
              v[i] = c.row(k, e0);
              m[i] = masks ? masks[k] + e0 : nullptr;
              w[i] = a->weights[k];
            }
            if (multi)
              c.kern->accum_multi(sc.num, sc.den, v, a->dtype, masks ? m : nullptr, w, n, G, masks ? 0 : 1);
            else
              c.kern->accum_group(sc.num, sc.den, v, a->dtype, masks ? m : nullptr, w, n, G);
            q += G;
          }
        });
      }
    });
    return FK_OK;
  } catch (const std::bad_alloc&) {
    return fail(FK_ENOMEM, "%s: out of memory", fn);
  }
}

/* ================================ structured ==================================================== */

extern "C" int fk_cpu_structured(const fk_accum_args* a, const fk_segment* segs, int64_t S, int64_t N,
                                 const uint8_t* neuron_masks, const int32_t* rank, const int32_t* sizes,
                                 int nonzero_rule, int nthreads) {
  const char* fn = "fk_cpu_structured";
  try {
    Common c;
    int rc = check_args(a, fn, &c);
    if (rc) return rc;
    if ((neuron_masks != nullptr) == (rank != nullptr || sizes != nullptr))
      return fail(FK_EINVAL, "%s: give exactly one of neuron_masks or (rank, sizes)", fn);
    if (!neuron_masks && (!rank || !sizes))
      return fail(FK_EINVAL, "%s: the nested form needs both rank and sizes", fn);
    rc = check_segments(segs, S, N, a->P, fn);
    if (rc) return rc;
    if (a->P == 0) return FK_OK;

    Structured st(c, segs, S, Gates{neuron_masks, rank, sizes, N}, nonzero_rule ? 1 : 0);
    const std::vector<Tile> tiles = make_tiles(segs, S);
    const int64_t ntiles = (int64_t)tiles.size();
    const int64_t nl = st.nl;
    const int nt = threads_for(c, nthreads);
    ScratchSet scratch(nt);

    parallel_region(nt, [&] {
#pragma omp for schedule(dynamic, 4) collapse(2)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t li = 0; li < nl; ++li) st.prepare(s, li);
      // (implicit barrier: the gate table is complete)
#pragma omp for schedule(dynamic, 2)
      for (int64_t t = 0; t < ntiles; ++t) {
        Scratch& sc = scratch.mine();
        const Tile& tl = tiles[t];
        const fk_segment& g = segs[tl.seg];
        const int64_t e0 = g.offset + tl.o0 * g.cols * g.inner + tl.j0;
        c.tile(sc, e0, (tl.o1 - tl.o0) * (tl.j1 - tl.j0), [&](int track) { st.clients(tl, e0, sc, track); });
      }
    });
    return FK_OK;
  } catch (const std::bad_alloc&) {
    return fail(FK_ENOMEM, "%s: out of memory", fn);
  }
}

/* ================================ compact ======================================================= */

extern "C" int fk_cpu_compact(const fk_accum_args* a, const fk_segment* segs, int64_t S, int64_t N,
                              const int32_t* inv, const int64_t* seg_off, const int64_t* seg_cols,
                              int nthreads) {
  const char* fn = "fk_cpu_compact";
  try {
    Common c;
    int rc = check_args(a, fn, &c);
    if (rc) return rc;
    rc = check_segments(segs, S, N, a->P, fn);
    if (rc) return rc;
    if (a->K > 0 && S > 0 && (!seg_off || !seg_cols))
      return fail(FK_EINVAL, "%s: seg_off and seg_cols must be non-NULL", fn);
    bool need_inv = false;
    for (int64_t s = 0; s < S; ++s) need_inv |= segs[s].out_off >= 0 || segs[s].in_off >= 0;
    if (need_inv && a->K > 0 && !inv) return fail(FK_EINVAL, "%s: inv is NULL", fn);
    if (a->P == 0) return FK_OK;

    const Compact cp{c, segs, S, N, inv, seg_off, seg_cols};
    const std::vector<Tile> tiles = make_tiles(segs, S);
    const int64_t ntiles = (int64_t)tiles.size();
    const int nt = threads_for(c, nthreads);
    ScratchSet scratch(nt);

    parallel_region(nt, [&] {
#pragma omp for schedule(dynamic, 2)
      for (int64_t t = 0; t < ntiles; ++t) {
        Scratch& sc = scratch.mine();
        const Tile& tl = tiles[t];
        const fk_segment& g = segs[tl.seg];
        const int64_t e0 = g.offset + tl.o0 * g.cols * g.inner + tl.j0;
        c.tile(sc, e0, (tl.o1 - tl.o0) * (tl.j1 - tl.j0), [&](int track) { cp.clients(tl, sc, track); });
      }
    });
    return FK_OK;
  } catch (const std::bad_alloc&) {
    return fail(FK_ENOMEM, "%s: out of memory", fn);
  }
}
