"""Evaluation of (sub)models: plain accuracy, many masks in one data pass, fused nested candidates
(spec §4.4, §7 K5) and per-client metrics on the clients' own data (spec §3.4, §7 K16).

All functions take the model as a stateless template plus a flat float32 parameter vector ``[P]``
(``named_parameters()`` order); the model's parameters are rebound to ``params`` (no copy).
Accuracy = (#argmax == label) / #samples, argmax taking the first maximal logit; loss = mean
cross-entropy. Returned per-submodel vectors are float64 tensors on the CPU.

How submodels share work:

* :func:`masks_accuracy` computes ``model.forward_shared`` (everything before the first mask
  site) once per data batch. For the MLP each distinct mask then runs only
  ``model.forward_rest`` (layer 2 and head, the same float32 ops as :func:`accuracy`, hence the
  same bits for the same ``batch_size``); for other models the distinct masks are stacked along
  the batch with per-sample masks (one large forward per group of candidates).
* :func:`nested_candidate_accuracy` for the MLP is FUSED (spec K5): layer 1 runs once for all
  candidates (and only for the layer-1 neurons some candidate holds, through
  :func:`fedrac._fastmath.linear_relu`: oneDNN's fused linear + ReLU where available), then the
  candidates are walked in increasing size. Each new layer-1 neuron adds its column to the running
  layer-2 pre-activations ``z2`` of the active layer-2 neurons (a rank-``pack`` update), each new
  layer-2 neuron gets its pre-activation from the layer-1 prefix and unmasks its column of the
  head; the head runs per candidate (when only layer-2 neurons entered, only their columns are
  added to the previous candidate's logits). That is about 1.2x the cost of one full evaluation
  for C = 50, instead of 50x. The walk runs in float32, so its rounding differs from a separate
  forward per candidate; to keep the decisions identical, every (candidate, sample) whose
  second-largest logit lies within a small relative tolerance of the largest is decided in
  float64: first from the float32 layer-1 activations (products of float32 values are exact in
  float64), and, if its float64 margin is still within reach of layer 1's float32 rounding, with
  layer 1 itself in float64 from the inputs. Every decision near a tie is therefore the
  exact-arithmetic one (up to ~1e-15), whatever GEMM kernel computed layer 1; a separate float32
  forward agrees except where its own rounding decides the argmax. Exact ties (e.g. an empty
  layer: logits = output bias) go to the first maximal class, as ``argmax`` does.
  On CUDA the walk's float32 logits come from one Triton launch per block of rows
  (:mod:`fedrac._walk_triton`: all candidates looped inside the kernel, instead of 3-4 small
  kernels per candidate, which leave the GPU launch-bound); the decisions and float64 re-decisions
  are the same code, so the counts are the same. ``FEDRAC_EVAL_WALK=torch|triton`` forces one.
  Other models (ResNet) share the stem and stack candidates along the batch, as
  :func:`masks_accuracy`: this saves the data passes and the stem, not the block FLOPs.
* :func:`client_metrics` for the MLP evaluates each client's submodel on its rows in one pass
  (layer 1 restricted to the submodel's neurons; nested masks share one gathered weight set) with
  the decisions of :func:`nested_candidate_accuracy`; ``subsets`` (e.g. logging holdouts) come
  from the same pass.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .models import MaskedMLP, bind_flat_parameters_, num_parameters

__all__ = [
    "accuracy",
    "evaluate",
    "masks_accuracy",
    "nested_candidate_accuracy",
    "nested_candidate_counts",
    "nested_masks",
    "client_metrics",
]

_DEFAULT_ROWS = {"MaskedMLP": 1024, "MaskedResNet18": 256}


def _rows(model, batch_size: Optional[int]) -> int:
    if batch_size is None:
        return _DEFAULT_ROWS.get(type(model).__name__, 512)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    return int(batch_size)


def _bind(model, params: torch.Tensor) -> None:
    P = num_parameters(model)
    if not isinstance(params, torch.Tensor) or params.dim() != 1 or params.numel() != P:
        raise ValueError(f"params: expected a 1-D tensor of {P} values")
    if params.dtype != torch.float32:
        raise TypeError(f"params: expected float32, got {params.dtype}")
    first = next(model.parameters())
    if first.data_ptr() == params.data_ptr() and first.device == params.device:
        return  # already bound to this buffer
    bind_flat_parameters_(model, params.detach())


def _check_data(x, y, params):
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x: {x.shape[0]} samples but y has {y.shape[0]}")
    if x.device != params.device or y.device != params.device:
        raise ValueError("x: data and params must be on the same device")


def _check_masks(model, masks) -> torch.Tensor:
    N = model.num_neurons
    if not isinstance(masks, torch.Tensor) and hasattr(masks, "dense"):
        masks = masks.dense()                       # fedrac_kernels.NestedMasks
    if not isinstance(masks, torch.Tensor) or masks.dim() != 2 or masks.shape[1] != N:
        raise ValueError(f"masks: expected a [S, {N}] tensor")
    if masks.dtype != torch.bool:
        if ((masks != 0) & (masks != 1)).any():
            raise ValueError("masks: values must be 0 or 1")
        masks = masks != 0
    return masks


def _result(correct, loss_sum, n, return_loss):
    acc = correct.to(torch.float64) / n if n > 0 else torch.full(correct.shape, math.nan, dtype=torch.float64)
    if not return_loss:
        return acc
    loss = loss_sum / n if n > 0 else torch.full(correct.shape, math.nan, dtype=torch.float64)
    return acc, loss


# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, params, x, y, mask=None, batch_size: Optional[int] = None) -> dict:
    """``{"accuracy", "loss", "correct", "n"}`` of one (sub)model on ``(x, y)``."""
    _check_data(x, y, params)
    _bind(model, params)
    bs = _rows(model, batch_size)
    if mask is not None:
        mask = model.check_mask(mask.to(params.device), 1)
    correct, loss_sum = 0, 0.0
    for i in range(0, x.shape[0], bs):
        xb, yb = x[i:i + bs], y[i:i + bs]
        logits = model(xb, mask=mask)
        correct += int((logits.argmax(1) == yb).sum())
        loss_sum += float(F.cross_entropy(logits.double(), yb, reduction="sum"))
    n = x.shape[0]
    return {"accuracy": correct / n if n else math.nan, "loss": loss_sum / n if n else math.nan,
            "correct": correct, "n": n}


@torch.no_grad()
def accuracy(model, params, x, y, mask=None, batch_size: Optional[int] = None) -> float:
    """Top-1 accuracy of the model (with ``mask``: None, float/bool ``[N]``) on ``(x, y)``."""
    _check_data(x, y, params)
    _bind(model, params)
    bs = _rows(model, batch_size)
    if mask is not None:
        mask = model.check_mask(mask.to(params.device), 1)
    correct = 0
    for i in range(0, x.shape[0], bs):
        logits = model(x[i:i + bs], mask=mask)
        correct += int((logits.argmax(1) == y[i:i + bs]).sum())
    return correct / x.shape[0] if x.shape[0] else math.nan


def _stacked_counts(model, h, yb, masks, rows, correct, loss_sum, want_loss):
    """Evaluate the S masks on the shared activation ``h`` [b, ...], stacking groups of candidates
    along the batch with per-sample masks; add into correct / loss_sum [S]."""
    b = h.shape[0]
    S = masks.shape[0]
    g = max(1, rows // b)
    for s0 in range(0, S, g):
        s1 = min(S, s0 + g)
        G = s1 - s0
        hr = h.repeat((G,) + (1,) * (h.dim() - 1))
        mr = masks[s0:s1].repeat_interleave(b, dim=0)
        logits = model.forward_rest(hr, mr).view(G, b, -1)
        correct[s0:s1] += (logits.argmax(2) == yb).sum(1).cpu()
        if want_loss:
            ce = F.cross_entropy(logits.reshape(G * b, -1).double(), yb.repeat(G), reduction="none")
            loss_sum[s0:s1] += ce.view(G, b).sum(1).cpu()


@torch.no_grad()
def masks_accuracy(model, params, x, y, masks, *, batch_size: Optional[int] = None,
                   return_loss: bool = False):
    """Accuracies ``[S]`` of the S submodels ``masks`` (bool/0-1 ``[S, N]``) in one data pass.

    ``masks`` may also be a ``fedrac_kernels.NestedMasks``. Identical rows are evaluated once.
    With ``return_loss`` returns ``(accuracy, mean_loss)``.
    ``batch_size``: rows per forward (MLP: data rows per batch; other models: candidates x data
    rows stacked per forward). Default 1024 (MLP) / 256 (ResNet).
    """
    _check_data(x, y, params)
    masks = _check_masks(model, masks)
    _bind(model, params)
    correct, loss_sum, inv = _masks_counts(model, x, y, masks, _rows(model, batch_size), return_loss)
    out = _result(correct, loss_sum, x.shape[0], return_loss)
    if return_loss:
        return out[0][inv], out[1][inv]
    return out[inv]


def _block_rows(model, rows: int, U: int) -> int:
    """Data rows per evaluation block of :func:`_masks_counts` / the fused walk for U submodels:
    every block is computed on its own, so any set of whole blocks gives the same per-block bits."""
    return rows if isinstance(model, MaskedMLP) else max(1, rows // U)


def _masks_counts(model, x, y, masks, rows: int, want_loss: bool):
    """(correct int64 [U], loss_sum float64 [U], inverse [S]) of the U distinct rows of ``masks``
    (bool [S, N]) on ``(x, y)``, in blocks of :func:`_block_rows` data rows."""
    dev = x.device
    uniq, inv = torch.unique(masks, dim=0, return_inverse=True)
    U = uniq.shape[0]
    fmasks = uniq.to(device=dev, dtype=torch.float32)
    correct = torch.zeros(U, dtype=torch.int64)
    loss_sum = torch.zeros(U, dtype=torch.float64)
    n = x.shape[0]
    b = _block_rows(model, rows, U)
    if isinstance(model, MaskedMLP):
        for i in range(0, n, b):
            xb, yb = x[i:i + b], y[i:i + b]
            h = model.forward_shared(xb)
            for u in range(U):
                logits = model.forward_rest(h, fmasks[u])
                correct[u] += int((logits.argmax(1) == yb).sum())
                if want_loss:
                    loss_sum[u] += float(F.cross_entropy(logits.double(), yb, reduction="sum"))
    else:
        for i in range(0, n, b):
            xb, yb = x[i:i + b], y[i:i + b]
            _stacked_counts(model, model.forward_shared(xb), yb, fmasks, rows, correct, loss_sum, want_loss)
    return correct, loss_sum, inv.cpu()


def _check_order_sizes(N: int, order, sizes):
    order = torch.as_tensor(order).to(torch.int64).cpu()
    sizes = torch.as_tensor(sizes).to(torch.int64).cpu().reshape(-1)
    if order.dim() != 1 or order.numel() != N:
        raise ValueError(f"order: expected {N} neuron indices")
    if not torch.equal(torch.sort(order).values, torch.arange(N)):
        raise ValueError("order: must be a permutation of 0..N-1")
    if sizes.numel() == 0:
        raise ValueError("sizes: at least one candidate size is needed")
    if (sizes < 0).any() or (sizes > N).any():
        raise ValueError(f"sizes: values must lie in [0, {N}]")
    return order, sizes


def nested_masks(order, sizes, N: Optional[int] = None) -> torch.Tensor:
    """bool ``[C, N]``: row c is True exactly at ``order[:sizes[c]]``."""
    order = torch.as_tensor(order).to(torch.int64).cpu()
    N = order.numel() if N is None else N
    order, sizes = _check_order_sizes(N, order, sizes)
    rank = torch.empty(N, dtype=torch.int64)
    rank[order] = torch.arange(N)
    return rank.unsqueeze(0) < sizes.unsqueeze(1)


# A float32 decision of the fused path is recomputed in float64 when another logit lies within
# _NEAR_TIE_RTOL * scale of the maximum, scale = max|b3| + sum_j max_k |W3[k, j]| a2[j] (a bound on
# the magnitude of the head's terms). Float32 rounding of the fused path (layer 1 included, whatever
# GEMM kernel computed it) moves the logits by ~1e-6 of that scale (measured on CIFAR-10: <= 9e-7),
# so this leaves a margin of ~100x while rechecking well under 1% of the decisions. The recheck
# starts from the float32 layer-1 activations; a decision whose float64 margin is still below
# _LAYER1_RTOL * scale is decided once more with layer 1 itself in float64 from the inputs, so that
# every decision within reach of float32 rounding is the exact-arithmetic one.
_NEAR_TIE_RTOL = 1e-4
_LAYER1_RTOL = 1e-5
# rows per block of the candidate walk (layer 1 runs on whole ``batch_size`` chunks): bounds the
# walk's running state (layer-2 pre-activations, the logits of every candidate; ~6 MB for C = 50)
_WALK_ROWS = 1024
# The walk's float32 logits: "auto" = the one-launch Triton kernel (fedrac._walk_triton) for CUDA
# tensors when triton is available, else the torch walk; "torch" / "triton" force one (tests).
_WALK_BACKEND = os.environ.get("FEDRAC_EVAL_WALK", "auto")


def _nested_slots(order, sizes, H):
    """The walk plan: ``(slots, slot_of, order1, order2)``.

    ``order1`` / ``order2``: the layer-1 / layer-2 neurons in the order they enter the prefixes;
    a slot is one distinct submodel on the walk, ``(a, e, k2)``: layer-1 prefix end before / after
    it and layer-2 prefix end, in increasing size (repeated sizes share a slot); ``slot_of[c]`` is
    candidate c's slot."""
    is1 = order < H
    order1 = order[is1]
    order2 = order[~is1] - H
    pos1 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(is1, 0)]).tolist()
    pos2 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(~is1, 0)]).tolist()
    slots, slot_of, prev1, key = [], [0] * sizes.numel(), 0, None
    sz = sizes.tolist()
    for c in torch.argsort(sizes, stable=True).tolist():
        e, k2 = pos1[sz[c]], pos2[sz[c]]
        if (e, k2) != key:
            slots.append((prev1, e, k2))
            key, prev1 = (e, k2), e
        slot_of[c] = len(slots) - 1
    return slots, slot_of, order1, order2


