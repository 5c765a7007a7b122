"""Sparsified rewards and similarity to an aggregate (ALGORITHMS.md §7 K8, K9, K10).

The reward-based fair FL methods (CGSV, FedAVE, CFFL) hand each client a *differently sparsified*
copy of one aggregate update ``u``; CGSV also needs every client's cosine similarity to ``u``.
These ops do that for K clients at once.

Segments
    ``segments`` names the parts of the flat parameter vector that are sparsified separately
    ("layers"): a :class:`fedrac_kernels.NeuronLayout` (its parameter tensors), a sequence of
    :class:`fedrac_kernels.Segment` (``offset``, ``shape``), a sequence of ``(offset, length)``
    pairs, or an int64 tensor ``[S, 2]`` of such pairs. Segments must lie inside ``[0, P)`` and
    must not overlap; entries outside every segment are never selected.

Selection rule (K9, the ``mask_grad_update_by_order(..., mode='layer')`` rule of the CGSV /
FedAVE / CFFL code)
    For a segment of ``n`` entries and a fraction ``q`` (float64 arithmetic):
    ``c = min(ceil(q * n), n - 1)`` (and ``c = 0`` for ``q = 0``). ``c = 0`` keeps nothing;
    otherwise the threshold ``t`` is the ``c``-th largest ``|u|`` of the segment (1-based) and the
    client keeps every entry with ``|u| >= t`` - ties at the threshold are kept, so more than
    ``c`` entries may survive. The ``n - 1`` cap means even ``q = 1`` drops the smallest entry of
    every segment (unless it ties with the next one). A one-entry segment keeps nothing.
    Global top-k (K10, CFFL's ``largest_criterion='all'``) is the same with one segment and an
    explicit count ``c`` (no cap: ``c = P`` keeps everything). Random-k (CFFL's
    ``download='random'``): one random permutation of ``[0, P)`` is drawn from ``generator`` and
    client k keeps the entries at its first ``c_k`` positions.

Ops (``targets``: a float32 tensor ``[K, P]`` with contiguous rows, or a list of K contiguous
float32 ``[P]`` tensors, updated in place; ``u``: float32 ``[P]``, finite)::

    topq_counts(q, lengths) -> int64 [K, S]                  the counts c of the rule above
    topk_thresholds(u, segments, counts) -> float32 [K, S]   t per client and segment (+inf: none)
    threshold_add_(targets, u, segments, thresholds, *, alpha=1.0)
        targets[k, p] += alpha * u[p]  where |u[p]| >= thresholds[k, segment(p)]
    layerwise_topq_add_(targets, u, segments, q, *, alpha=1.0)     K9, one sort per segment
    layerwise_topq(u, segments, q) -> float32 [K, P]               functional form
    global_topk_add_(targets, u, counts, *, alpha=1.0) / global_topk(u, counts)   K10
    randomk_add_(targets, u, counts, *, generator=None, alpha=1.0) K10, random-k (shared permutation)
    cosine_to_aggregate(U, u, *, eps=1e-10, return_norms=False)    K8
        cos[k] = <U_k, u> / max(||U_k|| ||u||, eps)   (float64 [K]); with return_norms also
        (||U_k|| float64 [K], ||u|| float).

Only selected entries are written (``targets[k, p] + alpha * u[p]``, the product rounded to
float32 first); unselected entries are left untouched, bit for bit.

Back ends (``backend=``; ``None`` picks ``triton`` for CUDA tensors when Triton is usable, else
``fused``; ``FEDRAC_KERNELS_BACKEND`` naming one of these overrides):

* ``torch``  - the reference: client by client, segment by segment, a full descending sort per
  (client, segment), boolean indexing. Obviously right, slow.
* ``fused``  - one sort per segment for all K clients (on the int32 view of ``|u|``: same order,
  radix-sorted), then one vectorised compare and add over ``[K, n]`` per segment (CPU default;
  also runs on CUDA).
* ``triton`` - the same selection, then ONE Triton kernel for the threshold/apply pass: each
  program owns a ``BLOCK`` of one segment, loads ``u`` once and loops over the K clients (row
  pointers), storing only selected entries. Compiled on CUDA; under ``TRITON_INTERPRET=1`` it runs
  on CPU tensors (tests; correctness only). Triton is imported, and the kernels defined, at the
  first use of this back end (importing this module never imports triton).

The selection / apply results are identical across back ends (the thresholds are the same values
of the same sort, the apply is one float32 add per selected entry). ``cosine_to_aggregate``
accumulates differently per back end (reference: float64; fused: float32 BLAS; triton: float32
per-block partial sums added in float64), so its back ends agree to ~1e-6 relative, not bitwise.

Bad input raises ``ValueError`` / ``TypeError`` whose message starts with the argument's name,
before anything is written.

Every public op here is also a ``torch.library`` custom op (``torch.ops.fedrac.*``, schemas in
:mod:`fedrac_kernels.library`): under ``torch.compile`` / ``torch.export`` or with fake tensors a call
becomes one graph node whose implementation is the function below on real tensors (all its checks
included); eager calls on plain tensors run it directly. Under tracing, ``randomk_add_`` draws its
permutation before the op checks its arguments, and ``cosine_to_aggregate(..., return_norms=True)``
gives ``u_norm`` as a 0-dim float64 tensor.
"""
from __future__ import annotations

import math
import operator
import os
from typing import NamedTuple, Optional, Sequence

import torch

from . import library
from .backends import triton_interpreter_issue

