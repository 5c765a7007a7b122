"""C++/OpenMP back end: thin wrappers over ``fedrac_kernels._cpu`` (the ``fk_cpu_*`` C ABI).

Tensors are handed over as raw pointers (``Tensor.data_ptr()``); the native code never sees torch.
Inputs follow the protocol of :mod:`fedrac_kernels.backends` (validated, contiguous, CPU); the few
normalisations done here (contiguity, int32 rank/sizes, int64 segment tables) are no-ops for
inputs that already conform. Work runs on ``torch.get_num_threads()`` OpenMP threads with the GIL
released, and is bit-identical to :mod:`fedrac_kernels.backends.torch_ref`.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import KEY_DTYPE_CODES, UPDATE_DTYPE_CODES, Accum, StackedRows

try:  # the extension is optional: without it this back end reports itself unavailable
    from .. import _cpu  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the build
    _cpu = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_UPDATE_DTYPES = UPDATE_DTYPE_CODES
_KEY_DTYPES = KEY_DTYPE_CODES


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


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _contig(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _check_cpu(*ts) -> None:
    for t in ts:  # is_cpu: a bool attribute, cheaper than building t.device
        if t is not None and not t.is_cpu:
            raise ValueError(f"cpu back end: tensors must be on the CPU, got {t.device}")


def _rows(rows, keep: list) -> tuple:
    """(dtype code, row pointers); rows must share one update dtype and live on the CPU."""
    if isinstance(rows, StackedRows):  # one tensor: one check, addresses by arithmetic
        b = rows.base
        code = _UPDATE_DTYPES.get(b.dtype)
        if code is None:
            raise TypeError(f"rows: dtype must be float32, bfloat16 or float16, got {b.dtype}")
        if not b.is_cpu:
            raise ValueError(f"cpu back end: tensors must be on the CPU, got {b.device}")
        return code, rows.row_addresses()
    if not rows:
        return 0, []
    dt = rows[0].dtype
    code = _UPDATE_DTYPES.get(dt)
    if code is None:
        raise TypeError(f"rows: dtype must be float32, bfloat16 or float16, got {dt}")
    ptrs = []
    for r in rows:  # one pass, cheap attribute checks only: this runs on every aggregation call
        if r.dtype != dt:
            raise TypeError("rows: all rows must share one dtype")
        if not r.is_cpu:
            raise ValueError(f"cpu back end: tensors must be on the CPU, got {r.device}")
        if not r.is_contiguous():
            r = r.contiguous()
            keep.append(r)
        ptrs.append(r.data_ptr())
    return code, ptrs


def _accum_tuple(acc: Accum, keep: list) -> tuple:
    """fk_accum_args as the binding's tuple; `keep` holds every temporary alive for the call."""
    code, ptrs = _rows(acc.rows, keep)
    if acc.flags.dtype != torch.int32 or not acc.flags.is_contiguous():
        raise TypeError("flags: must be a contiguous int32 tensor (it is written in place)")
    for name in ("out", "acc_num", "acc_den"):
        t = getattr(acc, name)
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            raise TypeError(f"{name}: must be a contiguous float32 tensor (it is written in place)")
    weights = _contig(acc.weights, torch.float32)
    g = _contig(acc.g, torch.float32)
    init_num = _contig(acc.init_num, torch.float32)
    init_den = _contig(acc.init_den, torch.float32)
    _check_cpu(weights, acc.flags, g, acc.out, init_num, init_den, acc.acc_num, acc.acc_den)
    keep += [weights, g, init_num, init_den]
    return (len(ptrs), int(acc.P), code, ptrs, weights.data_ptr(), _ptr(g), _ptr(acc.out), _ptr(init_num),
            _ptr(init_den), _ptr(acc.acc_num), _ptr(acc.acc_den), acc.flags.data_ptr())


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    """bool/uint8 tensor as a contiguous 1-byte tensor (0 / non-zero)."""
    if t.dtype not in (torch.bool, torch.uint8, torch.int8):
        t = t != 0
    return _contig(t)


