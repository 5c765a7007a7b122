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
  candidates, then the candidates are walked in increasing size. Each new layer-1 neuron adds its
  column to the running layer-2 pre-activation ``z2`` (a rank-``pack`` update), each new layer-2
  neuron unmasks its column of the head, and only the 200 x classes head runs per candidate
  (about 1.7x the cost of one full evaluation for C = 50, instead of 50x). The walk runs in
  float32, so its rounding differs from a separate forward per candidate; to keep the decisions
  identical, every (candidate, sample) whose second-largest logit lies within a small relative
  tolerance of the largest is recomputed in float64 from the same float32 layer-1 activations
  (products of float32 values are exact in float64, so that recomputation is the exact-arithmetic
  decision up to ~1e-15). Exact ties (e.g. an empty layer: logits = output bias) therefore go
  to the first maximal class, as ``argmax`` does.
  Other models (ResNet) share the stem and stack candidates along the batch, as
  :func:`masks_accuracy`: this saves the data passes and the stem, not the block FLOPs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .models import MaskedMLP, bind_flat_parameters_, num_parameters

__all__ = [
    "accuracy",
    "evaluate",
    "masks_accuracy",
    "nested_candidate_accuracy",
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
    rows = _rows(model, batch_size)
    dev = params.device
    uniq, inv = torch.unique(masks, dim=0, return_inverse=True)
    U = uniq.shape[0]
    fmasks = uniq.to(device=dev, dtype=torch.float32)
    correct = torch.zeros(U, dtype=torch.int64)
    loss_sum = torch.zeros(U, dtype=torch.float64)
    n = x.shape[0]
    if isinstance(model, MaskedMLP):
        for i in range(0, n, rows):
            xb, yb = x[i:i + rows], y[i:i + rows]
            h = model.forward_shared(xb)
            for u in range(U):
                logits = model.forward_rest(h, fmasks[u])
                correct[u] += int((logits.argmax(1) == yb).sum())
                if return_loss:
                    loss_sum[u] += float(F.cross_entropy(logits.double(), yb, reduction="sum"))
    else:
        b = max(1, rows // U)
        for i in range(0, n, b):
            xb, yb = x[i:i + b], y[i:i + b]
            _stacked_counts(model, model.forward_shared(xb), yb, fmasks, rows, correct, loss_sum,
                            return_loss)
    out = _result(correct, loss_sum, n, return_loss)
    if return_loss:
        return out[0][inv.cpu()], out[1][inv.cpu()]
    return out[inv.cpu()]


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
# the magnitude of the head's terms). Float32 rounding of the fused path is ~1e-6 of that scale,
# so this leaves a margin of ~100x while rechecking well under 1% of the decisions.
_NEAR_TIE_RTOL = 1e-4


def _mlp_nested_counts(model: MaskedMLP, x, y, order, sizes, rows, want_loss):
    """Fused prefix walk for the MLP; returns (correct int64 [C], loss_sum float64 [C])."""
    H = model.hidden
    dev = x.device
    f64 = torch.float64
    C = sizes.numel()
    # q-order: layer-1 and layer-2 neurons each in the order they enter the prefix
    is1 = order < H
    order1 = order[is1].to(dev)
    order2 = (order[~is1] - H).to(dev)
    pos1 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(is1, 0)])
    pos2 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(~is1, 0)])
    W2 = model.fc2.weight.detach()
    W2qt = W2[order2][:, order1].t().contiguous()     # [H1, H2]: row i = layer-1 neuron order1[i]
    b2q = model.fc2.bias.detach()[order2]
    W3q = model.fc3.weight.detach()[:, order2]        # [classes, H2]
    b3 = model.fc3.bias.detach()
    nc = W3q.shape[0]
    # head as [H2, ncp] with ncp a multiple of 16 (much faster GEMMs on CPU than 10 columns);
    # column nc holds max_k |W3[k, j]|, so logits[:, nc] bounds sum_j |W3[k, j]| a2[j]
    ncp = -(-(nc + 1) // 16) * 16
    W3p = torch.zeros(H, ncp, dtype=W3q.dtype, device=dev)
    W3p[:, :nc] = W3q.t()
    W3p[:, nc] = W3q.abs().amax(0)
    b3p = torch.zeros(ncp, dtype=b3.dtype, device=dev)
    b3p[:nc] = b3
    b3p[nc] = b3.abs().amax()
    W2q64, b2q64 = W2qt.t().to(f64), b2q.to(f64)
    W3q64, b364 = W3q.to(f64), b3.to(f64)
    # walk the candidates in increasing size; a "slot" is one distinct submodel on the walk:
    # (layer-1 prefix end before, after, layer-2 prefix end); repeated sizes share a slot
    slots, slot_of, prev1, key = [], [0] * C, 0, None
    for c in torch.argsort(sizes, stable=True).tolist():
        s = int(sizes[c])
        e, k2 = int(pos1[s]), int(pos2[s])
        if (e, k2) != key:
            slots.append((prev1, e, k2))
            key, prev1 = (e, k2), e
        slot_of[c] = len(slots) - 1
    S = len(slots)
    e1_of = torch.tensor([e for _, e, _ in slots], device=dev)
    e2_of = torch.tensor([k2 for _, _, k2 in slots], device=dev)
    ar = torch.arange(H, device=dev)
    top_b3 = int(torch.argmax(b3))
    correct = torch.zeros(S, dtype=torch.int64, device=dev)
    loss_sum = torch.zeros(S, dtype=f64, device=dev)
    for i in range(0, x.shape[0], rows):
        xb, yb = x[i:i + rows], y[i:i + rows]
        b = xb.shape[0]
        h1q = model.forward_shared(xb)[:, order1]                      # [b, H1], float32
        z2 = b2q.expand(b, H).contiguous()                              # running layer-2 pre-act.
        a2 = torch.empty_like(z2)
        la = torch.empty(b, ncp, dtype=z2.dtype, device=dev)
        vals = torch.empty(S, b, dtype=z2.dtype, device=dev)
        preds = torch.empty(S, b, dtype=torch.int64, device=dev)
        near = torch.zeros(S, b, dtype=torch.int64, device=dev)       # logits near the max
        for s, (a, e, k2) in enumerate(slots):
            if e > a:
                z2.addmm_(h1q[:, a:e], W2qt[a:e])
            if k2 == 0:                                                 # exact: logits = b3
                preds[s].fill_(top_b3)
                if want_loss:
                    loss_sum[s] += F.cross_entropy(b3.to(f64).expand(b, nc), yb, reduction="sum")
                continue
            torch.clamp_min(z2, 0, out=a2)
            torch.addmm(b3p, a2[:, :k2], W3p[:k2], out=la)
            logits = la[:, :nc]
            torch.max(logits, 1, out=(vals[s], preds[s]))
            # near-tie: another logit within tol of the max (la[:, nc] is the scale bound)
            thr = vals[s].sub(la[:, nc], alpha=_NEAR_TIE_RTOL).unsqueeze_(1)
            torch.sum(torch.ge(logits, thr), 1, out=near[s])
            if want_loss:
                loss_sum[s] += F.cross_entropy(logits.to(f64), yb, reduction="sum")
        hits = (preds == yb).sum(1)
        amb = (near > 1).nonzero()
        if amb.numel():
            # near-ties: recompute those (slot, sample) decisions from the same float32 layer-1
            # activations in float64 (products of float32 values are exact there)
            sl, sid = amb[:, 0], amb[:, 1]
            m1 = (ar.unsqueeze(0) < e1_of[sl].unsqueeze(1)).to(f64)
            m2 = (ar.unsqueeze(0) < e2_of[sl].unsqueeze(1)).to(f64)
            z = torch.addmm(b2q64, h1q[sid].to(f64) * m1, W2q64.t())
            p64 = torch.addmm(b364, z.clamp_min(0) * m2, W3q64.t()).argmax(1)
            ys = yb[sid]
            hits.index_add_(0, sl, (p64 == ys).to(torch.int64) - (preds[sl, sid] == ys).to(torch.int64))
        correct += hits
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
    rows = _rows(model, batch_size)
    n = x.shape[0]
    if isinstance(model, MaskedMLP):
        correct, loss_sum = _mlp_nested_counts(model, x, y, order, sizes, rows, return_loss)
        return _result(correct, loss_sum, n, return_loss)
    return masks_accuracy(model, params, x, y, nested_masks(order, sizes, model.num_neurons),
                          batch_size=batch_size, return_loss=return_loss)


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


@torch.no_grad()
def client_metrics(model, params, data: Sequence, masks=None, *,
                   batch_size: Optional[int] = None) -> dict:
    """Loss and accuracy of K reward submodels, each on its own client's data (spec §3.4, K16).

    ``data``: K pairs ``(x_k, y_k)`` on ``params``' device. ``masks``: ``None`` (full model for
    everyone), bool/0-1 ``[K, N]`` (client k's submodel) or a ``fedrac_kernels.NestedMasks``.
    Clients are grouped by distinct mask, so at most (#distinct masks) submodels run, each on the
    concatenated data of its clients (in chunks of ``batch_size``).
    Returns ``{"loss": f64 [K], "accuracy": f64 [K], "correct": i64 [K], "num_samples": i64 [K],
    "weighted_loss": float, "weighted_accuracy": float}`` (NaN for a client without data;
    the weighted values are data-volume-weighted averages over all samples).
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
    num = torch.tensor([d[0].shape[0] for d in data], dtype=torch.int64)
    correct, loss_sum = correct.cpu(), loss_sum.cpu()
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