__all__ = [
    "topq_counts",
    "topk_thresholds",
    "threshold_add_",
    "layerwise_topq_add_",
    "layerwise_topq",
    "global_topk_add_",
    "global_topk",
    "randomk_add_",
    "cosine_to_aggregate",
    "sparsify_backends",
]

BACKENDS = ("torch", "fused", "triton")
ENV_VAR = "FEDRAC_KERNELS_BACKEND"
BLOCK = 1024
NUM_WARPS = 4

_KERNELS: dict = {}


def _kernels() -> dict:
    """Import triton and define the kernels on first use (whether they run compiled or in the
    interpreter is fixed here, by TRITON_INTERPRET at that moment). ``{"error": reason}`` when
    triton is unusable."""
    if _KERNELS:
        return _KERNELS
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # ImportError or a broken install
        _KERNELS["error"] = f"{type(exc).__name__}: {exc}"
        return _KERNELS

    @triton.jit
    def select_add_kernel(TPTRS, U, THR, CNT, RANK, BSEG, BSTART, SEGEND, S, K, alpha,
                          RANDOM: tl.constexpr, USE_ALPHA: tl.constexpr, BLOCK: tl.constexpr):
        """One program = one BLOCK of one segment. ``u`` (and its key) is loaded once, then the
        K target rows are visited in order; only the selected lanes are read and written."""
        pid = tl.program_id(0)
        seg = tl.load(BSEG + pid)
        start = tl.load(BSTART + pid)
        end = tl.load(SEGEND + seg)
        offs = start + tl.arange(0, BLOCK)
        inb = offs < end
        u = tl.load(U + offs, mask=inb, other=0.0)
        if USE_ALPHA:
            v = u * alpha
        else:
            v = u
        if RANDOM:
            key = tl.load(RANK + offs, mask=inb, other=0)
        else:
            key = tl.abs(u)
        for k in range(K):
            row = tl.load(TPTRS + k).to(tl.pointer_type(tl.float32))
            if RANDOM:
                c = tl.load(CNT + k)
                keep = inb & (key < c)
            else:
                t = tl.load(THR + k * S + seg)
                keep = inb & (key >= t)
            x = tl.load(row + offs, mask=keep, other=0.0)
            tl.store(row + offs, x + v, mask=keep)

    @triton.jit
    def cosine_partial_kernel(UPTRS, A, OUT, P, K, BLOCK: tl.constexpr):
        """Per block: <U_k, a> and ||U_k||^2 for every k, and ||a||^2 (float32 partial sums)."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inb = offs < P
        a = tl.load(A + offs, mask=inb, other=0.0)
        base = OUT + pid * (2 * K + 1)
        tl.store(base + 2 * K, tl.sum(a * a, 0))
        for k in range(K):
            row = tl.load(UPTRS + k).to(tl.pointer_type(tl.float32))
            g = tl.load(row + offs, mask=inb, other=0.0)
            tl.store(base + 2 * k, tl.sum(g * a, 0))
            tl.store(base + 2 * k + 1, tl.sum(g * g, 0))

    _KERNELS.update(select_add=select_add_kernel, cosine_partial=cosine_partial_kernel,
                    interpreted=type(select_add_kernel).__name__ == "InterpretedFunction",
                    cdiv=triton.cdiv, version=triton.__version__)
    return _KERNELS


def _triton_status(device: torch.device) -> tuple[bool, str]:
    kern = _kernels()
    if "error" in kern:
        return False, f"triton cannot be imported ({kern['error']})"
    if kern["interpreted"]:
        issue = triton_interpreter_issue(kern["version"])
        if issue:
            return False, issue
        if device.type != "cpu":
            return False, ("the Triton kernels were defined under TRITON_INTERPRET=1 and run on CPU "
                           f"tensors only, got {device}")
        return True, "interpreter"
    if device.type != "cuda":
        return False, f"compiled Triton kernels need CUDA tensors, got {device}"
    return True, "compiled"


def sparsify_backends(device: Optional[torch.device] = None) -> list[str]:
    """Back ends of this module usable for tensors on ``device`` (default CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = ["torch", "fused"]
    if _triton_status(device)[0]:
        out.append("triton")
    return out


def _pick_backend(backend: Optional[str], device: torch.device) -> str:
    if backend is None:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env in BACKENDS and (env != "triton" or _triton_status(device)[0]):
            return env
        if device.type == "cuda" and _triton_status(device)[0]:
            return "triton"
        return "fused"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: unknown back end {backend!r}; use one of {', '.join(BACKENDS)} or None")
    if backend == "triton":
        ok, why = _triton_status(device)
        if not ok:
            raise ValueError(f"backend: triton is not usable here ({why})")
    return backend


# ---------------------------------------------------------------------------------- validation

def _check_u(u, name: str = "u") -> torch.Tensor:
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(u).__name__}")
    if u.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [P], got shape {tuple(u.shape)}")
    if u.dtype != torch.float32:
        raise TypeError(f"{name}: expected float32, got {u.dtype}")
    if not _all_finite(u):
        raise ValueError(f"{name}: contains NaN or Inf")
    return u.contiguous()