def dense(acc: Accum, masks) -> None:
    keep: list = []
    args = _accum_tuple(acc, keep)
    mptrs = None
    if masks is not None:
        ms = [_as_u8(m) for m in masks]
        _check_cpu(*ms)
        keep.append(ms)
        mptrs = [m.data_ptr() for m in ms]
    _cpu.dense(args, mptrs, _threads())


def _segments(segments) -> torch.Tensor:
    segs = _contig(torch.as_tensor(segments), torch.int64)
    if segs.numel() and (segs.dim() != 2 or segs.shape[1] != 6):
        raise ValueError(f"segments: expected an int64 [S, 6] table, got shape {tuple(segs.shape)}")
    return segs.reshape(-1, 6)


def structured(acc: Accum, segments, N, neuron_masks, rank, sizes, nonzero: bool) -> None:
    keep: list = []
    args = _accum_tuple(acc, keep)
    segs = _segments(segments)
    nm = _as_u8(neuron_masks) if neuron_masks is not None else None
    rk = _contig(rank, torch.int32)
    sz = _contig(sizes, torch.int32)
    _check_cpu(segs, nm, rk, sz)
    keep += [segs, nm, rk, sz]
    _cpu.structured(args, segs.data_ptr(), segs.shape[0], int(N), _ptr(nm), _ptr(rk), _ptr(sz), bool(nonzero),
                    _threads())


def compact(acc: Accum, segments, N, inv, seg_off, seg_cols) -> None:
    keep: list = []
    args = _accum_tuple(acc, keep)
    segs = _segments(segments)
    inv_t = _contig(inv, torch.int32)
    so = _contig(seg_off, torch.int64)
    sc = _contig(seg_cols, torch.int64)
    _check_cpu(segs, inv_t, so, sc)
    keep += [segs, inv_t, so, sc]
    _cpu.compact(args, segs.data_ptr(), segs.shape[0], int(N), _ptr(inv_t), _ptr(so), _ptr(sc), _threads())


def frequency_update(freq, masks, rank, sizes) -> None:
    if freq.dtype not in _KEY_DTYPES:
        raise TypeError(f"freq: dtype must be float32, float64, int32 or int64, got {freq.dtype}")
    if not freq.is_contiguous():
        raise TypeError("freq: must be contiguous (it is updated in place)")
    N = freq.numel()
    if masks is not None:
        m = _as_u8(masks)
        _check_cpu(freq, m)
        K = m.shape[0] if m.dim() == 2 else (m.numel() // N if N else 0)
        _cpu.frequency_update(freq.data_ptr(), _KEY_DTYPES[freq.dtype], m.data_ptr(), 0, 0, K, N, _threads())
    else:
        rk = _contig(rank, torch.int32)
        sz = _contig(sizes, torch.int32)
        _check_cpu(freq, rk, sz)
        _cpu.frequency_update(freq.data_ptr(), _KEY_DTYPES[freq.dtype], 0, rk.data_ptr(), sz.data_ptr(),
                              sz.numel(), N, _threads())


def stable_argsort(keys) -> torch.Tensor:
    k = keys.reshape(-1)
    if k.dtype not in _KEY_DTYPES:  # exact widening: smaller ints -> int64, smaller floats -> float64
        k = k.to(torch.float64 if k.dtype.is_floating_point else torch.int64)
    k = _contig(k)
    _check_cpu(k)
    order = torch.empty(k.numel(), dtype=torch.int64)
    _cpu.stable_argsort(k.data_ptr(), _KEY_DTYPES[k.dtype], order.data_ptr(), k.numel(), _threads())
    return order


def nested_masks(order, sizes) -> torch.Tensor:
    o = _contig(order, torch.int64)
    s = _contig(sizes, torch.int64).reshape(-1)
    _check_cpu(o, s)
    out = torch.empty((s.numel(), o.numel()), dtype=torch.bool)
    _cpu.nested_masks(out.data_ptr(), o.data_ptr(), s.data_ptr(), s.numel(), o.numel(), _threads())
    return out
