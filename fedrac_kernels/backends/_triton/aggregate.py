"""Masked-mean aggregation kernels: dense, structured (neuron gates) and compact uploads.

Design (all three kernels):

* One program owns a tile of contiguous parameters (dense: ``BLOCK`` = 1024, 8 per thread;
  structured / compact: ``SEG_TILE`` = 512, and a tile never crosses a segment boundary, so the
  segment's geometry is a per-program scalar). It loops over the K clients **in order inside
  the program**, accumulates ``num``/``den`` in float32 registers and writes once (``out`` in
  finalize mode, ``acc_num``/``acc_den`` in accumulate mode). No atomics, no cross-program
  reduction: the result does not depend on the grid and is bit-identical to ``torch_ref``:
  ``t = w * v`` rounded, then ``num + t`` -- kernels are launched with ``enable_fp_fusion=False``
  so the multiply and add are never contracted into an FMA (the PTX has ``mul.rn.f32`` /
  ``add.rn.f32``, which ptxas may not fuse either) -- and the division is ``tl.math.div_rn``
  (IEEE; Triton's ``/`` on float32 lowers to the approximate ``div.full.f32``).
* A client with weight 0 is skipped by a scalar branch: its row is never read (it may hold NaN).
* Dense: every tile but the last is in bounds, so it runs an unmasked copy of the loop; with
  16-byte aligned rows (``ALIGNED``, checked on the host, hinted by ``tl.multiple_of`` on the
  loaded row address) its loads are 16-byte vector loads whatever P is. With masks, full tiles
  read the values unmasked (vector loads) and ignore inactive lanes.
* Structured: gates are computed once per tile. Nested form: ``max(rank[out], rank[in])`` per
  element, then one compare per client, and a client whose tile-minimum rank is not below its
  size is skipped without touching its row. Dense neuron masks: two cached byte gathers per
  element and client. Either way the value load is masked by the gate, so gated-off rows cost
  no memory traffic. Compact: a deterministic gather (``inv`` / ``seg_off`` / ``seg_cols``),
  skipping clients that send nothing for the tile's segment.
* Non-finite detection costs nothing on the hot path: an active non-finite value makes that
  lane's ``num`` non-finite for good (NaN / Inf are absorbing under + with finite or infinite
  terms), so only a tile whose final ``num`` has a non-finite lane re-runs the client loop to set
  ``flags[k]`` for exactly the clients with a non-finite *active* value. Overflow to Inf from
  finite values also triggers the re-run, which then flags nobody, as the oracle does.
* Structured / compact tiles: the grid is ``cdiv(P, SEG_TILE) + S`` programs (an upper bound on
  the number of segment-aligned tiles, known without reading the device segment table); each
  program finds its segment with a vectorised prefix count over the table and surplus programs
  return at once. ``IDX32`` (P + tile < 2**31) keeps index arithmetic in int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INT32_MAX, MAXNREG, ROW_DTYPES, as_int64, check_device, launch_opts,
                     nonfinite, row_table)

BLOCK = 1024
NUM_WARPS = 4          # dense: 8 contiguous elements per thread (two 16-byte loads in fp32)
SEG_TILE = 512         # structured / compact: 4 elements per thread (index vectors and gates
SEG_WARPS = 4          # cost registers)
SEG_BLOCK = 64


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------

@triton.jit
def _start(INUM, IDEN, offs, inb, HAS_INUM: tl.constexpr, HAS_IDEN: tl.constexpr,
           FULL: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_INUM:
        if FULL:
            num = tl.load(INUM + offs)
        else:
            num = tl.load(INUM + offs, mask=inb, other=0.0)
    else:
        num = tl.zeros([BLOCK], tl.float32)
    if HAS_IDEN:
        if FULL:
            den = tl.load(IDEN + offs)
        else:
            den = tl.load(IDEN + offs, mask=inb, other=0.0)
    else:
        den = tl.zeros([BLOCK], tl.float32)
    return num, den


@triton.jit
def _finish(G, OUT, ANUM, ADEN, offs, inb, num, den, FINALIZE: tl.constexpr, FULL: tl.constexpr):
    """Finalize: out = where(den > 0, g + num / den, g) with IEEE division; else store num/den."""
    if FINALIZE:
        if FULL:
            g = tl.load(G + offs)
        else:
            g = tl.load(G + offs, mask=inb, other=0.0)
        pos = den > 0.0
        res = tl.where(pos, g + tl.math.div_rn(num, tl.where(pos, den, 1.0)), g)
        if FULL:
            tl.store(OUT + offs, res)
        else:
            tl.store(OUT + offs, res, mask=inb)
    else:
        if FULL:
            tl.store(ANUM + offs, num)
            tl.store(ADEN + offs, den)
        else:
            tl.store(ANUM + offs, num, mask=inb)
            tl.store(ADEN + offs, den, mask=inb)


@triton.jit
def _any_nonfinite(num, inb):
    return tl.max((inb & nonfinite(num)).to(tl.int32), 0) > 0


@triton.jit
def _flag(FLAGS, k, v, act):
    bad = tl.max((act & nonfinite(v)).to(tl.int32), 0) > 0
    tl.store(FLAGS + k, 1, mask=bad)


@triton.jit
def _locate_tile(SEG, S, BLOCK: tl.constexpr, SEG_BLOCK: tl.constexpr):
    """(segment index, tile index within the segment) of this program; segment == S: surplus."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(0) * 0
    before = pid * 0  # tiles of the segments entirely before this program's tile
    base = pid * 0
    for c in range(0, S, SEG_BLOCK):
        j = c + tl.arange(0, SEG_BLOCK)
        m = j < S
        rows = tl.load(SEG + j * 6 + 1, mask=m, other=0)
        cols = tl.load(SEG + j * 6 + 2, mask=m, other=0)
        inner = tl.load(SEG + j * 6 + 3, mask=m, other=0)
        ntiles = (rows * cols * inner + BLOCK - 1) // BLOCK
        end = tl.cumsum(ntiles, 0) + base
        done = m & (end <= pid)
        seg += tl.sum(done.to(tl.int32), 0)
        before = tl.maximum(before, tl.max(tl.where(done, end, 0), 0))
        base += tl.sum(ntiles, 0)
    return seg, pid - before


