"""Triton back end: every protocol op as fused Triton kernels (see ``_triton/*`` for the designs).

On a CUDA machine the kernels are compiled (CUDA tensors). Without a GPU they run in Triton's
interpreter on CPU tensors, which requires ``TRITON_INTERPRET=1`` in the environment *before*
this package is first imported (``tests/conftest.py`` does that); the interpreter is for
correctness only (about 1.7 us per element x client).

Importing this module never fails when triton is missing or broken: :func:`available` reports
the reason and the ops raise ``RuntimeError`` with it.

Results are bit-identical to :mod:`torch_ref` (fixed client order, float32, no FMA contraction,
IEEE division, no float atomics).
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import Accum, triton_interpreter_issue, version_tuple

_IMPORT_ERROR = None
try:
    import triton

    from ._triton import aggregate as _agg
    from ._triton import frequency as _freq
    from ._triton import nested as _nested
    from ._triton import sort as _sort
    from ._triton.common import is_interpreted as _is_interpreted
except Exception as exc:  # ImportError, or a broken triton install
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

MIN_TRITON = (3, 6)
MAX_TRITON = (3, 9)  # newest version tested; newer ones are tried, with a note


def interpreted() -> bool:
    """True when the kernels were imported under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    return _IMPORT_ERROR is None and _is_interpreted(_agg._dense_kernel)


def available(device=None) -> tuple[bool, str]:
    """(usable, reason). ``device`` (optional): the device of the tensors to be processed."""
    if _IMPORT_ERROR is not None:
        return False, f"triton is not importable ({_IMPORT_ERROR}); pip install 'triton>=3.6,<3.10'"
    ver = triton.__version__
    vt = version_tuple(ver)
    if vt < MIN_TRITON:
        return False, f"triton {ver} is older than the supported 3.6"
    note = "" if vt <= MAX_TRITON else f" (newer than the tested {MAX_TRITON[0]}.{MAX_TRITON[1]})"
    dev_type = torch.device(device).type if device is not None else None
    if interpreted():
        issue = triton_interpreter_issue(ver)
        if issue:
            return False, issue
        if dev_type not in (None, "cpu"):
            return False, (f"TRITON_INTERPRET=1 was set at import: the interpreter runs on CPU "
                           f"tensors only, not {dev_type}")
        return True, f"triton {ver} interpreter (TRITON_INTERPRET=1) on CPU tensors; slow{note}"
    if dev_type == "cpu" or (dev_type is None and not torch.cuda.is_available()):
        hint = ("TRITON_INTERPRET=1 is set now but was not when fedrac_kernels was imported"
                if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else
                "set TRITON_INTERPRET=1 before importing fedrac_kernels to run the kernels in "
                "the interpreter")
        where = "tensors are on the CPU" if dev_type == "cpu" else "no CUDA GPU is available"
        return False, f"compiled triton {ver} needs CUDA tensors, but {where} ({hint})"
    return True, f"triton {ver} compiled for CUDA{note}"


def _on(t: torch.Tensor):
    """Launch on the tensors' GPU (Triton launches on the current device), with a clear error
    when triton is unusable."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError("triton back end unavailable: triton is not importable "
                           f"({_IMPORT_ERROR})")
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def dense(acc: Accum, masks) -> None:
    with _on(acc.weights):
        _agg.dense(acc, masks)


def structured(acc: Accum, segments, N, neuron_masks, rank, sizes, nonzero: bool) -> None:
    with _on(acc.weights):
        _agg.structured(acc, segments, N, neuron_masks, rank, sizes, nonzero)


def compact(acc: Accum, segments, N, inv, seg_off, seg_cols) -> None:
    with _on(acc.weights):
        _agg.compact(acc, segments, N, inv, seg_off, seg_cols)


def frequency_update(freq, masks, rank, sizes) -> None:
    with _on(freq):
        _freq.frequency_update(freq, masks, rank, sizes)


def stable_argsort(keys, *, small_n: int | None = None, tile: int | None = None) -> torch.Tensor:
    """Stable ascending argsort; ``small_n`` / ``tile`` override the counting-rank threshold and
    the radix tile (tests lower them to run the multi-pass radix path at interpreter sizes)."""
    with _on(keys):
        return _sort.stable_argsort(keys, small_n=_sort.SMALL_N if small_n is None else small_n,
                                    tile=_sort.TILE if tile is None else tile)


def nested_masks(order, sizes) -> torch.Tensor:
    with _on(order):
        return _nested.nested_masks(order, sizes)
