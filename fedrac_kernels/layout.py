"""How neuron gates map onto the flat parameter buffer, nested masks, and flat-parameter helpers.

The global model lives in one flat float32 buffer ``g[P]`` (the module's ``named_parameters()``
flattened in order). Submodel methods switch *neurons* (hidden units, conv channels) on and off; a
:class:`NeuronLayout` says which neuron gates which slice of ``g``, so a per-client neuron mask
``bool [N]`` defines the client's element mask ``bool [P]`` without ever materialising it.

Flat neuron numbering: the mask sites in order, site ``s`` owning neurons
``[site.offset, site.offset + site.width)``.

Segment view: a parameter of shape ``s`` is viewed as ``[rows, cols, inner]`` with
``rows = s[0]``, ``cols = s[1]`` (1 for 0-/1-D tensors) and ``inner = prod(s[2:])``; dim 0 may be
gated by an *out* site (output neurons / channels) and dim 1 by an *in* site. Element ``(o, i, r)``
is live for client ``k`` iff ``on[k, out.offset + o]`` (or no out site) and
``on[k, in.offset + i]`` (or no in site).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "MaskSite",
    "Segment",
    "NeuronLayout",
    "NestedMasks",
    "CompactTables",
    "flatten_parameters",
    "bind_flat_parameters_",
]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class MaskSite:
    """A group of ``width`` maskable neurons, numbered ``offset .. offset + width - 1``."""

    name: str
    width: int
    offset: int


@dataclass(frozen=True)
class Segment:
    """One parameter tensor inside the flat buffer, starting at element ``offset``."""

    name: str
    offset: int
    shape: tuple
    out_site: Optional[str]
    in_site: Optional[str]

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def rows(self) -> int:
        return int(self.shape[0]) if len(self.shape) >= 1 else 1

    @property
    def cols(self) -> int:
        return int(self.shape[1]) if len(self.shape) >= 2 else 1

    @property
    def inner(self) -> int:
        return int(math.prod(self.shape[2:])) if len(self.shape) >= 3 else 1


@dataclass(frozen=True)
class CompactTables:
    """Index tables of the compact upload format (see ``fk_cpu_compact`` in the C ABI).

    inv      int32 [K, N]: local position of neuron n among client k's kept neurons of its site, or -1.
    seg_off  int64 [K, S]: element offset of segment s's sub-tensor in client k's values, or -1.
    seg_cols int64 [K, S]: kept columns of segment s for client k.
    lengths  tuple of K ints: the number of values client k uploads.
    """

    inv: torch.Tensor
    seg_off: torch.Tensor
    seg_cols: torch.Tensor
    lengths: tuple

    @property
    def K(self) -> int:
        return int(self.inv.shape[0])

    def to(self, device) -> "CompactTables":
        device = torch.device(device)
        return CompactTables(self.inv.to(device), self.seg_off.to(device), self.seg_cols.to(device), self.lengths)

    def select(self, a: int, b: int) -> "CompactTables":
        """The tables of clients ``a .. b-1`` (views)."""
        return CompactTables(self.inv[a:b], self.seg_off[a:b], self.seg_cols[a:b], self.lengths[a:b])


def _as_index_tensor(x, name: str, device=None) -> torch.Tensor:
    """1-D int64 tensor from a tensor or a sequence of ints (TypeError for other dtypes)."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in _INT_DTYPES:
            raise TypeError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(x.shape)}")
        t = x.to(torch.int64)
    else:
        try:
            vals = list(x)
        except TypeError:
            raise TypeError(f"{name}: expected a 1-D integer tensor or a sequence of ints, got {type(x).__name__}") from None
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype in _INT_DTYPES):
                raise TypeError(f"{name}: expected integers, got {type(v).__name__} ({v!r})")
        t = torch.tensor([int(v) for v in vals], dtype=torch.int64)
    if device is not None:
        t = t.to(device)
    return t


