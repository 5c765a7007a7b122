"""Plain-tensor / ``state_dict`` entry point: use the fused kernels without the fedrac simulator.

One call turns the global ``state_dict`` and the clients' ``state_dict`` s into the new global
``state_dict``::

    import fedrac_kernels.interop as fki

    sites = {"h1": 200, "h2": 200}
    gates = {"fc1.weight": ("h1", None), "fc1.bias": ("h1", None),
             "fc2.weight": ("h2", "h1"), "fc2.bias": ("h2", None), "fc3.weight": (None, "h2")}
    sets = fki.heterofl_neuron_sets(sites, rates=[1, 0.5, 0.25])       # one {site: indices} per client
    clients = [fki.slice_state_dict(global_sd, s, gates) for s in sets]  # what each client trains
    ...                                                                  # local training
    new_sd = fki.aggregate_state_dicts(global_sd, clients, neuron_sets=sets, gates=gates, sites=sites)

Rule (``rule="structural"``, the default): every floating-point element becomes the weighted mean
of the clients that *hold* it, and keeps its old value when no client holds it::

    new[e] = sum_k w_k a_ke x_ke / sum_k w_k a_ke      if sum_k w_k a_ke > 0, else old[e]

with ``x_ke`` client k's value and ``a_ke`` = 1 iff client k sent that key and, for a gated key,
holds the element's output neuron (dim 0) and input neuron (dim 1). This is HeteroFL / FedRolex
``combine`` (weights 1: sum of scattered slices / count of holders), FjORD's nested average
(weights = example counts) and plain FedAvg (no neuron sets). ``rule="nonzero"`` is FedRAC's rule
on full-size states: a client counts on an element only where its value differs from the global
one (and, with neuron sets, where it holds the element); it averages the *updates*
``x_ke - old[e]``.

Client formats (per client, detected from the tensor shapes, ``client_format="auto"``):

* **full-size** -- every tensor has the global shape (FjORD uploads, FedRAC, dense FedAvg).
* **sub-model** -- gated tensors hold only the client's slice, of shape
  ``len(rows) x len(cols) x ...`` where ``rows`` / ``cols`` are the client's neuron index lists of the
  key's out / in site *in the client's local order* (so FedRolex's rolled windows work: local row j
  is global row ``neuron_sets[k][site][j]``); ungated tensors keep the global shape.

When a client's sub-model shapes equal the global shapes (it holds every neuron) both readings
fit; "auto" then takes the sub-model reading, which applies the index order (identical for sorted
index lists). Pass ``client_format="full"`` for full-size states whose index lists are not sorted.

How it runs: the tensors are reduced in one deterministic pass per large tensor (and one per run
of small ones), all clients at once, in client order, in float32. Sub-model clients go to
:func:`fedrac_kernels.compact_mean_update_` with their tensors as they are (no scatter, no copy for
contiguous tensors); when every client is full-size, :func:`fedrac_kernels.structured_mean_update_`
reads the full tensors in place with the neuron gates; a mix slices the full-size ones. The kernels
make these forms bit-identical, so full-size and sub-model inputs give the same bits. The non-zero
rule runs ``structured_mean_update_`` (with neuron sets) or ``masked_mean_update_`` (without) on
the full-size updates.

Policy for the remaining entries:

* non-floating entries (``num_batches_tracked``, integer / bool buffers) are copied from
  ``global_state``; the clients' values are ignored;
* a floating key that only some clients sent is averaged over the clients that sent it (the others
  are not holders); a key no client sent keeps its global value;
* a key a client sent that is not in ``global_state`` is an error;
* arithmetic is float32 (float64 tensors are converted; float16 / bfloat16 client tensors of one
  dtype go to the kernels as they are); the result is cast back to the global tensor's dtype;
* a client with a NaN / Inf on an element it holds: ``nonfinite="raise"`` (default) raises naming
  it, nothing written; ``"drop"`` excludes that client from every key (warning, and
  ``report["dropped_clients"]``); ``"assume_finite"`` skips the check.

Bad arguments raise ``ValueError`` / ``TypeError`` whose message starts with the argument's name
(``client_states[2]['fc1.weight']: ...``), before anything is written.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import torch

from .backends import storage_address

__all__ = [
    "aggregate_state_dicts",
    "slice_state_dict",
    "heterofl_neuron_sets",
    "fedrolex_neuron_sets",
    "fjord_neuron_sets",
]

RULES = ("structural", "nonzero")
CLIENT_FORMATS = ("auto", "full", "sub")
_COMPACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DUMMY_SITE = "__fedrac_all__"


# ---- neuron sets of the three methods ---------------------------------------------------------
def _site_items(widths, name: str = "widths") -> list:
    """[(site, width)] from a {site: width} mapping or a sequence of pairs, checked."""
    if isinstance(widths, Mapping):
        items = list(widths.items())
    else:
        try:
            items = [tuple(x) for x in widths]
        except TypeError:
            raise TypeError(f"{name}: expected a mapping {{site: width}} or (site, width) pairs, "
                            f"got {type(widths).__name__}") from None
    seen = set()
    for it in items:
        if len(it) != 2:
            raise TypeError(f"{name}: expected (site, width) pairs, got {it!r}")
        site, width = it
        if not isinstance(site, str):
            raise TypeError(f"{name}: site names must be str, got {site!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
            raise ValueError(f"{name}: site {site!r} needs a positive integer width, got {width!r}")
        if site in seen:
            raise ValueError(f"{name}: site {site!r} is listed twice")
        seen.add(site)
    return items


def _kept_count(rate, width: int, name: str) -> int:
    """``ceil(rate * width)`` for a rate in (0, 1], guarded against float noise (0.3 * 10 -> 3)."""
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {rate!r}") from None
    if not (0.0 < r <= 1.0):
        raise ValueError(f"{name}: must lie in (0, 1], got {rate!r}")
    return max(1, min(width, int(math.ceil(r * width - 1e-9 * width))))


def heterofl_neuron_sets(widths, rates) -> list:
    """HeteroFL neuron sets: client k keeps the first ``ceil(rates[k] * width)`` neurons of every site.

    Args:
        widths: ``{site: width}`` (or ``[(site, width), ...]``), the ``sites`` of the layout.
        rates: K model rates in (0, 1] (HeteroFL uses 1, 1/2, 1/4, 1/8, 1/16).

    Returns:
        K dicts ``{site: int64 tensor of indices}`` (prefixes ``0 .. n-1``), one per client.

    Example::

        >>> heterofl_neuron_sets({"h": 8}, [1, 0.25])
        [{'h': tensor([0, 1, 2, 3, 4, 5, 6, 7])}, {'h': tensor([0, 1])}]
    """
    items = _site_items(widths)
    return [{s: torch.arange(_kept_count(r, w, f"rates[{k}]"), dtype=torch.int64) for s, w in items}
            for k, r in enumerate(_as_list(rates, "rates"))]


def fedrolex_neuron_sets(widths, rates, round) -> list:  # noqa: A002 (the paper's word)
    """FedRolex rolling-window neuron sets for round ``round``.

    Per site of width ``w``: ``roll = round % w`` and client k keeps
    ``torch.roll(arange(w), roll)[:ceil(rates[k] * w)]``, i.e. the cyclic window of indices
    ``(j - roll) mod w`` for ``j = 0 .. n-1``, *in that order* (local position j holds global
    neuron ``(j - roll) mod w``). The window advances by one neuron per round, so every neuron is
    trained by small clients over ``w`` rounds. All clients share the window start, so the sets of a
    round are nested.

    Example::

        >>> fedrolex_neuron_sets({"h": 8}, [0.5], round=3)
        [{'h': tensor([5, 6, 7, 0])}]
    """
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round: expected a non-negative int, got {round!r}")
    items = _site_items(widths)
    out = []
    for k, r in enumerate(_as_list(rates, "rates")):
        d = {}
        for s, w in items:
            n = _kept_count(r, w, f"rates[{k}]")
            roll = round % w
            d[s] = torch.remainder(torch.arange(n, dtype=torch.int64) - roll, w)
        out.append(d)
    return out


def fjord_neuron_sets(widths, p_values) -> list:
    """FjORD ordered-dropout neuron sets: client k keeps the prefix ``ceil(p_k * width)`` of every site.

    ``p_values[k]`` is client k's largest width ``p_max`` (FjORD's ``ODLinear`` / ``ODConv2d`` use
    ``ceil(p * width)`` too). The sets of different p are nested prefixes; FjORD's per-width
    average (for each p from large to small, average the prefix over the clients with
    ``p_max >= p``, weighted by example counts) is exactly the structural masked mean over these
    sets with ``weights = num_examples`` -- pass them to :func:`aggregate_state_dicts`.

    Example::

        >>> fjord_neuron_sets({"h": 10}, [0.2, 1.0])
        [{'h': tensor([0, 1])}, {'h': tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])}]
    """
    items = _site_items(widths)
    return [{s: torch.arange(_kept_count(p, w, f"p_values[{k}]"), dtype=torch.int64) for s, w in items}
            for k, p in enumerate(_as_list(p_values, "p_values"))]


def _as_list(x, name: str) -> list:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    try:
        vals = list(x)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(x).__name__}") from None
    if not vals:
        raise ValueError(f"{name}: empty; expected one value per client")
    return vals


# ---- slicing (the server's "distribute" step) -----------------------------------------------------
def slice_state_dict(state: Mapping[str, torch.Tensor], neuron_set: Optional[Mapping[str, object]],
                     gates: Mapping[str, tuple]) -> "OrderedDict[str, torch.Tensor]":
    """The sub-model ``state_dict`` of a client holding ``neuron_set`` (HeteroFL's ``distribute``).

    Gated tensors become ``state[key][rows][:, cols]`` with ``rows`` / ``cols`` the client's index
    lists of the key's out / in site, in the client's order (a site missing from ``neuron_set``,
    or ``neuron_set=None``, means all of it); other entries are cloned. The result is what
    :func:`aggregate_state_dicts` accepts as a sub-model client state.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping key -> tensor, got {type(state).__name__}")
    gates = _check_gates(gates, state) if gates is not None else {}
    out = OrderedDict()
    for key, t in state.items():
        g = gates.get(key)
        if g is None or neuron_set is None or not isinstance(t, torch.Tensor):
            out[key] = t.clone() if isinstance(t, torch.Tensor) else t
            continue
        s = _slice(t, g, neuron_set)
        out[key] = s.clone() if s is t else s
    return out


def _slice(t: torch.Tensor, gate, neuron_set, name: str = "neuron_set") -> torch.Tensor:
    """``t[rows][:, cols]`` for the sites of ``gate`` present in ``neuron_set`` (``t`` itself if none).

    ``neuron_set`` values may be raw index lists (checked here) or already-checked int64 tensors.
    """
    o_site, i_site = gate
    if o_site is not None and o_site in neuron_set:
        t = t.index_select(0, _idx(neuron_set[o_site], t.shape[0], f"{name}[{o_site!r}]", t.device))
    if i_site is not None and i_site in neuron_set:
        t = t.index_select(1, _idx(neuron_set[i_site], t.shape[1], f"{name}[{i_site!r}]", t.device))
    return t


def _slice_checked(t: torch.Tensor, gate, ns, ranges) -> torch.Tensor:
    """:func:`_slice` for index sets already checked by :func:`_check_neuron_sets` (int64, CPU).

    ``ranges[site]`` is the start of an ascending contiguous index range (then a view is taken
    instead of a gather: FjORD / HeteroFL prefixes) or None.
    """
    for dim, site in ((0, gate[0]), (1, gate[1])):
        if site is None or site not in ns:
            continue
        start = ranges.get(site)
        if start is not None:
            t = t.narrow(dim, start, ns[site].numel())
        else:
            t = t.index_select(dim, ns[site].to(t.device))
    return t


def _range_start(idx: torch.Tensor) -> Optional[int]:
    """``idx[0]`` when ``idx`` is ``arange(idx[0], idx[0] + n)``, else None (idx: checked, no repeats)."""
    n = idx.numel()
    if n == 0:
        return 0
    a, b = int(idx[0]), int(idx[-1])
    if b - a != n - 1:
        return None
    if n > 2 and not bool((idx[1:] > idx[:-1]).all()):
        return None
    return a


def _idx(x, width: int, name: str, device) -> torch.Tensor:
    """Checked int64 index tensor (values in [0, width), no repeats) on ``device``."""
    if isinstance(x, torch.Tensor):
        if x.dtype in (torch.bool,) or x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name}: expected integer indices, got dtype {x.dtype}")
        t = x.reshape(-1).to(torch.int64)
    else:
        try:
            vals = list(x)
        except TypeError:
            raise TypeError(f"{name}: expected a sequence of neuron indices, got {type(x).__name__}") from None
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, int) and not hasattr(v, "__index__"):
                raise TypeError(f"{name}: expected integer indices, got {v!r}")
        t = torch.tensor([int(v) for v in vals], dtype=torch.int64)
    if t.numel():
        tc = t.cpu()
        lo, hi = int(tc.min()), int(tc.max())
        if lo < 0 or hi >= width:
            raise ValueError(f"{name}: neuron index {lo if lo < 0 else hi} out of range [0, {width - 1}]")
        if tc.numel() > 1 and int(torch.bincount(tc, minlength=width).max()) > 1:
            raise ValueError(f"{name}: repeated neuron indices")
    return t.to(device)


