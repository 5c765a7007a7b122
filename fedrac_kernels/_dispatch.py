"""Back-end selection, value checks and the non-finite policy, shared by api, library and streaming.

The public functions in :mod:`fedrac_kernels.api` check shapes, dtypes and devices and normalise
their arguments; the ``run_*`` functions here take those normalised tensors, check the *values*
that need reading (weights, NaN keys, permutations), pick the back end and apply the non-finite
policy. They are what the ``torch.library`` ops in :mod:`fedrac_kernels.library` execute, so the
value checks also hold inside a ``torch.compile``'d graph.
"""
from __future__ import annotations

import contextlib
import math
import inspect
import logging
import os
from typing import Optional

import torch

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
    """Forget cached back-end statuses (tests; after building a native module in-process)."""
    _status_cache.clear()
    _device_cache.clear()
    _resolve_cache.clear()
    _logged.clear()


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


def device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ---- value checks -----------------------------------------------------------------------------
def check_weight_values(w: torch.Tensor, name: str = "weights", allow_all_zero: bool = False) -> None:
    """ValueError if any weight is negative or non-finite, or all are zero (one host sync on GPUs)."""
    if w.device.type == "cpu":
        vals = w.tolist()
        bad = any(not (v >= 0.0 and v != math.inf) for v in vals)  # NaN fails v >= 0
        positive = any(v > 0.0 for v in vals)
    else:
        flags = torch.stack([((w < 0) | ~torch.isfinite(w)).any(), (w > 0).any()]).tolist()
        bad, positive = flags
    if bad:
        wc = w.detach().cpu()
        neg = (wc < 0).nonzero().flatten().tolist()
        nf = (~torch.isfinite(wc)).nonzero().flatten().tolist()
        if nf:
            raise ValueError(f"{name}: non-finite weight(s) at client(s) {nf}: {wc[nf].tolist()}")
        raise ValueError(f"{name}: negative weight(s) at client(s) {neg}: {wc[neg].tolist()}; weights must be >= 0")
    if not positive and not allow_all_zero:
        raise ValueError(f"{name}: all weights are zero; at least one client needs a positive weight")


def prepare_weights(w: torch.Tensor, device: torch.device, name: str = "weights", checked: bool = False) -> torch.Tensor:
    """Checked float32 contiguous weights on ``device`` (checked where they live: no sync for CPU)."""
    w = w.to(torch.float32)
    if not checked:
        check_weight_values(w, name)
    return w.to(device).contiguous()


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


def check_no_nan(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point():
        nan = torch.isnan(t)
        if bool(nan.any()):
            idx = nan.nonzero().flatten()[:8].tolist()
            raise ValueError(f"{name}: contains NaN (first at index {idx}); frequencies must be numbers")


def check_order_sizes(order: torch.Tensor, sizes: torch.Tensor) -> None:
    N = order.numel()
    if N > 0:
        lo, hi = order.min(), order.max()
        counts = torch.bincount(order.clamp(0, max(N - 1, 0)), minlength=N)
        ok = torch.stack([lo >= 0, hi < N, (counts == 1).all()]).tolist()
        if not all(ok):
            raise ValueError(f"order: not a permutation of 0..{N - 1}")
    if sizes.numel() > 0:
        if not bool(((sizes >= 0) & (sizes <= N)).all()):
            bad = ((sizes < 0) | (sizes > N)).nonzero().flatten().tolist()
            raise ValueError(f"sizes: every size must lie in [0, N={N}]; out of range at {bad}")


# ---- running an aggregation with the non-finite policy -----------------------------------------
def call(mod, kind: str, acc: Accum, extra: tuple) -> None:
    getattr(mod, kind)(acc, *extra)


def _check_policy(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite: expected one of {NONFINITE_POLICIES}, got {nonfinite!r}")


def finalize(kind: str, extra: tuple, g: torch.Tensor, rows: list, weights: torch.Tensor, backend: str,
             nonfinite: str, arg: str = "deltas", weights_checked: bool = False) -> torch.Tensor:
    """Run ``kind`` (dense / structured / compact) in finalize mode into ``g``; returns int32 flags [K].

    ``raise``: compute into a scratch buffer, raise naming the flagged clients (``g`` untouched) or
    copy the result into ``g``. ``drop``: re-run with the flagged clients' weights set to zero.
    ``assume_finite``: write ``g`` in place directly. The returned flags mark dropped clients.
    """
    _check_policy(nonfinite)
    device = g.device
    mod = resolve(backend or None, device)
    weights = prepare_weights(weights, device, checked=weights_checked)
    K, P = len(rows), g.numel()
    flags = torch.zeros(K, dtype=torch.int32, device=device)
    if P == 0:
        return flags
    with no_grad(), device_guard(device):
        if nonfinite == "assume_finite":
            call(mod, kind, Accum(rows, weights, flags, P, out=g, g=g), extra)
            return flags
        out = torch.empty_like(g)
        call(mod, kind, Accum(rows, weights, flags, P, out=out, g=g), extra)
        bad = flags.nonzero().flatten().tolist()
        if bad:
            if nonfinite == "raise":
                raise ValueError(f"{arg}: non-finite values (NaN/Inf) on active elements of client(s) {bad}; "
                                 f"global_params is unchanged (nonfinite='drop' excludes such clients)")
            w2 = weights.clone()
            w2[bad] = 0
            if not bool((w2 > 0).any()):
                raise ValueError(f"{arg}: every client with a positive weight has non-finite values "
                                 f"(client(s) {bad}); nothing left to aggregate, global_params is unchanged")
            call(mod, kind, Accum(rows, w2, torch.zeros_like(flags), P, out=out, g=g), extra)
        g.copy_(out)
    return flags


# ---- the non-aggregation ops ------------------------------------------------------------------
def frequency_update(freq, masks, rank, sizes, backend: str) -> None:
    check_no_nan(freq, "freq")
    mod = resolve(backend or None, freq.device)
    with no_grad(), device_guard(freq.device):
        mod.frequency_update(freq, masks, rank, sizes)


def stable_argsort(freq: torch.Tensor, backend: str) -> torch.Tensor:
    check_no_nan(freq, "freq")
    mod = resolve(backend or None, freq.device)
    if freq.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=freq.device)
    keys = freq + 0 if freq.is_floating_point() else freq  # -0.0 -> +0.0: one key for both zeros
    with no_grad(), device_guard(freq.device):
        return mod.stable_argsort(keys.contiguous())


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