class NestedMasks:
    """Nested (prefix) neuron masks: neuron ``n`` is on for client ``k`` iff ``n in order[:sizes[k]]``.

    Equivalently ``on[k, n] = rank[n] < sizes[k]`` with ``rank[order[j]] = j``. FedRAC (prefixes of
    the frequency order), HeteroFL (``order = arange``), FedRolex (a rolled ``arange``) and FjORD all
    produce masks of this form; the kernels read the ``rank``/``sizes`` pair instead of a [K, N] mask.

    Example::

        >>> m = NestedMasks(order=[2, 0, 1], sizes=[1, 3])
        >>> m.rank
        tensor([1, 2, 0], dtype=torch.int32)
        >>> m.dense()
        tensor([[False, False,  True],
                [ True,  True,  True]])

    Args:
        order: a permutation of ``0 .. N-1`` (tensor or sequence of ints).
        sizes: K ints in ``[0, N]``.
    """

    __slots__ = ("order", "rank", "sizes")

    def __init__(self, order, sizes):
        self._build(order, sizes)

    def _build(self, order, sizes, extra: tuple = ()) -> list:
        """Check and store ``order``/``sizes``; ``extra``: further 0-dim bool device tensors to read
        in the same device -> host transfer (their values are returned, the caller raises)."""
        order = _as_index_tensor(order, "order")
        sizes_t = _as_index_tensor(sizes, "sizes", device=order.device)
        N = order.numel()
        perm_ok, sizes_ok, more, rank = _index_checks(order, sizes_t, extra)
        if not perm_ok:
            _permutation_error(order, "order")
        if not sizes_ok:
            _sizes_error(sizes_t, N)
        self.order = order.contiguous()
        self.rank = rank
        self.sizes = sizes_t.to(torch.int32).contiguous()
        return more

    @classmethod
    def _trusted(cls, order, rank, sizes) -> "NestedMasks":
        self = object.__new__(cls)
        self.order, self.rank, self.sizes = order, rank, sizes
        return self

    @property
    def K(self) -> int:
        return int(self.sizes.numel())

    @property
    def N(self) -> int:
        return int(self.order.numel())

    @property
    def device(self) -> torch.device:
        return self.order.device

    def to(self, device) -> "NestedMasks":
        device = torch.device(device)
        if device == self.device:
            return self
        return NestedMasks._trusted(self.order.to(device), self.rank.to(device), self.sizes.to(device))

    def select(self, clients) -> "NestedMasks":
        """The nested masks of a subset of clients (an index, slice or index list)."""
        sizes = self.sizes[clients].reshape(-1).contiguous()
        return NestedMasks._trusted(self.order, self.rank, sizes)

    def dense(self) -> torch.Tensor:
        """bool [K, N]: ``out[k, n] = rank[n] < sizes[k]``."""
        return self.rank.to(torch.int64)[None, :] < self.sizes.to(torch.int64)[:, None]

    def __repr__(self) -> str:
        return f"NestedMasks(K={self.K}, N={self.N}, sizes={self.sizes.tolist() if self.K <= 16 else '...'})"


def one_transfer(device: torch.device) -> bool:
    """How the value checks read their results: True (GPUs and other accelerators): stack them and
    read them in ONE device -> host transfer per call; False (CPU, where a read costs nothing): read
    them one by one, with fewer ops. (Tests force True to run the batched path on the CPU.)"""
    return device.type != "cpu"


_ARANGE: dict = {}


def _arange_i32(N: int, device: torch.device) -> torch.Tensor:
    """0..N-1 as int32 on ``device``; on the CPU cached (a read-only source, never handed out; not
    on GPUs, where a cached tensor could be read on another stream before it is written)."""
    if device.type != "cpu":
        return torch.arange(N, dtype=torch.int32, device=device)
    t = _ARANGE.get(N)
    if t is None:
        if len(_ARANGE) >= 16:
            _ARANGE.clear()
        t = _ARANGE[N] = torch.arange(N, dtype=torch.int32)
    return t


