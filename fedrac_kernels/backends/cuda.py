"""CUDA back end: thin wrappers over ``fedrac_kernels._cuda`` (the ``fk_cuda_*`` C ABI).

The native module is torch-free: tensors are handed over as raw device pointers
(``Tensor.data_ptr()``) and the stream as ``torch.cuda.current_stream(device).cuda_stream``, so every
kernel is ordered with the caller's torch work on that stream and nothing synchronises the device
(the only host synchronisation is the key-range read of ``stable_argsort`` for more than 4096 keys,
skipped while a CUDA graph is being captured). Temporary buffers (row-pointer arrays, the sort's
workspace) come from torch's caching allocator.

The module links the CUDA runtime statically: importing it needs no driver, and :func:`available`
reports ``(False, reason)`` on a machine without a GPU or driver (the native code is then never
called). Inputs follow the protocol of :mod:`fedrac_kernels.backends` (validated, contiguous, one
CUDA device); the normalisations done here (contiguity, int32 rank/sizes, int64 tables) are no-ops
for inputs that already conform. Results are bit-identical to :mod:`torch_ref`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from . import Accum
from ._native import (accum_args, accum_inputs, as_u8, contig, freq_code, load_extension, ptr, rows_of,
                      segment_table, sort_keys)

_cuda, _IMPORT_ERROR = load_extension("_cuda")

_device_status: dict = {}
_PTR_CACHE: "OrderedDict[tuple, list]" = OrderedDict()
_PTR_CACHE_MAX = 64
_PTR_CACHE_MAX_K = 1 << 16
_GRAPH_KEEP: list = []  # pointer arrays read by captured CUDA graphs


# ---- availability -------------------------------------------------------------------------------
def _runtime() -> tuple:
    """(ok, detail): the module is importable and its runtime sees a driver and a GPU."""
    if _cuda is None:
        return False, f"fedrac_kernels._cuda is not built or failed to load ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    try:
        n, rt, drv = _cuda.runtime_info()
    except Exception as exc:
        return False, f"CUDA runtime of fedrac_kernels._cuda unusable: {exc}"
    return True, f"runtime {rt // 1000}.{rt % 1000 // 10}, driver {drv // 1000}.{drv % 1000 // 10}, {n} device(s)"


def _device_ok(index: int) -> tuple:
    """(ok, detail) for one device index, cached: this build has a kernel image for it."""
    if index not in _device_status:
        try:
            major, minor = _cuda.device_check(index)
            name = torch.cuda.get_device_name(index)
            _device_status[index] = (True, f"{name} (sm_{major}{minor})")
        except Exception as exc:
            _device_status[index] = (False, str(exc))
    return _device_status[index]


def available(device=None) -> tuple:
    """(usable, reason). ``device`` (optional): the device of the tensors to be processed."""
    if device is not None and torch.device(device).type != "cuda":
        return False, "the cuda back end runs on CUDA tensors only"
    ok, detail = _runtime()
    if not ok:
        return False, detail
    dev = torch.device(device) if device is not None else torch.device("cuda")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    ok, what = _device_ok(index)
    if not ok:
        return False, what
    return True, f"CUDA kernels built for {_cuda.built_archs()} on {what}; {detail}"


# ---- helpers --------------------------------------------------------------------------------------
def _index(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        raise ValueError(f"cuda back end: tensors must be on a CUDA device, got {t.device}")
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _stream(index: int):
    return torch.cuda.current_stream(index)


def _check_device(device: torch.device, *ts) -> None:
    idx = device.index
    for t in ts:  # get_device(): an int, cheaper than building t.device for every row
        if t is not None and t.get_device() != idx:
            raise ValueError(f"cuda back end: every tensor must be on {device}, got one on {t.device}")


def _pointer_array(ptrs: list, device: torch.device, stream) -> torch.Tensor:
    """A device int64 array holding ``ptrs`` (row addresses), ready on ``stream``.

    Cached by the tuple of addresses (its content depends on nothing else, so a hit is always
    right, even for other tensors at the same addresses); a miss costs one pinned host tensor and a
    non_blocking copy on ``stream``. A cached array first used on another stream makes that stream
    wait for the copy and is recorded on it, so the caching allocator never reuses its memory while
    that stream may still read it. While a CUDA
    graph is being captured nothing is cached (the copy only runs at replay) and the arrays the
    graph reads (and the pinned source of its copy) are kept alive for the life of the process.
    """
    key = (device.index, tuple(ptrs))
    capturing = torch.cuda.is_current_stream_capturing()
    hit = _PTR_CACHE.get(key)
    if hit is not None:
        _PTR_CACHE.move_to_end(key)
        arr, ready, streams = hit
        sid = stream.cuda_stream
        if sid not in streams:  # first use on this stream: after the copy, and kept alive for it
            stream.wait_event(ready)
            arr.record_stream(stream)
            streams.add(sid)
        if capturing:
            _GRAPH_KEEP.append(arr)
        return arr
    host = torch.tensor(ptrs, dtype=torch.int64, pin_memory=True)
    arr = host.to(device, non_blocking=True)
    if capturing:
        _GRAPH_KEEP.extend((host, arr))
    elif len(ptrs) <= _PTR_CACHE_MAX_K:
        ready = torch.cuda.Event()
        ready.record(stream)
        _PTR_CACHE[key] = [arr, ready, {stream.cuda_stream}]
        while len(_PTR_CACHE) > _PTR_CACHE_MAX:
            _PTR_CACHE.popitem(last=False)
    return arr


def clear_cache() -> None:
    """Drop the cached device pointer arrays (and device checks)."""
    _PTR_CACHE.clear()
    _device_status.clear()


class _Call:
    """Device index, torch device, stream and the torch device context of one call."""

    __slots__ = ("index", "device", "stream", "_ctx")

    def __init__(self, t: torch.Tensor):
        self.index = _index(t)
        self.device = torch.device("cuda", self.index)
        self.stream = _stream(self.index)
        self._ctx = torch.cuda.device(self.index) if torch.cuda.current_device() != self.index else None

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False


def _accum(acc: Accum, call: _Call, keep: list, extra_ptr_rows=None) -> tuple:
    """fk_accum_args as the binding's 12 ints, plus the device address of the extra pointer rows
    (dense masks) stored after the K row pointers in the same device array."""
    code, ptrs, held = rows_of(acc.rows, keep)
    K = len(ptrs)
    weights, g, init_num, init_den = accum_inputs(acc)
    _check_device(call.device, weights, acc.flags, g, acc.out, init_num, init_den, acc.acc_num, acc.acc_den, *held)
    extra = 0
    if extra_ptr_rows is not None:
        _check_device(call.device, *extra_ptr_rows)
        ptrs += [m.data_ptr() for m in extra_ptr_rows]
    rows_dev = 0
    if ptrs:
        arr = _pointer_array(ptrs, call.device, call.stream)
        keep.append(arr)
        rows_dev = arr.data_ptr()
        if extra_ptr_rows is not None:
            extra = rows_dev + 8 * K
    keep += [held, weights, g, init_num, init_den]
    return accum_args(acc, K, code, rows_dev, weights, g, init_num, init_den), extra


# ---- protocol -------------------------------------------------------------------------------------
def dense(acc: Accum, masks) -> None:
    if masks is not None and len(masks) == 0:
        masks = None
    with _Call(acc.weights) as call:
        keep: list = []
        ms = None
        if masks is not None:
            ms = [as_u8(m) for m in masks]
            keep.append(ms)
        args, mptr = _accum(acc, call, keep, ms)
        _cuda.dense(call.index, call.stream.cuda_stream, args, mptr)


def structured(acc: Accum, segments, N, neuron_masks, rank, sizes, nonzero: bool) -> None:
    with _Call(acc.weights) as call:
        keep: list = []
        args, _ = _accum(acc, call, keep)
        segs = segment_table(segments, call.device)
        nm = as_u8(neuron_masks) if neuron_masks is not None else None
        rk = contig(rank, torch.int32) if neuron_masks is None else None
        sz = contig(sizes, torch.int32) if neuron_masks is None else None
        _check_device(call.device, nm, rk, sz)
        keep += [segs, nm, rk, sz]
        _cuda.structured(call.index, call.stream.cuda_stream, args, segs.data_ptr(), segs.shape[0], int(N),
                         ptr(nm), ptr(rk), ptr(sz), bool(nonzero))


def compact(acc: Accum, segments, N, inv, seg_off, seg_cols) -> None:
    with _Call(acc.weights) as call:
        keep: list = []
        args, _ = _accum(acc, call, keep)
        segs = segment_table(segments, call.device)
        inv_t = contig(inv, torch.int32)
        so = contig(seg_off, torch.int64)
        sc = contig(seg_cols, torch.int64)
        _check_device(call.device, inv_t, so, sc)
        keep += [segs, inv_t, so, sc]
        _cuda.compact(call.index, call.stream.cuda_stream, args, segs.data_ptr(), segs.shape[0], int(N),
                      ptr(inv_t), ptr(so), ptr(sc))


def frequency_update(freq, masks, rank, sizes) -> None:
    code = freq_code(freq)
    N = freq.numel()
    with _Call(freq) as call:
        if masks is not None:
            m = as_u8(masks)
            _check_device(call.device, m)
            K = m.shape[0] if m.dim() == 2 else (m.numel() // N if N else 0)
            if K == 0 or m.numel() == 0:  # no clients: count 0 (an empty tensor may have no address)
                freq.add_(0)
                return
            _cuda.frequency_update(call.index, call.stream.cuda_stream, freq.data_ptr(), code,
                                   m.data_ptr(), 0, 0, K, N)
        else:
            rk = contig(rank, torch.int32)
            sz = contig(sizes, torch.int32).reshape(-1)
            _check_device(call.device, rk, sz)
            _cuda.frequency_update(call.index, call.stream.cuda_stream, freq.data_ptr(), code,
                                   0, rk.data_ptr(), sz.data_ptr(), sz.numel(), N)


def stable_argsort(keys) -> torch.Tensor:
    k, code = sort_keys(keys)
    with _Call(k) as call:
        n = k.numel()
        order = torch.empty(n, dtype=torch.int64, device=call.device)
        if n == 0:
            return order
        sid = call.stream.cuda_stream
        nbytes = _cuda.argsort_workspace(call.index, sid, k.data_ptr(), code, order.data_ptr(), n)
        ws = torch.empty(int(nbytes), dtype=torch.uint8, device=call.device)
        _cuda.stable_argsort(call.index, sid, k.data_ptr(), code, order.data_ptr(), n, ws.data_ptr(), int(nbytes))
        return order


def nested_masks(order, sizes) -> torch.Tensor:
    with _Call(order) as call:
        o = contig(order, torch.int64).reshape(-1)
        s = contig(sizes, torch.int64).reshape(-1)
        _check_device(call.device, s)
        out = torch.empty((s.numel(), o.numel()), dtype=torch.bool, device=call.device)
        _cuda.nested_masks(call.index, call.stream.cuda_stream, out.data_ptr(), o.data_ptr(), s.data_ptr(),
                           s.numel(), o.numel())
        return out