@triton.jit
def _tile_coords(SEG, seg, tile, BLOCK: tl.constexpr, IDX32: tl.constexpr):
    """Flat offsets and (o, i, r) coordinates of one segment-aligned tile.

    IDX32 (valid whenever P + BLOCK < 2**31): all index arithmetic in int32, which halves the
    registers of the index vectors and makes the divisions much cheaper on the GPU.
    """
    sp = SEG + seg * 6
    off = tl.load(sp)
    rows = tl.load(sp + 1)
    cols = tl.load(sp + 2)
    inner = tl.load(sp + 3)
    oo = tl.load(sp + 4)
    io = tl.load(sp + 5)
    if IDX32:
        off = off.to(tl.int32)
        rows = rows.to(tl.int32)
        cols = cols.to(tl.int32)
        inner = inner.to(tl.int32)
        oo = oo.to(tl.int32)
        io = io.to(tl.int32)
        local = tile.to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    else:
        local = tile * BLOCK + tl.arange(0, BLOCK)
    inb = local < rows * cols * inner
    offs = off + local
    q = local // inner
    r = local - q * inner
    o = q // cols
    i = q - o * cols
    return offs, inb, o, i, r, oo, io, inner


# --------------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------------

@triton.jit
def _dense_values(PTRS, MPTRS, k, offs, inb, DT: tl.constexpr, HAS_MASK: tl.constexpr,
                  FULL: tl.constexpr, ALIGNED: tl.constexpr):
    row = tl.load(PTRS + k).to(tl.pointer_type(DT))
    if ALIGNED:
        row = tl.multiple_of(row, 16)
    if HAS_MASK:
        mrow = tl.load(MPTRS + k).to(tl.pointer_type(tl.uint8))
        if ALIGNED:
            mrow = tl.multiple_of(mrow, 16)
        if FULL:  # in-bounds tile: unmasked (vectorisable) loads; inactive lanes are ignored
            act = tl.load(mrow + offs) != 0
            v = tl.load(row + offs).to(tl.float32)
        else:
            act = tl.load(mrow + offs, mask=inb, other=0) != 0
            v = tl.load(row + offs, mask=act, other=0.0).to(tl.float32)
    else:
        if FULL:
            v = tl.load(row + offs).to(tl.float32)
        else:
            v = tl.load(row + offs, mask=inb, other=0.0).to(tl.float32)
        act = v != 0.0
    return v, act