def _all_finite(t: torch.Tensor) -> bool:
    """True iff every entry is finite. A NaN/Inf entry makes the sum non-finite, so a finite sum
    (one fast reduction, no temporary) settles it; only a non-finite sum (which may also be an
    overflow of finite values) pays for the exact elementwise check."""
    if t.numel() == 0 or math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _check_targets(targets, u: torch.Tensor, name: str = "targets") -> list[torch.Tensor]:
    """The K target rows (views for a 2-D tensor), validated."""
    P = u.numel()
    if isinstance(targets, torch.Tensor):
        if targets.dim() != 2 or targets.shape[1] != P:
            raise ValueError(f"{name}: expected a [K, {P}] tensor or a list of K [{P}] tensors, "
                             f"got shape {tuple(targets.shape)}")
        if targets.dtype != torch.float32:
            raise TypeError(f"{name}: expected float32, got {targets.dtype}")
        if P > 1 and targets.stride(1) != 1:
            raise ValueError(f"{name}: rows must be contiguous (stride 1 along P)")
        if targets.shape[0] > 1 and P and abs(targets.stride(0)) < P:
            raise ValueError(f"{name}: rows overlap in memory (stride {targets.stride(0)} along K)")
        rows = list(targets.unbind(0))
    elif isinstance(targets, (list, tuple)):
        rows = list(targets)
        for k, t in enumerate(rows):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: element {k} is a {type(t).__name__}, expected a tensor")
            if t.dim() != 1 or t.numel() != P:
                raise ValueError(f"{name}: element {k} has shape {tuple(t.shape)}, expected [{P}]")
            if t.dtype != torch.float32:
                raise TypeError(f"{name}: element {k} is {t.dtype}, expected float32")
            if P > 1 and t.stride(0) != 1:
                raise ValueError(f"{name}: element {k} must be contiguous")
    else:
        raise TypeError(f"{name}: expected a [K, P] tensor or a list of tensors, got {type(targets).__name__}")
    if not rows:
        raise ValueError(f"{name}: need at least one client (K = 0)")
    ustore = u.untyped_storage().data_ptr()
    for k, t in enumerate(rows):
        if t.device != u.device:
            raise ValueError(f"{name}: element {k} is on {t.device} but u is on {u.device}")
        if P and t.untyped_storage().data_ptr() == ustore:
            raise ValueError(f"{name}: element {k} shares memory with u")
    return rows


def _check_segments(segments, P: int) -> tuple[list[int], list[int]]:
    """(offsets, lengths) of the segments, validated."""
    if segments is None:
        raise TypeError("segments: expected a NeuronLayout, Segments, (offset, length) pairs or an [S, 2] tensor")
    if hasattr(segments, "segments") and not isinstance(segments, torch.Tensor):
        segments = segments.segments                       # NeuronLayout
    offs: list[int] = []
    lens: list[int] = []
    if isinstance(segments, torch.Tensor):
        if segments.dim() != 2 or segments.shape[1] != 2 or segments.dtype.is_floating_point:
            raise ValueError("segments: a tensor must be integer [S, 2] of (offset, length) rows")
        pairs = [tuple(int(v) for v in row) for row in segments.cpu().tolist()]
    else:
        try:
            items = list(segments)
        except TypeError:
            raise TypeError(f"segments: expected a sequence, got {type(segments).__name__}") from None
        pairs = []
        for i, s in enumerate(items):
            if hasattr(s, "offset") and hasattr(s, "shape"):
                pairs.append((int(s.offset), int(math.prod(s.shape))))
            else:
                try:
                    if len(s) != 2 or any(isinstance(v, bool) for v in s):
                        raise TypeError
                    pairs.append((operator.index(s[0]), operator.index(s[1])))
                except TypeError:
                    raise TypeError(f"segments: entry {i} ({s!r}) is not a Segment or an (offset, length) "
                                    f"pair of ints") from None
    for i, (o, n) in enumerate(pairs):
        if o < 0 or n < 0 or o + n > P:
            raise ValueError(f"segments: entry {i} = (offset {o}, length {n}) is outside [0, {P})")
        offs.append(o)
        lens.append(n)
    order = sorted(range(len(offs)), key=lambda i: offs[i])
    end = 0
    for i in order:
        if lens[i] and offs[i] < end:
            raise ValueError(f"segments: entry {i} (offset {offs[i]}) overlaps an earlier segment")
        end = max(end, offs[i] + lens[i])
    return offs, lens


def _check_q(q, K: int) -> torch.Tensor:
    try:
        qt = torch.as_tensor(q, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"q: expected K numbers, got {type(q).__name__}") from None
    if qt.dim() == 0:
        qt = qt.reshape(1)
    if qt.dim() != 1 or qt.numel() != K:
        raise ValueError(f"q: expected {K} values (one per client), got shape {tuple(qt.shape)}")
    if not bool(torch.isfinite(qt).all()) or bool((qt < 0).any()) or bool((qt > 1).any()):
        raise ValueError(f"q: fractions must be finite and in [0, 1], got {qt.tolist()}")
    return qt


def _check_counts(counts, K: int, limits: Sequence[int], name: str = "counts") -> torch.Tensor:
    """int64 [K, S] (``limits`` per segment)."""
    S = len(limits)
    if isinstance(counts, torch.Tensor):
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise TypeError(f"{name}: expected integers, got {counts.dtype}")
        ct = counts.detach().cpu().to(torch.int64)
    else:
        ct = torch.tensor(_ints(counts, name), dtype=torch.int64)
    if ct.dim() == 1 and S == 1:
        ct = ct.reshape(-1, 1)
    if ct.dim() != 2 or ct.shape != (K, S):
        raise ValueError(f"{name}: expected shape [{K}, {S}] (clients x segments), got {tuple(ct.shape)}")
    lim = torch.tensor(list(limits), dtype=torch.int64)
    if bool((ct < 0).any()) or bool((ct > lim).any()):
        raise ValueError(f"{name}: counts must be in [0, segment length {list(limits)}], got {ct.tolist()}")
    return ct