# ---- argument checks ------------------------------------------------------------------------------
def _check_gates(gates, state, sites=None) -> dict:
    if not isinstance(gates, Mapping):
        raise TypeError(f"gates: expected a mapping key -> (out_site, in_site), got {type(gates).__name__}")
    out = {}
    for key, g in gates.items():
        if key not in state:
            raise ValueError(f"gates: key {key!r} is not in global_state")
        try:
            o, i = g
        except (TypeError, ValueError):
            raise TypeError(f"gates: entry for {key!r} must be (out_site, in_site), got {g!r}") from None
        t = state[key]
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            raise ValueError(f"gates: key {key!r} is not a floating-point tensor ({t.dtype}); only float entries can be gated")
        for which, site, dim in (("out", o, 0), ("in", i, 1)):
            if site is None:
                continue
            if sites is not None and site not in sites:
                raise ValueError(f"gates: key {key!r} names unknown {which} site {site!r}; sites are {list(sites)}")
            if isinstance(t, torch.Tensor):
                if t.dim() <= dim:
                    raise ValueError(f"gates: key {key!r} of shape {tuple(t.shape)} has no dim {dim} for its {which} site {site!r}")
                if sites is not None and t.shape[dim] != sites[site]:
                    raise ValueError(f"gates: key {key!r} has {t.shape[dim]} entries along dim {dim} but its {which} "
                                     f"site {site!r} has width {sites[site]}")
        out[key] = (o, i)
    return out


