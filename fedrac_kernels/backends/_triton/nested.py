"""Nested prefix masks: row s of the ``[S, N]`` result is True exactly at ``order[:sizes[s]]``.

Two kernels: the inverse permutation ``rank[order[j]] = j`` (a conflict-free scatter), then one
program per block of neurons loads its ranks once and writes ``rank < sizes[s]`` for every s
(coalesced byte rows, no scattered writes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import as_int64, check_device, launch_opts

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _inverse_perm_kernel(ORDER, RANK, N, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < N
    n = tl.load(ORDER + j, mask=m, other=0)
    tl.store(RANK + n, j, mask=m)


@triton.jit
def _prefix_mask_kernel(RANK, SIZES, OUT, N, S, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    N64 = as_int64(N)
    r = tl.load(RANK + offs, mask=m, other=0)
    for s in range(S):
        sz = tl.load(SIZES + s)
        tl.store(OUT + N64 * s + offs, (r < sz).to(tl.uint8), mask=m)


def nested_masks(order, sizes, block: int = BLOCK) -> torch.Tensor:
    check_device(_inverse_perm_kernel, order)
    N, S = order.numel(), sizes.numel()
    out = torch.empty((S, N), dtype=torch.uint8, device=order.device)
    if N == 0 or S == 0:
        return out.view(torch.bool)
    order = order.to(torch.int64)
    sizes = sizes.to(torch.int64)
    rank = torch.empty(N, dtype=torch.int64, device=order.device)
    grid = (triton.cdiv(N, block),)
    _inverse_perm_kernel[grid](order, rank, N, BLOCK=block,
                               **launch_opts(NUM_WARPS))
    _prefix_mask_kernel[grid](rank, sizes, out, N, S, BLOCK=block,
                              **launch_opts(NUM_WARPS))
    return out.view(torch.bool)
