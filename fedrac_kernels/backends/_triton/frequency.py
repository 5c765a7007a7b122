"""Frequency-table update: ``freq[n] += #{k : client k holds neuron n}``.

* Dense masks ``bool [K, N]``: one program per block of neurons loops over the K mask rows and
  adds the int32 count, converted once to the table's dtype (one rounding, as ``torch_ref``).
* Nested form (``rank [N]``, ``sizes [K]``; n held by k iff ``rank[n] < sizes[k]``), O(N + K):
  a histogram of the sizes (integer atomics: order-independent, hence deterministic), an
  inclusive scan ``le[r] = #{k : sizes[k] <= r}``, then ``freq[n] += K - le[rank[n]]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import as_int64, check_device, launch_opts, scan_

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _freq_dense_kernel(F, M, N, K, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    N64 = as_int64(N)
    cnt = tl.zeros([BLOCK], tl.int32)
    for k in range(K):
        cnt += tl.load(M + N64 * k + offs, mask=inb, other=0).to(tl.int32)
    f = tl.load(F + offs, mask=inb)
    tl.store(F + offs, f + cnt.to(f.dtype), mask=inb)


@triton.jit
def _size_hist_kernel(SIZES, H, K, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < K
    s = tl.load(SIZES + offs, mask=m, other=0)
    tl.atomic_add(H + s, tl.full([BLOCK], 1, tl.int32), mask=m)


@triton.jit
def _freq_nested_kernel(F, RANK, LE, N, K, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    r = tl.load(RANK + offs, mask=inb, other=0)
    cnt = K - tl.load(LE + r, mask=inb, other=0)
    f = tl.load(F + offs, mask=inb)
    tl.store(F + offs, f + cnt.to(f.dtype), mask=inb)


def frequency_update(freq, masks, rank, sizes, block: int = BLOCK) -> None:
    check_device(_freq_dense_kernel, freq)
    N = freq.numel()
    if N == 0:
        return
    grid = (triton.cdiv(N, block),)
    if masks is not None:
        K = masks.shape[0]
        if K == 0:
            return
        _freq_dense_kernel[grid](freq, masks.view(torch.uint8), N, K, BLOCK=block,
                                 **launch_opts(NUM_WARPS))
        return
    K = sizes.numel()
    if K == 0:
        return
    le = torch.zeros(N + 1, dtype=torch.int32, device=freq.device)
    _size_hist_kernel[(triton.cdiv(K, block),)](sizes, le, K, BLOCK=block,
                                                **launch_opts(NUM_WARPS))
    scan_(le, le, inclusive=True)
    _freq_nested_kernel[grid](freq, rank, le, N, K, BLOCK=block,
                              **launch_opts(NUM_WARPS))
