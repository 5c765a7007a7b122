"""Batched client training: clients with the same architecture train together as one computation.

:func:`fedrac.training.local_train` runs one client at a time: for K = 1000 clients and one local
step that is 1000 tiny forward/backward passes, each dominated by per-call overhead. Here ``Kb``
clients share one batched computation:

* parameters stacked ``[Kb, P]`` (one row per client, the flat layout of :mod:`fedrac.models`),
  per-client neuron masks ``[Kb, N]`` (all ones for a client holding the full model);
* per-client minibatches: every client keeps its own index stream drawn from its own generator
  **exactly as** ``local_train`` draws it (a fresh permutation at each call and whenever a pass is
  exhausted; the last batch of a pass may be smaller - those rows are padded and given weight 0);
* per-client SGD with the global-norm clip taken per client (``g_k <- g_k min(1, c/(||g_k||+1e-6))``);
* the MLP uses a direct batched-GEMM forward/backward (``bmm``; same math as the hand-written
  ``_mlp_grad_`` of :mod:`fedrac.training`); any other model goes through
  ``torch.func.functional_call`` + ``vmap(grad(.))`` over the client dimension.

Results equal sequential ``local_train`` up to float rounding (GEMM blocking and the per-client
norm reduction differ; the tests hold every client's parameters within ~1e-5 relative), the
minibatch draws are identical, and exact zeros stay exact zeros (masked and dead units get no
update, so the non-zero aggregation rule sees the same active sets). The computation does not
depend on which other clients share a batch except through those rounding differences, and it is
deterministic for a given batching (CPU), so a run with a fixed ``client_batch`` resumes bit for bit.

:class:`ClientTrainer` keeps the ``[client_batch, P]`` work buffers between calls (O(client_batch x
P) memory, reused for every chunk of every round); :func:`advance_streams` replays a client's draws
without training (distributed runs: the ranks that do not own a client keep its stream in step).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .models import MaskedMLP, num_parameters
from .training import _BatchStream

__all__ = ["ClientTrainer", "train_batch", "advance_streams", "method_for", "METHODS"]

METHODS = ("auto", "bmm", "vmap")


def method_for(model, method: str = "auto") -> str:
    """The batched formulation used for ``model``: ``bmm`` (MLP) or ``vmap`` (any model)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "auto":
        return "bmm" if isinstance(model, MaskedMLP) else "vmap"
    if method == "bmm" and not isinstance(model, MaskedMLP):
        raise ValueError("method: bmm is the MLP's formulation; use vmap for other models")
    return method


def advance_streams(sizes: Sequence[int], generators: Sequence[torch.Generator], *, num_steps: int,
                    batch_size: int) -> None:
    """Advance each generator exactly as ``local_train`` would for ``num_steps`` steps over ``sizes[i]``
    samples, without training (the permutations are drawn and discarded)."""
    if num_steps <= 0:
        return                      # local_train with 0 steps draws nothing
    for n, g in zip(sizes, generators):
        s = _BatchStream(int(n), batch_size, g, torch.device("cpu"))
        for _ in range(num_steps):
            s.next()


# ----------------------------------------------------------------------------------------- MLP

def _mlp_views(model: MaskedMLP, flat: torch.Tensor):
    """[Kb, ...] views of W1, b1, W2, b2, W3, b3 into the stacked flat rows."""
    Kb = flat.shape[0]
    D, H, C = model.in_features, model.hidden, model.num_classes
    out, o = [], 0
    for shape in ((H, D), (H,), (H, H), (H,), (C, H), (C,)):
        n = 1
        for s in shape:
            n *= s
        out.append(flat[:, o:o + n].view((Kb,) + shape))
        o += n
    return out


