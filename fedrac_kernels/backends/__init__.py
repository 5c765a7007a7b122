"""Back ends of ``fedrac_kernels`` and the protocol they share.

Every back end is a module exposing the same functions over *validated, normalised* tensors (the
public API in :mod:`fedrac_kernels.api` checks shapes, dtypes, devices and values before calling a
back end, so back ends do no user-facing validation). The pure-torch back end
:mod:`fedrac_kernels.backends.torch_ref` is the definition of the semantics and the oracle every
other back end is tested against; ``csrc/include/fedrac_kernels.h`` states the same rules for the
native code.

Protocol (``Accum`` is defined below)::

    available() -> tuple[bool, str]          # usable here?, and why not
    dense(acc: Accum, masks: list[Tensor] | None) -> None
    structured(acc, segments, N, neuron_masks, rank, sizes, nonzero: bool) -> None
    compact(acc, segments, N, inv, seg_off, seg_cols) -> None
    frequency_update(freq, masks, rank, sizes) -> None        # in place on freq
    stable_argsort(keys) -> Tensor[int64]                     # ascending, ties by lower index
    nested_masks(order, sizes) -> Tensor[bool, S, N]

Tensor conventions (all on one device, all contiguous):

* ``acc.rows``: list of K 1-D tensors of one dtype in {float32, bfloat16, float16}. Dense and
  structured: each of length ``acc.P``. Compact: each client's concatenated compact values.
  Updates given as one [K, L] tensor arrive as a :class:`StackedRows` instead: a sequence of the
  same K rows (indexing or iterating makes the views), whose ``base`` / ``row_addresses()`` let a
  native back end take the row addresses without building K tensor views.
* ``acc.weights``: float32 [K], every value >= 0. A client with weight 0 is skipped entirely
  (its row is never read), so a dropped client may hold NaN.
* ``acc.flags``: int32 [K], zeroed by the caller; a back end sets ``flags[k] = 1`` when client k
  has a non-finite value on an element where it is *active*.
* Finalize mode (``acc.out`` is not None): ``out = where(den > 0, g + num / den, g)``; ``out`` may be
  the same tensor as ``g``. Accumulate mode (``acc.out`` is None): ``acc_num``/``acc_den`` receive
  num/den. In both modes num/den start from ``init_num``/``init_den`` when given, else from zero
  (``acc_*`` may be the same tensors as ``init_*``).
* Accumulation, for every element, in client order k = 0..K-1, in float32, without fused
  multiply-add: ``t = w_k * float(v)``; ``num = num + t``; ``den = den + w_k`` for active elements.
  Back ends following this are bit-identical to ``torch_ref`` (and streaming equals batched).
* ``segments``: int64 [S, 6] rows ``(offset, rows, cols, inner, out_off, in_off)``; they tile
  [0, P) in order. Element (o, i, r) of a segment is at ``offset + (o*cols + i)*inner + r``;
  ``out_off``/``in_off`` are the first flat neuron index of the gating group, or -1 (ungated).
* Neuron gates: ``neuron_masks`` bool [K, N], or the nested form ``rank`` int32 [N] and
  ``sizes`` int32 [K] (neuron n on for client k iff ``rank[n] < sizes[k]``); exactly one form.
  Gate of element (o, i, r) for client k: ``on(k, out_off+o)`` (or True if out_off < 0) and
  ``on(k, in_off+i)`` (or True if in_off < 0). ``nonzero=True`` additionally requires v != 0.
* Compact: ``inv`` int32 [K, N] (position of neuron n in client k's sorted kept list of its group,
  or -1), ``seg_off`` int64 [K, S] (element offset of the sub-tensor in client k's values, or -1
  when k sends nothing for that segment), ``seg_cols`` int64 [K, S] (number of kept columns).
  ``po = inv[k, out_off+o]`` (or o), ``pi = inv[k, in_off+i]`` (or i); active iff all three are
  >= 0; ``v = values_k[seg_off + (po*seg_cols + pi)*inner + r]``.
* ``freq``: 1-D float32/float64/int32/int64; ``freq[n] += count`` where count is the number of
  clients whose mask holds n (dense bool [K, N] masks, or rank/sizes as above).
* ``nested_masks(order int64 [N], sizes int64 [S])``: row s is True exactly at ``order[:sizes[s]]``.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

BACKEND_NAMES = ("torch", "cpu", "cuda", "triton")

_MODULES = {
    "torch": "fedrac_kernels.backends.torch_ref",
    "cpu": "fedrac_kernels.backends.cpu",
    "cuda": "fedrac_kernels.backends.cuda",
    "triton": "fedrac_kernels.backends.triton_backend",
}


#: ABI codes of csrc/include/fedrac_kernels.h (FK_F32.. and FK_KEY_F32..), shared by the native back ends.
UPDATE_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KEY_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.int32: 2, torch.int64: 3}


def storage_address(t: torch.Tensor) -> Optional[int]:
    """Address of the storage behind ``t``, or None for tensors that have none to compare (fake /
    meta tensors while tracing, some tensor subclasses: torch raises RuntimeError or
    NotImplementedError there)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class StackedRows(Sequence):
    """The K rows of a 2-D tensor ``base`` [K, L], as a read-only sequence of 1-D tensors.

    The row views (``base.unbind(0)``, about 0.5 us per row) are made on first indexing or
    iteration only; the native back ends read ``base`` (dtype, device: one check for all rows) and
    :meth:`row_addresses` instead. ``base`` always has contiguous rows (stride 1 along L)."""

    __slots__ = ("base", "_views")

    def __init__(self, base: torch.Tensor):
        if base.dim() != 2:
            raise ValueError(f"StackedRows: expected a 2-D tensor, got shape {tuple(base.shape)}")
        if base.shape[1] > 1 and base.stride(1) != 1:
            base = base.contiguous()
        self.base = base
        self._views: Optional[list] = None

    def views(self) -> list:
        if self._views is None:
            self._views = list(self.base.unbind(0))
        return self._views

    def __len__(self) -> int:
        return self.base.shape[0]

    def __getitem__(self, i):
        return self.views()[i]

    def __iter__(self):
        return iter(self.views())

    def row_addresses(self) -> list:
        """``[rows[k].data_ptr() for k in range(K)]``, by arithmetic on ``base``."""
        b = self.base
        p0, step = b.data_ptr(), b.stride(0) * b.element_size()
        return [p0 + k * step for k in range(b.shape[0])]