def _check_weights(weights, K: int) -> Optional[list]:
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        vals = weights.detach().reshape(-1).cpu().tolist()
    else:
        try:
            vals = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise TypeError(f"weights: expected K={K} numbers, got {weights!r}") from None
    if len(vals) != K:
        raise ValueError(f"weights: expected K={K} values (one per client state), got {len(vals)}")
    bad = [k for k, w in enumerate(vals) if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"weights: every weight must be finite and >= 0; bad at client(s) {bad}: {[vals[k] for k in bad]}")
    if not any(w > 0 for w in vals):
        raise ValueError("weights: all weights are zero; at least one client needs a positive weight")
    return [float(w) for w in vals]


def _check_neuron_sets(neuron_sets, K: int, sites: dict) -> list:
    if isinstance(neuron_sets, Mapping) or not isinstance(neuron_sets, Sequence):
        raise TypeError(f"neuron_sets: expected a list of K={K} mappings {{site: indices}} (or None entries), "
                        f"got {type(neuron_sets).__name__}")
    if len(neuron_sets) != K:
        raise ValueError(f"neuron_sets: expected K={K} entries (one per client state), got {len(neuron_sets)}")
    out = []
    for k, ns in enumerate(neuron_sets):
        if ns is None:
            out.append(None)
            continue
        if not isinstance(ns, Mapping):
            raise TypeError(f"neuron_sets[{k}]: expected a mapping {{site: indices}} or None, got {type(ns).__name__}")
        d = {}
        for site, idx in ns.items():
            if site not in sites:
                raise ValueError(f"neuron_sets[{k}]: unknown site {site!r}; sites are {list(sites)}")
            d[site] = _idx(idx, sites[site], f"neuron_sets[{k}][{site!r}]", "cpu")
        out.append(d)
    return out


