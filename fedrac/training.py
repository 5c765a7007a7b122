"""Client-side local training (spec §1.3) and standalone training (spec §3.1 [R]).

Semantics of :func:`local_train` (flgo 0.0.15, as used by FedRAC):

* plain SGD: ``w <- w - lr * g`` (momentum 0, weight decay 0, a fresh optimizer per call);
* loss: cross-entropy, mean over the minibatch;
* data order: at the start of every call a fresh random permutation of the local data is drawn
  from ``generator``; step ``t`` uses the next consecutive ``batch_size`` indices of that pass
  (the last batch of a pass may be smaller: ``drop_last=False``); when a pass is exhausted a new
  permutation is drawn;
* after ``backward`` and before the step, ``clip_grad_norm_(all parameters, clip_grad)``:
  ``g <- g * min(1, clip_grad / (||g||_2 + 1e-6))`` with the norm over all parameters
  (skipped when ``clip_grad`` is ``None`` or ``<= 0``);
* the mask is active in the forward pass and therefore in the backward pass.

Parameters travel as one flat float32 vector ``[P]`` in ``named_parameters()`` order (see
:mod:`fedrac.models`). The model object is used as a stateless template: its parameters are
rebound to a private working buffer on every call, and the caller's vector is never modified.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .models import MaskedMLP, bind_flat_parameters_, num_parameters

__all__ = ["local_train", "train_epochs", "holdout_split"]


def _check_inputs(model, params, x, y, mask):
    P = num_parameters(model)
    if not isinstance(params, torch.Tensor) or params.dim() != 1 or params.numel() != P:
        raise ValueError(f"params: expected a 1-D tensor of {P} values")
    if params.dtype != torch.float32:
        raise TypeError(f"params: expected float32, got {params.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x: {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("x: no samples")
    if x.device != params.device or y.device != params.device:
        raise ValueError("x: data and params must be on the same device")
    if mask is not None:
        N = model.num_neurons
        if mask.dim() != 1 or mask.shape[0] != N:
            raise ValueError(f"mask: expected shape [{N}], got {tuple(mask.shape)}")


class _BatchStream:
    """Consecutive batches of shuffled passes over ``n`` samples (DataLoader(shuffle=True,
    drop_last=False) re-created per call). Permutations come from ``generator`` (on its device)."""

    def __init__(self, n: int, batch_size: int, generator: Optional[torch.Generator], device):
        self.n, self.bs, self.gen, self.device = n, batch_size, generator, device
        self.perm = None
        self.pos = n

    def next(self) -> torch.Tensor:
        if self.pos >= self.n:
            gdev = self.gen.device if self.gen is not None else torch.device("cpu")
            self.perm = torch.randperm(self.n, generator=self.gen, device=gdev).to(self.device)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return idx


def _clip_(grad: torch.Tensor, clip_grad: Optional[float]) -> None:
    if clip_grad is None or clip_grad <= 0:
        return
    norm = torch.linalg.vector_norm(grad)
    coef = torch.clamp(clip_grad / (norm + 1e-6), max=1.0)
    grad.mul_(coef)


def _mlp_grad_(model: MaskedMLP, flat: torch.Tensor, grad: torch.Tensor, xb, yb, m1, m2) -> None:
    """Hand-written forward/backward of the masked MLP into ``grad`` (no autograd graph).

    Same math as autograd on ``MaskedMLP.forward`` with mean cross-entropy: masked (and dead
    ReLU) units get exactly zero gradient on their rows, biases and consuming columns.
    """
    D, H, C = model.in_features, model.hidden, model.num_classes
    o = 0
    W1 = flat[o:o + H * D].view(H, D); gW1 = grad[o:o + H * D].view(H, D); o += H * D
    b1 = flat[o:o + H]; gb1 = grad[o:o + H]; o += H
    W2 = flat[o:o + H * H].view(H, H); gW2 = grad[o:o + H * H].view(H, H); o += H * H
    b2 = flat[o:o + H]; gb2 = grad[o:o + H]; o += H
    W3 = flat[o:o + C * H].view(C, H); gW3 = grad[o:o + C * H].view(C, H); o += C * H
    b3 = flat[o:o + C]; gb3 = grad[o:o + C]
    B = xb.shape[0]
    xf = xb.reshape(B, D)
    a1 = torch.addmm(b1, xf, W1.t()).clamp_min_(0)
    h1 = a1 * m1 if m1 is not None else a1
    a2 = torch.addmm(b2, h1, W2.t()).clamp_min_(0)
    h2 = a2 * m2 if m2 is not None else a2
    logits = torch.addmm(b3, h2, W3.t())
    # d(mean CE)/d logits = (softmax - onehot) / B
    g3 = torch.softmax(logits, dim=1)
    g3[torch.arange(B, device=g3.device), yb] -= 1.0
    g3.div_(B)
    torch.mm(g3.t(), h2, out=gW3)
    torch.sum(g3, 0, out=gb3)
    g2 = g3 @ W3
    if m2 is not None:
        g2.mul_(m2)
    g2.mul_(a2 > 0)
    torch.mm(g2.t(), h1, out=gW2)
    torch.sum(g2, 0, out=gb2)
    g1 = g2 @ W2
    if m1 is not None:
        g1.mul_(m1)
    g1.mul_(a1 > 0)
    torch.mm(g1.t(), xf, out=gW1)
    torch.sum(g1, 0, out=gb1)


def local_train(model, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                mask: Optional[torch.Tensor], num_steps: int, batch_size: int, lr: float,
                clip_grad: Optional[float], generator: Optional[torch.Generator],
                use_autograd: bool = False) -> torch.Tensor:
    """Run ``num_steps`` masked SGD steps from ``params``; return the new flat float32 params.

    ``params``: float32 ``[P]`` (not modified). ``x``, ``y``: the client's local data, on the
    same device as ``params``. ``mask``: ``None`` (full model) or float/bool ``[N]``.
    ``generator``: source of the data order (a fresh shuffled pass at each call; see module doc).
    ``use_autograd``: force the generic autograd path (the MLP otherwise uses a hand-written
    backward of the same math, which avoids graph overhead on these tiny steps).
    """
    _check_inputs(model, params, x, y, mask)
    if num_steps < 0:
        raise ValueError(f"num_steps: must be >= 0, got {num_steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    flat = params.detach().clone()
    if num_steps == 0:
        return flat
    grad = torch.zeros_like(flat)
    fmask = None if mask is None else mask.to(device=flat.device, dtype=torch.float32)
    stream = _BatchStream(x.shape[0], batch_size, generator, x.device)

    if isinstance(model, MaskedMLP) and not use_autograd:
        H = model.hidden
        m1 = None if fmask is None else fmask[:H]
        m2 = None if fmask is None else fmask[H:]
        with torch.no_grad():
            for _ in range(num_steps):
                idx = stream.next()
                _mlp_grad_(model, flat, grad, x.index_select(0, idx), y.index_select(0, idx), m1, m2)
                _clip_(grad, clip_grad)
                flat.add_(grad, alpha=-lr)
        return flat

    bind_flat_parameters_(model, flat, grad)
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            for _ in range(num_steps):
                idx = stream.next()
                grad.zero_()
                logits = model(x.index_select(0, idx), mask=fmask)
                loss = F.cross_entropy(logits, y.index_select(0, idx))
                loss.backward()
                with torch.no_grad():
                    _clip_(grad, clip_grad)
                    flat.add_(grad, alpha=-lr)
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
    return flat


def holdout_split(n: int, fraction: float, generator: Optional[torch.Generator]):
    """Random (train_idx, holdout_idx) split of ``n`` samples; the holdout has
    ``max(1, round(fraction * n))`` samples (none when ``n < 2`` or ``fraction <= 0``)."""
    perm = torch.randperm(n, generator=generator)
    n_hold = 0 if (n < 2 or fraction <= 0) else min(n - 1, max(1, int(round(fraction * n))))
    return perm[n_hold:], perm[:n_hold]


def train_epochs(model, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                 epochs: int, batch_size: int, lr: float, clip_grad: Optional[float],
                 generator: Optional[torch.Generator], mask: Optional[torch.Tensor] = None,
                 holdout: float = 0.1, holdout_data=None, history: Optional[list] = None,
                 eval_batch_size: int = 1024):
    """Standalone training (spec §3.1 [R]): ``epochs`` full passes over the client's training
    part, the best epoch chosen on its holdout. Returns ``(best_params, best_holdout_accuracy)``.

    The client's data is split at random (from ``generator``) into a ``1 - holdout`` training part
    and a ``holdout`` part, unless ``holdout_data=(x_val, y_val)`` is given (then all of ``x``
    trains). One epoch is ``ceil(n_train / batch_size)`` steps of :func:`local_train` (one fresh
    shuffled pass). The holdout accuracy is measured after every epoch; the earliest of epochs
    1..E with the highest accuracy wins (``epochs=0`` returns ``params``). Without any holdout
    sample the last epoch is returned with accuracy NaN. ``history``: if a list, receives the
    holdout accuracies before training (index 0) and after each epoch.
    """
    from .evaluation import accuracy

    if epochs < 0:
        raise ValueError(f"epochs: must be >= 0, got {epochs}")
    if holdout_data is not None:
        xt, yt = x, y
        xv, yv = holdout_data
    else:
        tr, ho = holdout_split(x.shape[0], holdout, generator)
        tr, ho = tr.to(x.device), ho.to(x.device)
        xt, yt, xv, yv = x[tr], y[tr], x[ho], y[ho]
    steps = math.ceil(xt.shape[0] / batch_size)
    cur = params.detach().clone()
    has_val = xv.shape[0] > 0

    def score(p):
        return accuracy(model, p, xv, yv, mask=mask, batch_size=eval_batch_size) if has_val else math.nan

    best, best_acc = cur, score(cur)
    if history is not None:
        history.append(best_acc)
    first = True
    for _ in range(epochs):
        cur = local_train(model, cur, xt, yt, mask=mask, num_steps=steps, batch_size=batch_size,
                          lr=lr, clip_grad=clip_grad, generator=generator)
        acc = score(cur)
        if history is not None:
            history.append(acc)
        if first or not has_val or acc > best_acc:
            best, best_acc = cur, acc
        first = False
    return best, best_acc
