"""Stable ascending argsort (ties by lower index; -0.0 == +0.0; keys never NaN).

* Small N (``N <= small_n``, default 4096): a counting rank, one launch.
  ``rank[i] = #{j : key[j] < key[i]} + #{j < i : key[j] == key[i]}`` is a permutation, and
  ``out[rank[i]] = i`` is the stable order. Each program ranks ``RANK_BI`` keys against all N
  keys in ``[RANK_BI, RANK_BJ]`` tiles (O(N^2) compares spread over ``N / RANK_BI`` programs:
  about 16 M compares at N = 4096). Keys are compared in their own dtype, so -0.0 == +0.0.
* Large N: LSD radix sort. Keys are first mapped to integers of the same width whose
  *unsigned* order is the keys' order (-0.0 -> +0.0; floats flip all bits when negative, the sign
  bit otherwise; integers flip the sign bit); equal keys map to equal integers. One pass per
  ``RADIX_BITS``-bit digit position at which the keys actually differ (the transform kernel
  records, per digit position, the largest digit of ``key ^ key[0]``; read back once):
      histogram: per tile of ``TILE`` keys, the count of each digit, stored digit-major
                 (``hist[d * n_tiles + tile]``);
      scan:      exclusive prefix sum of ``hist`` = first output slot of every (digit, tile);
      scatter:   each tile ranks its keys within their digit with a one-hot
                 ``[TILE, RADIX]`` exclusive cumsum (key j's rank = #earlier keys of the tile
                 with the same digit) and writes key and index to ``slot[d, tile] + rank``.
  Tiles are taken in order within each digit and keys in order within each tile, so each pass
  is stable and the LSD result breaks ties by original index. Indices start as the position
  (never materialised), stay int32 between passes and the last pass writes int64.
  Counts are int32: N < 2**31.

Why not ``tl.sort`` for the in-tile step: its bitonic network uses custom-combine reductions
that Triton's interpreter evaluates element by element (about 20 s for one 4096-key sort), and
on the GPU a 78-stage network costs more per key than a 16-bin one-hot rank.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_device, is_interpreted, launch_opts, scan_

SMALL_N = 4096
RANK_BI = 32
RANK_BJ = 128
RANK_WARPS = 8
INTERP_RANK_BI = 256  # the interpreter pays ~10 ms per program: fewer, larger tiles there
RADIX_BITS = 4
RADIX = 1 << RADIX_BITS
TILE = 256
TILE_WARPS = 8
BLOCK = 1024

_KEY_DTYPES = {  # torch dtype -> (is_float, wide)
    torch.float32: (True, False),
    torch.float64: (True, True),
    torch.int32: (False, False),
    torch.int64: (False, True),
}


# --------------------------------------------------------------------------------------------
# small N: counting rank
# --------------------------------------------------------------------------------------------

@triton.jit
def _rank_sort_kernel(KEYS, OUT, N, BI: tl.constexpr, BJ: tl.constexpr):
    i = tl.program_id(0) * BI + tl.arange(0, BI)
    mi = i < N
    xi = tl.load(KEYS + i, mask=mi, other=0)
    rank = tl.zeros([BI], tl.int32)
    for j0 in range(0, N, BJ):
        j = j0 + tl.arange(0, BJ)
        mj = j < N
        xj = tl.load(KEYS + j, mask=mj, other=0)
        lt = xj[None, :] < xi[:, None]
        tie = (xj[None, :] == xi[:, None]) & (j[None, :] < i[:, None])
        before = lt | tie
        rank += tl.sum((before & mj[None, :]).to(tl.int32), 1)
    tl.store(OUT + rank, i.to(tl.int64), mask=mi)


# --------------------------------------------------------------------------------------------
# large N: LSD radix sort
# --------------------------------------------------------------------------------------------

@triton.jit
def _orderable(x, IS_FLOAT: tl.constexpr, WIDE: tl.constexpr):
    """Integers (same width as the key) whose unsigned order is the order of the keys."""
    if IS_FLOAT:
        x = tl.where(x == 0, 0.0, x).to(x.dtype)  # -0.0 -> +0.0
        if WIDE:
            b = x.to(tl.int64, bitcast=True)
            return tl.where(b < 0, ~b, b - 9223372036854775807 - 1)
        else:
            b = x.to(tl.int32, bitcast=True)
            return tl.where(b < 0, ~b, b - 2147483647 - 1)
    else:
        if WIDE:
            return tl.where(x < 0, x + 9223372036854775807 + 1, x - 9223372036854775807 - 1)
        else:
            return tl.where(x < 0, x + 2147483647 + 1, x - 2147483647 - 1)


@triton.jit
def _transform_kernel(KEYS, T, DIFF, N, IS_FLOAT: tl.constexpr, WIDE: tl.constexpr,
                      NDIGITS: tl.constexpr, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    t = _orderable(tl.load(KEYS + offs, mask=m, other=0), IS_FLOAT, WIDE)
    tl.store(T + offs, t, mask=m)
    t0 = _orderable(tl.load(KEYS), IS_FLOAT, WIDE)
    d = tl.where(m, t ^ t0, 0)
    for p in tl.static_range(NDIGITS):
        dig = ((d >> (p * RADIX_BITS)) & ((1 << RADIX_BITS) - 1)).to(tl.int32)
        tl.atomic_max(DIFF + p, tl.max(dig, 0))


@triton.jit
def _digits(t, m, shift, RADIX: tl.constexpr):
    """[TILE, RADIX] one-hot of the digit of t at ``shift`` (all-zero rows on padding lanes)."""
    d = ((t >> shift) & (RADIX - 1)).to(tl.int32)
    bins = tl.arange(0, RADIX)
    return ((d[:, None] == bins[None, :]) & m[:, None]).to(tl.int32), d


@triton.jit
def _radix_hist_kernel(T, HIST, N, NT, shift, TILE: tl.constexpr, RADIX: tl.constexpr):
    tile = tl.program_id(0)
    offs = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
    m = offs < N
    t = tl.load(T + offs, mask=m, other=0)
    onehot, d = _digits(t, m, shift, RADIX)
    bins = tl.arange(0, RADIX)
    tl.store(HIST + bins.to(tl.int64) * NT + tile, tl.sum(onehot, 0))


@triton.jit
def _radix_scatter_kernel(TIN, IIN, TOUT, IOUT, SLOT, N, NT, shift, FIRST: tl.constexpr,
                          WRITE_KEYS: tl.constexpr, TILE: tl.constexpr, RADIX: tl.constexpr):
    tile = tl.program_id(0)
    loc = tl.arange(0, TILE)
    offs = tile.to(tl.int64) * TILE + loc
    m = offs < N
    t = tl.load(TIN + offs, mask=m, other=0)
    onehot, d = _digits(t, m, shift, RADIX)
    earlier = tl.cumsum(onehot, 0) - onehot            # same-digit keys before j in the tile
    rank = tl.sum(earlier * onehot, 1)
    slot = tl.load(SLOT + d.to(tl.int64) * NT + tile, mask=m, other=0)
    dest = (slot + rank).to(tl.int64)
    if FIRST:
        iv = offs
    else:
        iv = tl.load(IIN + offs, mask=m, other=0)
    if WRITE_KEYS:
        tl.store(TOUT + dest, t, mask=m)
    tl.store(IOUT + dest, iv.to(IOUT.dtype.element_ty), mask=m)


def _digit_shifts(diff: torch.Tensor) -> list:
    return [p * RADIX_BITS for p, v in enumerate(diff.tolist()) if v]


def stable_argsort(keys, small_n: int = SMALL_N, tile: int = TILE) -> torch.Tensor:
    """int64 indices sorting ``keys`` ascending, ties by lower index (see the module docstring).

    ``small_n`` (the counting-rank threshold) and ``tile`` (radix tile, a power of two in
    [64, 8192]) are exposed so tests can run the multi-pass radix path at interpreter sizes.
    """
    check_device(_rank_sort_kernel, keys)
    if keys.dtype not in _KEY_DTYPES:
        raise TypeError(f"keys: unsupported dtype {keys.dtype}")
    is_float, wide = _KEY_DTYPES[keys.dtype]
    keys = keys.contiguous()
    N = keys.numel()
    dev = keys.device
    out = torch.empty(N, dtype=torch.int64, device=dev)
    if N <= 1:
        out.copy_(torch.arange(N, device=dev))
        return out
    if N >= 2**31 - 1:
        raise ValueError("keys: the triton stable_argsort supports N < 2**31")
    if N <= small_n:
        if is_interpreted(_rank_sort_kernel):
            bi, bj = INTERP_RANK_BI, INTERP_RANK_BI
        else:
            bi, bj = RANK_BI, RANK_BJ
        _rank_sort_kernel[(triton.cdiv(N, bi),)](keys, out, N, BI=bi, BJ=bj,
                                                 **launch_opts(RANK_WARPS))
        return out

    if tile & (tile - 1) or not 64 <= tile <= 8192:
        raise ValueError("tile: must be a power of two in [64, 8192]")
    bits = 64 if wide else 32
    ndig = bits // RADIX_BITS
    t0 = torch.empty(N, dtype=torch.int64 if wide else torch.int32, device=dev)
    diff = torch.zeros(ndig, dtype=torch.int32, device=dev)
    _transform_kernel[(triton.cdiv(N, BLOCK),)](keys, t0, diff, N, IS_FLOAT=is_float, WIDE=wide,
                                                NDIGITS=ndig, RADIX_BITS=RADIX_BITS, BLOCK=BLOCK,
                                                **launch_opts(4))
    shifts = _digit_shifts(diff)  # the one host synchronisation
    if not shifts:  # all keys equal: the stable order is the identity
        out.copy_(torch.arange(N, device=dev))
        return out
    NT = triton.cdiv(N, tile)
    hist = torch.empty(RADIX * NT, dtype=torch.int32, device=dev)
    npass = len(shifts)
    t1 = torch.empty_like(t0) if npass > 1 else t0
    i0 = torch.empty(N, dtype=torch.int32, device=dev) if npass > 1 else out
    i1 = torch.empty(N, dtype=torch.int32, device=dev) if npass > 2 else out
    tin, tout, iin = t0, t1, i0
    for p, shift in enumerate(shifts):
        last = p == npass - 1
        iout = out if last else (i0 if p % 2 == 0 else i1)
        _radix_hist_kernel[(NT,)](tin, hist, N, NT, shift, TILE=tile, RADIX=RADIX,
                                  **launch_opts(TILE_WARPS))
        scan_(hist, hist, inclusive=False)
        _radix_scatter_kernel[(NT,)](tin, iin, tout, iout, hist, N, NT, shift, FIRST=p == 0,
                                     WRITE_KEYS=not last, TILE=tile, RADIX=RADIX,
                                     **launch_opts(TILE_WARPS))
        tin, tout = tout, tin
        iin = iout
    return out
