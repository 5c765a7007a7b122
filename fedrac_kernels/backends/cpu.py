"""C++/OpenMP back end: thin wrappers over ``fedrac_kernels._cpu`` (the ``fk_cpu_*`` C ABI).

Tensors are handed over as raw pointers (``Tensor.data_ptr()``); the native code never sees torch.
Inputs follow the protocol of :mod:`fedrac_kernels.backends` (validated, contiguous, CPU); the few
normalisations done here (contiguity, int32 rank/sizes, int64 segment tables) are no-ops for
inputs that already conform. Work runs on ``torch.get_num_threads()`` OpenMP threads with the GIL
released, and is bit-identical to :mod:`fedrac_kernels.backends.torch_ref`.
"""
from __future__ import annotations

import torch

from . import Accum
from ._native import (accum_args, accum_inputs, as_u8, contig, freq_code, load_extension, ptr, rows_of,
                      segment_table, sort_keys)

_cpu, _IMPORT_ERROR = load_extension("_cpu")


def available() -> tuple[bool, str]:
    if _cpu is None:
        return False, f"fedrac_kernels._cpu is not built or failed to load ({_IMPORT_ERROR})"
    info = _cpu.build_info()
    return True, (f"C++/OpenMP ({info['compiler']}, OpenMP {info['openmp']}, {info['isa']} kernels, "
                  f"{torch.get_num_threads()} threads)")


def build_info() -> dict:
    """Compiler, OpenMP version, instruction-set level in use, FP-contraction self-check."""
    if _cpu is None:
        raise RuntimeError(f"fedrac_kernels._cpu unavailable: {_IMPORT_ERROR}")
    return dict(_cpu.build_info())


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _check_cpu(*ts) -> None:
    for t in ts:  # is_cpu: a bool attribute, cheaper than building t.device
        if t is not None and not t.is_cpu:
            raise ValueError(f"cpu back end: tensors must be on the CPU, got {t.device}")


def _accum_tuple(acc: Accum, keep: list) -> tuple:
    """fk_accum_args as the binding's tuple; `keep` holds every temporary alive for the call."""
    code, ptrs, held = rows_of(acc.rows, keep)
    weights, g, init_num, init_den = accum_inputs(acc)
    _check_cpu(*held, weights, acc.flags, g, acc.out, init_num, init_den, acc.acc_num, acc.acc_den)
    keep += [weights, g, init_num, init_den]
    return accum_args(acc, len(ptrs), code, ptrs, weights, g, init_num, init_den)


def dense(acc: Accum, masks) -> None:
    keep: list = []
    args = _accum_tuple(acc, keep)
    mptrs = None
    if masks is not None:
        ms = [as_u8(m) for m in masks]
        _check_cpu(*ms)
        keep.append(ms)
        mptrs = [m.data_ptr() for m in ms]
    _cpu.dense(args, mptrs, _threads())


def structured(acc: Accum, segments, N, neuron_masks, rank, sizes, nonzero: bool) -> None:
    keep: list = []
    args = _accum_tuple(acc, keep)
    segs = segment_table(segments)
    nm = as_u8(neuron_masks) if neuron_masks is not None else None
    rk = contig(rank, torch.int32)
    sz = contig(sizes, torch.int32)
    _check_cpu(segs, nm, rk, sz)
    keep += [segs, nm, rk, sz]
    _cpu.structured(args, segs.data_ptr(), segs.shape[0], int(N), ptr(nm), ptr(rk), ptr(sz), bool(nonzero),
                    _threads())


def compact(acc: Accum, segments, N, inv, seg_off, seg_cols) -> None:
    keep: list = []
    args = _accum_tuple(acc, keep)
    segs = segment_table(segments)
    inv_t = contig(inv, torch.int32)
    so = contig(seg_off, torch.int64)
    sc = contig(seg_cols, torch.int64)
    _check_cpu(segs, inv_t, so, sc)
    keep += [segs, inv_t, so, sc]
    _cpu.compact(args, segs.data_ptr(), segs.shape[0], int(N), ptr(inv_t), ptr(so), ptr(sc), _threads())


def frequency_update(freq, masks, rank, sizes) -> None:
    code = freq_code(freq)
    N = freq.numel()
    if masks is not None:
        m = as_u8(masks)
        _check_cpu(freq, m)
        K = m.shape[0] if m.dim() == 2 else (m.numel() // N if N else 0)
        _cpu.frequency_update(freq.data_ptr(), code, m.data_ptr(), 0, 0, K, N, _threads())
    else:
        rk = contig(rank, torch.int32)
        sz = contig(sizes, torch.int32)
        _check_cpu(freq, rk, sz)
        _cpu.frequency_update(freq.data_ptr(), code, 0, rk.data_ptr(), sz.data_ptr(), sz.numel(), N, _threads())


def stable_argsort(keys) -> torch.Tensor:
    k, code = sort_keys(keys)
    _check_cpu(k)
    order = torch.empty(k.numel(), dtype=torch.int64)
    _cpu.stable_argsort(k.data_ptr(), code, order.data_ptr(), k.numel(), _threads())
    return order


def nested_masks(order, sizes) -> torch.Tensor:
    o = contig(order, torch.int64)
    s = contig(sizes, torch.int64).reshape(-1)
    _check_cpu(o, s)
    out = torch.empty((s.numel(), o.numel()), dtype=torch.bool)
    _cpu.nested_masks(out.data_ptr(), o.data_ptr(), s.data_ptr(), s.numel(), o.numel(), _threads())
    return out