def _ints(counts, name: str) -> list:
    """A (nested) sequence of ints as nested lists, TypeError naming ``name`` for anything else."""
    try:
        vals = counts.tolist() if hasattr(counts, "tolist") else list(counts)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of integers, got {type(counts).__name__}") from None

    def ints(x):
        if isinstance(x, (list, tuple)):
            return [ints(v) for v in x]
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name}: expected integers, got {x!r}")
        return x

    return ints(vals)


def _num_clients(values, name: str) -> int:
    """K = the leading length of ``values`` (a tensor or a (nested) sequence); ValueError if 0."""
    if isinstance(values, torch.Tensor):
        K = int(values.shape[0]) if values.dim() >= 1 else 1
    else:
        try:
            K = len(values)
        except TypeError:
            raise TypeError(f"{name}: expected one value per client, got {type(values).__name__}") from None
    if K == 0:
        raise ValueError(f"{name}: need at least one client (K = 0)")
    return K


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha: expected a number, got {type(alpha).__name__}") from None
    if not math.isfinite(a):
        raise ValueError(f"alpha: must be finite, got {a}")
    return a


def _check_thresholds(thr, K: int, S: int, device) -> torch.Tensor:
    if not isinstance(thr, torch.Tensor):
        raise TypeError(f"thresholds: expected a float32 [K, S] tensor, got {type(thr).__name__}")
    if thr.shape != (K, S):
        raise ValueError(f"thresholds: expected shape [{K}, {S}], got {tuple(thr.shape)}")
    if thr.dtype != torch.float32:
        raise TypeError(f"thresholds: expected float32, got {thr.dtype}")
    if thr.device != device:
        raise ValueError(f"thresholds: on {thr.device} but u is on {device}")
    if bool(torch.isnan(thr).any()):
        raise ValueError("thresholds: contains NaN")
    return thr.contiguous()


def _scaled(u: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 1.0:
        return u
    return u * torch.tensor(alpha, dtype=torch.float32, device=u.device)


# ------------------------------------------------------------------ registered ops (tracing)
# Under torch.compile / export or with fake tensors the public functions call the torch.library
# ops of fedrac_kernels.library; these turn their arguments into the ops' tensor form (metadata
# only: the op, which runs the undecorated function on real tensors, checks everything).

def _u_arg(u) -> torch.Tensor:
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u: expected a torch.Tensor, got {type(u).__name__}")
    if u.dim() != 1:
        raise ValueError(f"u: expected a 1-D tensor [P], got shape {tuple(u.shape)}")
    return u


def _rows_arg(targets, name: str = "targets") -> list:
    """[T] for one [K, P] tensor, else the list of K rows."""
    if isinstance(targets, torch.Tensor):
        if targets.dim() != 2:
            raise ValueError(f"{name}: expected a [K, P] tensor or a list of K [P] tensors, "
                             f"got shape {tuple(targets.shape)}")
        return [targets]
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"{name}: expected a [K, P] tensor or a list of tensors, got {type(targets).__name__}")
    if not targets:
        raise ValueError(f"{name}: need at least one client (K = 0)")
    for k, t in enumerate(targets):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: element {k} is a {type(t).__name__}, expected a tensor")
        if t.dim() != 1:
            raise ValueError(f"{name}: element {k} has shape {tuple(t.shape)}, expected a 1-D tensor")
    return list(targets)


def _segments_arg(segments, u: torch.Tensor) -> torch.Tensor:
    if isinstance(segments, torch.Tensor):
        return segments
    offs, lens = _check_segments(segments, u.shape[0])  # layouts and pairs: plain Python, checked now
    return torch.tensor([[o, n] for o, n in zip(offs, lens)], dtype=torch.int64).reshape(-1, 2)


def _float_arg(q, name: str = "q") -> torch.Tensor:
    if isinstance(q, torch.Tensor):
        return q
    try:
        return torch.tensor(q, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected K numbers, got {type(q).__name__}") from None


def _int_arg(counts, name: str = "counts") -> torch.Tensor:
    if isinstance(counts, torch.Tensor):
        if counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise TypeError(f"{name}: expected integers, got {counts.dtype}")
        return counts
    return torch.tensor(_ints(counts, name), dtype=torch.int64)


def _backend_arg(backend) -> str:
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"backend: unknown back end {backend!r}; use one of {', '.join(BACKENDS)} or None")
    return backend or ""


def _topq_counts_op(q, lengths):
    return torch.ops.fedrac.topq_counts(_float_arg(q), [int(n) for n in lengths])


def _topk_thresholds_op(u, segments, counts, *, backend=None):
    u = _u_arg(u)
    return torch.ops.fedrac.topk_thresholds(u, _segments_arg(segments, u), _int_arg(counts), _backend_arg(backend))


def _threshold_add_op(targets, u, segments, thresholds, *, alpha=1.0, backend=None):
    u = _u_arg(u)
    torch.ops.fedrac.threshold_add_(_rows_arg(targets), u, _segments_arg(segments, u), thresholds,
                                    _check_alpha(alpha), _backend_arg(backend))
    return targets


