"""Public ops of ``fedrac_kernels``: validation -> normalisation -> dispatch -> back end.

Every function checks all of its arguments (shape, dtype, device, contiguity, values) *before*
anything is written, and raises ``TypeError`` (wrong type / dtype) or ``ValueError`` (anything else)
with a message that starts with the argument's name. Back ends then get the normalised form of the
protocol in :mod:`fedrac_kernels.backends`: lists of contiguous 1-D rows, float32 weights, bool
masks, int32 rank/sizes, index tables.

Notation: ``P`` parameters, ``K`` clients, ``N`` maskable neurons, ``w_k`` client weights,
``d_kp`` client k's update of parameter p, ``a_kp`` in {0, 1} whether client k is *active* on p.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import _dispatch, library
from . import layout as _layout
from .backends import StackedRows, storage_address
from .layout import CompactTables, NestedMasks, NeuronLayout

__all__ = [
    "masked_mean_update_",
    "structured_mean_update_",
    "compact_pack",
    "compact_mean_update_",
    "frequency_update_",
    "lowest_frequency_order",
    "nested_masks",
    "available_backends",
    "backend_report",
]

UPDATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FREQ_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)
RULES = ("structural", "nonzero")

available_backends = _dispatch.available_backends
backend_report = _dispatch.backend_report


# ================================================================================================
# argument normalisation (shared with streaming.py)
# ================================================================================================
def _dtype_list(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_global(g, name: str = "global_params") -> torch.Tensor:
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name}: expected a float32 tensor [P], got {type(g).__name__}")
    if g.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype float32, got {g.dtype}")
    if g.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [P], got shape {tuple(g.shape)}")
    if not g.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")
    return g


def check_backend_arg(backend) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a back-end name (str) or None, got {type(backend).__name__}")


def check_nonfinite(nonfinite) -> None:
    if nonfinite not in _dispatch.NONFINITE_POLICIES:
        raise ValueError(f"nonfinite: expected one of {_dispatch.NONFINITE_POLICIES}, got {nonfinite!r}")


def check_report(report) -> None:
    if report is not None and not isinstance(report, dict):
        raise TypeError(f"report: expected a dict or None, got {type(report).__name__}")


def rows_of(deltas, name: str, P: Optional[int], device: torch.device, lengths=None):
    """K contiguous 1-D rows of one update dtype on ``device``: a list, or for a [K, P] tensor a
    :class:`~fedrac_kernels.backends.StackedRows` (a sequence of its rows, views made on demand).

    ``P``: every row's length (dense); ``lengths``: per-row lengths (compact uploads) instead.
    """
    if isinstance(deltas, torch.Tensor):
        if deltas.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [K, P] or a list of K 1-D tensors, got shape "
                             f"{tuple(deltas.shape)}")
        if deltas.dtype not in UPDATE_DTYPES:
            raise TypeError(f"{name}: dtype {deltas.dtype} is not supported; use one of {_dtype_list(UPDATE_DTYPES)}")
        if deltas.shape[0] == 0:
            raise ValueError(f"{name}: no clients (K = 0)")
        if deltas.device != device:
            raise ValueError(f"{name}: on {deltas.device}, but global_params is on {device}")
        if lengths is not None:
            lens = set(int(n) for n in lengths)
            if len(lens) != 1 or deltas.shape[1] not in lens:
                raise ValueError(f"{name}: a [K, L] tensor needs every client to send L={deltas.shape[1]} values; "
                                 f"expected lengths {list(lengths)}")
        elif deltas.shape[1] != P:
            raise ValueError(f"{name}: expected shape [K, P={P}], got {tuple(deltas.shape)}")
        return StackedRows(deltas)  # rows made contiguous; their views only when someone needs them
    if not isinstance(deltas, (list, tuple)):
        raise TypeError(f"{name}: expected a 2-D tensor [K, P] or a list of K 1-D tensors, got {type(deltas).__name__}")
    if len(deltas) == 0:
        raise ValueError(f"{name}: no clients (K = 0)")
    dtype = None
    for k, r in enumerate(deltas):
        if not isinstance(r, torch.Tensor):
            raise TypeError(f"{name}: entry {k} is a {type(r).__name__}, expected a 1-D tensor")
        if r.dtype not in UPDATE_DTYPES:
            raise TypeError(f"{name}: entry {k} has dtype {r.dtype}; use one of {_dtype_list(UPDATE_DTYPES)}")
        if dtype is None:
            dtype = r.dtype
        elif r.dtype != dtype:
            raise TypeError(f"{name}: entry {k} has dtype {r.dtype} but entry 0 has {dtype}; all clients need one dtype")
        if r.dim() != 1:
            raise ValueError(f"{name}: entry {k} has shape {tuple(r.shape)}, expected a 1-D tensor")
        want = P if lengths is None else int(lengths[k])
        if r.numel() != want:
            what = f"P={P}" if lengths is None else f"{want} values for its kept neurons"
            raise ValueError(f"{name}: entry {k} has {r.numel()} elements, expected {what}")
        if r.device != device:
            raise ValueError(f"{name}: entry {k} is on {r.device}, but global_params is on {device}")
        if not r.is_contiguous():
            raise ValueError(f"{name}: entry {k} is not contiguous (call .contiguous())")
    return list(deltas)


_ONES: dict = {}
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def weights_of(weights, K: int, device: Optional[torch.device] = None, check: bool = True,
               name: str = "weights", tracing: bool = False) -> tuple:
    """(float32 [K] weights, whether their values were checked).

    None gives ones on ``device`` (nothing to check); a sequence is checked on the host now (when
    ``check``); a tensor's values are checked by the op, where the tensor lives. ``tracing``
    (compile / fake tensors): build fresh tensors and leave every value check to the op.
    """
    if weights is None:
        if tracing:
            return torch.ones(K, dtype=torch.float32, device=device), True
        key = (K, str(device))
        t = _ONES.get(key)
        if t is None:
            t = _ONES[key] = torch.ones(K, dtype=torch.float32, device=device)
        return t, True
    if isinstance(weights, torch.Tensor):
        if weights.dtype == torch.bool or weights.is_complex() or not (weights.is_floating_point() or
                                                                       weights.dtype in _INT_DTYPES):
            raise TypeError(f"{name}: expected real numbers, got dtype {weights.dtype}")
        if weights.dim() != 1 or weights.numel() != K:
            raise ValueError(f"{name}: expected K={K} values, got shape {tuple(weights.shape)}")
        return weights.to(torch.float32), False
    if isinstance(weights, (str, bytes)):
        raise TypeError(f"{name}: expected a tensor or a sequence of K numbers, got {type(weights).__name__}")
    try:
        vals = list(weights)
    except TypeError:
        raise TypeError(f"{name}: expected a tensor or a sequence of K numbers, got {type(weights).__name__}") from None
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not (isinstance(v, torch.Tensor) and v.numel() == 1):
            raise TypeError(f"{name}: expected numbers, got {type(v).__name__} ({v!r})")
    if len(vals) != K:
        raise ValueError(f"{name}: expected K={K} values, got {len(vals)}")
    t = torch.tensor([float(v) for v in vals], dtype=torch.float32)
    if check and not tracing:
        _dispatch.check_weight_values(t, name)
        return t, True
    return t, False


def masks_of(masks, K: int, P: int, device: torch.device, name: str = "masks") -> list:
    """[] for None (the non-zero rule), else K contiguous bool rows [P] on ``device``."""
    if masks is None:
        return []
    if isinstance(masks, torch.Tensor):
        if masks.dtype != torch.bool:
            raise TypeError(f"{name}: expected dtype torch.bool, got {masks.dtype}")
        if masks.dim() != 2 or masks.shape[0] != K or masks.shape[1] != P:
            raise ValueError(f"{name}: expected shape [K={K}, P={P}], got {tuple(masks.shape)}")
        if masks.device != device:
            raise ValueError(f"{name}: on {masks.device}, but global_params is on {device}")
        if P > 1 and masks.stride(1) != 1:
            masks = masks.contiguous()
        return list(masks.unbind(0))
    if not isinstance(masks, (list, tuple)):
        raise TypeError(f"{name}: expected None, a bool tensor [K, P] or a list of K bool tensors [P], got {type(masks).__name__}")
    if len(masks) != K:
        raise ValueError(f"{name}: expected K={K} masks, got {len(masks)}")
    for k, m in enumerate(masks):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name}: entry {k} is a {type(m).__name__}, expected a bool tensor [P]")
        if m.dtype != torch.bool:
            raise TypeError(f"{name}: entry {k} has dtype {m.dtype}, expected torch.bool")
        if m.dim() != 1 or m.numel() != P:
            raise ValueError(f"{name}: entry {k} has shape {tuple(m.shape)}, expected [P={P}]")
        if m.device != device:
            raise ValueError(f"{name}: entry {k} is on {m.device}, but global_params is on {device}")
        if not m.is_contiguous():
            raise ValueError(f"{name}: entry {k} is not contiguous (call .contiguous())")
    return list(masks)


def check_layout(layout, P: int, name: str = "global_params") -> NeuronLayout:
    if not isinstance(layout, NeuronLayout):
        raise TypeError(f"layout: expected a NeuronLayout, got {type(layout).__name__}")
    if layout.P != P:
        raise ValueError(f"layout: describes P={layout.P} parameters, but {name} has {P}")
    return layout


def neuron_masks_of(neuron_masks, K: Optional[int], N: int, device: torch.device, name: str = "neuron_masks"):
    """(neuron_masks bool [K, N] | None, rank int32 [N] | None, sizes int32 [K] | None)."""
    if isinstance(neuron_masks, NestedMasks):
        if neuron_masks.N != N:
            raise ValueError(f"{name}: NestedMasks has N={neuron_masks.N}, the layout has N={N}")
        if K is not None and neuron_masks.K != K:
            raise ValueError(f"{name}: NestedMasks has K={neuron_masks.K} clients, expected {K}")
        if neuron_masks.K == 0:
            raise ValueError(f"{name}: no clients (K = 0)")
        nm = neuron_masks.to(device)
        return None, nm.rank, nm.sizes
    if isinstance(neuron_masks, (list, tuple)) and neuron_masks and all(isinstance(m, torch.Tensor) for m in neuron_masks):
        if any(m.dtype != torch.bool for m in neuron_masks):
            raise TypeError(f"{name}: expected bool tensors [N]")
        if any(m.shape != (N,) for m in neuron_masks):
            raise ValueError(f"{name}: every entry must have shape [N={N}]")
        if any(m.device != device for m in neuron_masks):
            raise ValueError(f"{name}: every entry must be on {device}")
        neuron_masks = torch.stack(list(neuron_masks))
    if not isinstance(neuron_masks, torch.Tensor):
        raise TypeError(f"{name}: expected a bool tensor [K, N] or NestedMasks, got {type(neuron_masks).__name__}")
    if neuron_masks.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {neuron_masks.dtype}")
    if neuron_masks.dim() != 2 or neuron_masks.shape[1] != N or (K is not None and neuron_masks.shape[0] != K):
        want = f"[K={K}, N={N}]" if K is not None else f"[K, N={N}]"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(neuron_masks.shape)}")
    if neuron_masks.shape[0] == 0:
        raise ValueError(f"{name}: no clients (K = 0)")
    if neuron_masks.device != device:
        raise ValueError(f"{name}: on {neuron_masks.device}, but global_params is on {device}")
    return neuron_masks.contiguous(), None, None


def use_ops_rows(g: torch.Tensor, rows) -> bool:
    """:func:`library.use_ops` for ``g`` and the rows (a [K, L] tensor's rows have its type)."""
    if isinstance(rows, StackedRows):
        return library.use_ops(g, rows.base)
    return library.use_ops(g, *rows)


def check_no_alias(g: torch.Tensor, rows: list, name: str) -> None:
    """ValueError when an input row overlaps ``g`` (the in-place update would read its own output).

    Call only with real tensors (not while tracing)."""
    gs = storage_address(g)
    if gs is None:
        return
    glo = g.data_ptr()
    ghi = glo + g.numel() * g.element_size()
    if isinstance(rows, StackedRows):  # one test for the whole [K, L] span; the rows only if it overlaps
        b = rows.base
        if b.numel() == 0 or storage_address(b) != gs:
            return
        lo = b.data_ptr()
        hi = lo + ((b.shape[0] - 1) * b.stride(0) + b.shape[1]) * b.element_size()
        if not (lo < ghi and glo < hi):
            return
    for k, r in enumerate(rows):
        rs = storage_address(r)
        if rs is None:
            return
        if rs != gs:
            continue
        lo = r.data_ptr()
        hi = lo + r.numel() * r.element_size()
        if lo < ghi and glo < hi:
            raise ValueError(f"{name}: entry {k} overlaps global_params in memory; pass a separate buffer")


def after_aggregation(flags: torch.Tensor, nonfinite: str, report, what: str, dropped: Optional[list] = None) -> None:
    """Warn about and report dropped clients (``nonfinite="drop"``). ``dropped``: their indices as
    the eager path already read them (else they are read from ``flags``)."""
    if nonfinite != "drop":
        dropped = []
    elif dropped is None:
        dropped = flags.nonzero().flatten().tolist()
    if nonfinite == "drop":
        if dropped:
            warnings.warn(f"{what}: dropped client(s) {dropped}: non-finite values on active elements",
                          RuntimeWarning, stacklevel=3)
    if report is not None:
        report["dropped_clients"] = dropped


def kept_for_one(kept, name: str = "kept"):
    """Turn one client's kept neurons (bool [N], index list/tensor, NestedMasks K=1) into the K=1 form."""
    if isinstance(kept, NestedMasks):
        if kept.K != 1:
            raise ValueError(f"{name}: NestedMasks for one client must have K=1, got K={kept.K}")
        return kept
    if isinstance(kept, torch.Tensor):
        if kept.dtype == torch.bool:
            if kept.dim() == 1:
                return kept[None]
            if kept.dim() == 2 and kept.shape[0] == 1:
                return kept
            raise ValueError(f"{name}: expected one client's bool mask [N], got shape {tuple(kept.shape)}")
        if kept.dim() != 1:
            raise ValueError(f"{name}: expected one client's 1-D index tensor, got shape {tuple(kept.shape)}")
        return [kept]
    if isinstance(kept, (list, tuple)):
        if len(kept) == 1 and isinstance(kept[0], torch.Tensor) and kept[0].dim() == 1:
            return [kept[0]]
        return [list(kept)]
    raise TypeError(f"{name}: expected a bool tensor [N], an index tensor/list or NestedMasks, got {type(kept).__name__}")


# ================================================================================================
# aggregation
# ================================================================================================
def masked_mean_update_(global_params: torch.Tensor, deltas, *, weights=None, masks=None,
                        backend: Optional[str] = None, nonfinite: str = "raise",
                        report: Optional[dict] = None) -> torch.Tensor:
    r"""Per-element weighted mean of the clients' updates over the clients active there, in place.

    .. math::

        g_p \mathrel{+}= \frac{\sum_k w_k a_{kp} d_{kp}}{\sum_k w_k a_{kp}}
        \quad\text{where } \textstyle\sum_k w_k a_{kp} > 0,\ \text{else } g_p \text{ unchanged}

    with ``a_kp = masks[k][p]``, or ``a_kp = (d_kp != 0)`` when ``masks is None`` (FedRAC's
    non-zero rule, spec section 4.9). Accumulation is float32, client by client in order, so every
    back end gives the same bits.

    Example (3 clients, 4 parameters, weights 1)::

        >>> g = torch.zeros(4)
        >>> d = torch.tensor([[1., 0., 2., 0.],
        ...                   [3., 0., 0., 0.],
        ...                   [2., 4., 0., 0.]])
        >>> masked_mean_update_(g, d)      # p0: (1+3+2)/3, p1: 4/1, p2: 2/1, p3: nobody
        tensor([2., 4., 2., 0.])

    Args:
        global_params: float32 [P], contiguous; updated in place and returned.
        deltas: [K, P] tensor or list of K contiguous 1-D tensors (float32 / bfloat16 / float16).
        weights: None (all 1) or K values >= 0, not all 0 (tensor or sequence). A zero-weight
            client is skipped and its row never read.
        masks: None (non-zero rule), bool [K, P] or list of K bool [P].
        backend: None (automatic), "torch", "cpu", "cuda" or "triton".
        nonfinite: "raise" (ValueError naming the clients with NaN/Inf on active elements,
            global_params untouched), "drop" (exclude them, warn, fill ``report["dropped_clients"]``)
            or "assume_finite" (no check, fused in place: fastest).
        report: optional dict receiving ``"dropped_clients"``.
    """
    g = check_global(global_params)
    P, dev = g.numel(), g.device
    rows = rows_of(deltas, "deltas", P, dev)
    K = len(rows)
    ops = use_ops_rows(g, rows)
    w, checked = weights_of(weights, K, dev, tracing=ops)
    m = masks_of(masks, K, P, dev)
    check_backend_arg(backend)
    check_nonfinite(nonfinite)
    check_report(report)
    dropped = None
    if ops:
        flags = torch.ops.fedrac.masked_mean_update_(g, list(rows), w, m, backend or "", nonfinite)
    else:
        check_no_alias(g, rows, "deltas")
        dropped = []
        flags = _dispatch.finalize("dense", (m or None,), g, rows, w, backend or "", nonfinite,
                                   weights_checked=checked, dropped=dropped)
    after_aggregation(flags, nonfinite, report, "masked_mean_update_", dropped)
    return global_params


def structured_mean_update_(global_params: torch.Tensor, deltas, layout: NeuronLayout, neuron_masks, *,
                            weights=None, rule: str = "structural", backend: Optional[str] = None,
                            nonfinite: str = "raise", report: Optional[dict] = None) -> torch.Tensor:
    r"""Masked mean whose masks come from neuron gates through ``layout`` (never materialised).

    .. math::

        a_{kp} = \mathrm{on}_k(\mathrm{out}(p)) \wedge \mathrm{on}_k(\mathrm{in}(p))
        \ [\wedge\ d_{kp} \ne 0 \text{ for rule="nonzero"}],\qquad
        g_p \mathrel{+}= \frac{\sum_k w_k a_{kp} d_{kp}}{\sum_k w_k a_{kp}}

    Bit for bit equal to ``masked_mean_update_(g, deltas, masks=layout.expand(neuron_masks))``
    (``& (deltas != 0)`` for ``rule="nonzero"``).

    Example (a 1-2-1 MLP: weights W1 [2,1], W2 [1,2], hidden site "h" of width 2; P = 4)::

        >>> lay = NeuronLayout([("h", 2)], [("W1", (2, 1), "h", None), ("W2", (1, 2), None, "h")])
        >>> g = torch.zeros(4)
        >>> d = torch.tensor([[1., 5., 1., 5.],     # client 0 holds neuron 0 only
        ...                   [3., 2., 3., 2.],     # client 1 holds both
        ...                   [0., 4., 0., 4.]])    # client 2 holds neuron 1 only
        >>> on = torch.tensor([[True, False], [True, True], [False, True]])
        >>> structured_mean_update_(g, d, lay, on)   # p0: (1+3)/2, p1: (2+4)/2, p2, p3 alike
        tensor([2., 3., 2., 3.])

    Args:
        layout: the :class:`NeuronLayout` of the flat buffer (``layout.P == P``).
        neuron_masks: bool [K, N] or :class:`NestedMasks`.
        rule: "structural" (active iff gate on) or "nonzero" (gate on and delta != 0).
        Others as in :func:`masked_mean_update_`.
    """
    g = check_global(global_params)
    P, dev = g.numel(), g.device
    check_layout(layout, P)
    rows = rows_of(deltas, "deltas", P, dev)
    K = len(rows)
    ops = use_ops_rows(g, rows)
    w, checked = weights_of(weights, K, dev, tracing=ops)
    nm, rank, sizes = neuron_masks_of(neuron_masks, K, layout.N, dev)
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    check_backend_arg(backend)
    check_nonfinite(nonfinite)
    check_report(report)
    segs = layout.segment_table(dev)
    nonzero = rule == "nonzero"
    dropped = None
    if ops:
        flags = torch.ops.fedrac.structured_mean_update_(g, list(rows), w, segs, layout.N, nm, rank, sizes, nonzero,
                                                         backend or "", nonfinite)
    else:
        check_no_alias(g, rows, "deltas")
        dropped = []
        flags = _dispatch.finalize("structured", (segs, layout.N, nm, rank, sizes, nonzero), g, rows, w,
                                   backend or "", nonfinite, weights_checked=checked, dropped=dropped)
    after_aggregation(flags, nonfinite, report, "structured_mean_update_", dropped)
    return global_params


def compact_pack(delta: torch.Tensor, layout: NeuronLayout, kept):
    r"""Client side of the compact format: the values of ``delta`` on the client's submodel.

    For every segment (parameter) in flat order, the sub-tensor ``delta[kept rows][:, kept cols]``
    (rows/cols gated by the segment's out/in site; ungated dims kept whole) is appended row-major.
    Rows and columns follow the client's *local* neuron order: ascending neuron number for bool and
    nested masks, the given order for index lists (FedRolex's rolled windows).

    Example (the 1-2-1 MLP of :func:`structured_mean_update_`, keeping neuron 1 only)::

        >>> lay = NeuronLayout([("h", 2)], [("W1", (2, 1), "h", None), ("W2", (1, 2), None, "h")])
        >>> compact_pack(torch.tensor([1., 5., 1., 6.]), lay, torch.tensor([False, True]))
        tensor([5., 6.])

    Args:
        delta: [P] (one client; returns a 1-D tensor) or [K, P] (returns a list of K tensors),
            float32 / bfloat16 / float16; the values keep its dtype.
        kept: one client: bool [N], an index tensor/list, or NestedMasks with K=1; [K, P] delta:
            bool [K, N], NestedMasks or a list of K index tensors.
    """
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"delta: expected a tensor [P] or [K, P], got {type(delta).__name__}")
    if delta.dtype not in UPDATE_DTYPES:
        raise TypeError(f"delta: dtype {delta.dtype} is not supported; use one of {_dtype_list(UPDATE_DTYPES)}")
    if delta.dim() not in (1, 2):
        raise ValueError(f"delta: expected shape [P] or [K, P], got {tuple(delta.shape)}")
    check_layout(layout, delta.shape[-1], "delta")
    single = delta.dim() == 1
    kept_k = kept_for_one(kept) if single else kept
    tables = layout.compact_tables(kept_k, device=delta.device)
    rows = [delta] if single else list(delta.unbind(0))
    if len(rows) == 0:
        raise ValueError("delta: no clients (K = 0)")
    if tables.K != len(rows):
        raise ValueError(f"kept: describes {tables.K} clients, delta has {len(rows)}")
    segs = layout.segment_table(delta.device)
    out = []
    for k, r in enumerate(rows):
        r = r.contiguous()
        args = (r, segs, tables.inv[k], tables.seg_off[k], tables.seg_cols[k], tables.lengths[k])
        if library.use_ops(r):
            out.append(torch.ops.fedrac.compact_pack(*args))
        else:
            out.append(_dispatch.compact_pack(*args))
    return out[0] if single else out