def _cross_entropy_cols(logits, y):
    """Float64 cross-entropy of column-major logits ``[..., classes, w]`` against labels ``[w]``:
    ``logsumexp - logit[y]`` per column, ``[..., w]``."""
    lg = logits.to(torch.float64, copy=True)
    idx = y.view((1,) * (lg.dim() - 2) + (1, -1)).expand(lg.shape[:-2] + (1, lg.shape[-1]))
    top = torch.amax(lg, -2, keepdim=True)
    picked = torch.gather(lg, -2, idx).sub_(top).squeeze_(-2)
    return torch.sub(lg, top, out=lg).exp_().sum(-2).log_().sub_(picked)


def _disable_triton_walk(exc: BaseException) -> None:
    """The Triton walk failed (e.g. a Triton version that cannot compile it): warn once and use
    the torch walk from now on in this process (the counts are the same, only slower on GPUs)."""
    global _WALK_BACKEND
    import warnings

    _WALK_BACKEND = "torch"
    warnings.warn(f"fedrac: the Triton candidate walk failed ({type(exc).__name__}: {exc}); using the torch "
                  "walk (same results; set FEDRAC_EVAL_WALK=torch to skip the attempt)", RuntimeWarning,
                  stacklevel=3)


class _MLPWalk:
    """The fused evaluation of nested submodels of one MLP (see the module doc).

    Built from the layer-1 / layer-2 neurons in the order they enter the prefixes (``order1``,
    ``order2``) restricted to the first ``E`` / ``K2`` of them (the neurons some submodel uses):
    the weights are gathered once in that order, so a submodel is a pair of prefix lengths
    ``(e, k2)`` and layer 1 runs only for the ``E`` rows of ``W1`` in use.

    :meth:`walk_counts` walks candidates in increasing size on transposed blocks (``z2``:
    ``[K2, rows]``, logits: ``[S, classes + 1, rows]``), so that every prefix is a contiguous
    slice. Per slot: layer-1 neurons entering update the active layer-2 pre-activations (a
    rank-``de`` GEMM); layer-2 neurons entering get their pre-activations from the whole layer-1
    prefix, in one GEMM for the whole run of slots that adds no layer-1 neuron; if layer 1 changed
    the head runs on every active column, else the logits of the previous slot get the new columns
    added (a rank-``dk2`` GEMM). :meth:`prefix_rows` evaluates one prefix per row (client metrics).
    Decisions near a tie are taken in float64 (:meth:`decide64`).
    """

    def __init__(self, model: MaskedMLP, order1, order2, E: int, K2: int, dev):
        self.E, self.K2 = E, K2
        o1 = order1[:E].to(dev)
        o2 = order2[:K2].to(dev)
        W1, b1 = model.fc1.weight.detach(), model.fc1.bias.detach()
        W2, b2 = model.fc2.weight.detach(), model.fc2.bias.detach()
        W3, b3 = model.fc3.weight.detach(), model.fc3.bias.detach()
        self.W1q = W1.index_select(0, o1)                       # [E, D]
        self.b1q = b1.index_select(0, o1)
        self.W2q = W2.index_select(0, o2).index_select(1, o1)   # [K2, E]
        self.b2q = b2.index_select(0, o2).unsqueeze(1)          # [K2, 1]
        W3q = W3.index_select(1, o2)                            # [nc, K2]
        self.nc = nc = W3q.shape[0]
        # head with one extra row: max_k |W3[k, j]|, so logits row nc bounds sum_j |W3[k, j]| a2[j]
        self.W3e = torch.cat([W3q, W3q.abs().amax(0, keepdim=True)]) if K2 else W3q.new_zeros(nc + 1, 0)
        self.b3e = torch.cat([b3, b3.abs().amax().reshape(1)]).unsqueeze(1)   # [nc + 1, 1]
        self.top_b3 = int(torch.argmax(b3))
        self.arE = torch.arange(E, device=dev)
        self.arK = torch.arange(K2, device=dev)
        self.f64 = None                                        # float64 copies, when a decision needs them
        self.W1q64 = self.b1q64 = None
        self.buf = None
        self.W2T = self.b2v = self.b3v = self.W3c = None
        self._triton = None

    def _use_triton(self) -> bool:
        """The one-launch Triton walk (:mod:`fedrac._walk_triton`) instead of the torch walk."""
        if self._triton is None:
            mode = _WALK_BACKEND
            if mode not in ("auto", "torch", "triton"):
                raise ValueError(f"FEDRAC_EVAL_WALK: expected auto, torch or triton, got {mode!r}")
            if mode == "torch" or self.K2 == 0:
                self._triton = False
            else:
                from ._walk_triton import usable

                ok = usable(self.W2q.device, self.K2)
                if mode == "triton" and not ok:
                    raise RuntimeError("FEDRAC_EVAL_WALK=triton: the Triton walk is unavailable here (needs "
                                       "triton and CUDA tensors or TRITON_INTERPRET=1, layer 2 <= 512 wide)")
                self._triton = ok and (mode == "triton" or self.W2q.is_cuda)
        return self._triton

    # ------------------------------------------------------------------------------ decisions
    def _decide(self, logits, scale, yb, exact: bool):
        """Float32 decisions of logits ``[nc, w]`` (scale bound ``[w]``) against labels ``[w]``:
        (hit float 0/1 ``[w]``, near bool ``[w]``: needs a float64 decision)."""
        if exact:                                        # logits = b3 exactly: argmax(b3)
            return (yb == self.top_b3).to(logits.dtype), torch.zeros_like(yb, dtype=torch.bool)
        thr = torch.amax(logits, 0).sub_(scale, alpha=_NEAR_TIE_RTOL)
        # logits within tol of the max: exactly one (the argmax) unless near a tie
        near = torch.sub(logits, thr).ge_(0).sum(0) != 1
        # away from ties the prediction is the only class >= thr: correct iff the label's logit is
        hit = torch.gather(logits, 0, yb.unsqueeze(0)).squeeze_(0).ge_(thr)
        return hit, near

    def decide64(self, h, x, rid, e_of, k2_of) -> torch.Tensor:
        """Float64 predictions (int64 ``[m]``) of m rows: float32 layer-1 activations ``h``
        ``[m, c]`` (q-order, ``c >= e``), inputs ``x[rid]`` (``x``: ``[b, D]``, ``rid``: ``[m]``),
        prefixes ``e_of`` / ``k2_of`` ``[m]``.

        From ``h`` first (products of float32 values are exact in float64); a row whose float64
        margin is below ``_LAYER1_RTOL`` of the scale bound is decided again with layer 1 in float64
        from ``x``, so that float32 rounding of layer 1 cannot decide it."""
        f64 = torch.float64
        if self.f64 is None:
            nc = self.nc
            self.f64 = (self.W2q.to(f64), self.b2q.squeeze(1).to(f64), self.W3e[:nc].to(f64),
                        self.b3e[:nc, 0].to(f64), self.W3e[nc].to(f64), float(self.b3e[nc, 0]))
        W2q64, b2q64, W3q64, b364, absW3_64, absb3 = self.f64
        c = h.shape[1]
        m1 = (self.arE[:c].unsqueeze(0) < e_of.unsqueeze(1)).to(f64)
        m2 = (self.arK.unsqueeze(0) < k2_of.unsqueeze(1)).to(f64)
        W2t = W2q64[:, :c].t()

        def head(h64, m1, m2):                 # float64 logits and scale bound
            z = torch.addmm(b2q64, h64 * m1, W2t).clamp_min_(0).mul_(m2)
            return torch.addmm(b364, z, W3q64.t()), z @ absW3_64 + absb3

        lg, scale = head(h.to(f64), m1, m2)
        if self.nc > 1:
            top = torch.topk(lg, 2, dim=1).values
            close = ((top[:, 0] - top[:, 1]) <= _LAYER1_RTOL * scale).nonzero()[:, 0]
            if close.numel():
                if self.W1q64 is None:
                    self.W1q64, self.b1q64 = self.W1q.to(f64), self.b1q.to(f64)
                x64 = x.index_select(0, rid[close]).to(f64)
                h64 = torch.addmm(self.b1q64[:c], x64, self.W1q64[:c].t()).clamp_min_(0)
                lg[close] = head(h64, m1[close], m2[close])[0]
        return lg.argmax(1)

    def layer1(self, xb, e: Optional[int] = None):
        """relu(layer 1) of the first ``e`` (default ``E``) neurons in q-order: ``[b, e]``."""
        from ._fastmath import linear_relu

        if e is None or e == self.E:
            return linear_relu(xb, self.W1q, self.b1q)
        return linear_relu(xb, self.W1q[:e], self.b1q[:e])

    # ------------------------------------------------------------------------- one prefix per row
    def prefix_rows(self, xb, yb, e: int, k2: int, want_loss: bool):
        """The submodel ``(e, k2)`` on rows ``xb``: (correct int64 ``[b]``, loss float64 ``[b]`` or None)."""
        b = xb.shape[0]
        nc = self.nc
        h1 = self.layer1(xb, e)                                        # [b, e]
        if k2:
            a2 = torch.addmm(self.b2q[:k2], self.W2q[:k2, :e], h1.t()).clamp_min_(0)   # [k2, b]
            la = torch.addmm(self.b3e, self.W3e[:, :k2], a2)                            # [nc + 1, b]
        else:
            la = self.b3e.expand(nc + 1, b)
        logits = la[:nc]
        hit, near = self._decide(logits, la[nc], yb, k2 == 0)
        correct = hit.to(torch.int64)
        amb = near.nonzero()[:, 0]
        if amb.numel():
            m = amb.numel()
            p64 = self.decide64(h1.index_select(0, amb), xb, amb, torch.full((m,), e, device=xb.device),
                                torch.full((m,), k2, device=xb.device))
            correct[amb] = (p64 == yb[amb]).to(torch.int64)
        return correct, (_cross_entropy_cols(logits, yb) if want_loss else None)

    # ---------------------------------------------------------------------------- candidate walk
    def plan_walk(self, slots) -> None:
        """Plan the walk over ``slots`` ``(a, e, k2)`` (see :func:`_nested_slots`): per slot
        ``(a, e, k, done, k_new, k2, head)`` with ``k`` the previous slot's layer-2 prefix, ``done``
        the layer-2 pre-activations computed so far (updated with layer-1 neurons ``a:e`` when
        ``e > a``), ``[done, k_new)`` the columns computed at this slot from the layer-1 prefix
        ``e`` (up to the end of the run of slots without layer-1 change) and ``head`` one of
        "full", "add" (new columns only) or "bias" (no layer-2 neuron: logits = b3)."""
        self.slots = slots
        self.S = len(slots)
        self.e_of = torch.tensor([e for _, e, _ in slots], device=self.arE.device)
        self.k2_of = torch.tensor([k2 for _, _, k2 in slots], device=self.arE.device)
        self.exact = [s for s, (_, _, k2) in enumerate(slots) if k2 == 0]
        plan, k, done = [], 0, 0
        for s, (a, e, k2) in enumerate(slots):
            k_new = done
            if k2 > done:
                k_new = k2
                t = s + 1
                while t < len(slots) and slots[t][1] == e:
                    k_new = slots[t][2]
                    t += 1
            head = "bias" if k2 == 0 else ("full" if e > a or s == 0 else "add")
            plan.append((a, e, k, done, k_new, k2, head))
            done = k_new
            k = k2
        self.plan = plan

    def _buffers(self, w):
        K2, S, nc1 = self.K2, self.S, self.nc + 1
        if self.buf is None or self.buf[0] < w:
            dev, dt = self.W2q.device, self.W2q.dtype
            self.buf = (w, torch.empty(K2 * w, dtype=dt, device=dev), torch.empty(K2 * w, dtype=dt, device=dev),
                        torch.empty(S * nc1 * w, dtype=dt, device=dev),
                        torch.empty(S * (nc1 - 1) * w, dtype=dt, device=dev))
        _, z, a, la, g = self.buf
        return (z[:K2 * w].view(K2, w), a[:K2 * w].view(K2, w), la[:S * nc1 * w].view(S, nc1, w),
                g[:S * (nc1 - 1) * w].view(S, nc1 - 1, w))

    def _torch_logits(self, h1, z2, a2, LA) -> None:
        """``LA [S, nc + 1, w]`` by the torch walk (a few small GEMMs per slot; see the class doc)."""
        w = h1.shape[0]
        nc = self.nc
        hT = h1.t()                                                     # [E, w] (a view)
        W2q, b2q, W3e, b3e = self.W2q, self.b2q, self.W3e, self.b3e
        for s, (a, e, k, done, k_new, k2, head) in enumerate(self.plan):
            if e > a and done:                                         # new layer-1 neurons
                z2[:done].addmm_(W2q[:done, a:e], hT[a:e])
            if k_new > done:                                           # new layer-2 neurons (whole run)
                if e:
                    torch.addmm(b2q[done:k_new], W2q[done:k_new, :e], hT[:e], out=z2[done:k_new])
                else:
                    z2[done:k_new].copy_(b2q[done:k_new].expand(k_new - done, w))
            if head == "full":                                         # head on every active column
                torch.clamp_min(z2[:k_new], 0, out=a2[:k_new])
                torch.addmm(b3e, W3e[:, :k2], a2[:k2], out=LA[s])
            elif head == "add":                                        # the new columns only
                if k_new > done:
                    torch.clamp_min(z2[done:k_new], 0, out=a2[done:k_new])
                torch.addmm(LA[s - 1], W3e[:, k:k2], a2[k:k2], out=LA[s])
            else:
                LA[s].copy_(b3e.expand(nc + 1, w))

    def _triton_logits(self, h1, LA) -> None:
        """``LA`` by :func:`fedrac._walk_triton.walk_logits`: every slot in one launch."""
        from ._walk_triton import walk_logits

        if self.W2T is None:
            self.W2T = self.W2q.t().contiguous()
            self.b2v = self.b2q.reshape(-1).contiguous()
            self.b3v = self.b3e.reshape(-1).contiguous()
            self.W3c = self.W3e.contiguous()
        walk_logits(h1.t().contiguous(), self.W2T, self.b2v, self.W3c, self.b3v, self.e_of, self.k2_of, out=LA)

    def _walk_block(self, h1, yb, correct, loss_sum, want_loss):
        """Walk every slot over one block of rows (``h1``: their layer-1 activations ``[w, E]``);
        add the float32 decisions into ``correct`` / ``loss_sum`` ``[S]``. Returns the near-ties
        ``[m, 2]`` (slot, row) and what was counted for them (int64 0/1 ``[m]``)."""
        w = h1.shape[0]
        nc, S = self.nc, self.S
        z2, a2, LA, G = self._buffers(w)
        if self._use_triton():
            try:
                self._triton_logits(h1, LA)
            except Exception as exc:  # noqa: BLE001 - an optional fast path: keep evaluating, say why
                if _WALK_BACKEND == "triton":
                    raise
                _disable_triton_walk(exc)
                self._triton = False
                self._torch_logits(h1, z2, a2, LA)
        else:
            self._torch_logits(h1, z2, a2, LA)
        # the decisions of all slots at once (as _decide, batched over the slots)
        logits = LA[:, :nc]                                            # [S, nc, w]
        thr = torch.amax(logits, 1).sub_(LA[:, nc], alpha=_NEAR_TIE_RTOL)   # [S, w]
        near = torch.sub(logits, thr.unsqueeze(1), out=G).ge_(0).sum(1) != 1
        hit = torch.gather(logits, 1, yb.view(1, 1, w).expand(S, 1, w)).squeeze_(1).ge_(thr)
        hits = hit.sum(1).to(torch.int64)
        if self.exact:
            near[self.exact] = False
            hits[self.exact] = int((yb == self.top_b3).sum())
        if want_loss:
            loss_sum += _cross_entropy_cols(logits, yb).sum(1)
        correct += hits
        amb = near.nonzero()
        return amb, hit[amb[:, 0], amb[:, 1]].to(torch.int64)

    def walk_counts(self, xf, y, rows: int, want_loss: bool):
        """Correct counts (int64 ``[S]``) and loss sums (float64 ``[S]``) of the planned slots on
        ``(xf [n, D], y)``, layer 1 in chunks of ``rows``."""
        dev = xf.device
        correct = torch.zeros(self.S, dtype=torch.int64, device=dev)
        loss_sum = torch.zeros(self.S, dtype=torch.float64, device=dev)
        wr = max(1, min(rows, _WALK_ROWS))
        if self._use_triton():           # one launch per block: larger blocks, LA capped at 64 MiB,
            per_row = max(1, self.E, self.S * (self.nc + 1))       # and the kernel's offsets in int32
            wr = max(1, min(rows, max(_WALK_ROWS, (1 << 24) // per_row), (2 ** 31 - 1) // per_row))
        for i in range(0, xf.shape[0], rows):
            xb, yb = xf[i:i + rows], y[i:i + rows]
            if not xb.is_contiguous():
                xb = xb.contiguous()
            h1 = self.layer1(xb)                                        # [b, E] in q-order
            sls, sids, claims = [], [], []
            for j in range(0, xb.shape[0], wr):
                amb, claimed = self._walk_block(h1[j:j + wr], yb[j:j + wr], correct, loss_sum, want_loss)
                if amb.numel():
                    sls.append(amb[:, 0])
                    sids.append(amb[:, 1] + j)
                    claims.append(claimed)
            if sls:
                sl, sid = torch.cat(sls), torch.cat(sids)
                p64 = self.decide64(h1.index_select(0, sid), xb, sid, self.e_of[sl], self.k2_of[sl])
                correct.index_add_(0, sl, (p64 == yb[sid]).to(torch.int64) - torch.cat(claims))
        return correct, loss_sum


def _mlp_nested_counts(model: MaskedMLP, x, y, order, sizes, rows, want_loss):
    """Fused prefix walk for the MLP; returns (correct int64 [C], loss_sum float64 [C])."""
    dev = x.device
    slots, slot_of, order1, order2 = _nested_slots(order, sizes, model.hidden)
    walk = _MLPWalk(model, order1, order2, max(e for _, e, _ in slots), max(k2 for _, _, k2 in slots), dev)
    xf = x.reshape(x.shape[0], model.in_features)
    if len(slots) == 1:                                    # one submodel: no walk needed
        _, e, k2 = slots[0]
        correct = torch.zeros(1, dtype=torch.int64, device=dev)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=dev)
        for i in range(0, xf.shape[0], rows):
            xb = xf[i:i + rows]
            c, l_ = walk.prefix_rows(xb if xb.is_contiguous() else xb.contiguous(), y[i:i + rows], e, k2, want_loss)
            correct += c.sum()
            if want_loss:
                loss_sum += l_.sum()
    else:
        walk.plan_walk(slots)
        correct, loss_sum = walk.walk_counts(xf, y, rows, want_loss)
    idx = torch.tensor(slot_of, device=dev)
    return correct[idx].cpu(), loss_sum[idx].cpu()


@torch.no_grad()
def nested_candidate_accuracy(model, params, x, y, order, sizes, *,
                              batch_size: Optional[int] = None, return_loss: bool = False):
    """Accuracies ``[C]`` of the nested candidates ``order[:sizes[c]]`` (spec §4.4, K5), fused.

    ``order``: permutation of the N flat neuron indices (e.g. ascending-frequency order);
    ``sizes``: C candidate sizes in [0, N], any order, repeats allowed. With ``return_loss``
    returns ``(accuracy, mean_loss)``. MLP: fused prefix walk (see the module doc); other models:
    shared stem and candidates stacked along the batch.
    """
    _check_data(x, y, params)
    order, sizes = _check_order_sizes(model.num_neurons, order, sizes)
    _bind(model, params)
    correct, loss_sum = _nested_counts(model, x, y, order, sizes, _rows(model, batch_size), return_loss)
    return _result(correct, loss_sum, x.shape[0], return_loss)


def _nested_counts(model, x, y, order, sizes, rows: int, want_loss: bool):
    if isinstance(model, MaskedMLP):
        return _mlp_nested_counts(model, x, y, order, sizes, rows, want_loss)
    correct, loss_sum, inv = _masks_counts(model, x, y, nested_masks(order, sizes, model.num_neurons), rows,
                                           want_loss)
    return correct[inv], loss_sum[inv]


def shard_rows(model, n: int, sizes, shard: tuple, batch_size: Optional[int] = None) -> torch.Tensor:
    """int64 row indices of shard ``i`` of ``W`` (``shard = (i, W)``) of an ``n``-row evaluation set
    for :func:`nested_candidate_counts`: the evaluation blocks ``b`` with ``b % W == i``, whole, in
    order - the same blocks the one-process call computes, so the shards' counts sum exactly to
    its counts."""
    i, W = (int(v) for v in shard)
    if W < 1 or not 0 <= i < W:
        raise ValueError(f"shard: expected (i, W) with 0 <= i < W, got {shard!r}")
    sizes = torch.as_tensor(sizes).to(torch.int64).reshape(-1)
    U = max(1, int(torch.unique(sizes.clamp(0, model.num_neurons)).numel()))
    unit = _block_rows(model, _rows(model, batch_size), U)
    starts = torch.arange(i * unit, max(n, i * unit), W * unit, dtype=torch.int64)
    idx = (starts.unsqueeze(1) + torch.arange(unit, dtype=torch.int64)).reshape(-1)
    return idx[idx < n]


@torch.no_grad()
def nested_candidate_counts(model, params, x, y, order, sizes, *, batch_size: Optional[int] = None,
                            shard: Optional[tuple] = None) -> torch.Tensor:
    """Correct-prediction counts (int64 ``[C]``, CPU) of the nested candidates of
    :func:`nested_candidate_accuracy` on ``(x, y)``, or with ``shard=(i, W)`` on the rows
    :func:`shard_rows` gives shard i: the W shards' counts add up to exactly the unsharded counts
    (integers; every block is computed as the one-process call computes it). Distributed runs
    split the candidate sweep this way: each rank evaluates 1/W of the validation set and one
    all-reduce sums the counts; accuracy = counts / len(x)."""
    _check_data(x, y, params)
    order, sizes = _check_order_sizes(model.num_neurons, order, sizes)
    if shard is not None:
        idx = shard_rows(model, x.shape[0], sizes, shard, batch_size).to(x.device)
        x, y = x.index_select(0, idx), y.index_select(0, idx)
    _bind(model, params)
    correct, _ = _nested_counts(model, x, y, order, sizes, _rows(model, batch_size), False)
    return correct.cpu()


# --------------------------------------------------------------------------------------------


def _client_chunks(data, clients, rows):
    """Yield (xb, yb, owner) chunks of at most ``rows`` samples over the listed clients' data."""
    xs, ys, owners, filled = [], [], [], 0
    for k in clients:
        xk, yk = data[k]
        start = 0
        while start < xk.shape[0]:
            take = min(rows - filled, xk.shape[0] - start)
            xs.append(xk[start:start + take])
            ys.append(yk[start:start + take])
            owners.append(torch.full((take,), k, dtype=torch.int64, device=yk.device))
            filled += take
            start += take
            if filled == rows:
                yield torch.cat(xs), torch.cat(ys), torch.cat(owners)
                xs, ys, owners, filled = [], [], [], 0
    if filled:
        yield torch.cat(xs), torch.cat(ys), torch.cat(owners)


def _mlp_client_rows(model: MaskedMLP, data, masks, rows):
    """Per-row (correct int64, loss float64) of every client's submodel on its own rows (MLP):
    each client's rows go through layer 1 once, restricted to the neurons of its submodel."""
    H, N = model.hidden, model.num_neurons
    K = len(data)
    dev = model.fc1.weight.device
    if masks is None or hasattr(masks, "sizes") and hasattr(masks, "order") and not isinstance(masks, torch.Tensor):
        # nested (or full) submodels: one walk object, client k = a pair of prefix lengths
        if masks is None:
            order, sizes = torch.arange(N), torch.full((K,), N, dtype=torch.int64)
        else:
            order = torch.as_tensor(masks.order).to(torch.int64).cpu()
            sizes = torch.as_tensor(masks.sizes).to(torch.int64).cpu().reshape(-1)
            if sizes.numel() != K:
                raise ValueError(f"masks: expected {K} rows (one per client), got {sizes.numel()}")
        is1 = order < H
        pos1 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(is1, 0)])
        pos2 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(~is1, 0)])
        pre = [(int(pos1[s]), int(pos2[s])) for s in sizes.tolist()]
        walk = _MLPWalk(model, order[is1], order[~is1] - H, max(e for e, _ in pre), max(k for _, k in pre), dev)
        sub = [(walk, e, k2) for e, k2 in pre]
    else:
        masks = _check_masks(model, masks).cpu()
        if masks.shape[0] != K:
            raise ValueError(f"masks: expected {K} rows (one per client), got {masks.shape[0]}")
        uniq, inv = torch.unique(masks, dim=0, return_inverse=True)
        walks = []
        for u in range(uniq.shape[0]):
            o1 = uniq[u, :H].nonzero()[:, 0]
            o2 = uniq[u, H:].nonzero()[:, 0]
            walks.append((_MLPWalk(model, o1, o2, o1.numel(), o2.numel(), dev), o1.numel(), o2.numel()))
        sub = [walks[int(inv[k])] for k in range(K)]
    out = []
    for k, (xk, yk) in enumerate(data):
        walk, e, k2 = sub[k]
        n = xk.shape[0]
        xf = xk.reshape(n, model.in_features)
        cs, ls = [], []
        for i in range(0, n, rows):
            xb = xf[i:i + rows]
            c, l_ = walk.prefix_rows(xb if xb.is_contiguous() else xb.contiguous(), yk[i:i + rows], e, k2, True)
            cs.append(c)
            ls.append(l_)
        out.append((torch.cat(cs) if cs else torch.zeros(0, dtype=torch.int64, device=dev),
                    torch.cat(ls) if ls else torch.zeros(0, dtype=torch.float64, device=dev)))
    return out


