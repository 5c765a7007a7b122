"""Back-end selection, value checks and the non-finite policy, shared by api, library and streaming.

The public functions in :mod:`fedrac_kernels.api` check shapes, dtypes and devices and normalise
their arguments; the ``run_*`` functions here take those normalised tensors, check the *values*
that need reading (weights, NaN keys, permutations), pick the back end and apply the non-finite
policy. They are what the ``torch.library`` ops in :mod:`fedrac_kernels.library` execute, so the
value checks also hold inside a ``torch.compile``'d graph.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import threading
from collections import OrderedDict
from typing import Optional

import torch

from . import layout as _layout
from .backends import BACKEND_NAMES, Accum, backend_status, get_backend

ENV_VAR = "FEDRAC_KERNELS_BACKEND"
NONFINITE_POLICIES = ("raise", "drop", "assume_finite")

_DEVICE_DEFAULTS = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

_log = logging.getLogger("fedrac_kernels")
_status_cache: dict = {}
_logged: set = set()
_device_cache: dict = {}
_resolve_cache: dict = {}


# ---- back-end status and selection --------------------------------------------------------------
def status(name: str) -> tuple:
    """(usable, reason) of back end ``name``, computed once per process."""
    if name not in _status_cache:
        _status_cache[name] = backend_status(name)
    return _status_cache[name]


def clear_cache() -> None:
    """Forget cached back-end statuses and scratch buffers (tests; after building a native module in-process)."""
    _status_cache.clear()
    _device_cache.clear()
    _resolve_cache.clear()
    _logged.clear()
    with _scratch_lock:
        _SCRATCH.clear()


def available_backends() -> list:
    """Names of the back ends usable in this process, e.g. ``["torch", "cpu"]``."""
    return [n for n in BACKEND_NAMES if status(n)[0]]


def backend_report() -> dict:
    """``{name: "ok: <detail>"}`` for usable back ends, ``{name: "unavailable: <reason>"}`` otherwise."""
    out = {}
    for n in BACKEND_NAMES:
        ok, why = status(n)
        out[n] = f"ok: {why}" if ok else f"unavailable: {why}"
    return out


def supports_device(name: str, device: torch.device) -> tuple:
    """(ok, reason): can back end ``name`` run on tensors on ``device``?

    A back end whose ``available`` takes a device (``available(device) -> (ok, why)``, e.g. the
    Triton back end, which knows whether it was imported for the interpreter) decides itself.
    """
    key = (name, device.type)
    if key in _device_cache:
        return _device_cache[key]
    t = device.type
    if name == "torch":
        res = (True, "")
    elif name == "cpu":
        res = ((t == "cpu"), "the cpu back end runs on CPU tensors only")
    elif name == "cuda":
        res = ((t == "cuda"), "the cuda back end runs on CUDA tensors only")
    elif name == "triton":
        if t == "cuda" or (t == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1"):
            res = (True, "")
        else:
            res = (False, "the triton back end runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1)")
    else:
        res = (False, f"unknown back end {name!r}")
    if res[0] and name != "torch" and status(name)[0]:
        mod = get_backend(name)
        try:
            takes_device = len(inspect.signature(mod.available).parameters) >= 1
        except (TypeError, ValueError):
            takes_device = False
        if takes_device:
            try:
                ok, why = mod.available(device)
                res = (bool(ok), why)
            except Exception as exc:  # a failing check is a reason, not a crash
                res = (False, f"availability check for {t} failed: {type(exc).__name__}: {exc}")
    _device_cache[key] = res
    return res


def resolve(backend: Optional[str], device: torch.device):
    key = (backend or None, os.environ.get(ENV_VAR, ""), device.type)
    mod = _resolve_cache.get(key)
    if mod is None:
        mod = _resolve(backend, device)
        _resolve_cache[key] = mod
    return mod


def _resolve(backend: Optional[str], device: torch.device):
    """The back-end module to use for tensors on ``device``.

    Order: ``backend`` argument > ``$FEDRAC_KERNELS_BACKEND`` > the device default (CUDA tensors:
    cuda > triton > torch; CPU tensors: cpu > torch; other devices: torch). An explicitly requested
    back end that is unknown, unavailable or unable to handle ``device`` raises ``ValueError``. The
    environment variable is a preference: an unknown or unavailable name raises, but a back end that
    does not handle this device (e.g. ``cuda`` for a CPU frequency table) falls back to the default.
    """
    if backend is not None and backend != "":
        return _requested(backend, device, "backend")
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        if env not in BACKEND_NAMES:
            raise ValueError(f"backend: {ENV_VAR}={env!r} is not a back end; choose one of {BACKEND_NAMES}")
        ok, why = status(env)
        if not ok:
            raise ValueError(f"backend: {ENV_VAR}={env!r} is unavailable: {why}")
        if supports_device(env, device)[0]:
            return _chosen(env, device)
        _log.info("fedrac_kernels: %s=%r does not handle %s tensors; using the default for them",
                  ENV_VAR, env, device.type)
    for name in _DEVICE_DEFAULTS.get(device.type, ("torch",)):
        if status(name)[0] and supports_device(name, device)[0]:
            return _chosen(name, device)
    return _chosen("torch", device)


def _requested(name: str, device: torch.device, source: str):
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a back-end name (str) or None, got {type(name).__name__}")
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend: unknown back end {name!r}; choose one of {BACKEND_NAMES}")
    ok, why = status(name)
    if not ok:
        raise ValueError(f"backend: {name!r} is unavailable: {why}")
    ok, why = supports_device(name, device)
    if not ok:
        raise ValueError(f"backend: {name!r} cannot run on {device.type} tensors: {why}")
    return _chosen(name, device)


def _chosen(name: str, device: torch.device):
    key = (name, device.type)
    if key not in _logged:
        _logged.add(key)
        _log.info("fedrac_kernels: using back end %r for %s tensors", name, device.type)
    return get_backend(name)


_NULL_CONTEXT = contextlib.nullcontext()


def device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _NULL_CONTEXT  # stateless and reentrant: one instance serves every call


# ---- value checks -----------------------------------------------------------------------------
def weight_code(w: torch.Tensor) -> torch.Tensor:
    """0-dim int32 tensor on ``w``'s device, from ONE reduction over the weights: 0 = every weight is
    zero, 1 = valid (all >= 0 and finite, one > 0), >= 2 = some weight is negative or non-finite."""
    if w.numel() == 0:
        return torch.zeros((), dtype=torch.int32, device=w.device)
    bad = ~(w >= 0) | (w == math.inf)  # NaN fails w >= 0
    return (bad.to(torch.int32) * 2 + (w > 0).to(torch.int32)).amax()


def weight_error(w: torch.Tensor, name: str = "weights", allow_all_zero: bool = False) -> None:
    """Raise the ValueError describing what is wrong with ``w`` (reads it on the host: error path only)."""
    wc = w.detach().cpu()
    nf = (~torch.isfinite(wc)).nonzero().flatten().tolist()
    if nf:
        raise ValueError(f"{name}: non-finite weight(s) at client(s) {nf}: {wc[nf].tolist()}")
    neg = (wc < 0).nonzero().flatten().tolist()
    if neg:
        raise ValueError(f"{name}: negative weight(s) at client(s) {neg}: {wc[neg].tolist()}; weights must be >= 0")
    if not allow_all_zero and not bool((wc > 0).any()):
        raise ValueError(f"{name}: all weights are zero; at least one client needs a positive weight")


def check_weight_values(w: torch.Tensor, name: str = "weights", allow_all_zero: bool = False) -> None:
    """ValueError if any weight is negative or non-finite, or all are zero.

    CPU: read on the host. Other devices: one reduction (:func:`weight_code`) and one transfer."""
    if not _layout.one_transfer(w.device):
        vals = w.tolist()
        bad = any(not (v >= 0.0 and v != math.inf) for v in vals)  # NaN fails v >= 0
        positive = any(v > 0.0 for v in vals)
    else:
        code = int(weight_code(w))
        bad, positive = code >= 2, code == 1
    if bad or (not positive and not allow_all_zero):
        weight_error(w, name, allow_all_zero)


# ---- scratch buffers of the checked aggregation ------------------------------------------------
# ``finalize`` computes into a scratch buffer the size of ``g`` and copies it into ``g`` once the
# flags are read. On the CPU a buffer above glibc's mmap threshold (32 MiB at most) is fresh memory
# on every allocation: at P = 11M (45 MB) its page faults cost more than the aggregation itself. So
# used buffers are kept, keyed by (device, stream, dtype, size). A call *takes* its buffer out of
# the cache and puts it back when done, so two calls running at the same time (threads) never
# share one; the back ends write every element of ``out`` in finalize mode, so nothing of an
# earlier call's data can reach a result. Small CPU buffers are not kept (malloc serves them from
# the heap faster than the cache). On CUDA the key holds the stream, so a buffer is only reused in
# the stream order of its last use (and, evicted, freed to the stream it was allocated on); nothing
# is cached while a graph is being captured.
_SCRATCH: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_SCRATCH_MAX = 4                      # buffers kept
_SCRATCH_MAX_BYTES = 512 << 20        # bytes kept, all buffers together
_SCRATCH_MIN_CPU_BYTES = 1 << 20      # smaller CPU buffers are allocated per call
_scratch_lock = threading.Lock()


def take_scratch(g: torch.Tensor) -> tuple:
    """(buffer like ``g``, cache key or None): a buffer for this call alone."""
    dev = g.device
    if dev.type == "cpu":
        key = ("cpu", g.dtype, g.numel()) if g.numel() * g.element_size() >= _SCRATCH_MIN_CPU_BYTES else None
    elif dev.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        key = ("cuda", dev.index, torch.cuda.current_stream(dev).cuda_stream, g.dtype, g.numel())
    else:
        key = None
    buf = None
    if key is not None:
        with _scratch_lock:
            buf = _SCRATCH.pop(key, None)
    if buf is None:
        buf = torch.empty_like(g, memory_format=torch.contiguous_format)
    return buf, key


def give_back_scratch(buf: torch.Tensor, key) -> None:
    """Return a buffer from :func:`take_scratch` to the cache (oldest buffers go first when full)."""
    if key is None:
        return
    with _scratch_lock:
        _SCRATCH[key] = buf
        total = sum(t.numel() * t.element_size() for t in _SCRATCH.values())
        while _SCRATCH and (len(_SCRATCH) > _SCRATCH_MAX or total > _SCRATCH_MAX_BYTES):
            _, old = _SCRATCH.popitem(last=False)
            total -= old.numel() * old.element_size()


class no_grad:
    """``torch.no_grad()`` without its per-call overhead (the ops never build autograd graphs)."""

    __slots__ = ("prev",)

    def __enter__(self):
        self.prev = torch.is_grad_enabled()
        if self.prev:
            torch._C._set_grad_enabled(False)

    def __exit__(self, *exc):
        if self.prev:
            torch._C._set_grad_enabled(True)
        return False


def nan_free(t: torch.Tensor) -> bool:
    """True iff the floating tensor ``t`` holds no NaN: one reduction and one read (a NaN makes the
    sum NaN; a NaN sum without NaN, from +inf and -inf, is settled by the exact elementwise test)."""
    s = float(t.sum())
    return s == s or not bool(torch.isnan(t).any())


def nan_error(t: torch.Tensor, name: str) -> None:
    idx = torch.isnan(t).nonzero().flatten()[:8].tolist()
    raise ValueError(f"{name}: contains NaN (first at index {idx}); frequencies must be numbers")


def check_no_nan(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not nan_free(t):
        nan_error(t, name)


def check_order_sizes(order: torch.Tensor, sizes: torch.Tensor) -> None:
    """ValueError unless ``order`` is a permutation of 0..N-1 and every size lies in [0, N] (one
    device -> host read on a GPU)."""
    perm_ok, sizes_ok, _, _ = _layout._index_checks(order, sizes)
    if not perm_ok:
        _layout._permutation_error(order, "order")
    if not sizes_ok:
        _layout._sizes_error(sizes, order.numel())


# ---- running an aggregation with the non-finite policy -----------------------------------------
def call(mod, kind: str, acc: Accum, extra: tuple) -> None:
    getattr(mod, kind)(acc, *extra)


def _check_policy(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite: expected one of {NONFINITE_POLICIES}, got {nonfinite!r}")


def finalize(kind: str, extra: tuple, g: torch.Tensor, rows: list, weights: torch.Tensor, backend: str,
             nonfinite: str, arg: str = "deltas", weights_checked: bool = False,
             dropped: Optional[list] = None) -> torch.Tensor:
    """Run ``kind`` (dense / structured / compact) in finalize mode into ``g``; returns int32 flags [K].

    ``raise``: compute into a scratch buffer, raise naming the flagged clients (``g`` untouched) or
    copy the result into ``g``. ``drop``: re-run with the flagged clients' weights set to zero.
    ``assume_finite``: write ``g`` in place directly. The returned flags mark dropped clients;
    ``dropped`` (a list, optional) receives their indices as read from the flags (no further read).

    Device -> host reads: at most one per call. Unchecked weights (a tensor) are checked where they
    live: on the CPU at once; on a GPU by one reduction (:func:`weight_code`) whose result is read
    together with the flags (``raise`` / ``drop``: the scratch result is discarded when the weights
    are invalid, ``g`` is untouched) or, for ``assume_finite``, before ``g`` is written.
    """
    _check_policy(nonfinite)
    device = g.device
    mod = resolve(backend or None, device)
    K, P = len(rows), g.numel()
    w = weights if weights.dtype == torch.float32 else weights.to(torch.float32)
    batched = _layout.one_transfer(device)
    defer = not weights_checked and P > 0 and nonfinite != "assume_finite" and _layout.one_transfer(w.device)
    if not weights_checked and not defer:
        check_weight_values(w)
    if w.device != device:
        w = w.to(device)
    if not w.is_contiguous():
        w = w.contiguous()
    flags = torch.zeros(K, dtype=torch.int32, device=device)
    if P == 0:
        return flags
    with no_grad(), device_guard(device):
        if nonfinite == "assume_finite":
            call(mod, kind, Accum(rows, w, flags, P, out=g, g=g), extra)
            return flags
        drop = nonfinite == "drop"
        out, key = take_scratch(g)
        try:
            try:
                call(mod, kind, Accum(rows, w, flags, P, out=out, g=g), extra)
            except Exception:
                if defer:  # a back end that checks weights itself: report them as the API does
                    check_weight_values(w)
                raise
            if not batched and not defer:
                host = flags.tolist()
            else:  # the call's one device -> host read: flags [, weight code] [, a survivor exists]
                parts = [flags]
                if defer:
                    parts.append(weight_code(w).view(1))
                if drop and batched:
                    parts.append(((flags == 0) & (w > 0)).any().to(torch.int32).view(1))
                host = (torch.cat(parts) if len(parts) > 1 else flags).tolist()
            if defer and host[K] != 1:
                weight_error(w)
            bad = [k for k in range(K) if host[k]]
            if bad:
                if not drop:
                    raise ValueError(f"{arg}: non-finite values (NaN/Inf) on active elements of client(s) {bad}; "
                                     f"global_params is unchanged (nonfinite='drop' excludes such clients)")
                if batched:
                    alive = bool(host[-1])
                else:
                    alive = any(v > 0.0 for k, v in enumerate(w.tolist()) if not host[k])
                if not alive:
                    raise ValueError(f"{arg}: every client with a positive weight has non-finite values "
                                     f"(client(s) {bad}); nothing left to aggregate, global_params is unchanged")
                w2 = w.masked_fill(flags != 0, 0.0)
                call(mod, kind, Accum(rows, w2, torch.zeros_like(flags), P, out=out, g=g), extra)
            g.copy_(out)
        finally:
            give_back_scratch(out, key)
    if dropped is not None:
        dropped.extend(bad)
    return flags


# ---- the non-aggregation ops ------------------------------------------------------------------
def frequency_update(freq, masks, rank, sizes, backend: str, checked: bool = False) -> None:
    """``checked``: the caller has already found ``freq`` free of NaN."""
    if not checked:
        check_no_nan(freq, "freq")
    mod = resolve(backend or None, freq.device)
    with no_grad(), device_guard(freq.device):
        mod.frequency_update(freq, masks, rank, sizes)


def stable_argsort(freq: torch.Tensor, backend: str) -> torch.Tensor:
    if freq.is_floating_point():
        keys = torch.add(freq, 0.0)  # -0.0 -> +0.0: one key for both zeros (a new contiguous tensor)
        if not nan_free(keys):       # the NaN check reads the keys, not freq: one pass saved
            nan_error(keys, "freq")
    else:
        keys = freq
    mod = resolve(backend or None, freq.device)
    if freq.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=freq.device)
    with no_grad(), device_guard(freq.device):
        return mod.stable_argsort(keys if keys.is_contiguous() else keys.contiguous())


def nested_masks(order: torch.Tensor, sizes: torch.Tensor, backend: str) -> torch.Tensor:
    check_order_sizes(order, sizes)
    mod = resolve(backend or None, order.device)
    if sizes.numel() == 0:
        return torch.zeros(0, order.numel(), dtype=torch.bool, device=order.device)
    with no_grad(), device_guard(order.device):
        return mod.nested_masks(order, sizes)


def compact_pack(delta: torch.Tensor, segments: torch.Tensor, inv: torch.Tensor, seg_off: torch.Tensor,
                 seg_cols: torch.Tensor, length: int) -> torch.Tensor:
    """One client's compact values from its dense row ``delta`` [P] (pure torch gather)."""
    dev = delta.device
    out = torch.empty(length, dtype=delta.dtype, device=dev)
    if length == 0:
        return out
    seg_rows = segments.tolist()
    offs = seg_off.tolist()
    cols_k = seg_cols.tolist()
    inv64 = inv.to(torch.int64)
    for s, (off, rows, cols, inner, oo, io) in enumerate(seg_rows):
        so = offs[s]
        if so < 0:
            continue
        blk = delta[off:off + rows * cols * inner].view(rows, cols, inner)
        if oo >= 0:
            blk = blk.index_select(0, _local_order(inv64[oo:oo + rows]))
        if io >= 0:
            blk = blk.index_select(1, _local_order(inv64[io:io + cols]))
        n = blk.numel()
        assert blk.shape[1] == cols_k[s]
        out[so:so + n] = blk.reshape(-1)
    return out


def _local_order(inv_site: torch.Tensor) -> torch.Tensor:
    """Site-local neuron indices in local-position order (the inverse of ``inv`` on one site)."""
    keep = inv_site >= 0
    pos = inv_site[keep]
    idx = torch.arange(inv_site.numel(), device=inv_site.device)[keep]
    out = torch.empty_like(idx)
    out[pos] = idx
    return out
