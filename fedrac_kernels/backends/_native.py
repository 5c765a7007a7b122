"""Marshalling shared by the native back ends (:mod:`.cpu` and :mod:`.cuda`).

Both hand tensors to a torch-free C ABI (``csrc/include/fedrac_kernels.h``) as raw addresses and
dtype codes; what differs between them is only where the tensors must live (checked by each back
end) and how the call is issued (threads vs device and stream). Inputs follow the protocol of
:mod:`fedrac_kernels.backends`; the normalisations here (contiguity, int32/int64 tables, float32
weights) are no-ops for inputs that already conform.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import KEY_DTYPE_CODES, UPDATE_DTYPE_CODES, Accum, StackedRows


def load_extension(name: str) -> tuple:
    """(module ``fedrac_kernels.<name>`` or None, why it failed to import or None). The extensions
    are optional: without one its back end reports itself unavailable."""
    try:
        return importlib.import_module(f"fedrac_kernels.{name}"), None
    except Exception as exc:  # pragma: no cover - depends on the build
        return None, f"{type(exc).__name__}: {exc}"


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def contig(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def as_u8(t: torch.Tensor) -> torch.Tensor:
    """bool/uint8 tensor as a contiguous 1-byte tensor (0 / non-zero)."""
    if t.dtype not in (torch.bool, torch.uint8, torch.int8):
        t = t != 0
    return contig(t)


def update_code(dtype: torch.dtype) -> int:
    code = UPDATE_DTYPE_CODES.get(dtype)
    if code is None:
        raise TypeError(f"rows: dtype must be float32, bfloat16 or float16, got {dtype}")
    return code


def rows_of(rows, keep: list) -> tuple:
    """(dtype code, row addresses, the tensors holding the rows) of ``acc.rows``.

    A :class:`StackedRows` gives its base tensor (one dtype, one device, rows already contiguous)
    and the addresses by arithmetic; a list gets one pass of cheap attribute checks, and a
    non-contiguous row is copied (the copy is appended to ``keep``, alive for the call). The caller
    checks the devices of the returned tensors."""
    if isinstance(rows, StackedRows):
        return update_code(rows.base.dtype), rows.row_addresses(), (rows.base,)
    if not rows:
        return 0, [], ()
    dt = rows[0].dtype
    code = update_code(dt)
    ptrs, held = [], []
    for r in rows:  # one pass: this runs on every aggregation call
        if r.dtype != dt:
            raise TypeError("rows: all rows must share one dtype")
        if not r.is_contiguous():
            r = r.contiguous()
            keep.append(r)
        held.append(r)
        ptrs.append(r.data_ptr())
    return code, ptrs, held


def accum_inputs(acc: Accum) -> tuple:
    """(weights, g, init_num, init_den) as contiguous float32, after checking the tensors the
    kernel writes (flags int32, out / acc_num / acc_den float32, all contiguous)."""
    if acc.flags.dtype != torch.int32 or not acc.flags.is_contiguous():
        raise TypeError("flags: must be a contiguous int32 tensor (it is written in place)")
    for name in ("out", "acc_num", "acc_den"):
        t = getattr(acc, name)
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            raise TypeError(f"{name}: must be a contiguous float32 tensor (it is written in place)")
    f32 = torch.float32
    return contig(acc.weights, f32), contig(acc.g, f32), contig(acc.init_num, f32), contig(acc.init_den, f32)


def accum_args(acc: Accum, K: int, code: int, rows, weights, g, init_num, init_den) -> tuple:
    """fk_accum_args as the bindings' 12 fields; ``rows``: the row addresses (CPU: a list) or the
    address of a device array holding them (CUDA)."""
    return (K, int(acc.P), code, rows, weights.data_ptr(), ptr(g), ptr(acc.out), ptr(init_num), ptr(init_den),
            ptr(acc.acc_num), ptr(acc.acc_den), acc.flags.data_ptr())


def segment_table(segments, device: Optional[torch.device] = None) -> torch.Tensor:
    """The segments as a contiguous int64 [S, 6] table (on ``device`` when given)."""
    segs = torch.as_tensor(segments)
    if device is not None and segs.device != device:
        segs = segs.to(device)
    segs = contig(segs, torch.int64)
    if segs.numel() and (segs.dim() != 2 or segs.shape[1] != 6):
        raise ValueError(f"segments: expected an int64 [S, 6] table, got shape {tuple(segs.shape)}")
    return segs.reshape(-1, 6)


def freq_code(freq: torch.Tensor) -> int:
    """Key dtype code of a frequency table updated in place (contiguous, a supported dtype)."""
    if freq.dtype not in KEY_DTYPE_CODES:
        raise TypeError(f"freq: dtype must be float32, float64, int32 or int64, got {freq.dtype}")
    if not freq.is_contiguous():
        raise TypeError("freq: must be contiguous (it is updated in place)")
    return KEY_DTYPE_CODES[freq.dtype]


def sort_keys(keys: torch.Tensor) -> tuple:
    """(contiguous 1-D keys of a supported dtype, its code). Other dtypes are widened exactly:
    smaller ints -> int64, smaller floats -> float64."""
    k = keys.reshape(-1)
    if k.dtype not in KEY_DTYPE_CODES:
        k = k.to(torch.float64 if k.dtype.is_floating_point else torch.int64)
    k = contig(k)
    return k, KEY_DTYPE_CODES[k.dtype]