# ---- the entry point ------------------------------------------------------------------------------
def aggregate_state_dicts(global_state: Mapping[str, torch.Tensor], client_states: Sequence[Mapping[str, torch.Tensor]],
                          *, neuron_sets: Optional[Sequence[Optional[Mapping[str, object]]]] = None,
                          gates: Optional[Mapping[str, tuple]] = None, sites=None, weights=None,
                          rule: str = "structural", backend: Optional[str] = None, client_format: str = "auto",
                          nonfinite: str = "raise", report: Optional[dict] = None, inplace: bool = False,
                          device=None) -> "OrderedDict[str, torch.Tensor]":
    """Aggregate K client ``state_dict`` s into a new global ``state_dict`` with the fused kernels.

    Args:
        global_state: the current global model's ``state_dict`` (not modified unless ``inplace``).
        client_states: K client ``state_dict`` s, full-size or sub-model (see the module docstring).
        neuron_sets: None (every client holds every neuron) or K entries, each None (all) or
            ``{site: indices}``: the client's neurons of that site, in the client's local order; a
            site left out means all of it. Build them with :func:`heterofl_neuron_sets`,
            :func:`fedrolex_neuron_sets` or :func:`fjord_neuron_sets`.
        gates: ``{key: (out_site, in_site)}``: the site gating dim 0 (output neurons / channels) and
            dim 1 (input neurons / channels) of a float entry; None = ungated. Keys not listed are
            ungated (held whole by every client that sent them). Required with ``neuron_sets``.
        sites: ``{site: width}`` (or ``[(site, width)]``): the maskable neuron groups.
        weights: None (all 1: HeteroFL / FedRolex count averaging) or K values >= 0, not all 0
            (e.g. example counts: FjORD, FedAvg).
        rule: ``"structural"`` (a client counts wherever it holds the element) or ``"nonzero"``
            (FedRAC: also requires its value to differ from the global one; full-size states only).
        backend: kernel back end (None: the fastest for the global tensors' device).
        client_format: ``"auto"`` (per client, from the shapes), ``"full"`` or ``"sub"``.
        nonfinite: ``"raise"`` (default), ``"drop"`` or ``"assume_finite"``, as in
            :func:`fedrac_kernels.masked_mean_update_`; dropped clients are listed in
            ``report["dropped_clients"]`` when a dict is passed as ``report``.
        inplace: write the result into ``global_state``'s tensors and return ``global_state``.
        device: where to aggregate (default: the global tensors' device); client tensors are
            moved there pack by pack.

    Memory: the clients' tensors are handed to the kernels as they are (sub-model slices to
    :func:`fedrac_kernels.compact_mean_update_`, full-size tensors to
    :func:`fedrac_kernels.structured_mean_update_`), one kernel call per large tensor and one per
    run of small ones, so besides the result only copies of one small-tensor pack (or of a
    non-contiguous / converted tensor) are ever live. Splitting into calls never changes a bit.

    Returns:
        A new ``OrderedDict`` with ``global_state``'s keys, order, shapes, dtypes and device (or
        ``global_state`` itself when ``inplace``). Entries are new tensors; floating entries of one
        aggregation group may share one storage.
    """
    # ---- arguments ----
    if not isinstance(global_state, Mapping):
        raise TypeError(f"global_state: expected a mapping key -> tensor (a state_dict), got {type(global_state).__name__}")
    for key, t in global_state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"global_state[{key!r}]: expected a tensor, got {type(t).__name__}")
    if isinstance(client_states, Mapping) or not isinstance(client_states, Sequence):
        raise TypeError(f"client_states: expected a list of K state_dicts, got {type(client_states).__name__}")
    K = len(client_states)
    if K == 0:
        raise ValueError("client_states: empty; need at least one client state_dict")
    for k, st in enumerate(client_states):
        if not isinstance(st, Mapping):
            raise TypeError(f"client_states[{k}]: expected a mapping key -> tensor, got {type(st).__name__}")
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    if client_format not in CLIENT_FORMATS:
        raise ValueError(f"client_format: expected one of {CLIENT_FORMATS}, got {client_format!r}")
    w = _check_weights(weights, K)
    site_items = _site_items(sites, "sites") if sites is not None else []
    site_w = dict(site_items)
    if gates is not None:
        if sites is None and isinstance(gates, Mapping) and any(
                isinstance(g, (tuple, list)) and any(x is not None for x in g) for g in gates.values()):
            raise ValueError("sites: required with gates that name sites; pass {site: width}")
        gates = _check_gates(gates, global_state, site_w)
    else:
        gates = {}
    if neuron_sets is not None:
        if sites is None:
            raise ValueError("sites: required with neuron_sets; pass {site: width}")
        if not gates:
            raise ValueError("gates: required with neuron_sets; pass {key: (out_site, in_site)}")
        sets = _check_neuron_sets(neuron_sets, K, site_w)
    else:
        sets = [None] * K

    float_keys = [k for k, t in global_state.items() if t.is_floating_point()]
    devices = {global_state[k].device for k in float_keys}
    if len(devices) > 1:
        raise ValueError(f"global_state: floating entries live on several devices {sorted(map(str, devices))}")
    gdev = devices.pop() if devices else torch.device("cpu")
    device = torch.device(device) if device is not None else gdev
    if nonfinite not in ("raise", "drop", "assume_finite"):
        raise ValueError(f"nonfinite: expected one of ('raise', 'drop', 'assume_finite'), got {nonfinite!r}")
    if report is not None and not isinstance(report, dict):
        raise TypeError(f"report: expected a dict or None, got {type(report).__name__}")

    # ---- per client: keys, shapes, format ----
    fmt = []
    for k, st in enumerate(client_states):
        fits_full, fits_sub, first_bad = True, True, None
        for key, t in st.items():
            if key not in global_state:
                raise ValueError(f"client_states[{k}]: key {key!r} is not in global_state")
            g = global_state[key]
            if not g.is_floating_point():
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"client_states[{k}][{key!r}]: expected a tensor, got {type(t).__name__}")
            if not (t.is_floating_point()):
                raise TypeError(f"client_states[{k}][{key!r}]: expected a floating-point tensor like global_state, got {t.dtype}")
            full_shape = tuple(g.shape)
            sub_shape = _sub_shape(full_shape, gates.get(key), sets[k])
            shp = tuple(t.shape)
            if shp != full_shape:
                fits_full = False
            if shp != sub_shape:
                fits_sub = False
            if shp != full_shape and shp != sub_shape and first_bad is None:
                first_bad = (key, shp, full_shape, sub_shape)
        if first_bad is not None:
            key, shp, full_shape, sub_shape = first_bad
            extra = f" nor the client's sub-model shape {sub_shape}" if sub_shape != full_shape else ""
            raise ValueError(f"client_states[{k}][{key!r}]: shape {shp} matches neither the global shape {full_shape}{extra}")
        if client_format == "full":
            if not fits_full:
                raise ValueError(f"client_states[{k}]: client_format='full' but some tensors do not have the global shape")
            fmt.append("full")
        elif client_format == "sub":
            if not fits_sub:
                raise ValueError(f"client_states[{k}]: client_format='sub' but some tensors do not have the sub-model "
                                 f"shape of neuron_sets[{k}]")
            fmt.append("sub")
        elif fits_sub:
            fmt.append("sub")
        elif fits_full:
            fmt.append("full")
        else:  # mixed: some keys full, some sliced
            raise ValueError(f"client_states[{k}]: mixes full-size and sub-model tensors; send one format per client "
                             f"(or pass client_format)")
        if rule == "nonzero" and fmt[-1] == "sub" and not fits_full:
            raise ValueError(f"rule: 'nonzero' compares full-size client tensors with the global ones, but "
                             f"client_states[{k}] is a sub-model state")
    if rule == "nonzero":
        fmt = ["full"] * K

    # ---- group keys by the clients that sent them ----
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for key in float_keys:
        holders = tuple(k for k in range(K) if key in client_states[k])
        if holders:
            groups.setdefault(holders, []).append(key)

    results = {}
    dropped_all: list = []
    for holders, keys in groups.items():
        wk = [1.0 if w is None else w[k] for k in holders]
        if not any(x > 0 for x in wk):
            continue  # every sender has weight 0: the keys keep their global values
        res, dropped = _aggregate_group(global_state, client_states, keys, holders, wk, gates, site_items,
                                        sets, fmt, rule, backend, nonfinite, device)
        dropped_all.extend(holders[j] for j in dropped)
        results.update(res)
    dropped_all = sorted(set(dropped_all))
    if dropped_all and nonfinite == "raise":
        raise ValueError(f"client_states: non-finite values (NaN/Inf) on held elements of client(s) {dropped_all}; "
                         f"nothing was written (nonfinite='drop' excludes such clients)")
    if dropped_all:
        warnings.warn(f"aggregate_state_dicts: dropped client(s) {dropped_all}: non-finite values on held elements",
                      RuntimeWarning, stacklevel=2)
    if report is not None:
        report["dropped_clients"] = dropped_all
    if gdev != device:
        results = {k: v.to(gdev) for k, v in results.items()}

    # ---- assemble ----
    if inplace:
        with torch.no_grad():
            for key, v in results.items():
                global_state[key].copy_(v)
        return global_state
    out = OrderedDict()
    for key, t in global_state.items():
        out[key] = results[key] if key in results else t.detach().clone()
    return out