def compact_mean_update_(global_params: torch.Tensor, uploads, layout: NeuronLayout, kept, *, weights=None,
                         backend: Optional[str] = None, nonfinite: str = "raise",
                         report: Optional[dict] = None) -> torch.Tensor:
    r"""Masked mean (structural rule) over compact uploads, without scattering them to [K, P].

    Equals ``structured_mean_update_(g, D, layout, kept_masks, rule="structural")`` bit for bit,
    where ``D[k]`` scatters ``uploads[k]`` back to the dense layout (:func:`compact_pack`'s
    inverse) and ``kept_masks`` are the kept neurons as a bool [K, N] mask: every value a client
    sends counts, zeros included.

    Example (the 1-2-1 MLP of :func:`structured_mean_update_`; clients keep {0}, {0, 1}, {1})::

        >>> lay = NeuronLayout([("h", 2)], [("W1", (2, 1), "h", None), ("W2", (1, 2), None, "h")])
        >>> ups = [torch.tensor([1., 1.]), torch.tensor([3., 2., 3., 2.]), torch.tensor([4., 4.])]
        >>> compact_mean_update_(torch.zeros(4), ups, lay, [[0], [0, 1], [1]])
        tensor([2., 3., 2., 3.])

    Args:
        uploads: list of K 1-D tensors (float32 / bfloat16 / float16), as produced by compact_pack.
        kept: bool [K, N], NestedMasks, or a list of K index tensors (order within a site = local
            positions).
        Others as in :func:`masked_mean_update_`.
    """
    g = check_global(global_params)
    P, dev = g.numel(), g.device
    check_layout(layout, P)
    tables: CompactTables = layout.compact_tables(kept, device=dev)
    if isinstance(uploads, (list, tuple)) and len(uploads) != tables.K:
        raise ValueError(f"uploads: {len(uploads)} uploads, but kept describes {tables.K} clients")
    rows = rows_of(uploads, "uploads", None, dev, lengths=tables.lengths)
    K = len(rows)
    if K != tables.K:
        raise ValueError(f"uploads: {K} uploads, but kept describes {tables.K} clients")
    ops = use_ops_rows(g, rows)
    w, checked = weights_of(weights, K, dev, tracing=ops)
    check_backend_arg(backend)
    check_nonfinite(nonfinite)
    check_report(report)
    segs = layout.segment_table(dev)
    dropped = None
    if ops:
        flags = torch.ops.fedrac.compact_mean_update_(g, list(rows), w, segs, layout.N, tables.inv, tables.seg_off,
                                                      tables.seg_cols, backend or "", nonfinite)
    else:
        check_no_alias(g, rows, "uploads")
        dropped = []
        flags = _dispatch.finalize("compact", (segs, layout.N, tables.inv, tables.seg_off, tables.seg_cols),
                                   g, rows, w, backend or "", nonfinite, arg="uploads", weights_checked=checked,
                                   dropped=dropped)
    after_aggregation(flags, nonfinite, report, "compact_mean_update_", dropped)
    return global_params


