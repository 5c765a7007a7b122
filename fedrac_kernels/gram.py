"""Client Gram matrix (spec §7 K12) and FedPW's per-layer masking helpers (K13).

Gram matrix of the client updates, summed over layers::

    G[i, j] = sum_L <U_L[i], U_L[j]> = <u_i, u_j>          (u_i = client i's update, all layers)

so the per-layer sum equals the Gram matrix of the concatenated updates ``U`` [K, P], and
``G = U U^T``. FedPW (spec §5.9) takes ``g = G 1`` as its "dot" client weights.

Streaming over P. ``U`` is never needed in one piece: the coordinates are cut into fixed chunks
``[c*m, c*(m+1))`` of ``chunk_size`` columns of the concatenated coordinate space; each chunk is
gathered into one contiguous ``[K, c]`` buffer of the accumulation dtype, multiplied by its own
transpose (one small GEMM) and added to the ``[K, K]`` accumulator, in chunk order. Peak extra
memory is ``K * chunk_size`` values plus ``K^2``, whatever P is, so K x P may be far larger than
memory (feed it as per-client rows that are memory-mapped / on the host, or as layer blocks from a
generator). Because the chunks are cut from the *concatenated* coordinates, the result does not
depend on how ``U`` is supplied (one tensor, K rows, layer blocks of any widths): the same chunks
meet the same GEMMs in the same order, so the bits are the same (deterministic for a given
``chunk_size``, accumulation dtype, device and thread count). The final matrix is made exactly
symmetric from its upper triangle.

Accumulation: ``float64`` (default; products of float32 values are exact in float64, so only the
sums round) or ``float32`` (about 2x faster on CPUs, relative error ~1e-7 x sqrt(P/chunk)).
Non-finite values in client k's update make ``G[k, k]`` non-finite (inf^2 = inf, NaN^2 = NaN; an
overflow of float32 accumulation too), so the check is O(K): ``nonfinite="raise"`` names those
clients, ``"propagate"`` returns the matrix as it is.

The op is plain torch on every device (a GEMM per chunk: cuBLAS / MKL / OpenBLAS are already at
the roofline for it; the chunking is what matters). :func:`gram_reference` is the oracle.

FedPW helpers (per layer, all K client rows of one parameter tensor resident, spec K13):

* :func:`bottomk_magnitude_mask` - zero the ``n_k`` smallest-magnitude entries of row k (stable:
  ties go to the lower index), and report the mean magnitude of every ``sample_every``-th dropped
  entry (in ascending magnitude order), as FedPW's ``drop``;
* :func:`column_normalized_std` - rows scaled to unit L2 norm, then columns to unit L2 norm,
  then the unbiased std of every column across clients (FedPW's consensus measure), with an
  epsilon guard so that zero rows / columns give 0 instead of NaN;
* :func:`smallest_indices` - the ``n`` indices of the smallest values (stable ascending).

:func:`gram_matrix`, :meth:`GramAccumulator.add` and the three helpers are also ``torch.library``
custom ops (``torch.ops.fedrac.*``, schemas in :mod:`fedrac_kernels.library`): under
``torch.compile`` / ``torch.export`` or with fake tensors each call is one graph node running the
code below on real tensors; eager calls on plain tensors run it directly.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import library

__all__ = [
    "gram_matrix",
    "gram_reference",
    "GramAccumulator",
    "bottomk_magnitude_mask",
    "column_normalized_std",
    "smallest_indices",
    "DEFAULT_CHUNK",
]

DEFAULT_CHUNK = 1 << 16
ACCUMULATE = (torch.float32, torch.float64)
INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
NONFINITE = ("raise", "propagate")


# ---------------------------------------------------------------------------------------- checks

def _check_accumulate(accumulate) -> torch.dtype:
    if accumulate not in ACCUMULATE:
        raise TypeError(f"accumulate: expected torch.float32 or torch.float64, got {accumulate!r}")
    return accumulate


def _check_chunk(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    return chunk_size


def _check_nonfinite(nonfinite) -> str:
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite: expected one of {NONFINITE}, got {nonfinite!r}")
    return nonfinite


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; use float32, float64, bfloat16 or float16")


# ----------------------------------------------------------------------------------- accumulator

class GramAccumulator:
    """Streaming ``G = U U^T`` over column blocks of ``U`` (see the module docstring).

    >>> acc = GramAccumulator(K)
    >>> for name, block in layers:          # block: [K, p_L], any p_L >= 0, any float dtype/device
    ...     acc.add(block)
    >>> G = acc.gram()                      # [K, K] in the accumulation dtype

    ``device``: where the chunks are multiplied and G lives (default: the first block's device);
    blocks elsewhere are copied chunk by chunk. State is O(K * chunk_size + K^2).
    """

    def __init__(self, K: int, *, accumulate: torch.dtype = torch.float64, chunk_size: int = DEFAULT_CHUNK,
                 device: Optional[Union[str, torch.device]] = None):
        if isinstance(K, bool) or not isinstance(K, int):
            raise TypeError(f"K: expected an int, got {type(K).__name__}")
        if K < 1:
            raise ValueError(f"K: need at least one client, got {K}")
        self.K = K
        self.accumulate = _check_accumulate(accumulate)
        self.chunk_size = _check_chunk(chunk_size)
        self.device = torch.device(device) if device is not None else None
        self._acc: Optional[torch.Tensor] = None
        self._buf: Optional[torch.Tensor] = None
        self._fill = 0
        self.columns = 0            # coordinates seen so far

    # internals --------------------------------------------------------------------------------
    def _ensure(self, device: torch.device) -> None:
        if self.device is None:
            self.device = device
        if self._acc is None:
            self._acc = torch.zeros(self.K, self.K, dtype=self.accumulate, device=self.device)

    def _flush(self) -> None:
        if self._fill == 0:
            return
        c = self._buf[:, : self._fill]
        if self._fill < self.chunk_size:
            c = c.contiguous()
        self._acc.add_(torch.mm(c, c.t()))
        self._fill = 0

    def _new_buf(self) -> torch.Tensor:
        return torch.empty(self.K, self.chunk_size, dtype=self.accumulate, device=self.device)

    def _take(self, block: torch.Tensor) -> None:
        """Copy the columns of ``block`` ([K, p]) into the chunk buffer, flushing full chunks."""
        if library.use_ops(block, self._acc):  # tracing / fake tensors: the registered op, buffer always there
            if self._buf is None:
                self._buf = self._new_buf()
            torch.ops.fedrac.gram_add_(self._acc, self._buf, block, self._fill)
            self._fill = (self._fill + block.shape[1]) % self.chunk_size  # what _take_columns leaves
            return
        self._buf, self._fill = _take_columns(self._acc, self._buf, self._fill, block, self.chunk_size,
                                              self._new_buf)

    # public -----------------------------------------------------------------------------------
    def add(self, block: torch.Tensor) -> "GramAccumulator":
        """Add the columns of ``block`` ([K, p], the next p coordinates of every client)."""
        if not isinstance(block, torch.Tensor):
            raise TypeError(f"block: expected a tensor [K, p], got {type(block).__name__}")
        _check_float(block, "block")
        if block.dim() != 2 or block.shape[0] != self.K:
            raise ValueError(f"block: expected shape [K={self.K}, p], got {tuple(block.shape)}")
        self._ensure(block.device)
        self._take(block)
        self.columns += int(block.shape[1])
        return self

    def add_rows(self, rows: Sequence[torch.Tensor], start: int, stop: int) -> "GramAccumulator":
        """Add coordinates ``[start, stop)`` of K per-client 1-D tensors (only those slices are read)."""
        if not isinstance(rows, (list, tuple)) or len(rows) != self.K:
            raise ValueError(f"rows: expected a list of K={self.K} 1-D tensors")
        for k, r in enumerate(rows):
            if not isinstance(r, torch.Tensor) or r.dim() != 1:
                raise ValueError(f"rows: entry {k} is not a 1-D tensor")
            _check_float(r, f"rows: entry {k}")
            if not 0 <= start <= stop <= r.numel():
                raise ValueError(f"start: [{start}, {stop}) is outside entry {k}'s {r.numel()} elements")
        self._ensure(rows[0].device)
        pos = start
        while pos < stop:
            if self._buf is None:
                self._buf = torch.empty(self.K, self.chunk_size, dtype=self.accumulate, device=self.device)
            n = min(self.chunk_size - self._fill, stop - pos)
            for k, r in enumerate(rows):
                self._buf[k, self._fill:self._fill + n].copy_(r[pos:pos + n])
            self._fill += n
            pos += n
            if self._fill == self.chunk_size:
                self._flush()
        self.columns += stop - start
        return self

    def gram(self, *, nonfinite: str = "propagate") -> torch.Tensor:
        """The exactly symmetric ``[K, K]`` matrix of everything added so far (a new tensor). The
        accumulator is left as it is (a partly filled chunk stays open), so more blocks may follow
        and the final result is the same as without this call."""
        _check_nonfinite(nonfinite)
        if self._acc is None:
            self._ensure(self.device or torch.device("cpu"))
        A = self._acc
        if self._fill:
            c = self._buf[:, : self._fill].contiguous()
            A = A + torch.mm(c, c.t())
        G = torch.triu(A) + torch.triu(A, 1).t()
        if nonfinite == "raise":
            d = torch.diagonal(G)
            bad = (~torch.isfinite(d)).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"updates: client(s) {bad} hold non-finite values (or their squared norm "
                                 f"overflows {str(self.accumulate).replace('torch.', '')})")
        return G

    def reset(self) -> None:
        self._acc = None
        self._fill = 0
        self.columns = 0

    def state_dict(self) -> dict:
        """Everything needed to continue (the accumulator and the open chunk's columns)."""
        return {"K": self.K, "accumulate": str(self.accumulate), "chunk_size": self.chunk_size,
                "columns": self.columns, "acc": None if self._acc is None else self._acc.clone(),
                "open": None if not self._fill else self._buf[:, : self._fill].clone()}

    def load_state_dict(self, sd: dict) -> None:
        if int(sd["K"]) != self.K or int(sd["chunk_size"]) != self.chunk_size \
                or sd["accumulate"] != str(self.accumulate):
            raise ValueError("sd: K, chunk_size and accumulate must match this accumulator")
        self.reset()
        if sd["acc"] is not None:
            self._ensure(sd["acc"].device)
            self._acc.copy_(sd["acc"])
        if sd.get("open") is not None:
            self._buf = torch.empty(self.K, self.chunk_size, dtype=self.accumulate, device=self.device)
            n = int(sd["open"].shape[1])
            self._buf[:, :n].copy_(sd["open"])
            self._fill = n
        self.columns = int(sd["columns"])


def _take_columns(acc: torch.Tensor, buf: Optional[torch.Tensor], fill: int, block: torch.Tensor, chunk: int,
                  new_buf) -> tuple:
    """Add the columns of ``block`` ([K, p]) to the open chunk ``buf[:, :fill]``, multiplying every
    chunk that fills up into ``acc``; returns (buf, fill) with fill = (fill + p) % chunk.
    ``new_buf()`` makes the buffer when it is None and needed."""
    p = block.shape[1]
    pos = 0
    while pos < p:
        if fill == 0 and p - pos >= chunk:
            # a whole aligned chunk: one contiguous copy (cast / device move included)
            c = block[:, pos:pos + chunk].to(device=acc.device, dtype=acc.dtype, copy=True,
                                            memory_format=torch.contiguous_format)
            if not c.is_contiguous():
                c = c.contiguous()
            acc.add_(torch.mm(c, c.t()))
            pos += chunk
            continue
        if buf is None:
            buf = new_buf()
        n = min(chunk - fill, p - pos)
        buf[:, fill:fill + n].copy_(block[:, pos:pos + n])
        fill += n
        pos += n
        if fill == chunk:
            acc.add_(torch.mm(buf, buf.t()))
            fill = 0
    return buf, fill


def gram_add_checked_(acc: torch.Tensor, buf: torch.Tensor, block: torch.Tensor, fill: int) -> None:
    """The registered ``fedrac::gram_add_``: :meth:`GramAccumulator.add`'s column step on explicit
    state (``acc`` [K, K], the chunk buffer ``buf`` [K, chunk] holding ``fill`` open columns)."""
    for name, t in (("acc", acc), ("buf", buf), ("block", block)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor")
    _check_float(block, "block")
    K = acc.shape[0]
    if acc.shape != (K, K) or acc.dtype not in ACCUMULATE:
        raise ValueError(f"acc: expected a float32/float64 [K, K] accumulator, got {acc.dtype} {tuple(acc.shape)}")
    if buf.shape[0] != K or buf.shape[1] < 1 or buf.dtype != acc.dtype or buf.device != acc.device:
        raise ValueError(f"buf: expected a [K={K}, chunk] buffer like acc, got {buf.dtype} {tuple(buf.shape)}")
    if block.shape[0] != K:
        raise ValueError(f"block: expected shape [K={K}, p], got {tuple(block.shape)}")
    if not 0 <= fill < buf.shape[1]:
        raise ValueError(f"fill: expected 0 <= fill < {buf.shape[1]}, got {fill}")
    _take_columns(acc, buf, fill, block, buf.shape[1], None)


# ----------------------------------------------------------------------------------------- op

def _is_rows(updates) -> bool:
    return isinstance(updates, (list, tuple)) and len(updates) > 0 and all(
        isinstance(r, torch.Tensor) and r.dim() == 1 for r in updates)


def _gram_matrix_op(updates, *, accumulate: torch.dtype = torch.float64, chunk_size: int = DEFAULT_CHUNK,
                    device: Optional[Union[str, torch.device]] = None, nonfinite: str = "raise") -> torch.Tensor:
    _check_accumulate(accumulate)
    _check_chunk(chunk_size)
    _check_nonfinite(nonfinite)
    if isinstance(updates, torch.Tensor):
        parts, rows = [updates], False
    else:
        if isinstance(updates, (str, bytes)) or not hasattr(updates, "__iter__"):
            raise TypeError(f"updates: expected a tensor [K, P], a list of K 1-D tensors or an iterable of [K, p] "
                            f"blocks, got {type(updates).__name__}")
        parts = list(updates)
        if not parts:
            raise ValueError("updates: no clients (K = 0)")
        rows = _is_rows(parts)
    dev = torch.device(device) if device is not None else None
    return torch.ops.fedrac.gram_matrix(parts, rows, accumulate, chunk_size, dev, nonfinite)


@library.routed(_gram_matrix_op)
def gram_matrix(updates, *, accumulate: torch.dtype = torch.float64, chunk_size: int = DEFAULT_CHUNK,
                device: Optional[Union[str, torch.device]] = None, nonfinite: str = "raise") -> torch.Tensor:
    """``G = U U^T`` ([K, K], dtype ``accumulate``), streamed in chunks of ``chunk_size`` columns.

    ``updates`` is one of

    * a tensor ``[K, P]``;
    * a list/tuple of K 1-D tensors of one length P (one per client; may live on the host or be
      memory-mapped: only ``chunk_size`` columns of each are read at a time);
    * a list/tuple or any iterable (e.g. a generator) of 2-D blocks ``[K, p_L]`` (layers or column
      chunks of U, in coordinate order): ``G = sum_L U_L U_L^T``.

    ``device``: where the GEMMs run (default: the first tensor's). ``nonfinite="raise"``: a
    ValueError naming the clients whose update holds NaN/inf (checked on the diagonal, O(K)).
    Same bits for every form of the same U (module docstring). Example::

        >>> U = torch.tensor([[1., 2., 0.], [0., 1., 1.]])
        >>> gram_matrix(U)
        tensor([[5., 2.],
                [2., 2.]], dtype=torch.float64)
    """
    _check_accumulate(accumulate)
    _check_chunk(chunk_size)
    _check_nonfinite(nonfinite)
    if isinstance(updates, torch.Tensor):
        _check_float(updates, "updates")
        if updates.dim() != 2:
            raise ValueError(f"updates: expected a 2-D tensor [K, P], K 1-D rows or [K, p] blocks, got shape "
                             f"{tuple(updates.shape)}")
        if updates.shape[0] == 0:
            raise ValueError("updates: no clients (K = 0)")
        acc = GramAccumulator(int(updates.shape[0]), accumulate=accumulate, chunk_size=chunk_size, device=device)
        acc.add(updates)
        return acc.gram(nonfinite=nonfinite)
    if isinstance(updates, (str, bytes)) or not hasattr(updates, "__iter__"):
        raise TypeError(f"updates: expected a tensor [K, P], a list of K 1-D tensors or an iterable of [K, p] "
                        f"blocks, got {type(updates).__name__}")
    if isinstance(updates, (list, tuple)) and len(updates) == 0:
        raise ValueError("updates: no clients (K = 0)")
    if _is_rows(updates):
        K, P = len(updates), int(updates[0].numel())
        for k, r in enumerate(updates):
            _check_float(r, f"updates: entry {k}")
            if r.numel() != P:
                raise ValueError(f"updates: entry {k} has {r.numel()} elements but entry 0 has {P}")
            if r.dtype != updates[0].dtype:
                raise TypeError(f"updates: entry {k} has dtype {r.dtype} but entry 0 has {updates[0].dtype}")
        acc = GramAccumulator(K, accumulate=accumulate, chunk_size=chunk_size, device=device)
        acc.add_rows(list(updates), 0, P)
        return acc.gram(nonfinite=nonfinite)
    acc = None
    for i, block in enumerate(updates):
        if not isinstance(block, torch.Tensor):
            raise TypeError(f"updates: block {i} is a {type(block).__name__}, expected a tensor [K, p]")
        if block.dim() != 2:
            raise ValueError(f"updates: block {i} has shape {tuple(block.shape)}; blocks must be [K, p] "
                             f"(mixing 1-D rows and 2-D blocks is not allowed)")
        _check_float(block, f"updates: block {i}")
        if acc is None:
            if block.shape[0] == 0:
                raise ValueError("updates: no clients (K = 0)")
            acc = GramAccumulator(int(block.shape[0]), accumulate=accumulate, chunk_size=chunk_size, device=device)
        elif block.shape[0] != acc.K:
            raise ValueError(f"updates: block {i} has {block.shape[0]} rows but block 0 has K={acc.K}")
        acc.add(block)
    if acc is None:
        raise ValueError("updates: no blocks (empty iterable)")
    return acc.gram(nonfinite=nonfinite)


def gram_reference(updates) -> torch.Tensor:
    """Oracle: the dense float64 ``U U^T`` of a [K, P] tensor, K rows or a sequence of [K, p] blocks
    (per-block products summed, like the per-layer loop of FedPW's code)."""
    if isinstance(updates, torch.Tensor):
        U = updates.to(torch.float64)
        return U @ U.t()
    if _is_rows(updates):
        U = torch.stack([r.to(torch.float64) for r in updates])
        return U @ U.t()
    G = None
    for b in updates:
        B = b.to(torch.float64)
        G = B @ B.t() if G is None else G + B @ B.t()
    return G


# ------------------------------------------------------------------------------- FedPW helpers

def _smallest_indices_op(values, n):
    return torch.ops.fedrac.smallest_indices(values, n)


def _bottomk_op(rows, counts, *, sample_every: int = 10):
    if not isinstance(counts, torch.Tensor):
        counts = torch.tensor(counts, dtype=torch.int64)
    return torch.ops.fedrac.bottomk_magnitude_mask(rows, counts, sample_every)


def _column_std_op(rows, *, eps: float = 1e-12):
    return torch.ops.fedrac.column_normalized_std(rows, float(eps))


@library.routed(_smallest_indices_op)
def smallest_indices(values: torch.Tensor, n: int) -> torch.Tensor:
    """int64 indices of the ``n`` smallest entries of 1-D ``values``, ascending, ties by lower index."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError("values: expected a 1-D tensor")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= values.numel():
        raise ValueError(f"n: expected an int in [0, {values.numel()}], got {n!r}")
    return torch.sort(values, stable=True).indices[:n]


@library.routed(_bottomk_op)
def bottomk_magnitude_mask(rows: torch.Tensor, counts, *, sample_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the ``counts[k]`` smallest-|value| entries of every row ``k`` of ``rows`` [K, L].

    Returns ``(masked, dropped_mean)``: a new tensor with those entries set to 0, and float64 [K]
    with the mean |value| of the dropped entries ``0, s, 2s, ...`` of row k in ascending-magnitude
    order (``s = sample_every``; NaN where nothing was dropped). Ties: lower index dropped first.
    """
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise ValueError("rows: expected a 2-D tensor [K, L]")
    _check_float(rows, "rows")
    K, L = rows.shape
    counts = torch.as_tensor(counts, dtype=torch.int64).reshape(-1).cpu()
    if counts.numel() != K:
        raise ValueError(f"counts: expected K={K} values, got {counts.numel()}")
    if bool(((counts < 0) | (counts > L)).any()):
        raise ValueError(f"counts: every count must be in [0, L={L}]")
    if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
        raise ValueError(f"sample_every: expected an int >= 1, got {sample_every!r}")
    mag = rows.abs()
    order = torch.sort(mag, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(L, device=rows.device).expand(K, L))
    drop = rank < counts.to(rows.device).view(K, 1)
    masked = rows.masked_fill(drop, 0)
    means = torch.full((K,), float("nan"), dtype=torch.float64)
    for k in range(K):
        n = int(counts[k])
        if n:
            sampled = order[k, :n:sample_every]
            means[k] = float(mag[k, sampled].to(torch.float64).mean())
    return masked, means


@library.routed(_column_std_op)
def column_normalized_std(rows: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """Unbiased std across clients of every column of ``rows`` [K, L] after scaling each row to unit
    L2 norm and then each column to unit L2 norm (norms below ``eps`` count as ``eps``: zero rows /
    columns stay zero instead of NaN). float32 for float32 input; K >= 2."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise ValueError("rows: expected a 2-D tensor [K, L]")
    _check_float(rows, "rows")
    if rows.shape[0] < 2:
        raise ValueError(f"rows: need K >= 2 clients for a std across clients, got {rows.shape[0]}")
    r = rows / rows.norm(dim=1, keepdim=True).clamp_min(eps)
    c = r / r.norm(dim=0, keepdim=True).clamp_min(eps)
    return torch.std(c, dim=0, unbiased=True)