def _sub_shape(full_shape: tuple, gate, neuron_set) -> tuple:
    if gate is None or neuron_set is None:
        return full_shape
    o, i = gate
    shp = list(full_shape)
    if o is not None and o in neuron_set:
        shp[0] = int(neuron_set[o].numel())
    if i is not None and i in neuron_set:
        shp[1] = int(neuron_set[i].numel())
    return tuple(shp)


def _flat_view(tensors, dtype, device) -> Optional[torch.Tensor]:
    """A 1-D view covering ``tensors`` back to back when they already tile one buffer (no copy), else None.

    True for modules bound to one flat buffer (:func:`fedrac_kernels.bind_flat_parameters_`) and for
    state dicts built as views of a flat upload.
    """
    if not tensors:
        return None
    t0 = tensors[0]
    if t0.dtype != dtype or t0.device != device:
        return None
    base = storage_address(t0)
    if base is None:
        return None
    start = t0.storage_offset()
    pos = start
    for t in tensors:
        if (t.dtype != dtype or t.device != device or not t.is_contiguous()
                or storage_address(t) != base or t.storage_offset() != pos):
            return None
        pos += t.numel()
    flat = torch.empty(0, dtype=dtype, device=device)
    flat.set_(t0.untyped_storage(), start, (pos - start,), (1,))
    return flat