def _metrics_dict(correct, loss_sum, num) -> dict:
    nf = num.to(torch.float64)
    total = int(num.sum())
    return {
        "loss": loss_sum / nf,
        "accuracy": correct.to(torch.float64) / nf,
        "correct": correct,
        "num_samples": num,
        "weighted_loss": float(loss_sum.sum() / total) if total else math.nan,
        "weighted_accuracy": float(correct.sum()) / total if total else math.nan,
    }


@torch.no_grad()
def client_metrics(model, params, data: Sequence, masks=None, *,
                   batch_size: Optional[int] = None, subsets: Optional[Sequence] = None) -> dict:
    """Loss and accuracy of K reward submodels, each on its own client's data (spec §3.4, K16).

    ``data``: K pairs ``(x_k, y_k)`` on ``params``' device. ``masks``: ``None`` (full model for
    everyone), bool/0-1 ``[K, N]`` (client k's submodel) or a ``fedrac_kernels.NestedMasks``.
    ``subsets``: optional K int64 index tensors into each client's rows (e.g. its logging holdout):
    the same metrics of those rows come back under ``"subset"``, from the same pass.
    Returns ``{"loss": f64 [K], "accuracy": f64 [K], "correct": i64 [K], "num_samples": i64 [K],
    "weighted_loss": float, "weighted_accuracy": float}`` (NaN for a client without data;
    the weighted values are data-volume-weighted averages over all samples).

    MLP: every client's rows go through layer 1 once, restricted to the neurons of its submodel
    (nested masks: one gathered weight set, each client a prefix of it), and its decisions are
    those of :func:`nested_candidate_accuracy` (near-ties decided in float64). Other models: clients
    are grouped by distinct mask, so at most (#distinct masks) submodels run, each on the
    concatenated data of its clients (in chunks of ``batch_size``).
    """
    K = len(data)
    _bind(model, params)
    rows = _rows(model, batch_size)
    dev = params.device
    for k, (xk, yk) in enumerate(data):
        if xk.shape[0] != yk.shape[0]:
            raise ValueError(f"data: client {k} has {xk.shape[0]} inputs but {yk.shape[0]} labels")
        if xk.device != dev or yk.device != dev:
            raise ValueError(f"data: client {k} is not on the params' device {dev}")
    if subsets is not None:
        if len(subsets) != K:
            raise ValueError(f"subsets: expected {K} index tensors (one per client), got {len(subsets)}")
        subsets = [torch.as_tensor(s, dtype=torch.int64).reshape(-1).to(dev) for s in subsets]
        for k, s in enumerate(subsets):
            if s.numel() and (int(s.min()) < 0 or int(s.max()) >= data[k][0].shape[0]):
                raise ValueError(f"subsets: client {k} has an index outside 0..{data[k][0].shape[0] - 1}")
    num = torch.tensor([d[0].shape[0] for d in data], dtype=torch.int64)
    if isinstance(model, MaskedMLP):
        per_row = _mlp_client_rows(model, data, masks, rows)
        correct = torch.stack([c.sum() for c, _ in per_row]).cpu() if K else torch.zeros(0, dtype=torch.int64)
        loss_sum = torch.stack([l_.sum() for _, l_ in per_row]).cpu() if K else torch.zeros(0, dtype=torch.float64)
        out = _metrics_dict(correct, loss_sum, num)
        if subsets is not None:
            sc = torch.stack([c[s].sum() for (c, _), s in zip(per_row, subsets)]).cpu()
            sl = torch.stack([l_[s].sum() for (_, l_), s in zip(per_row, subsets)]).cpu()
            out["subset"] = _metrics_dict(sc, sl, torch.tensor([s.numel() for s in subsets], dtype=torch.int64))
        return out
    if masks is None:
        groups = [(None, list(range(K)))]
    else:
        masks = _check_masks(model, masks)
        if masks.shape[0] != K:
            raise ValueError(f"masks: expected {K} rows (one per client), got {masks.shape[0]}")
        uniq, inv = torch.unique(masks.cpu(), dim=0, return_inverse=True)
        groups = [(uniq[u].to(device=dev, dtype=torch.float32),
                   [k for k in range(K) if int(inv[k]) == u]) for u in range(uniq.shape[0])]
    correct = torch.zeros(K, dtype=torch.int64, device=dev)
    loss_sum = torch.zeros(K, dtype=torch.float64, device=dev)
    for mask, clients in groups:
        for xb, yb, owner in _client_chunks(data, clients, rows):
            logits = model(xb, mask=mask)
            correct.index_add_(0, owner, (logits.argmax(1) == yb).to(torch.int64))
            loss_sum.index_add_(0, owner, F.cross_entropy(logits.double(), yb, reduction="none"))
    out = _metrics_dict(correct.cpu(), loss_sum.cpu(), num)
    if subsets is not None:
        out["subset"] = client_metrics(model, params, [(x[s], y[s]) for (x, y), s in zip(data, subsets)], masks,
                                       batch_size=batch_size)
    return out