# ================================================================================================
# frequency table, ordering, nested masks
# ================================================================================================
def _check_freq(freq) -> torch.Tensor:
    if not isinstance(freq, torch.Tensor):
        raise TypeError(f"freq: expected a 1-D tensor, got {type(freq).__name__}")
    if freq.dtype not in FREQ_DTYPES:
        raise TypeError(f"freq: dtype {freq.dtype} is not supported; use one of {_dtype_list(FREQ_DTYPES)}")
    if freq.dim() != 1:
        raise ValueError(f"freq: expected a 1-D tensor [N], got shape {tuple(freq.shape)}")
    return freq


def frequency_update_(freq: torch.Tensor, masks=None, *, order=None, sizes=None,
                      backend: Optional[str] = None) -> torch.Tensor:
    r"""Add, for every neuron, the number of clients holding it: ``freq[n] += #{k : m_k[n]}``.

    Nested form (``masks`` a :class:`NestedMasks`, or ``order`` + ``sizes``):
    ``freq[n] += #{k : rank[n] < sizes[k]}``. The count is added in ``freq``'s dtype.

    Example::

        >>> f = torch.zeros(4, dtype=torch.int64)
        >>> frequency_update_(f, torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool))
        tensor([3, 1, 1, 0])
        >>> frequency_update_(f, order=[3, 1, 0, 2], sizes=[2, 1, 0])   # {3, 1} and {3}
        tensor([3, 2, 1, 2])

    Args:
        freq: 1-D float32 / float64 / int32 / int64 [N], contiguous, no NaN; updated in place.
        masks: bool [K, N] or NestedMasks; or give ``order`` (permutation of 0..N-1) and ``sizes``
            (K ints in [0, N]) instead.
    """
    f = _check_freq(freq)
    N, dev = f.numel(), f.device
    if not f.is_contiguous():
        raise ValueError("freq: must be contiguous (it is updated in place)")
    freq_ok = False
    if masks is not None and (order is not None or sizes is not None):
        raise ValueError("masks: give either masks or order and sizes, not both")
    if masks is None:
        if order is None or sizes is None:
            raise ValueError("masks: give masks (bool [K, N] or NestedMasks) or both order and sizes")
        if isinstance(order, torch.Tensor) and order.device != dev:
            raise ValueError(f"order: on {order.device}, but freq is on {dev}")
        if isinstance(sizes, torch.Tensor) and sizes.device != dev:
            raise ValueError(f"sizes: on {sizes.device}, but freq is on {dev}")
        # on a GPU the NaN test of freq is read with the order/sizes checks: one device -> host read
        extra = ()
        if f.is_floating_point() and _layout.one_transfer(dev):
            total = f.sum()
            extra = (total == total,)
        masks = object.__new__(NestedMasks)
        more = masks._build(order, sizes, extra)
        freq_ok = bool(more) and bool(more[0])
        if masks.N != N:
            raise ValueError(f"order: has N={masks.N} entries, but freq has {N}")
    if isinstance(masks, NestedMasks):
        if masks.N != N:
            raise ValueError(f"masks: NestedMasks has N={masks.N}, but freq has {N}")
        if masks.K == 0:
            raise ValueError("sizes: no clients (K = 0)")
        nm = masks.to(dev)
        m, rank, sz = None, nm.rank, nm.sizes
    else:
        m, rank, sz = neuron_masks_of(masks, None, N, dev, name="masks")
    check_backend_arg(backend)
    if library.use_ops(f):
        torch.ops.fedrac.frequency_update_(f, m, rank, sz, backend or "")
    else:
        _dispatch.frequency_update(f, m, rank, sz, backend or "", checked=freq_ok)
    return freq