_PACK_ELEMS = 1 << 16   # tensors with fewer elements are packed with their neighbours (copied)


def _packs(keys, global_state) -> list:
    """Consecutive runs of keys reduced by one kernel call each.

    A tensor of at least ``_PACK_ELEMS`` elements is its own pack, so the clients' tensors are passed
    to the kernel as they are (no copy when contiguous); smaller neighbours (biases, norms) are
    packed together so there are few calls. Results are per element, so packing never changes them.
    """
    packs, cur, cur_n = [], [], 0
    for key in keys:
        n = global_state[key].numel()
        if n >= _PACK_ELEMS:
            if cur:
                packs.append(cur)
                cur, cur_n = [], 0
            packs.append([key])
            continue
        cur.append(key)
        cur_n += n
        if cur_n >= _PACK_ELEMS:
            packs.append(cur)
            cur, cur_n = [], 0
    if cur:
        packs.append(cur)
    return packs


def _aggregate_group(global_state, client_states, keys, holders, wk, gates, site_items, sets, fmt, rule,
                     backend, nonfinite, device):
    """Aggregate the float ``keys`` that exactly the clients ``holders`` sent.

    Returns ({key: new tensor}, positions in ``holders`` of the clients dropped for NaN/Inf).

    The keys are reduced pack by pack (:func:`_packs`): one kernel call per pack over all clients,
    each client's tensors passed as they are where possible (sub-model slices to
    ``compact_mean_update_``, full-size tensors to ``structured_mean_update_``), so the extra
    memory is one P-sized result plus, at most, copies of one pack. The kernels' "drop" policy
    detects non-finite clients during the pass; a client flagged anywhere is then excluded
    everywhere (a second pass with its weight set to 0), and the caller raises for "raise".
    """
    from . import api
    from .layout import NeuronLayout

    sites_l = list(site_items) if site_items else [(_DUMMY_SITE, 1)]
    params = [(key, tuple(global_state[key].shape)) + tuple(gates.get(key, (None, None))) for key in keys]
    layout = NeuronLayout(sites_l, params)
    any_set = any(gates.get(key, (None, None)) != (None, None) for key in keys) and \
        any(sets[k] is not None for k in holders)
    policy = "assume_finite" if nonfinite == "assume_finite" else "drop"
    site_pos = {s.name: j for j, s in enumerate(layout.sites)}

    on_all = torch.ones(len(holders), layout.N, dtype=torch.bool)      # [K, N] neurons held
    for j, k in enumerate(holders):
        ns = sets[k]
        if ns is not None:
            for site, idx in ns.items():
                st = layout.site(site)
                on_all[j, st.offset:st.offset + st.width] = False
                on_all[j, st.offset + idx] = True
    ascending = all(sets[k] is None or all(idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all())
                                           for idx in sets[k].values()) for k in holders)
    ranges = {k: {site: _range_start(idx) for site, idx in sets[k].items()}
              for k in holders if fmt[k] == "full" and sets[k] is not None}
    dts = {client_states[k][key].dtype for k in holders for key in keys}
    up_dtype = dts.pop() if len(dts) == 1 and next(iter(dts), None) in _COMPACT_DTYPES else torch.float32
    if rule == "nonzero":
        up_dtype = torch.float32
    all_full = all(fmt[k] == "full" for k in holders)

    packs = []
    off = 0
    for pk in _packs(keys, global_state):
        used = sorted({s for key in pk for s in gates.get(key, (None, None)) if s is not None}, key=site_pos.get)
        sub_sites = [(s, layout.site(s).width) for s in used] or [(_DUMMY_SITE, 1)]
        lay = NeuronLayout(sub_sites, [(key, tuple(global_state[key].shape)) + tuple(gates.get(key, (None, None)))
                                       for key in pk])
        cols = torch.cat([torch.arange(layout.site(s).offset, layout.site(s).offset + layout.site(s).width)
                          for s in used]) if used else None
        on = on_all[:, cols] if used else torch.ones(len(holders), 1, dtype=torch.bool)
        packs.append((pk, lay, off, used, on))
        off += lay.P

    def rows_of(pk, k, slice_full: bool) -> torch.Tensor:
        """Client k's values of pack ``pk`` as one 1-D tensor (a view when they already are one)."""
        st, ns = client_states[k], sets[k]
        parts = []
        for key in pk:
            t = st[key].detach()
            if slice_full and fmt[k] == "full" and ns is not None and key in gates:
                t = _slice_checked(t, gates[key], ns, ranges[k])
            parts.append(t)
        flat = _flat_view(parts, up_dtype, device)
        if flat is None:
            flat = torch.cat([t.reshape(-1).to(device=device, dtype=up_dtype) for t in parts])
        return flat

    def kept_lists(used, k) -> torch.Tensor:
        ns = sets[k]
        idx, o = [], 0
        for s in used:
            w = layout.site(s).width
            idx.append((ns[s] if ns is not None and s in ns else torch.arange(w)) + o)
            o += w
        return torch.cat(idx).to(device) if idx else torch.zeros(1, dtype=torch.int64, device=device)

    acc = torch.empty(layout.P, dtype=torch.float32, device=device)
    weights = list(wk)
    dropped: set = set()
    for _attempt in range(2):
        found: set = set()
        for pk, lay, off, used, on in packs:
            out = acc[off:off + lay.P]
            report: dict = {}
            live = [j for j in range(len(holders)) if weights[j] > 0]
            if not live:
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                if rule == "nonzero":
                    g = torch.cat([global_state[key].detach().reshape(-1).to(device=device, dtype=torch.float32)
                                   for key in pk])
                    out.copy_(g)
                    deltas = [torch.sub(rows_of(pk, k, False), g) if weights[j] > 0 else g
                              for j, k in enumerate(holders)]
                    if any_set and used:
                        api.structured_mean_update_(out, deltas, lay, on.to(device), weights=weights, rule="nonzero",
                                                    backend=backend, nonfinite=policy, report=report)
                    else:
                        api.masked_mean_update_(out, deltas, weights=weights, backend=backend, nonfinite=policy,
                                                report=report)
                    del deltas
                elif all_full and any_set and used:
                    out.zero_()
                    rows = [rows_of(pk, k, False) for k in holders]
                    api.structured_mean_update_(out, rows, lay, on.to(device), weights=weights, rule="structural",
                                                backend=backend, nonfinite=policy, report=report)
                    del rows
                else:
                    out.zero_()
                    rows = [rows_of(pk, k, True) for k in holders]
                    if ascending or not used:
                        kept = on.to(device)
                    else:
                        kept = [kept_lists(used, k) for k in holders]
                    api.compact_mean_update_(out, rows, lay, kept, weights=weights, backend=backend,
                                             nonfinite=policy, report=report)
                    del rows
            found.update(report.get("dropped_clients", []))
        if not found:
            break
        dropped |= found
        if nonfinite == "raise":
            return {}, sorted(dropped)
        weights = [0.0 if j in dropped else w for j, w in enumerate(wk)]  # exclude them everywhere, redo

    live = [j for j in range(len(holders)) if weights[j] > 0]
    if rule == "nonzero":
        if not live:
            acc.copy_(torch.cat([global_state[key].detach().reshape(-1).to(device=device, dtype=torch.float32)
                                 for key in keys]))
        return _split(acc, keys, global_state), sorted(dropped)
    on_live = on_all[live].to(device) if live else None
    _restore_uncovered_(acc, global_state, keys, layout, on_live, any_set)
    return _split(acc, keys, global_state), sorted(dropped)