def _index_checks(order: torch.Tensor, sizes: Optional[torch.Tensor] = None, extra: tuple = ()) -> tuple:
    """(``order`` is a permutation of 0..N-1, every size lies in [0, N], [values of ``extra``],
    int32 rank with ``rank[order[j]] = j`` when ``order`` is a permutation).

    The permutation test builds the rank: ``rank`` starts at -1 and gets ``j`` at ``order[j]``; N
    values in [0, N-1] leave no -1 behind iff none repeats. CPU: the few reductions are read one by
    one (cheapest there). Other devices: the conditions are stacked and read in ONE device -> host
    transfer, ``extra`` (0-dim bool tensors) included."""
    N = order.numel()
    dev = order.device
    has_sizes = sizes is not None and sizes.numel() > 0
    rank = torch.full((N,), -1, dtype=torch.int32, device=dev)
    if not one_transfer(dev):
        perm_ok = True
        if N > 0:
            lo, hi = torch.aminmax(order)
            perm_ok = int(lo) >= 0 and int(hi) < N
            if perm_ok:
                rank.scatter_(0, order, _arange_i32(N, dev))
                perm_ok = int(rank.min()) >= 0
        sizes_ok = True
        if has_sizes:
            if sizes.numel() <= 4096:  # a few values: reading them beats a reduction
                vals = sizes.tolist()
                lo, hi = min(vals), max(vals)
            else:
                lo, hi = (int(v) for v in torch.aminmax(sizes))
            sizes_ok = lo >= 0 and hi <= N
        return perm_ok, sizes_ok, [bool(e) for e in extra], rank
    conds = []
    if N > 0:
        lo, hi = torch.aminmax(order)
        rank.scatter_(0, order.clamp(0, N - 1), _arange_i32(N, dev))
        conds.append((lo >= 0) & (hi < N) & (rank.amin() >= 0))
    if has_sizes:
        lo, hi = torch.aminmax(sizes)
        conds.append((lo >= 0) & (hi <= N))
    conds += [e.to(device=dev, dtype=torch.bool).reshape(()) for e in extra]
    vals = torch.stack(conds).tolist() if conds else []
    i = 0
    perm_ok = sizes_ok = True
    if N > 0:
        perm_ok, i = vals[0], 1
    if has_sizes:
        sizes_ok, i = vals[i], i + 1
    return perm_ok, sizes_ok, vals[i:], rank


def _sizes_error(sizes: torch.Tensor, N: int) -> None:
    """Raise the ValueError naming the sizes outside [0, N] (error path: reads them)."""
    s = sizes.detach().cpu()
    bad = ((s < 0) | (s > N)).nonzero().flatten().tolist()
    raise ValueError(f"sizes: every size must lie in [0, N={N}]; out of range at client(s) {bad}: {s[bad].tolist()}")


def _permutation_error(order: torch.Tensor, name: str) -> None:
    """Raise the ValueError saying how ``order`` fails to be a permutation (error path: reads it)."""
    o = order.detach().cpu()
    N = o.numel()
    lo, hi = int(o.min()), int(o.max())
    if lo < 0 or hi >= N:
        raise ValueError(f"{name}: not a permutation of 0..{N - 1}: values must lie in [0, {N - 1}], "
                         f"found {lo if lo < 0 else hi}")
    dup = (torch.bincount(o, minlength=N) > 1).nonzero().flatten()[:5].tolist()
    raise ValueError(f"{name}: not a permutation of 0..{N - 1}: value(s) {dup} repeated")