def _mlp_grad_batched_(model: MaskedMLP, w, grad, xb, yb, m1, m2, counts, valid) -> None:
    """Hand-written batched forward/backward of the masked MLP (mean CE per client) into ``grad``.

    ``w``: the clients' parameters, ``[Kb, P]``, or ``[P]`` when they all hold the same ones (the
    first local step: the forward and input-gradient GEMMs then run as single ``[Kb*B, .]`` GEMMs;
    only the weight gradients are per client). ``grad`` [Kb, P]; ``xb`` [Kb, B, ...]; ``yb`` [Kb, B];
    ``m1``/``m2`` float [Kb, H]; ``counts`` float [Kb] (each client's real batch size); ``valid``
    None or float [Kb, B] (0 on padding rows). Same op sequence as ``training._mlp_grad_``.
    """
    Kb, B = yb.shape
    D, H, C = model.in_features, model.hidden, model.num_classes
    shared = w.dim() == 1
    W1, b1, W2, b2, W3, b3 = _mlp_views(model, w.unsqueeze(0) if shared else w)
    gW1, gb1, gW2, gb2, gW3, gb3 = _mlp_views(model, grad)
    xf = xb.reshape(Kb, B, D)
    if shared:
        W1, b1, W2, b2, W3, b3 = W1[0], b1[0], W2[0], b2[0], W3[0], b3[0]

        def lin(h, W, b):           # h [Kb, B, in] @ W.T + b, one GEMM for every client
            return torch.addmm(b, h.reshape(Kb * B, -1), W.t()).view(Kb, B, -1)

        def back(g, W):             # g [Kb, B, out] @ W
            return torch.mm(g.reshape(Kb * B, -1), W).view(Kb, B, -1)
    else:
        def lin(h, W, b):
            return torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))

        def back(g, W):
            return torch.bmm(g, W)
    a1 = lin(xf, W1, b1).clamp_min_(0)
    h1 = a1 * m1.unsqueeze(1)
    a2 = lin(h1, W2, b2).clamp_min_(0)
    h2 = a2 * m2.unsqueeze(1)
    logits = lin(h2, W3, b3)
    g3 = torch.softmax(logits, dim=2)
    g3.scatter_add_(2, yb.unsqueeze(2), torch.full((Kb, B, 1), -1.0, dtype=g3.dtype, device=g3.device))
    g3.div_(counts.view(Kb, 1, 1))
    if valid is not None:
        g3.mul_(valid.unsqueeze(2))
    torch.bmm(g3.transpose(1, 2), h2, out=gW3)
    torch.sum(g3, 1, out=gb3)
    g2 = back(g3, W3)
    g2.mul_(m2.unsqueeze(1))
    g2.mul_(a2 > 0)
    torch.bmm(g2.transpose(1, 2), h1, out=gW2)
    torch.sum(g2, 1, out=gb2)
    g1 = back(g2, W2)
    g1.mul_(m1.unsqueeze(1))
    g1.mul_(a1 > 0)
    torch.bmm(g1.transpose(1, 2), xf, out=gW1)
    torch.sum(g1, 1, out=gb1)


# ---------------------------------------------------------------------------------------- vmap

class _VmapGrad:
    """``vmap(grad(loss))`` over the client dimension via ``torch.func.functional_call``."""

    def __init__(self, model):
        from torch.func import functional_call, grad, vmap

        self.model = model
        spec, o = [], 0
        for name, p in model.named_parameters():
            spec.append((name, o, p.numel(), tuple(p.shape)))
            o += p.numel()
        self.spec = spec

        def loss(params, xk, yk, wk, mk):
            logits = functional_call(model, params, (xk,), {"mask": mk})
            return (F.cross_entropy(logits, yk, reduction="none") * wk).sum()

        # grad w.r.t. a dict of per-parameter views (a grad w.r.t. slices of one flat vector would
        # scatter every slice's gradient into a full-size zero tensor)
        self.fn = vmap(grad(loss))
        # every client holds the same parameters (first local step): unbatched weights, so the
        # forward runs as one large batch and only the weight gradients are per client
        self.fn_shared = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))

    def __call__(self, w, grad_out, xb, yb, rows_w, masks) -> None:
        Kb = xb.shape[0]
        with torch.enable_grad():
            if w.dim() == 1:
                params = {name: w[o:o + n].view(shape) for name, o, n, shape in self.spec}
                g = self.fn_shared(params, xb, yb, rows_w, masks)
            else:
                params = {name: w[:, o:o + n].view((Kb,) + shape) for name, o, n, shape in self.spec}
                g = self.fn(params, xb, yb, rows_w, masks)
        for name, o, n, shape in self.spec:
            grad_out[:, o:o + n].copy_(g[name].reshape(Kb, n))