@triton.jit
def _dense_tile(PTRS, MPTRS, W, FLAGS, G, OUT, INUM, IDEN, ANUM, ADEN, offs, inb, K,
                DT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INUM: tl.constexpr,
                HAS_IDEN: tl.constexpr, FINALIZE: tl.constexpr, FULL: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    num, den = _start(INUM, IDEN, offs, inb, HAS_INUM, HAS_IDEN, FULL, BLOCK)
    for k in range(K):
        w = tl.load(W + k)
        if w != 0.0:
            v, act = _dense_values(PTRS, MPTRS, k, offs, inb, DT, HAS_MASK, FULL, ALIGNED)
            num = tl.where(act, num + w * v, num)
            den = tl.where(act, den + w, den)
    if _any_nonfinite(num, inb):
        for k in range(K):
            w = tl.load(W + k)
            if w != 0.0:
                v, act = _dense_values(PTRS, MPTRS, k, offs, inb, DT, HAS_MASK, FULL, ALIGNED)
                _flag(FLAGS, k, v, act)
    _finish(G, OUT, ANUM, ADEN, offs, inb, num, den, FINALIZE, FULL)


@triton.jit
def _dense_kernel(PTRS, MPTRS, W, FLAGS, G, OUT, INUM, IDEN, ANUM, ADEN, P, K,
                  DT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INUM: tl.constexpr,
                  HAS_IDEN: tl.constexpr, FINALIZE: tl.constexpr, ALIGNED: tl.constexpr,
                  IDX32: tl.constexpr, BLOCK: tl.constexpr):
    if IDX32:  # int32 offsets (P + BLOCK < 2**31): fewer registers per element
        pid = tl.program_id(0)
    else:
        pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < P
    # Every tile but the last is entirely in bounds: its loads need no bounds mask, so with
    # 16-byte aligned rows (ALIGNED) they compile to vector loads whatever P is.
    if (pid + 1) * BLOCK <= P:
        _dense_tile(PTRS, MPTRS, W, FLAGS, G, OUT, INUM, IDEN, ANUM, ADEN, offs, inb, K, DT,
                    HAS_MASK, HAS_INUM, HAS_IDEN, FINALIZE, True, ALIGNED, BLOCK)
    else:
        _dense_tile(PTRS, MPTRS, W, FLAGS, G, OUT, INUM, IDEN, ANUM, ADEN, offs, inb, K, DT,
                    HAS_MASK, HAS_INUM, HAS_IDEN, FINALIZE, False, ALIGNED, BLOCK)


# --------------------------------------------------------------------------------------------
# structured (neuron gates through the segment table)
# --------------------------------------------------------------------------------------------

@triton.jit
def _structured_values(PTRS, NM, SIZES, k, N64, offs, inb, o, i, oo, io, rmax, rmin,
                       DT: tl.constexpr, NESTED: tl.constexpr, NONZERO: tl.constexpr):
    """(v, act) of client k on this tile (v = 0 where the gate is off)."""
    if NESTED:
        sk = tl.load(SIZES + k)
        live = rmin < sk            # some lane of the tile is on: per-tile row gate
        gate = rmax < sk
    else:
        base = NM + N64 * k
        zo = o * 0
        go = tl.load(base + oo + o, mask=inb & ((zo + oo) >= 0), other=1) != 0
        gi = tl.load(base + io + i, mask=inb & ((zo + io) >= 0), other=1) != 0
        gate = inb & go & gi
        live = True
    v = tl.zeros(offs.shape, tl.float32)
    act = gate & False
    if live:
        row = tl.load(PTRS + k).to(tl.pointer_type(DT))
        v = tl.load(row + offs, mask=gate, other=0.0).to(tl.float32)
        if NONZERO:
            act = gate & (v != 0.0)
        else:
            act = gate
    return v, act


@triton.jit
def _structured_kernel(PTRS, W, FLAGS, G, OUT, INUM, IDEN, ANUM, ADEN, SEG, S, NM, RANK, SIZES,
                       N, K, DT: tl.constexpr, NESTED: tl.constexpr, NONZERO: tl.constexpr,
                       HAS_INUM: tl.constexpr, HAS_IDEN: tl.constexpr, FINALIZE: tl.constexpr,
                       IDX32: tl.constexpr, BLOCK: tl.constexpr, SEG_BLOCK: tl.constexpr):
    seg, tile = _locate_tile(SEG, S, BLOCK, SEG_BLOCK)
    if seg >= S:
        return
    offs, inb, o, i, r, oo, io, inner = _tile_coords(SEG, seg, tile, BLOCK, IDX32)
    N64 = as_int64(N)
    zo = o * 0
    if NESTED:
        # nested gates: neuron n is on for client k iff rank[n] < sizes[k]; an element is on iff
        # max(rank[out], rank[in]) < sizes[k] (ungated dims contribute -1). Computed once per tile.
        ro = tl.load(RANK + oo + o, mask=inb & ((zo + oo) >= 0), other=-1)
        ri = tl.load(RANK + io + i, mask=inb & ((zo + io) >= 0), other=-1)
        rmax = tl.where(inb, tl.maximum(ro, ri), INT32_MAX)
        rmin = tl.min(rmax, 0)
    else:
        rmax = zo.to(tl.int32)
        rmin = tl.min(rmax, 0)
    num, den = _start(INUM, IDEN, offs, inb, HAS_INUM, HAS_IDEN, False, BLOCK)
    for k in range(K):
        w = tl.load(W + k)
        if w != 0.0:
            v, act = _structured_values(PTRS, NM, SIZES, k, N64, offs, inb, o, i, oo, io, rmax,
                                        rmin, DT, NESTED, NONZERO)
            num = tl.where(act, num + w * v, num)
            den = tl.where(act, den + w, den)
    if _any_nonfinite(num, inb):
        for k in range(K):
            w = tl.load(W + k)
            if w != 0.0:
                v, act = _structured_values(PTRS, NM, SIZES, k, N64, offs, inb, o, i, oo, io,
                                            rmax, rmin, DT, NESTED, NONZERO)
                _flag(FLAGS, k, v, act)
    _finish(G, OUT, ANUM, ADEN, offs, inb, num, den, FINALIZE, False)


# --------------------------------------------------------------------------------------------
# compact uploads (deterministic gather, no atomics)
# --------------------------------------------------------------------------------------------

@triton.jit
def _compact_values(PTRS, INV, SOFF, SCOLS, k, seg, S, N64, inb, o, i, r, oo, io, inner,
                    DT: tl.constexpr):
    so = tl.load(SOFF + S * k + seg).to(inner.dtype)
    v = tl.zeros(o.shape, tl.float32)
    act = inb & False
    if so >= 0:
        nc = tl.load(SCOLS + S * k + seg).to(inner.dtype)
        base = INV + N64 * k
        zo = o * 0
        po = tl.load(base + oo + o, mask=inb & ((zo + oo) >= 0), other=-1)
        pi = tl.load(base + io + i, mask=inb & ((zo + io) >= 0), other=-1)
        po = tl.where((zo + oo) >= 0, po.to(o.dtype), o)
        pi = tl.where((zo + io) >= 0, pi.to(i.dtype), i)
        act = inb & (po >= 0) & (pi >= 0)
        src = so + (po * nc + pi) * inner + r
        row = tl.load(PTRS + k).to(tl.pointer_type(DT))
        v = tl.load(row + src, mask=act, other=0.0).to(tl.float32)
    return v, act


@triton.jit
def _compact_kernel(PTRS, W, FLAGS, G, OUT, INUM, IDEN, ANUM, ADEN, SEG, S, INV, SOFF, SCOLS,
                    N, K, DT: tl.constexpr, HAS_INUM: tl.constexpr, HAS_IDEN: tl.constexpr,
                    FINALIZE: tl.constexpr, IDX32: tl.constexpr, BLOCK: tl.constexpr,
                    SEG_BLOCK: tl.constexpr):
    seg, tile = _locate_tile(SEG, S, BLOCK, SEG_BLOCK)
    if seg >= S:
        return
    offs, inb, o, i, r, oo, io, inner = _tile_coords(SEG, seg, tile, BLOCK, IDX32)
    N64 = as_int64(N)
    num, den = _start(INUM, IDEN, offs, inb, HAS_INUM, HAS_IDEN, False, BLOCK)
    for k in range(K):
        w = tl.load(W + k)
        if w != 0.0:
            v, act = _compact_values(PTRS, INV, SOFF, SCOLS, k, seg, S, N64, inb, o, i, r, oo, io,
                                     inner, DT)
            num = tl.where(act, num + w * v, num)
            den = tl.where(act, den + w, den)
    if _any_nonfinite(num, inb):
        for k in range(K):
            w = tl.load(W + k)
            if w != 0.0:
                v, act = _compact_values(PTRS, INV, SOFF, SCOLS, k, seg, S, N64, inb, o, i, r, oo,
                                         io, inner, DT)
                _flag(FLAGS, k, v, act)
    _finish(G, OUT, ANUM, ADEN, offs, inb, num, den, FINALIZE, False)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------

def _common_args(acc, kernel):
    """Row table, dtype and the g/out/init/acc pointers (unused ones replaced by a dummy)."""
    w = acc.weights
    check_device(kernel, w)
    dt = acc.rows[0].dtype
    if dt not in ROW_DTYPES:
        raise TypeError(f"rows: unsupported dtype {dt}")
    ptrs = row_table(acc.rows, w.device)
    finalize = acc.out is not None
    dummy = w
    g = acc.g if finalize else dummy
    out = acc.out if finalize else dummy
    anum = dummy if finalize else acc.acc_num
    aden = dummy if finalize else acc.acc_den
    inum = acc.init_num if acc.init_num is not None else dummy
    iden = acc.init_den if acc.init_den is not None else dummy
    ptr_args = (ptrs, w, acc.flags, g, out, inum, iden, anum, aden)
    consts = dict(DT=ROW_DTYPES[dt], HAS_INUM=acc.init_num is not None,
                  HAS_IDEN=acc.init_den is not None, FINALIZE=finalize)
    return ptr_args, consts


def dense(acc, masks, block: int = BLOCK, num_warps: int = NUM_WARPS) -> None:
    P, K = acc.P, acc.K
    if P == 0:
        return
    ptr_args, consts = _common_args(acc, _dense_kernel)
    ptrs, w = ptr_args[0], ptr_args[1]
    mptrs = row_table(masks, w.device) if masks is not None else ptrs
    aligned = all(t.data_ptr() % 16 == 0 for t in acc.rows)
    if masks is not None:
        aligned = aligned and all(m.data_ptr() % 16 == 0 for m in masks)
    grid = (triton.cdiv(P, block),)
    _dense_kernel[grid](ptrs, mptrs, *ptr_args[1:], P, K, HAS_MASK=masks is not None,
                        ALIGNED=aligned, IDX32=P + block < 2**31, BLOCK=block, **consts,
                        **launch_opts(num_warps))


def _seg_grid(P: int, S: int, block: int) -> tuple:
    return (triton.cdiv(P, block) + S,)


def structured(acc, segments, N, neuron_masks, rank, sizes, nonzero: bool,
               block: int = SEG_TILE, num_warps: int = SEG_WARPS) -> None:
    P, K = acc.P, acc.K
    S = segments.shape[0]
    if P == 0 or S == 0:
        return
    ptr_args, consts = _common_args(acc, _structured_kernel)
    w = acc.weights
    nested = neuron_masks is None
    nm = neuron_masks.view(torch.uint8) if not nested else w
    rk = rank if nested else w
    sz = sizes if nested else w
    _structured_kernel[_seg_grid(P, S, block)](
        *ptr_args, segments, S, nm, rk, sz, N, K, NESTED=nested, NONZERO=bool(nonzero),
        IDX32=P + block < 2**31, BLOCK=block, SEG_BLOCK=SEG_BLOCK, **consts,
        **launch_opts(num_warps))


def compact(acc, segments, N, inv, seg_off, seg_cols, block: int = SEG_TILE,
            num_warps: int = SEG_WARPS) -> None:
    P, K = acc.P, acc.K
    S = segments.shape[0]
    if P == 0 or S == 0:
        return
    ptr_args, consts = _common_args(acc, _compact_kernel)
    idx32 = P + block < 2**31
    _compact_kernel[_seg_grid(P, S, block)](
        *ptr_args, segments, S, inv, seg_off, seg_cols, N, K, IDX32=idx32, BLOCK=block,
        SEG_BLOCK=SEG_BLOCK, **consts, **launch_opts(num_warps, MAXNREG if idx32 else 168))
