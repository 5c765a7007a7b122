"""StreamingAggregator: the masked mean over clients that arrive one by one or in chunks.

For K too large to hold all updates at once (1000 clients x 10^8 parameters = 400 GB), keep only
the float32 numerator and denominator of the masked mean (O(P) state)::

    num[p] = sum_k w_k a_kp d_kp        den[p] = sum_k w_k a_kp        (client order, float32)
    apply_(g):  g[p] += num[p] / den[p]  where den[p] > 0

Every ``add`` continues the back end's accumulation from the current state (the protocol's
``init_num/init_den -> acc_num/acc_den``), so the result equals the batched call over the same
clients in the same order **bit for bit**, however the clients were chunked.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import _dispatch
from .api import (check_backend_arg, check_global, check_layout, check_nonfinite, kept_for_one, masks_of,
                  neuron_masks_of, rows_of, weights_of)
from .backends import Accum
from .layout import NeuronLayout

__all__ = ["StreamingAggregator"]

_ALIGN_BYTES = 16


class StreamingAggregator:
    r"""Accumulates clients' masked updates in O(P) memory; ``apply_`` writes the masked mean.

    .. math::

        \mathrm{num}_p \mathrel{+}= w_k a_{kp} d_{kp},\quad
        \mathrm{den}_p \mathrel{+}= w_k a_{kp}\quad(\text{per added client, in order});\qquad
        g_p \mathrel{+}= \mathrm{num}_p / \mathrm{den}_p \text{ where } \mathrm{den}_p > 0

    Example (the three clients of :func:`masked_mean_update_`'s example, streamed)::

        >>> agg = StreamingAggregator(4)
        >>> agg.add(torch.tensor([1., 0., 2., 0.]))
        >>> agg.add(torch.tensor([[3., 0., 0., 0.], [2., 4., 0., 0.]]))   # a chunk of two
        >>> agg.apply_(torch.zeros(4))
        tensor([2., 4., 2., 0.])

    Args:
        global_params_or_P: the float32 [P] global parameters (gives P and the device; not kept)
            or the number of parameters P.
        layout: :class:`NeuronLayout` for ``add_structured`` / ``add_compact``.
        device: where the state lives (default: the global parameters' device, or CPU).
        backend: as in :func:`masked_mean_update_` (checked now).
        nonfinite: "raise" (a chunk with NaN/Inf on active elements raises and leaves the state
            untouched), "drop" (those clients are skipped, warned about and listed in ``dropped``)
            or "assume_finite" (accumulate in place, no check).
        transfer_bytes: when the state is on a CUDA device and a chunk arrives on the CPU, it is
            copied in pieces of about this many bytes on a side stream, double buffered through
            pinned memory, so the copy of piece i+1 overlaps the accumulation of piece i.

    Attributes: ``clients`` (number of clients accumulated, dropped ones excluded), ``dropped``
    (positions, in arrival order over all offered clients, of the dropped clients), ``P``,
    ``device``.
    """

    def __init__(self, global_params_or_P, *, layout: Optional[NeuronLayout] = None, device=None,
                 backend: Optional[str] = None, nonfinite: str = "raise", transfer_bytes: int = 64 << 20):
        if isinstance(global_params_or_P, torch.Tensor):
            g = check_global(global_params_or_P)
            P = g.numel()
            dev = torch.device(device) if device is not None else g.device
        elif isinstance(global_params_or_P, int) and not isinstance(global_params_or_P, bool):
            P = int(global_params_or_P)
            if P < 0:
                raise ValueError(f"global_params_or_P: P must be >= 0, got {P}")
            dev = torch.device(device) if device is not None else torch.device("cpu")
        else:
            raise TypeError(f"global_params_or_P: expected a float32 tensor [P] or an int P, got "
                            f"{type(global_params_or_P).__name__}")
        if layout is not None:
            check_layout(layout, P, "global_params_or_P")
        check_backend_arg(backend)
        check_nonfinite(nonfinite)
        if isinstance(transfer_bytes, bool) or not isinstance(transfer_bytes, int) or transfer_bytes <= 0:
            raise ValueError(f"transfer_bytes: expected a positive int, got {transfer_bytes!r}")
        self._P = P
        self._device = dev
        self._layout = layout
        self._backend_name = backend
        self._mod = _dispatch.resolve(backend, dev)  # an unusable back end fails here, not later
        self._nonfinite = nonfinite
        self._transfer_bytes = transfer_bytes
        self._num = torch.zeros(P, dtype=torch.float32, device=dev)
        self._den = torch.zeros(P, dtype=torch.float32, device=dev)
        self._spare: Optional[tuple] = None
        self._clients = 0
        self._positive = 0
        self._seen = 0
        self._dropped: list = []
        self._pipe: Optional[_HostToDevice] = None
        self._force_pipeline = False  # tests: route same-device chunks through the piece pipeline

    # ---- properties ---------------------------------------------------------------------------
    @property
    def P(self) -> int:
        return self._P

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def layout(self) -> Optional[NeuronLayout]:
        return self._layout

    @property
    def clients(self) -> int:
        return self._clients

    @property
    def dropped(self) -> list:
        return list(self._dropped)

    def __repr__(self) -> str:
        return (f"StreamingAggregator(P={self._P}, device={self._device}, clients={self._clients}, "
                f"dropped={len(self._dropped)})")

    # ---- adding clients -----------------------------------------------------------------------
    def add(self, delta, weight=1.0, mask=None) -> None:
        """Add one client (``delta`` [P]) or a chunk (``[Kc, P]`` or a list of Kc rows).

        ``weight``: a number (every client of the chunk) or Kc numbers. ``mask``: None (non-zero
        rule: active iff delta != 0), bool [P] for one client, bool [Kc, P] or a list of Kc rows.
        """
        single = isinstance(delta, torch.Tensor) and delta.dim() == 1
        src = self._source_device(delta, "delta")
        rows = rows_of(delta[None] if single else delta, "delta", self._P, src)
        K = len(rows)
        if single and isinstance(mask, torch.Tensor) and mask.dim() == 1:
            mask = mask[None]
        masks = masks_of(mask, K, self._P, src, name="mask")
        w = self._weights(weight, K)
        groups = [(r, m) for r, m in zip(rows, masks)] if masks else [(r,) for r in rows]

        def extra(a, b, dev_groups):
            return ([g[1] for g in dev_groups] if masks else None,)

        self._accumulate("dense", groups, w, extra, "delta")

    def add_structured(self, delta, neuron_mask, weight=1.0, rule: str = "structural") -> None:
        """Add clients whose masks come from neuron gates (needs ``layout``).

        ``neuron_mask``: bool [N] (one client), bool [Kc, N] or :class:`NestedMasks`. ``rule`` as
        in :func:`structured_mean_update_`.
        """
        lay = self._need_layout("add_structured")
        single = isinstance(delta, torch.Tensor) and delta.dim() == 1
        src = self._source_device(delta, "delta")
        rows = rows_of(delta[None] if single else delta, "delta", self._P, src)
        K = len(rows)
        if isinstance(neuron_mask, torch.Tensor) and neuron_mask.dim() == 1:
            neuron_mask = neuron_mask[None]
        if isinstance(neuron_mask, torch.Tensor) and neuron_mask.device != self._device:
            if neuron_mask.device != src:
                raise ValueError(f"neuron_mask: on {neuron_mask.device}, but delta is on {src}")
            neuron_mask = neuron_mask.to(self._device)
        nm, rank, sizes = neuron_masks_of(neuron_mask, K, lay.N, self._device, name="neuron_mask")
        if rule not in ("structural", "nonzero"):
            raise ValueError(f"rule: expected 'structural' or 'nonzero', got {rule!r}")
        w = self._weights(weight, K)
        segs = lay.segment_table(self._device)
        nonzero = rule == "nonzero"

        def extra(a, b, dev_groups):
            return (segs, lay.N, nm[a:b] if nm is not None else None, rank,
                    sizes[a:b] if sizes is not None else None, nonzero)

        self._accumulate("structured", [(r,) for r in rows], w, extra, "delta")

    def add_compact(self, values, kept, weight=1.0) -> None:
        """Add compact uploads (see :func:`compact_mean_update_`; needs ``layout``).

        ``values``: one client's 1-D values with its ``kept`` (bool [N], index tensor/list,
        NestedMasks K=1), or a list of Kc value tensors with bool [Kc, N] / NestedMasks / a list of
        Kc index tensors.
        """
        lay = self._need_layout("add_compact")
        single = isinstance(values, torch.Tensor)
        if single and values.dim() != 1:
            raise ValueError(f"values: expected one client's 1-D values or a list of them, got shape {tuple(values.shape)}")
        tables = lay.compact_tables(kept_for_one(kept) if single else kept, device=self._device)
        vals = [values] if single else values
        if isinstance(vals, (list, tuple)) and len(vals) != tables.K:
            raise ValueError(f"values: {len(vals)} uploads, but kept describes {tables.K} clients")
        src = self._source_device(vals, "values")
        rows = rows_of(vals, "values", None, src, lengths=tables.lengths)
        K = len(rows)
        w = self._weights(weight, K)
        segs = lay.segment_table(self._device)

        def extra(a, b, dev_groups):
            return (segs, lay.N, tables.inv[a:b], tables.seg_off[a:b], tables.seg_cols[a:b])

        self._accumulate("compact", [(r,) for r in rows], w, extra, "values")

    # ---- result, state ------------------------------------------------------------------------
    def apply_(self, global_params: torch.Tensor) -> torch.Tensor:
        """``g[p] += num[p] / den[p]`` where ``den[p] > 0`` (in place; the state is kept)."""
        g = check_global(global_params)
        if g.numel() != self._P:
            raise ValueError(f"global_params: has {g.numel()} elements, the aggregator has P={self._P}")
        if g.device != self._device:
            raise ValueError(f"global_params: on {g.device}, the aggregator state is on {self._device}")
        if self._clients == 0:
            raise ValueError("clients: no client has been added (K = 0); nothing to apply")
        if self._positive == 0:
            raise ValueError("weights: every client added so far has weight 0 (or was dropped); at least one "
                             "client needs a positive weight")
        with _dispatch.no_grad():
            # the back ends' finalize, op for op (IEEE division, then addition), with few temporaries
            pos = self._den > 0
            t = torch.where(pos, self._den, torch.ones((), dtype=torch.float32, device=self._device))
            torch.div(self._num, t, out=t)
            t.add_(g)
            g.copy_(torch.where(pos, t, g))
        return global_params

    def reset(self) -> None:
        """Forget every client (state back to zero)."""
        self._num.zero_()
        self._den.zero_()
        self._clients = self._positive = self._seen = 0
        self._dropped = []

    def state_dict(self) -> dict:
        """A checkpoint of the state (tensors cloned)."""
        return {"P": self._P, "num": self._num.clone(), "den": self._den.clone(), "clients": self._clients,
                "positive": self._positive, "seen": self._seen, "dropped": list(self._dropped)}

    def load_state_dict(self, sd: dict) -> None:
        """Restore a :meth:`state_dict` (validated first; the state is untouched on error)."""
        if not isinstance(sd, dict):
            raise TypeError(f"sd: expected a dict, got {type(sd).__name__}")
        missing = [k for k in ("P", "num", "den", "clients", "positive", "seen", "dropped") if k not in sd]
        if missing:
            raise ValueError(f"sd: missing key(s) {missing}")
        if int(sd["P"]) != self._P:
            raise ValueError(f"sd: saved with P={sd['P']}, this aggregator has P={self._P}")
        for key in ("num", "den"):
            t = sd[key]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                raise TypeError(f"sd: {key!r} must be a float32 tensor")
            if t.shape != (self._P,):
                raise ValueError(f"sd: {key!r} has shape {tuple(t.shape)}, expected [{self._P}]")
        with torch.no_grad():
            self._num.copy_(sd["num"])
            self._den.copy_(sd["den"])
        self._clients, self._positive, self._seen = int(sd["clients"]), int(sd["positive"]), int(sd["seen"])
        self._dropped = [int(i) for i in sd["dropped"]]

    # ---- internals ----------------------------------------------------------------------------
    def _need_layout(self, what: str) -> NeuronLayout:
        if self._layout is None:
            raise ValueError(f"layout: {what} needs the aggregator to be built with layout=")
        return self._layout

    def _source_device(self, x, name: str) -> torch.device:
        if isinstance(x, torch.Tensor):
            dev = x.device
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
            dev = x[0].device
        else:
            return self._device  # rows_of reports the real problem
        if dev == self._device or (dev.type == "cpu" and self._device.type == "cuda"):
            return dev
        raise ValueError(f"{name}: on {dev}, but the aggregator state is on {self._device}")

    def _weights(self, weight, K: int) -> torch.Tensor:
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            weight = [float(weight)] * K
        w = weights_of(weight, K, check=False, name="weight")[0].to("cpu")
        _dispatch.check_weight_values(w, "weight", allow_all_zero=True)
        return w

    def _spare_pair(self) -> tuple:
        if self._spare is None:
            self._spare = (torch.empty_like(self._num), torch.empty_like(self._den))
        return self._spare

    def _run(self, kind, groups, w_dev, flags, extra, init, acc) -> None:
        """One pass over the chunk: init -> acc, piecewise through the pipeline when copying."""
        P = self._P
        via_pipe = self._force_pipeline or groups[0][0].device != self._device
        with _dispatch.no_grad(), _dispatch.device_guard(self._device):
            if not via_pipe:
                a = Accum([g[0] for g in groups], w_dev, flags, P, init_num=init[0], init_den=init[1],
                          acc_num=acc[0], acc_den=acc[1])
                _dispatch.call(self._mod, kind, a, extra(0, len(groups), groups))
                return
            if self._pipe is None:
                self._pipe = _HostToDevice(self._device, self._transfer_bytes)
            state = {"first": True}

            def consume(a, b, dev_groups):
                src = init if state["first"] else acc
                state["first"] = False
                accum = Accum([g[0] for g in dev_groups], w_dev[a:b], flags[a:b], P, init_num=src[0],
                              init_den=src[1], acc_num=acc[0], acc_den=acc[1])
                _dispatch.call(self._mod, kind, accum, extra(a, b, dev_groups))

            self._pipe.run(groups, consume)

    def _accumulate(self, kind: str, groups: list, w_cpu: torch.Tensor, extra, name: str) -> None:
        K = len(groups)
        dev = self._device
        w_dev = w_cpu.to(dev)
        flags = torch.zeros(K, dtype=torch.int32, device=dev)
        if self._P == 0:
            bad = []
        elif self._nonfinite == "assume_finite":
            self._run(kind, groups, w_dev, flags, extra, (self._num, self._den), (self._num, self._den))
            bad = []
        else:
            tgt = self._spare_pair()
            self._run(kind, groups, w_dev, flags, extra, (self._num, self._den), tgt)
            bad = flags.nonzero().flatten().tolist()
            if bad:
                if self._nonfinite == "raise":
                    raise ValueError(f"{name}: non-finite values (NaN/Inf) on active elements of client(s) {bad} "
                                     f"of this chunk; the aggregator state is unchanged (nonfinite='drop' "
                                     f"excludes such clients)")
                w_cpu = w_cpu.clone()
                w_cpu[bad] = 0
                w_dev = w_cpu.to(dev)
                self._run(kind, groups, w_dev, torch.zeros_like(flags), extra, (self._num, self._den), tgt)
                stream_idx = [self._seen + b for b in bad]
                warnings.warn(f"StreamingAggregator: dropped client(s) {stream_idx} (chunk position(s) {bad}): "
                              f"non-finite values on active elements", RuntimeWarning, stacklevel=3)
                self._dropped.extend(stream_idx)
            # accept: the fresh buffers become the state, the old state the spare
            self._spare = (self._num, self._den)
            self._num, self._den = tgt
        self._seen += K
        self._clients += K - len(bad)
        self._positive += int((w_cpu > 0).sum())


class _HostToDevice:
    """Copies chunks of host rows to the device in pieces, overlapping copy and accumulation.

    Pieces are runs of consecutive clients of about ``piece_bytes``. Piece i uses buffer pair
    ``j = i % 2`` (pinned host staging + device buffer): the host stages piece i+1 while the side
    stream copies piece i and the compute stream accumulates piece i-1. Events order the reuse:
    the side stream waits until the compute stream has consumed buffer j before overwriting it, the
    host waits until the side stream has copied out of staging j before restaging it. Each row is
    placed at a 16-byte aligned offset. On a CPU device (tests) the same piece logic runs with
    plain copies and no streams.
    """

    def __init__(self, device: torch.device, piece_bytes: int):
        self.device = device
        self.piece_bytes = piece_bytes
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._dev = ({}, {})
        self._host = ({}, {})
        self._copied = [None, None]
        self._consumed = [None, None]

    @staticmethod
    def pieces(nbytes: list, budget: int) -> list:
        """Runs [a, b) of consecutive clients with at most ``budget`` bytes (at least one client)."""
        out, a, acc = [], 0, 0
        for k, n in enumerate(nbytes):
            if k > a and acc + n > budget:
                out.append((a, k))
                a, acc = k, 0
            acc += n
        if a < len(nbytes):
            out.append((a, len(nbytes)))
        return out

    @staticmethod
    def _aligned(n: int, itemsize: int) -> int:
        step = max(1, _ALIGN_BYTES // itemsize)
        return (n + step - 1) // step * step

    def _buffer(self, store: dict, dtype: torch.dtype, n: int, pinned: bool) -> tuple:
        """(buffer of >= n elements, whether it was freshly allocated)."""
        t = store.get(dtype)
        if t is not None and t.numel() >= n:
            return t, False
        if pinned:
            try:
                t = torch.empty(n, dtype=dtype, pin_memory=True)
            except RuntimeError:
                t = torch.empty(n, dtype=dtype)
        else:
            t = torch.empty(n, dtype=dtype, device=self.device)
        store[dtype] = t
        return t, True

    def run(self, groups: list, consume) -> None:
        """``groups[k]``: tuple of host 1-D tensors of client k; ``consume(a, b, dev_groups)`` runs on
        the current stream for each piece with device views of clients a..b-1."""
        nbytes = [sum(t.numel() * t.element_size() for t in g) for g in groups]
        try:
            for i, (a, b) in enumerate(self.pieces(nbytes, self.piece_bytes)):
                j = i % 2
                chunk = groups[a:b]
                # layout of the piece in per-dtype flat buffers
                need: dict = {}
                places = []
                for g in chunk:
                    pl = []
                    for t in g:
                        o = need.get(t.dtype, 0)
                        pl.append((t.dtype, o, t.numel()))
                        need[t.dtype] = self._aligned(o + t.numel(), t.element_size())
                    places.append(pl)
                dev_bufs, fresh = {}, False
                for dt, n in need.items():
                    dev_bufs[dt], f = self._buffer(self._dev[j], dt, max(n, 1), pinned=False)
                    fresh = fresh or f
                if not self.cuda:
                    for g, pl in zip(chunk, places):
                        for t, (dt, o, n) in zip(g, pl):
                            dev_bufs[dt][o:o + n].copy_(t)
                    consume(a, b, self._views(dev_bufs, places))
                    continue
                # host side: wait until staging j has been copied out, then stage (unless pinned)
                if self._copied[j] is not None:
                    self._copied[j].synchronize()
                host_need = {}
                for g, pl in zip(chunk, places):
                    for t, (dt, o, n) in zip(g, pl):
                        if not t.is_pinned():
                            host_need[dt] = max(host_need.get(dt, 0), o + n)
                host_bufs = {dt: self._buffer(self._host[j], dt, n, pinned=True)[0] for dt, n in host_need.items()}
                srcs = []
                for g, pl in zip(chunk, places):
                    for t, (dt, o, n) in zip(g, pl):
                        if t.is_pinned():
                            srcs.append((t, dt, o, n))
                        else:
                            host_bufs[dt][o:o + n].copy_(t)
                            srcs.append((host_bufs[dt][o:o + n], dt, o, n))
                # side stream: wait until device buffer j is consumed, then copy. A freshly allocated
                # buffer may reuse memory the compute stream freed but has not finished reading (the
                # caching allocator orders reuse on the allocating stream only): wait for it all.
                cur = torch.cuda.current_stream(self.device)
                with torch.cuda.stream(self.stream):
                    if fresh:
                        self.stream.wait_stream(cur)
                    elif self._consumed[j] is not None:
                        self.stream.wait_event(self._consumed[j])
                    for t, dt, o, n in srcs:
                        dev_bufs[dt][o:o + n].copy_(t, non_blocking=True)
                    for buf in dev_bufs.values():  # freeing a grown-out buffer must wait for both streams
                        buf.record_stream(self.stream)
                        buf.record_stream(cur)
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                    self._copied[j] = ev
                cur.wait_event(self._copied[j])
                consume(a, b, self._views(dev_bufs, places))
                done = torch.cuda.Event()
                done.record(cur)
                self._consumed[j] = done
        finally:
            # the caller may reuse its host rows (and we our staging) once the copies are done
            for ev in self._copied:
                if ev is not None:
                    ev.synchronize()

    @staticmethod
    def _views(bufs: dict, places: list) -> list:
        return [tuple(bufs[dt][o:o + n] for dt, o, n in pl) for pl in places]
