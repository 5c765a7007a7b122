"""Pure-torch back end: the executable definition of every op's semantics, and the oracle.

Written for obviousness, not speed: a Python loop over clients in order, float32 arithmetic with
one rounding per operation (torch's elementwise kernels never contract ``a * b + c`` into an FMA),
exactly as ``fedrac_kernels/backends/__init__.py`` and ``csrc/include/fedrac_kernels.h`` describe.
"""
from __future__ import annotations

import torch

from . import Accum


def available() -> tuple[bool, str]:
    return True, "pure torch"


def _start(acc: Accum):
    dev = acc.weights.device
    num = acc.init_num.clone() if acc.init_num is not None else torch.zeros(acc.P, dtype=torch.float32, device=dev)
    den = acc.init_den.clone() if acc.init_den is not None else torch.zeros(acc.P, dtype=torch.float32, device=dev)
    return num, den


def _add_client(acc: Accum, k: int, num, den, v, active) -> None:
    """Add client k's float32 values ``v`` on ``active`` elements (both [P])."""
    w = acc.weights[k]
    if bool(active.any()) and not bool(torch.isfinite(v[active]).all()):
        acc.flags[k] = 1
    t = w * v
    num.copy_(torch.where(active, num + t, num))
    den.copy_(torch.where(active, den + w, den))


def _finish(acc: Accum, num, den) -> None:
    if acc.out is not None:
        safe = torch.where(den > 0, den, torch.ones_like(den))
        res = torch.where(den > 0, acc.g + num / safe, acc.g)
        acc.out.copy_(res)
    else:
        acc.acc_num.copy_(num)
        acc.acc_den.copy_(den)


def _skipped(acc: Accum, k: int) -> bool:
    return float(acc.weights[k]) == 0.0


def dense(acc: Accum, masks) -> None:
    num, den = _start(acc)
    for k in range(acc.K):
        if _skipped(acc, k):
            continue
        v = acc.rows[k].to(torch.float32)
        active = (v != 0) if masks is None else masks[k].to(torch.bool)
        _add_client(acc, k, num, den, v, active)
    _finish(acc, num, den)


def neuron_on(N: int, neuron_masks, rank, sizes, k: int) -> torch.Tensor:
    """bool [N]: which neurons client k holds, from either mask form."""
    if neuron_masks is not None:
        return neuron_masks[k].to(torch.bool)
    return rank.to(torch.int64) < int(sizes[k])


def gate_row(P: int, segments: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Expand one client's neuron gates ``on`` [N] to an element gate [P] through the segments."""
    out = torch.empty(P, dtype=torch.bool, device=on.device)
    for off, rows, cols, inner, oo, io in segments.tolist():
        g_o = on[oo:oo + rows] if oo >= 0 else torch.ones(rows, dtype=torch.bool, device=on.device)
        g_i = on[io:io + cols] if io >= 0 else torch.ones(cols, dtype=torch.bool, device=on.device)
        blk = (g_o[:, None, None] & g_i[None, :, None]).expand(rows, cols, inner)
        out[off:off + rows * cols * inner] = blk.reshape(-1)
    return out


def structured(acc: Accum, segments, N, neuron_masks, rank, sizes, nonzero: bool) -> None:
    num, den = _start(acc)
    for k in range(acc.K):
        if _skipped(acc, k):
            continue
        v = acc.rows[k].to(torch.float32)
        active = gate_row(acc.P, segments, neuron_on(N, neuron_masks, rank, sizes, k))
        if nonzero:
            active = active & (v != 0)
        _add_client(acc, k, num, den, v, active)
    _finish(acc, num, den)


def compact_to_dense(P: int, segments, values: torch.Tensor, inv_k: torch.Tensor, seg_off_k, seg_cols_k):
    """Scatter one client's compact values into a dense float32 row [P] and its gate [P]."""
    dev = values.device
    dense_v = torch.zeros(P, dtype=torch.float32, device=dev)
    active = torch.zeros(P, dtype=torch.bool, device=dev)
    for s, (off, rows, cols, inner, oo, io) in enumerate(segments.tolist()):
        so = int(seg_off_k[s])
        if so < 0:
            continue
        po = inv_k[oo:oo + rows].to(torch.int64) if oo >= 0 else torch.arange(rows, device=dev)
        pi = inv_k[io:io + cols].to(torch.int64) if io >= 0 else torch.arange(cols, device=dev)
        nc = int(seg_cols_k[s])
        ok = (po[:, None] >= 0) & (pi[None, :] >= 0)                      # [rows, cols]
        src = (po.clamp(min=0)[:, None] * nc + pi.clamp(min=0)[None, :])  # [rows, cols]
        src = so + src[:, :, None] * inner + torch.arange(inner, device=dev)[None, None, :]
        okx = ok[:, :, None].expand(rows, cols, inner)
        blk = torch.zeros(rows, cols, inner, dtype=torch.float32, device=dev)
        blk[okx] = values[src[okx]].to(torch.float32)
        dense_v[off:off + rows * cols * inner] = blk.reshape(-1)
        active[off:off + rows * cols * inner] = okx.reshape(-1)
    return dense_v, active


def compact(acc: Accum, segments, N, inv, seg_off, seg_cols) -> None:
    num, den = _start(acc)
    for k in range(acc.K):
        if _skipped(acc, k):
            continue
        v, active = compact_to_dense(acc.P, segments, acc.rows[k], inv[k], seg_off[k], seg_cols[k])
        _add_client(acc, k, num, den, v, active)
    _finish(acc, num, den)


def frequency_update(freq, masks, rank, sizes) -> None:
    if masks is not None:
        count = masks.to(torch.int64).sum(0)
    else:
        count = (sizes.to(torch.int64)[:, None] > rank.to(torch.int64)[None, :]).sum(0)
    freq.add_(count.to(freq.dtype))


def stable_argsort(keys) -> torch.Tensor:
    return torch.sort(keys, stable=True).indices.to(torch.int64)


def nested_masks(order, sizes) -> torch.Tensor:
    N = order.numel()
    rank = torch.empty(N, dtype=torch.int64, device=order.device)
    rank[order.to(torch.int64)] = torch.arange(N, device=order.device)
    return rank[None, :] < sizes.to(torch.int64)[:, None]