class NeuronLayout:
    """Mask sites and parameter segments of a flat parameter buffer.

    ``NeuronLayout(sites, params)`` with ``sites = [(name, width), ...]`` and
    ``params = [(name, shape, out_site, in_site), ...]`` in flat order; usually built by
    :meth:`from_module`.

    Example (a 2-3-1 MLP whose 3 hidden units form the site "h")::

        >>> lay = NeuronLayout([("h", 3)], [("fc1.weight", (3, 2), "h", None),
        ...                                  ("fc1.bias", (3,), "h", None),
        ...                                  ("fc2.weight", (1, 3), None, "h"),
        ...                                  ("fc2.bias", (1,), None, None)])
        >>> lay.P, lay.N
        (13, 3)
        >>> lay.expand(torch.tensor([[True, False, True]])).int()
        tensor([[1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1]], dtype=torch.int32)
    """

    def __init__(self, sites, params):
        site_list = []
        off = 0
        seen = set()
        for item in sites:
            if isinstance(item, MaskSite):
                name, width = item.name, item.width
            else:
                if not isinstance(item, (tuple, list)) or len(item) != 2:
                    raise TypeError(f"sites: expected (name, width) pairs, got {item!r}")
                name, width = item
            if not isinstance(name, str):
                raise TypeError(f"sites: site names must be str, got {name!r}")
            if isinstance(width, bool) or not isinstance(width, int):
                raise TypeError(f"sites: site {name!r} needs a positive integer width, got {width!r}")
            if width <= 0:
                raise ValueError(f"sites: site {name!r} needs a positive integer width, got {width!r}")
            if name in seen:
                raise ValueError(f"sites: site {name!r} is listed twice")
            seen.add(name)
            site_list.append(MaskSite(name, int(width), off))
            off += int(width)
        self._sites = tuple(site_list)
        self._site_by_name = {s.name: s for s in self._sites}
        self._site_index = {s.name: i for i, s in enumerate(self._sites)}
        self._N = off

        segs = []
        off = 0
        names = set()
        for item in params:
            if not isinstance(item, (tuple, list)) or len(item) != 4:
                raise TypeError(f"params: expected (name, shape, out_site, in_site), got {item!r}")
            name, shape, out_site, in_site = item
            shape = tuple(int(d) for d in shape)
            if name in names:
                raise ValueError(f"params: parameter {name!r} is listed twice")
            names.add(name)
            for which, site, dim in (("out", out_site, 0), ("in", in_site, 1)):
                if site is None:
                    continue
                if site not in self._site_by_name:
                    raise ValueError(f"gates: parameter {name!r} names unknown {which} site {site!r}; "
                                     f"sites are {[s.name for s in self._sites]}")
                if len(shape) <= dim:
                    raise ValueError(f"gates: parameter {name!r} of shape {shape} has no dim {dim} for its "
                                     f"{which} site {site!r}")
                width = self._site_by_name[site].width
                if shape[dim] != width:
                    raise ValueError(f"gates: parameter {name!r} has {shape[dim]} entries along dim {dim} but "
                                     f"its {which} site {site!r} has width {width}")
            seg = Segment(name, off, shape, out_site, in_site)
            segs.append(seg)
            off += seg.numel
        self._segments = tuple(segs)
        self._P = off
        self._tables: dict = {}

    # ---- construction from a module -----------------------------------------------------------
    @classmethod
    def from_module(cls, module: torch.nn.Module, gates=None, *, sites=None) -> "NeuronLayout":
        """Layout of ``module``'s ``named_parameters()`` (flat order) with its mask sites.

        Uses ``module.mask_sites() -> [(site, width)]`` and
        ``module.parameter_gates() -> {param: (out_site | None, in_site | None)}``; pass ``gates=``
        (and ``sites=``) for a module without that protocol. Parameters missing from the gates dict
        are ungated (always live).
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if sites is None:
            if not hasattr(module, "mask_sites"):
                raise TypeError(f"module: {type(module).__name__} has no mask_sites(); pass sites=[(name, width), ...]")
            sites = module.mask_sites()
        if gates is None:
            if not hasattr(module, "parameter_gates"):
                raise TypeError(f"module: {type(module).__name__} has no parameter_gates(); pass gates={{param: (out_site, in_site)}}")
            gates = module.parameter_gates()
        if not isinstance(gates, dict):
            raise TypeError(f"gates: expected a dict param -> (out_site, in_site), got {type(gates).__name__}")
        named = list(module.named_parameters())
        pnames = {n for n, _ in named}
        unknown = [n for n in gates if n not in pnames]
        if unknown:
            raise ValueError(f"gates: unknown parameter(s) {unknown}; the module has {sorted(pnames)}")
        params = []
        for n, p in named:
            g = gates.get(n, (None, None))
            if not isinstance(g, (tuple, list)) or len(g) != 2 or \
                    not all(x is None or isinstance(x, str) for x in g):
                raise TypeError(f"gates: entry for {n!r} must be (out_site | None, in_site | None), got {g!r}")
            out_site, in_site = g
            params.append((n, tuple(p.shape), out_site, in_site))
        return cls(sites, params)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def sites(self) -> tuple:
        return self._sites

    @property
    def segments(self) -> tuple:
        return self._segments

    @property
    def P(self) -> int:
        return self._P

    @property
    def N(self) -> int:
        return self._N

    @property
    def S(self) -> int:
        return len(self._segments)

    def site(self, name: str) -> MaskSite:
        return self._site_by_name[name]

    def __repr__(self) -> str:
        sites = ", ".join(f"{s.name}:{s.width}" for s in self._sites)
        return f"NeuronLayout(P={self.P}, N={self.N}, sites=[{sites}], segments={len(self._segments)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, NeuronLayout) and self._sites == other._sites and self._segments == other._segments

    def __hash__(self) -> int:
        return hash((self._sites, self._segments))

    # ---- tables -------------------------------------------------------------------------------
    def segment_table(self, device=None) -> torch.Tensor:
        """int64 [S, 6]: rows ``(offset, rows, cols, inner, out_off, in_off)`` (the ABI's fk_segment)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = str(device)
        t = self._tables.get(key)
        if t is None:
            rows = []
            for s in self._segments:
                oo = self._site_by_name[s.out_site].offset if s.out_site is not None else -1
                io = self._site_by_name[s.in_site].offset if s.in_site is not None else -1
                rows.append((s.offset, s.rows, s.cols, s.inner, oo, io))
            t = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 6).to(device).contiguous()
            self._tables[key] = t
        return t

    def expand(self, neuron_masks) -> torch.Tensor:
        """Dense element masks bool [K, P] from neuron masks (bool [K, N] or :class:`NestedMasks`).

        ``out[k, p] = on[k, out(p)] and on[k, in(p)]`` (ungated dims count as on). Meant for the
        oracle and tests: the kernels never materialise this.
        """
        from .backends import torch_ref

        if isinstance(neuron_masks, NestedMasks):
            if neuron_masks.N != self.N:
                raise ValueError(f"neuron_masks: NestedMasks has N={neuron_masks.N}, the layout has N={self.N}")
            dev = neuron_masks.device
            K = neuron_masks.K
            nm, rank, sizes = None, neuron_masks.rank, neuron_masks.sizes
        else:
            if not isinstance(neuron_masks, torch.Tensor):
                raise TypeError(f"neuron_masks: expected a bool tensor [K, N] or NestedMasks, got {type(neuron_masks).__name__}")
            if neuron_masks.dtype != torch.bool:
                raise TypeError(f"neuron_masks: expected dtype torch.bool, got {neuron_masks.dtype}")
            if neuron_masks.dim() == 1:
                neuron_masks = neuron_masks[None]
            if neuron_masks.dim() != 2 or neuron_masks.shape[1] != self.N:
                raise ValueError(f"neuron_masks: expected shape [K, N={self.N}], got {tuple(neuron_masks.shape)}")
            dev = neuron_masks.device
            K = neuron_masks.shape[0]
            nm, rank, sizes = neuron_masks, None, None
        table = self.segment_table(dev)
        out = torch.empty(K, self.P, dtype=torch.bool, device=dev)
        for k in range(K):
            out[k] = torch_ref.gate_row(self.P, table, torch_ref.neuron_on(self.N, nm, rank, sizes, k))
        return out

    # ---- compact format -----------------------------------------------------------------------
    def compact_tables(self, kept, device=None) -> CompactTables:
        """Index tables of the compact upload format for K clients' kept neurons.

        ``kept``: bool [K, N], :class:`NestedMasks`, or a list of K index tensors (flat neuron
        numbers; the order of a client's indices inside each site gives their local positions,
        e.g. FedRolex's rolled windows). For the bool and nested forms local positions follow the
        neuron number (ascending). A client sends, per segment, its kept rows x kept columns
        (x inner) row-major, segments in flat order.
        """
        N, S = self.N, self.S
        if isinstance(kept, NestedMasks):
            if kept.N != N:
                raise ValueError(f"kept: NestedMasks has N={kept.N}, the layout has N={N}")
            kept = kept.dense()
        if isinstance(kept, torch.Tensor):
            if kept.dtype != torch.bool:
                raise TypeError(f"kept: expected a bool tensor [K, N], NestedMasks or a list of index tensors, got dtype {kept.dtype}")
            if kept.dim() != 2 or kept.shape[1] != N:
                raise ValueError(f"kept: expected shape [K, N={N}], got {tuple(kept.shape)}")
            K = kept.shape[0]
            if device is None:
                device = kept.device
            m = kept.to("cpu")
            inv = torch.full((K, N), -1, dtype=torch.int32)
            counts = torch.zeros(K, len(self._sites), dtype=torch.int64)
            for j, s in enumerate(self._sites):
                blk = m[:, s.offset:s.offset + s.width]
                pos = blk.to(torch.int32).cumsum(1, dtype=torch.int32) - 1
                inv[:, s.offset:s.offset + s.width] = torch.where(blk, pos, torch.full_like(pos, -1))
                counts[:, j] = blk.sum(1)
        elif isinstance(kept, (list, tuple)):
            K = len(kept)
            inv = torch.full((K, N), -1, dtype=torch.int32)
            counts = torch.zeros(K, len(self._sites), dtype=torch.int64)
            for k, idx in enumerate(kept):
                if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
                    if idx.shape != (N,):
                        raise ValueError(f"kept: client {k}: bool mask of shape {tuple(idx.shape)}, expected [N={N}]")
                    idx = idx.nonzero().flatten()
                    if device is None:
                        device = kept[k].device
                elif isinstance(idx, torch.Tensor) and device is None:
                    device = idx.device
                idx = _as_index_tensor(idx, f"kept: client {k}").to("cpu")
                if idx.numel() > 0:
                    lo, hi = int(idx.min()), int(idx.max())
                    if lo < 0 or hi >= N:
                        raise ValueError(f"kept: client {k}: neuron index {lo if lo < 0 else hi} out of range [0, {N - 1}]")
                    if bool((torch.bincount(idx, minlength=N) > 1).any()):
                        raise ValueError(f"kept: client {k}: repeated neuron indices")
                for j, s in enumerate(self._sites):
                    sel = idx[(idx >= s.offset) & (idx < s.offset + s.width)]
                    inv[k, sel] = torch.arange(sel.numel(), dtype=torch.int32)
                    counts[k, j] = sel.numel()
        else:
            raise TypeError(f"kept: expected a bool tensor [K, N], NestedMasks or a list of index tensors, got {type(kept).__name__}")
        seg_cols = torch.empty(K, S, dtype=torch.int64)
        sizes = torch.empty(K, S, dtype=torch.int64)
        for j, s in enumerate(self._segments):
            nr = counts[:, self._site_index[s.out_site]] if s.out_site is not None else torch.full((K,), s.rows, dtype=torch.int64)
            nc = counts[:, self._site_index[s.in_site]] if s.in_site is not None else torch.full((K,), s.cols, dtype=torch.int64)
            seg_cols[:, j] = nc
            sizes[:, j] = nr * nc * s.inner
        ends = sizes.cumsum(1)
        seg_off = torch.where(sizes > 0, ends - sizes, torch.full_like(sizes, -1))
        lengths = tuple(int(v) for v in (ends[:, -1] if S > 0 else torch.zeros(K, dtype=torch.int64)).tolist())
        device = torch.device(device) if device is not None else torch.device("cpu")
        return CompactTables(inv.to(device), seg_off.to(device), seg_cols.to(device), lengths)