@dataclass
class Accum:
    """Arguments shared by the aggregation entry points (see the module docstring)."""

    rows: list
    weights: torch.Tensor
    flags: torch.Tensor
    P: int
    out: Optional[torch.Tensor] = None
    g: Optional[torch.Tensor] = None
    init_num: Optional[torch.Tensor] = None
    init_den: Optional[torch.Tensor] = None
    acc_num: Optional[torch.Tensor] = None
    acc_den: Optional[torch.Tensor] = None

    @property
    def K(self) -> int:
        return len(self.rows)


def version_tuple(v: str) -> tuple:
    """(major, minor) of a version string such as '3.6.0', '2.13.0+cpu' or '3.7.0rc1'."""
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def triton_interpreter_issue(triton_version: str) -> Optional[str]:
    """Why Triton's interpreter cannot run this package's kernels here, or None.

    Triton 3.6's interpreter turns a runtime loop bound (``for k in range(K)``) into a Python int
    through ``int()`` of a one-element array, which numpy >= 2.4 refuses; triton 3.7 fixed it.
    Compiled kernels are not affected. Every Triton user in this package (the back end, the
    sparsification kernels, the simulator's evaluation walk) asks this before interpreting."""
    if version_tuple(triton_version) >= (3, 7):
        return None
    import numpy

    if version_tuple(numpy.__version__) < (2, 4):
        return None
    return (f"triton {triton_version}'s interpreter fails on runtime-bounded loops with numpy "
            f"{numpy.__version__} >= 2.4: use numpy<2.4 or triton>=3.7")


_cache: dict = {}


def get_backend(name: str):
    """Import and return the back-end module ``name`` (one of BACKEND_NAMES)."""
    if name not in _MODULES:
        raise ValueError(f"backend: unknown back end {name!r}; choose one of {BACKEND_NAMES}")
    if name not in _cache:
        _cache[name] = importlib.import_module(_MODULES[name])
    return _cache[name]


def backend_status(name: str) -> tuple[bool, str]:
    """(usable, reason) for back end ``name``; never raises."""
    try:
        mod = get_backend(name)
    except Exception as exc:  # an import failure is a reason, not a crash
        return False, f"import failed: {type(exc).__name__}: {exc}"
    try:
        return mod.available()
    except Exception as exc:
        return False, f"availability check failed: {type(exc).__name__}: {exc}"