# ------------------------------------------------------------------------------------- trainer

class ClientTrainer:
    """Trains chunks of up to ``max_batch`` clients as one batched computation.

    The work buffers (parameters, gradients and the gathered minibatch, ``[max_batch, ...]``) are
    allocated on first use and reused, so training every client of a round costs O(max_batch x P)
    memory however many clients there are.
    """

    def __init__(self, model, *, max_batch: int, method: str = "auto"):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = int(max_batch)
        self.method = method_for(model, method)
        self.P = num_parameters(model)
        self.N = int(model.num_neurons)
        self._bufs: dict = {}
        self._vmap: Optional[_VmapGrad] = None

    def release(self) -> None:
        """Drop the cached work buffers (they are re-allocated on the next call)."""
        self._bufs.clear()

    def _buffer(self, name: str, shape, dtype, device) -> torch.Tensor:
        """A cached flat buffer of at least ``prod(shape)`` elements (re-allocated only when it is too
        small; parameters/gradients are sized for ``max_batch`` clients at once), viewed to ``shape``."""
        key = (name, dtype, device)
        b = self._bufs.get(key)
        need = 1
        for s in shape:
            need *= s
        if b is None or b.numel() < need:
            cap = need
            if name in ("flat", "grad"):
                cap = max(need, self.max_batch * self.P)
            b = torch.empty(cap, dtype=dtype, device=device)
            self._bufs[key] = b
        return b[:need].view(shape)

    def train(self, start: torch.Tensor, data: Sequence[tuple[torch.Tensor, torch.Tensor]],
              masks: Optional[Sequence[Optional[torch.Tensor]]], *, num_steps: int, batch_size: int,
              lr: float, clip_grad: Optional[float], generators: Sequence[Optional[torch.Generator]],
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``num_steps`` masked SGD steps for each client of the chunk; returns ``[Kb, P]``.

        ``start``: float32 ``[P]`` (every client starts from it) or ``[Kb, P]``. ``data``: the clients'
        ``(x, y)``. ``masks``: None, a float/bool ``[Kb, N]`` tensor, or one float/bool ``[N]`` or
        None (full model) per client.
        ``generators``: one per client (its data order, advanced as ``local_train`` advances it).
        The result is a view of the trainer's work buffer (valid until the next call) unless ``out``
        ([Kb, P] float32) is given. ``start`` is not modified.
        """
        Kb = len(data)
        if Kb == 0:
            raise ValueError("data: no clients")
        if Kb > self.max_batch:
            raise ValueError(f"data: {Kb} clients but max_batch={self.max_batch}")
        if len(generators) != Kb or (masks is not None and len(masks) != Kb):
            raise ValueError("generators/masks: one per client")
        if num_steps < 0:
            raise ValueError(f"num_steps: must be >= 0, got {num_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        P, N = self.P, self.N
        if not isinstance(start, torch.Tensor) or start.dtype != torch.float32 or start.shape not in ((P,), (Kb, P)):
            raise ValueError(f"start: expected float32 [{P}] or [{Kb}, {P}]")
        dev = start.device
        for k, (x, y) in enumerate(data):
            if x.shape[0] != y.shape[0] or x.shape[0] == 0:
                raise ValueError(f"data: client {k} has {x.shape[0]} samples and {y.shape[0]} labels")
            if x.device != dev or y.device != dev:
                raise ValueError("data: client data and start must be on the same device")
            if x.shape[1:] != data[0][0].shape[1:]:
                raise ValueError("data: every client's samples must have the same shape")
        flat = out if out is not None else self._buffer("flat", (Kb, P), torch.float32, dev)
        if flat.shape != (Kb, P) or flat.dtype != torch.float32 or flat.device != dev:
            raise ValueError(f"out: expected float32 [{Kb}, {P}] on {dev}")
        shared = start.dim() == 1
        if num_steps == 0 or not shared:
            flat.copy_(start.expand(Kb, P))
        if num_steps == 0:
            return flat
        if isinstance(masks, torch.Tensor):
            if masks.shape != (Kb, N):
                raise ValueError(f"masks: expected [{Kb}, {N}], got {tuple(masks.shape)}")
            fm = masks.to(device=dev, dtype=torch.float32)
        else:
            fm = torch.ones(Kb, N, dtype=torch.float32, device=dev)
        if masks is not None and not isinstance(masks, torch.Tensor):
            for k, m in enumerate(masks):
                if m is not None:
                    if m.dim() != 1 or m.shape[0] != N:
                        raise ValueError(f"masks: client {k}'s mask has shape {tuple(m.shape)}, expected [{N}]")
                    fm[k].copy_(m.to(device=dev, dtype=torch.float32))
        grad = self._buffer("grad", (Kb, P), torch.float32, dev)
        streams = [_BatchStream(x.shape[0], batch_size, g, x.device) for (x, _), g in zip(data, generators)]
        in_shape = tuple(data[0][0].shape[1:])
        xdtype, ydtype = data[0][0].dtype, data[0][1].dtype
        clip = clip_grad if (clip_grad is not None and clip_grad > 0) else None
        if self.method == "bmm":
            H = self.model.hidden
            m1, m2 = fm[:, :H], fm[:, H:]
        elif self._vmap is None:
            self._vmap = _VmapGrad(self.model)
        with torch.no_grad():
            for step in range(num_steps):
                first_shared = shared and step == 0     # every client still holds `start`
                w = start if first_shared else flat
                idx = [s.next() for s in streams]
                lens = [int(i.numel()) for i in idx]
                B = max(lens)
                xb = self._buffer("x", (Kb, B) + in_shape, xdtype, dev)
                yb = self._buffer("y", (Kb, B), ydtype, dev)
                for k, ((x, y), i) in enumerate(zip(data, idx)):
                    b = lens[k]
                    torch.index_select(x, 0, i, out=xb[k, :b])
                    torch.index_select(y, 0, i, out=yb[k, :b])
                    if b < B:
                        xb[k, b:].zero_()
                        yb[k, b:].zero_()
                counts = torch.tensor(lens, dtype=torch.float32).to(dev)
                padded = min(lens) < B
                valid = None
                if padded:
                    valid = (torch.arange(B, device=dev).unsqueeze(0) < counts.unsqueeze(1)).to(torch.float32)
                if self.method == "bmm":
                    _mlp_grad_batched_(self.model, w, grad, xb, yb, m1, m2, counts, valid)
                else:
                    rows_w = torch.ones(Kb, B, dtype=torch.float32, device=dev) if valid is None else valid
                    rows_w = rows_w / counts.unsqueeze(1)
                    model = self.model
                    was = model.training
                    model.train()
                    try:
                        self._vmap(w, grad, xb, yb, rows_w, fm)
                    finally:
                        model.train(was)
                if clip is not None:
                    norm = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
                    coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
                    grad.mul_(coef)
                if first_shared:        # = clone(start) then add_, as local_train, in one pass
                    torch.add(start.expand(Kb, P), grad, alpha=-lr, out=flat)
                else:
                    flat.add_(grad, alpha=-lr)
        return flat


def train_batch(model, start, data, masks, *, num_steps: int, batch_size: int, lr: float,
                clip_grad: Optional[float], generators, method: str = "auto") -> torch.Tensor:
    """One-shot :meth:`ClientTrainer.train` (returns a new ``[Kb, P]`` tensor)."""
    t = ClientTrainer(model, max_batch=len(data), method=method)
    out = torch.empty(len(data), t.P, dtype=torch.float32, device=start.device)
    return t.train(start, data, masks, num_steps=num_steps, batch_size=batch_size, lr=lr, clip_grad=clip_grad,
                   generators=generators, out=out)


# ------------------------------------------------------------------------------ simulator glue

def resolve_client_batch(model_name: str, device: str) -> int:
    """The ``client_batch=auto`` value: the MLP trains in batches (bmm: ~2x faster per client on
    CPU for small inputs, far more on GPUs where one client's step is launch-bound); the ResNet
    trains sequentially on CPU (vmap turns its convolutions into grouped convolutions, which are
    slower than per-client convolutions on CPU) and in batches of 16 on CUDA."""
    cuda = str(device).startswith("cuda")
    if model_name == "mlp":
        return 256 if cuda else 32
    return 16 if cuda else 1


def train_clients(sim, ks: Sequence[int], params: torch.Tensor, masks: Optional[torch.Tensor] = None, *,
                  num_steps: Optional[int] = None, lr: Optional[float] = None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[len(ks), P]``: the clients ``ks`` of simulation ``sim`` trained from ``params`` as
    ``sim.local_train`` trains them (their own data and RNG streams, cfg's SGD settings).

    ``masks``: None (full models) or bool/float ``[len(ks), N]``. ``len(ks)`` may not exceed
    ``sim.cfg["client_batch"]`` when that is > 1 (one batched computation); with ``client_batch`` 0
    or 1 the clients run one after another through ``sim.local_train``. The result is a work buffer
    reused by the next call unless ``out`` is given.
    """
    cfg = sim.cfg
    ks = [int(k) for k in ks]
    b = len(ks)
    cb = int(cfg.get("client_batch", 1) or 1)
    P = sim.P
    steps = int(cfg["local_steps"] if num_steps is None else num_steps)
    lr_ = float(cfg["lr"] if lr is None else lr)
    if masks is not None and (masks.dim() != 2 or masks.shape != (b, sim.N)):
        raise ValueError(f"masks: expected [{b}, {sim.N}], got {tuple(masks.shape)}")
    if cb <= 1:
        if out is None:
            out = _sim_buffer(sim, b, params.device)
        for i, k in enumerate(ks):
            m = None
            if masks is not None and not bool(masks[i].all()):
                m = masks[i]
            start = params if params.dim() == 1 else params[i]
            out[i].copy_(sim.local_train(k, start, mask=m, num_steps=steps, lr=lr_))
        return out
    if b > cb:
        raise ValueError(f"ks: {b} clients in one call, but client_batch={cb}")
    trainer = getattr(sim, "_client_trainer", None)
    if trainer is None or trainer.max_batch != cb:
        trainer = ClientTrainer(sim.model, max_batch=cb)
        sim._client_trainer = trainer
    data = [sim.client_data(k) for k in ks]
    gens = [sim.client_generators[k] for k in ks]
    return trainer.train(params, data, masks, num_steps=steps,
                         batch_size=int(cfg["batch_size"]), lr=lr_,
                         clip_grad=float(cfg["clip_grad"]) or None, generators=gens, out=out)


def _sim_buffer(sim, b: int, device) -> torch.Tensor:
    buf = getattr(sim, "_client_buffer", None)
    if buf is None or buf.shape[0] < b or buf.device != torch.device(device):
        buf = torch.empty(max(b, 1), sim.P, dtype=torch.float32, device=device)
        sim._client_buffer = buf
    return buf[:b]