# ---- flat parameters --------------------------------------------------------------------------
def flatten_parameters(module: torch.nn.Module) -> torch.Tensor:
    """float32 [P] copy of ``module``'s parameters, concatenated in ``named_parameters()`` order."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    params = [p for _, p in module.named_parameters()]
    if not params:
        return torch.zeros(0, dtype=torch.float32)
    devs = {p.device for p in params}
    if len(devs) > 1:
        raise ValueError(f"module: parameters live on several devices {sorted(map(str, devs))}")
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])


def bind_flat_parameters_(module: torch.nn.Module, flat: torch.Tensor) -> None:
    """Make every parameter of ``module`` a view of its slice of ``flat`` (float32 [P]).

    The Parameter objects stay the same (optimisers keep working); their ``.data`` becomes
    ``flat[offset : offset + numel].view(shape)``, so updating ``flat`` in place (e.g. with
    :func:`masked_mean_update_`) updates the module, and the module's values are now ``flat``'s.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"flat: expected a tensor, got {type(flat).__name__}")
    if flat.dtype != torch.float32:
        raise TypeError(f"flat: expected dtype torch.float32, got {flat.dtype}")
    named = list(module.named_parameters())
    P = sum(p.numel() for _, p in named)
    if flat.dim() != 1 or flat.numel() != P:
        raise ValueError(f"flat: expected shape [P={P}], got {tuple(flat.shape)}")
    if not flat.is_contiguous():
        raise ValueError("flat: must be contiguous")
    off = 0
    with torch.no_grad():
        for _, p in named:
            n = p.numel()
            p.data = flat[off:off + n].view(p.shape)
            off += n