def _layerwise_topq_add_op(targets, u, segments, q, *, alpha=1.0, backend=None):
    u = _u_arg(u)
    torch.ops.fedrac.layerwise_topq_add_(_rows_arg(targets), u, _segments_arg(segments, u), _float_arg(q),
                                         _check_alpha(alpha), _backend_arg(backend))
    return targets


def _layerwise_topq_op(u, segments, q, *, backend=None):
    u = _u_arg(u)
    return torch.ops.fedrac.layerwise_topq(u, _segments_arg(segments, u), _float_arg(q), _backend_arg(backend))


def _global_topk_add_op(targets, u, counts, *, alpha=1.0, backend=None):
    torch.ops.fedrac.global_topk_add_(_rows_arg(targets), _u_arg(u), _int_arg(counts), _check_alpha(alpha),
                                      _backend_arg(backend))
    return targets


def _global_topk_op(u, counts, *, backend=None):
    return torch.ops.fedrac.global_topk(_u_arg(u), _int_arg(counts), _backend_arg(backend))


def _randomk_add_op(targets, u, counts, *, generator=None, alpha=1.0, backend=None):
    u = _u_arg(u)
    perm = _draw_permutation(u, generator)
    torch.ops.fedrac.randomk_add_(_rows_arg(targets), u, _int_arg(counts), perm, _check_alpha(alpha),
                                  _backend_arg(backend))
    return targets


def _cosine_op(U, u, *, eps=1e-10, return_norms=False, backend=None):
    """Under tracing ``u_norm`` stays a 0-dim float64 tensor (a float would end the graph)."""
    cos, norms, unorm = torch.ops.fedrac.cosine_to_aggregate(_rows_arg(U, "U"), _u_arg(u), float(eps),
                                                             _backend_arg(backend))
    return CosineNorms(cos, norms, unorm) if return_norms else cos


# -------------------------------------------------------------------------------------- counts

@library.routed(_topq_counts_op)
def topq_counts(q, lengths: Sequence[int]) -> torch.Tensor:
    """int64 [K, S]: ``min(ceil(q_k n_s), n_s - 1)`` (at least 0), float64 arithmetic."""
    qt = torch.as_tensor(q, dtype=torch.float64).detach().cpu().reshape(-1)
    n = torch.as_tensor(list(lengths), dtype=torch.float64)
    c = torch.ceil(qt[:, None] * n[None, :])
    c = torch.minimum(c, n[None, :] - 1.0).clamp_(min=0.0)
    return c.to(torch.int64)


# ----------------------------------------------------------------------------------- selection

def _thresholds_reference(u, offs, lens, counts) -> torch.Tensor:
    K, S = counts.shape
    thr = torch.full((K, S), math.inf, dtype=torch.float32, device=u.device)
    for k in range(K):
        for s in range(S):
            c = int(counts[k, s])
            if c == 0:
                continue
            seg = u[offs[s]:offs[s] + lens[s]].abs()
            thr[k, s] = torch.sort(seg, descending=True).values[c - 1]
    return thr


def _thresholds_fused(u, offs, lens, counts) -> torch.Tensor:
    """One ascending sort per segment, shared by all clients: the magnitudes are non-negative
    finite floats, whose int32 bit patterns sort in the same order, so the sort runs on the int32
    view (a radix sort in torch, several times faster than a float sort); the ``c``-th largest is
    then entry ``n - c``."""
    K, S = counts.shape
    thr = torch.full((K, S), math.inf, dtype=torch.float32, device=u.device)
    cmax = counts.max(0).values.tolist()
    a = u.abs()
    for s in range(S):
        if int(cmax[s]) == 0:
            continue
        n = lens[s]
        seg = a[offs[s]:offs[s] + n]
        asc = torch.sort(seg.view(torch.int32)).values.view(torch.float32)
        c = counts[:, s]
        sel = (c > 0).nonzero().flatten()
        thr[sel.to(u.device), s] = asc[(n - c[sel]).to(u.device)]
    return thr


@library.routed(_topk_thresholds_op)
def topk_thresholds(u: torch.Tensor, segments, counts, *, backend: Optional[str] = None) -> torch.Tensor:
    """float32 [K, S]: the ``counts[k, s]``-th largest ``|u|`` of segment s (+inf where the count is 0)."""
    u = _check_u(u)
    offs, lens = _check_segments(segments, u.numel())
    ct = _check_counts(counts, _num_clients(counts, "counts"), lens)
    be = _pick_backend(backend, u.device)
    if be == "torch":
        return _thresholds_reference(u, offs, lens, ct)
    return _thresholds_fused(u, offs, lens, ct)


# ------------------------------------------------------------------------------------ applying

def _apply_reference(rows, u, offs, lens, thr, alpha) -> None:
    v = _scaled(u, alpha)
    a = u.abs()
    for k, t in enumerate(rows):
        for s in range(len(offs)):
            sl = slice(offs[s], offs[s] + lens[s])
            keep = a[sl] >= thr[k, s]
            part = t[sl]
            part[keep] = part[keep] + v[sl][keep]


