"""One-launch logits of every nested MLP candidate for a block of rows (Triton; CUDA or the interpreter).

The torch walk of :class:`fedrac.evaluation._MLPWalk` issues 3-4 small kernels per candidate and
block of rows, so on a GPU the fused evaluation is launch-bound (about as many launches per
candidate as a separate forward). This kernel walks all S candidates (slots) inside one program
per ``BW`` rows: it keeps the layer-2 pre-activations ``z2`` of every layer-2 neuron for its rows
in registers, adds each layer-1 neuron when it enters (a rank-1 update per neuron, in walk
order), and for every slot runs the head on the active layer-2 prefix (``tl.dot`` in IEEE float32,
class tiles of 16). It writes the same ``LA [S, classes + 1, w]`` block as the torch walk (the
last row is the scale bound ``b3max + sum_j max_k |W3[k, j]| a2[j]``); the decisions, including
the float64 re-decision of every near tie, stay in :class:`~fedrac.evaluation._MLPWalk`, so the
correct counts are the same as the torch walk's (its float32 rounding differs, but no decision is
taken from float32 values within the tie tolerance).

Work per row: E x K2 multiply-adds for z2 plus S x (classes + 1) x K2 for the heads, about 1.2x one
full evaluation for C = 50 candidates of the CIFAR-10 MLP, in one launch per block.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from fedrac_kernels.backends import triton_interpreter_issue

try:  # optional: without triton (or without a CUDA device) the torch walk runs
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

NCT = 16          # classes per head tile (tl.dot needs >= 16)
MAX_K2P = 512     # layer-2 widths above this keep the torch walk (z2 would not fit in registers)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable(device: torch.device, K2: int) -> bool:
    """Whether :func:`walk_logits` can run for tensors on ``device`` with ``K2`` layer-2 neurons."""
    if triton is None or K2 < 1 or triton.next_power_of_2(max(K2, 16)) > MAX_K2P:
        return False
    if _interpreting():  # tests without a GPU: only where this triton's interpreter runs the loops
        return triton_interpreter_issue(triton.__version__) is None
    return device.type == "cuda"


if triton is not None:
    @triton.jit
    def _walk_logits_kernel(HT, W2T, B2, W3, B3, E_OF, K2_OF, OUT, w, K2, S, NC1,
                            BW: tl.constexpr, K2P: tl.constexpr, NCT_: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BW + tl.arange(0, BW)
        rmask = rows < w
        j = tl.arange(0, K2P)
        jm = j < K2
        c = tl.arange(0, NCT_)
        b2 = tl.load(B2 + j, mask=jm, other=0.0)
        z2 = tl.zeros([K2P, BW], dtype=tl.float32) + b2[:, None]
        e_prev = 0
        for s in range(0, S):
            e = tl.load(E_OF + s).to(tl.int32)
            k2 = tl.load(K2_OF + s).to(tl.int32)
            for i in range(e_prev, e):                     # layer-1 neuron i enters: rank-1 update
                wcol = tl.load(W2T + i * K2 + j, mask=jm, other=0.0)            # W2q[:, i]
                hrow = tl.load(HT + i * w + rows, mask=rmask, other=0.0)        # h1[rows, i]
                z2 += wcol[:, None] * hrow[None, :]
            e_prev = e
            a2 = tl.where((j < k2)[:, None], tl.maximum(z2, 0.0), 0.0)
            for c0 in range(0, NC1, NCT_):
                cls = c0 + c
                cm = cls < NC1
                w3 = tl.load(W3 + cls[:, None] * K2 + j[None, :], mask=cm[:, None] & jm[None, :], other=0.0)
                b3 = tl.load(B3 + cls, mask=cm, other=0.0)
                lg = tl.dot(w3, a2, input_precision="ieee") + b3[:, None]
                tl.store(OUT + s * NC1 * w + cls[:, None] * w + rows[None, :], lg,
                         mask=cm[:, None] & rmask[None, :])


def walk_logits(hT: torch.Tensor, W2T: torch.Tensor, b2: torch.Tensor, W3e: torch.Tensor, b3e: torch.Tensor,
                e_of: torch.Tensor, k2_of: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``LA [S, nc + 1, w]`` float32: slot s's logits (rows ``:nc``) and scale bound (row ``nc``).

    ``hT`` ``[E, w]``: relu(layer 1) of the rows in walk order (contiguous); ``W2T`` ``[E, K2]``:
    layer-2 weights (walk order) transposed; ``b2`` ``[K2]``; ``W3e`` ``[nc + 1, K2]`` /
    ``b3e`` ``[nc + 1]``: the head with the |W3| max row; ``e_of`` / ``k2_of`` ``[S]``: each slot's
    layer-1 / layer-2 prefix lengths, ``e_of`` non-decreasing."""
    E, w = hT.shape
    K2 = W2T.shape[1]
    S = e_of.numel()
    nc1 = W3e.shape[0]
    if max(E, S * nc1) * w >= 2 ** 31:
        raise ValueError(f"walk_logits: {w} rows are too many for int32 offsets (E = {E}, S x (nc + 1) = "
                         f"{S * nc1}); pass fewer rows per call")
    if out is None:
        out = torch.empty(S, nc1, w, dtype=torch.float32, device=hT.device)
    if S == 0 or w == 0:
        return out
    K2P = triton.next_power_of_2(max(K2, 16))
    BW = 32 if K2P <= 256 else 16
    grid = (triton.cdiv(w, BW),)
    _walk_logits_kernel[grid](hT, W2T, b2, W3e, b3e, e_of, k2_of, out, w, K2, S, nc1,
                              BW=BW, K2P=K2P, NCT_=NCT, num_warps=4 if K2P <= 256 else 8)
    return out