def lowest_frequency_order(freq: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    r"""The neurons sorted by ascending frequency, ties by lower index (a stable argsort).

    ``out = torch.sort(freq, stable=True).indices`` (with -0.0 and +0.0 equal), as int64 [N].

    Example::

        >>> lowest_frequency_order(torch.tensor([2., 0., 1., 0.]))
        tensor([1, 3, 2, 0])

    Args:
        freq: 1-D float32 / float64 / int32 / int64 without NaN.
    """
    f = _check_freq(freq)
    check_backend_arg(backend)
    f = f.contiguous()
    if library.use_ops(f):
        return torch.ops.fedrac.lowest_frequency_order(f, backend or "")
    return _dispatch.stable_argsort(f, backend or "")


def nested_masks(order, sizes, *, backend: Optional[str] = None) -> torch.Tensor:
    r"""Dense nested masks: ``out[s, n] = n in order[:sizes[s]]``, bool [S, N].

    Example::

        >>> nested_masks(torch.tensor([2, 0, 1]), torch.tensor([0, 1, 3]))
        tensor([[False, False, False],
                [False, False,  True],
                [ True,  True,  True]])

    Args:
        order: a permutation of 0..N-1 (int tensor or sequence).
        sizes: S ints in [0, N] (int tensor or sequence), on ``order``'s device when a tensor.
    """
    from .layout import _as_index_tensor

    o = _as_index_tensor(order, "order")
    if isinstance(sizes, torch.Tensor) and sizes.device != o.device:
        raise ValueError(f"sizes: on {sizes.device}, but order is on {o.device}")
    s = _as_index_tensor(sizes, "sizes", device=o.device)
    check_backend_arg(backend)
    o, s = o.contiguous(), s.contiguous()
    if library.use_ops(o, s):
        return torch.ops.fedrac.nested_masks(o, s, backend or "")
    return _dispatch.nested_masks(o, s, backend or "")