def _apply_fused(targets, rows, u, offs, lens, thr, alpha) -> None:
    """Per segment one compare of ``|u|`` against all K thresholds and one add of
    ``where(keep, v, -0.0)``: ``x + (-0.0) == x`` bit for bit for every x, so unselected entries
    keep their exact bits (including -0.0)."""
    v = _scaled(u, alpha)
    a = u.abs()
    K = len(rows)
    live = torch.isfinite(thr).any(0).tolist()         # segments where somebody keeps something
    stacked = isinstance(targets, torch.Tensor)
    fin = torch.isfinite(thr).tolist()
    chunk = _chunk(K)                                   # K x chunk temporaries stay cache-sized
    for s in range(len(offs)):
        if not live[s] or lens[s] == 0:
            continue
        for i in range(offs[s], offs[s] + lens[s], chunk):
            sl = slice(i, min(i + chunk, offs[s] + lens[s]))
            if stacked:
                keep = a[sl].unsqueeze(0) >= thr[:, s:s + 1]
                targets[:, sl].add_(torch.where(keep, v[sl], -0.0))
            else:
                for k, t in enumerate(rows):
                    if fin[k][s]:
                        t[sl].add_(torch.where(a[sl] >= thr[k, s], v[sl], -0.0))


def _chunk(K: int) -> int:
    """Columns per step of the vectorised apply: about 2**19 [K, chunk] elements, at least 8192."""
    return max(8192, (1 << 19) // max(K, 1))


_BLOCK_TABLES: dict = {}


def _block_table(offs, lens, device, block: int):
    key = (tuple(offs), tuple(lens), str(device), block)
    hit = _BLOCK_TABLES.get(key)
    if hit is not None:
        return hit
    bseg, bstart = [], []
    for s, (o, n) in enumerate(zip(offs, lens)):
        for start in range(o, o + n, block):
            bseg.append(s)
            bstart.append(start)
    ends = [o + n for o, n in zip(offs, lens)]
    out = (torch.tensor(bseg, dtype=torch.int64, device=device),
           torch.tensor(bstart, dtype=torch.int64, device=device),
           torch.tensor(ends if ends else [0], dtype=torch.int64, device=device), len(bseg))
    if len(_BLOCK_TABLES) > 32:
        _BLOCK_TABLES.clear()
    _BLOCK_TABLES[key] = out
    return out


def _launch_select_add(rows, u, offs, lens, alpha, *, thr=None, counts=None, rank=None,
                       block: int = BLOCK) -> None:
    bseg, bstart, ends, nblocks = _block_table(offs, lens, u.device, block)
    if nblocks == 0:
        return
    ptrs = torch.tensor([t.data_ptr() for t in rows], dtype=torch.int64, device=u.device)
    random = rank is not None
    dummy_f = u
    dummy_i = bseg
    _kernels()["select_add"][(nblocks,)](
        ptrs, u, thr if thr is not None else dummy_f, counts if counts is not None else dummy_i,
        rank if rank is not None else dummy_i, bseg, bstart, ends, len(offs), len(rows), float(alpha),
        RANDOM=random, USE_ALPHA=(alpha != 1.0), BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False)


@library.routed(_threshold_add_op)
def threshold_add_(targets, u: torch.Tensor, segments, thresholds: torch.Tensor, *, alpha: float = 1.0,
                   backend: Optional[str] = None):
    """``targets[k, p] += alpha * u[p]`` where ``|u[p]| >= thresholds[k, segment(p)]``; returns targets."""
    u = _check_u(u)
    rows = _check_targets(targets, u)
    offs, lens = _check_segments(segments, u.numel())
    thr = _check_thresholds(thresholds, len(rows), len(offs), u.device)
    a = _check_alpha(alpha)
    be = _pick_backend(backend, u.device)
    _apply(be, targets, rows, u, offs, lens, thr, a)
    return targets


def _apply(be, targets, rows, u, offs, lens, thr, alpha) -> None:
    if be == "torch":
        _apply_reference(rows, u, offs, lens, thr, alpha)
    elif be == "fused":
        _apply_fused(targets, rows, u, offs, lens, thr, alpha)
    else:
        _launch_select_add(rows, u, offs, lens, alpha, thr=thr)


# --------------------------------------------------------------------------------------- K9 ops

def _layerwise_reference(rows, u, offs, lens, q, alpha) -> None:
    """The rule written out directly, client by client and segment by segment (the oracle)."""
    v = _scaled(u, alpha)
    for k, t in enumerate(rows):
        for s in range(len(offs)):
            n = lens[s]
            c = min(math.ceil(float(q[k]) * n), n - 1)
            if c <= 0:
                continue
            sl = slice(offs[s], offs[s] + n)
            mag = u[sl].abs()
            t_ks = torch.sort(mag, descending=True).values[c - 1]
            keep = mag >= t_ks
            part = t[sl]
            part[keep] = part[keep] + v[sl][keep]


@library.routed(_layerwise_topq_add_op)
def layerwise_topq_add_(targets, u: torch.Tensor, segments, q, *, alpha: float = 1.0,
                        backend: Optional[str] = None):
    """Add each client's layer-wise top-``q_k`` sparsification of ``u`` to its row (K9).

    ``targets``: float32 ``[K, P]`` or a list of K ``[P]`` tensors; ``q``: K fractions in [0, 1].
    Returns ``targets``."""
    u = _check_u(u)
    rows = _check_targets(targets, u)
    offs, lens = _check_segments(segments, u.numel())
    qt = _check_q(q, len(rows))
    a = _check_alpha(alpha)
    be = _pick_backend(backend, u.device)
    if be == "torch":
        _layerwise_reference(rows, u, offs, lens, qt, a)
        return targets
    counts = topq_counts(qt, lens)
    thr = _thresholds_fused(u, offs, lens, counts)
    _apply(be, targets, rows, u, offs, lens, thr, a)
    return targets


@library.routed(_layerwise_topq_op)
def layerwise_topq(u: torch.Tensor, segments, q, *, backend: Optional[str] = None) -> torch.Tensor:
    """float32 ``[K, P]``: row k = ``u`` with everything but client k's layer-wise top-``q_k`` zeroed."""
    u = _check_u(u)
    K = _num_clients(q, "q")
    qt = _check_q(q, K)
    _check_segments(segments, u.numel())
    out = torch.zeros((K, u.numel()), dtype=torch.float32, device=u.device)
    return layerwise_topq_add_(out, u, segments, qt, backend=backend)


# -------------------------------------------------------------------------------------- K10 ops

def _global_counts(counts, K: int, P: int) -> torch.Tensor:
    return _check_counts(counts, K, [P])


@library.routed(_global_topk_add_op)
def global_topk_add_(targets, u: torch.Tensor, counts, *, alpha: float = 1.0, backend: Optional[str] = None):
    """Global top-k (one segment = all of ``u``): client k adds the entries with ``|u|`` at least
    its ``counts[k]``-th largest magnitude (ties kept; count 0 adds nothing). Returns targets."""
    u = _check_u(u)
    rows = _check_targets(targets, u)
    P = u.numel()
    ct = _global_counts(counts, len(rows), P)
    a = _check_alpha(alpha)
    be = _pick_backend(backend, u.device)
    offs, lens = [0], [P]
    if be == "torch":
        v = _scaled(u, a)
        mag = u.abs()
        for k, t in enumerate(rows):
            c = int(ct[k, 0])
            if c == 0:
                continue
            t_k = torch.sort(mag, descending=True).values[c - 1]
            keep = mag >= t_k
            t[keep] = t[keep] + v[keep]
        return targets
    thr = _thresholds_fused(u, offs, lens, ct)
    _apply(be, targets, rows, u, offs, lens, thr, a)
    return targets


@library.routed(_global_topk_op)
def global_topk(u: torch.Tensor, counts, *, backend: Optional[str] = None) -> torch.Tensor:
    """float32 ``[K, P]`` functional form of :func:`global_topk_add_`."""
    u = _check_u(u)
    K = _num_clients(counts, "counts")
    _global_counts(counts, K, u.numel())
    out = torch.zeros((K, u.numel()), dtype=torch.float32, device=u.device)
    return global_topk_add_(out, u, counts, backend=backend)


@library.routed(_randomk_add_op)
def randomk_add_(targets, u: torch.Tensor, counts, *, generator: Optional[torch.Generator] = None,
                 alpha: float = 1.0, backend: Optional[str] = None):
    """Random-k: ONE permutation ``perm`` of ``[0, P)`` is drawn (``torch.randperm(P, generator=...)``
    on the generator's device) and client k adds ``u`` at ``perm[:counts[k]]``. Returns targets."""
    u, rows, ct, a, be = _randomk_checked(targets, u, counts, alpha, backend, generator)
    _randomk_apply(be, targets, rows, u, ct, _draw_permutation(u, generator), a)  # drawn after every check
    return targets


def _draw_permutation(u: torch.Tensor, generator) -> torch.Tensor:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(u.shape[0], generator=generator, device=gdev).to(u.device)


def _randomk_checked(targets, u, counts, alpha, backend, generator=None) -> tuple:
    u = _check_u(u)
    rows = _check_targets(targets, u)
    ct = _global_counts(counts, len(rows), u.numel())
    a = _check_alpha(alpha)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    return u, rows, ct, a, _pick_backend(backend, u.device)


def randomk_with_perm_(targets, u: torch.Tensor, counts, perm: torch.Tensor, *, alpha: float = 1.0,
                       backend: Optional[str] = None):
    """:func:`randomk_add_` with the permutation given (the registered op's implementation: the
    draw happens outside the op). ``perm``: int64 [P], a permutation of ``[0, P)``, on u's device."""
    u, rows, ct, a, be = _randomk_checked(targets, u, counts, alpha, backend)
    P = u.numel()
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.shape != (P,):
        raise ValueError(f"perm: expected an int64 tensor [{P}]")
    if perm.device != u.device:
        raise ValueError(f"perm: on {perm.device} but u is on {u.device}")
    from .layout import _index_checks

    if not _index_checks(perm)[0]:
        raise ValueError(f"perm: not a permutation of 0..{P - 1}")
    _randomk_apply(be, targets, rows, u, ct, perm, a)
    return targets


def _randomk_apply(be, targets, rows, u, ct, perm, a) -> None:
    P = u.numel()
    v = _scaled(u, a)
    if be == "torch":
        for k, t in enumerate(rows):
            idx = perm[:int(ct[k, 0])]
            t[idx] = t[idx] + v[idx]
        return
    rank = torch.empty(P, dtype=torch.int64, device=u.device)
    rank[perm] = torch.arange(P, dtype=torch.int64, device=u.device)
    if be == "fused":
        cdev = ct[:, 0].to(u.device)
        chunk = _chunk(len(rows))
        for i in range(0, P, chunk):                          # x + (-0.0) == x: others untouched
            sl = slice(i, min(i + chunk, P))
            if isinstance(targets, torch.Tensor):
                keep = rank[sl].unsqueeze(0) < cdev.unsqueeze(1)
                targets[:, sl].add_(torch.where(keep, v[sl], -0.0))
            else:
                for k, t in enumerate(rows):
                    t[sl].add_(torch.where(rank[sl] < cdev[k], v[sl], -0.0))
        return
    _launch_select_add(rows, u, [0], [P], a, counts=ct[:, 0].to(u.device).contiguous(), rank=rank)


# ---------------------------------------------------------------------------------------- K8 op

class CosineNorms(NamedTuple):
    cos: torch.Tensor        # float64 [K]
    norms: torch.Tensor      # float64 [K]
    u_norm: float


def _check_rows_like(U, u: torch.Tensor) -> list[torch.Tensor]:
    return _check_targets(U, u, name="U")


@library.routed(_cosine_op)
def cosine_to_aggregate(U, u: torch.Tensor, *, eps: float = 1e-10, return_norms: bool = False,
                        backend: Optional[str] = None):
    """``cos[k] = <U_k, u> / max(||U_k|| ||u||, eps)`` as float64 ``[K]`` (K8).

    ``U``: float32 ``[K, P]`` or a list of K ``[P]`` tensors. With ``return_norms`` returns
    ``CosineNorms(cos, norms, u_norm)``."""
    u = _check_u(u)
    if isinstance(U, torch.Tensor) and U.dim() == 2 and U.shape[1] == u.numel() and U.dtype == torch.float32:
        rows = list(U.unbind(0)) if U.shape[0] else []
        if not rows:
            raise ValueError("U: need at least one client (K = 0)")
        if not _all_finite(U):
            raise ValueError("U: contains NaN or Inf")
    else:
        rows = _check_rows_like(U, u)
        for k, t in enumerate(rows):
            if not _all_finite(t):
                raise ValueError(f"U: element {k} contains NaN or Inf")
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps: expected a number, got {type(eps).__name__}") from None
    if not (math.isfinite(e) and e >= 0):
        raise ValueError(f"eps: must be finite and >= 0, got {eps}")
    be = _pick_backend(backend, u.device)
    K = len(rows)
    if be == "torch":
        u64 = u.double()
        dots = torch.stack([(t.double() * u64).sum() for t in rows])
        nsq = torch.stack([(t.double() * t.double()).sum() for t in rows])
        usq = (u64 * u64).sum()
    elif be == "fused":
        if isinstance(U, torch.Tensor):
            Uc = U if U.is_contiguous() else U.contiguous()
            dots = torch.mv(Uc, u).double()
            nsq = torch.linalg.vector_norm(Uc, dim=1).double() ** 2
        else:
            dots = torch.stack([torch.dot(t, u) for t in rows]).double()
            nsq = torch.stack([torch.linalg.vector_norm(t) for t in rows]).double() ** 2
        usq = torch.linalg.vector_norm(u).double() ** 2
    else:
        P = u.numel()
        nb = -(-P // BLOCK)
        part = torch.zeros((max(nb, 1), 2 * K + 1), dtype=torch.float32, device=u.device)
        if nb:
            ptrs = torch.tensor([t.data_ptr() for t in rows], dtype=torch.int64, device=u.device)
            _kernels()["cosine_partial"][(nb,)](ptrs, u, part, P, K, BLOCK=BLOCK, num_warps=NUM_WARPS)
        tot = part.double().sum(0)
        dots, nsq, usq = tot[0:2 * K:2], tot[1:2 * K:2], tot[2 * K]
    norms = torch.sqrt(nsq).cpu()
    unorm = float(torch.sqrt(usq))
    den = torch.clamp(norms * unorm, min=e)
    cos = dots.cpu() / den
    if return_norms:
        return CosineNorms(cos, norms, unorm)
    return cos


# ------------------------------------------------------------------------------- AOT self-check

def aot_report(arch: int = 90) -> list[dict]:
    """Compile every kernel variant for ``sm_<arch>`` without a GPU (Triton AOT) and report the
    PTX size and the number of FMA instructions (must be 0: ``enable_fp_fusion=False``). Needs
    the kernels defined *without* TRITON_INTERPRET (tests/test_sparsify.py runs it in a subprocess)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = _kernels()
    if "error" in kern:
        raise RuntimeError(f"triton unusable: {kern['error']}")
    if kern["interpreted"]:
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1; unset it to AOT-compile")
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    select_sig = {"TPTRS": "*i64", "U": "*fp32", "THR": "*fp32", "CNT": "*i64", "RANK": "*i64", "BSEG": "*i64",
                  "BSTART": "*i64", "SEGEND": "*i64", "S": "i32", "K": "i32", "alpha": "fp32"}
    jobs = [(f"select_add[RANDOM={r},USE_ALPHA={a}]", kern["select_add"], select_sig,
             {"RANDOM": r, "USE_ALPHA": a, "BLOCK": BLOCK}) for r in (False, True) for a in (False, True)]
    jobs.append(("cosine_partial", kern["cosine_partial"], {"UPTRS": "*i64", "A": "*fp32", "OUT": "*fp32",
                                                            "P": "i64", "K": "i32"}, {"BLOCK": BLOCK}))
    out = []
    for name, fn, sig, consts in jobs:
        full = {**sig, **{c: "constexpr" for c in consts}}
        src = ASTSource(fn=fn, signature={a: full[a] for a in fn.arg_names}, constexprs=consts, attrs={})
        opts = backend.parse_options({"num_warps": NUM_WARPS, "enable_fp_fusion": False})
        k = triton.compile(src, target=target, options=opts.__dict__)
        ptx = k.asm["ptx"]
        out.append({"name": name, "ptx_chars": len(ptx), "fma": len(re.findall(r"\bfma\.rn", ptx)),
                    "local_memory": ".local" in ptx})
    return out