def _restore_uncovered_(acc: torch.Tensor, global_state, keys, layout, on: Optional[torch.Tensor],
                        any_set: bool) -> None:
    """Put the old values back into ``acc`` where none of the live clients (neuron gates ``on``) holds.

    Exactly the elements where the kernel's weight sum is 0. Per segment: skipped when it is
    ungated or one client holds every neuron of its sites; rows / columns nobody holds are copied
    back directly; only a segment gated on both dims whose coverage is a union of different boxes
    needs its [rows, cols] coverage (a 0/1 matmul over the distinct client patterns).
    """
    if on is None:                          # no live client at all: everything keeps its value
        off = 0
        for key in keys:
            g = global_state[key]
            acc[off:off + g.numel()].copy_(g.detach().reshape(-1))
            off += g.numel()
        return
    if not any_set:
        return
    full_site = {s.name: on[:, s.offset:s.offset + s.width].all(1) for s in layout.sites}
    every = torch.ones(on.shape[0], dtype=torch.bool, device=on.device)
    for seg, key in zip(layout.segments, keys):
        o, i = seg.out_site, seg.in_site
        if o is None and i is None:
            continue
        fo = full_site[o] if o is not None else every
        fi = full_site[i] if i is not None else every
        if bool((fo & fi).any()):
            continue                                                      # one client holds it all
        rows, cols, inner = seg.rows, seg.cols, seg.inner
        a = acc[seg.offset:seg.offset + seg.numel].view(rows, cols, inner)
        b = global_state[key].detach().reshape(rows, cols, inner).to(device=acc.device, dtype=acc.dtype)
        O = on[:, layout.site(o).offset:layout.site(o).offset + rows] if o is not None else None
        I = on[:, layout.site(i).offset:layout.site(i).offset + cols] if i is not None else None
        r_any = O.any(0) if O is not None else None
        c_any = I.any(0) if I is not None else None
        if r_any is not None and not bool(r_any.all()):
            miss = (~r_any).nonzero().flatten()
            a.index_copy_(0, miss, b.index_select(0, miss))
        if c_any is not None and not bool(c_any.all()):
            miss = (~c_any).nonzero().flatten()
            a.index_copy_(1, miss, b.index_select(1, miss))
        if O is None or I is None:
            continue
        pats = torch.unique(torch.cat([O, I], 1).to(torch.uint8), dim=0).to(torch.bool)
        if bool(((pats[:, :rows] == r_any).all(1) & (pats[:, rows:] == c_any).all(1)).any()):
            continue                   # one client's box contains all others (nested sets): done above
        cov = (pats[:, :rows].t().to(torch.float32) @ pats[:, rows:].to(torch.float32)) > 0   # [rows, cols]
        if not bool(cov.all()):
            torch.where(cov[:, :, None], a, b, out=a)


def _split(flat: torch.Tensor, keys, global_state) -> dict:
    out, off = {}, 0
    for key in keys:
        g = global_state[key]
        n = g.numel()
        v = flat[off:off + n].view(g.shape)
        out[key] = v if g.dtype == torch.float32 else v.to(g.dtype)
        off += n
    return out
