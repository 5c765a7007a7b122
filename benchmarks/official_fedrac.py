"""Baselines for the aggregation benchmark: FedRAC's own aggregation, and the best plain torch.

(a) :func:`official_aggregate` -- our re-implementation of the server aggregation of the official
    FedRAC code (``my_algorithm/FedRAC.py`` / ``FedRAC_ResNet.py``, ``Server.iterate``, on flgo 0.0.15
    model objects), written from the descriptions in ``shared/spec/ALGORITHMS.md`` §4.9 and
    ``shared/research/KERNELS.md`` §1.1, not from their code. The same work, organised the same way:

    * the clients' models arrive as model objects; each update ``m_k - w`` is computed by model
      arithmetic, which builds a **new model object** (constructed with its random initialisation,
      as ``m.__class__()`` does) and fills it layer by layer;
    * every update is flattened (``torch.cat`` of its parameters) and turned into an int32 mask
      ``gt(abs(u), 0).int()``; the masks are summed with Python's ``sum`` over the list;
    * the reciprocal of the count is computed three times (``where(isinf(1/c), full_like(1/c, 0), 1/c)``)
      and turned back into a model object;
    * the updates are summed by a Python loop over layers x clients (one new tensor per addition),
      multiplied layer by layer by the reciprocal model, and added to the global model -- each step
      again a new model object;
    * result ``w + (sum_k delta_k) * (1 / c)``: a product with the reciprocal, not a division (so it
      can differ from the exact mean by an ulp), and the deltas are recomputed from the models.

(b) :func:`stacked_mean_update` -- the best plain-torch vectorised form: the updates stacked as one
    [K, P] tensor (stacking not timed), one count of non-zeros, one sum and one ``where``.

(b') :func:`compiled_stacked` -- ``torch.compile`` of (b), or None where compilation is unavailable.

Parameter layouts: :func:`mlp_shapes` (the paper MLP 3072-200-200-10, P = 656,810) and
:func:`resnet18_shapes` (torchvision's resnet18 layer list with GroupNorm affine parameters in place
of BatchNorm's and fc 512 -> num_classes; P = 11,181,642 for 10 classes), optionally with scaled
channel widths for small machines.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

Shape = tuple


# ---- parameter layouts ----------------------------------------------------------------------------
def mlp_shapes(dim_in: int = 3072, hidden: int = 200, classes: int = 10) -> list:
    """named_parameters() shapes of the FedRAC MLP (spec §1.2.1)."""
    return [(hidden, dim_in), (hidden,), (hidden, hidden), (hidden,), (classes, hidden), (classes,)]


def resnet18_shapes(num_classes: int = 10, width: float = 1.0) -> list:
    """named_parameters() shapes of torchvision's resnet18 (ImageNet stem), norms as GroupNorm.

    ``width`` scales every channel count (64, 128, 256, 512) for scaled-down CPU runs.
    """
    c = [max(1, int(round(ch * width))) for ch in (64, 128, 256, 512)]
    shapes: list = [(c[0], 3, 7, 7), (c[0],), (c[0],)]  # stem conv + norm
    cin = c[0]
    for stage, cout in enumerate(c):
        for block in range(2):
            stride_change = block == 0 and (stage > 0)
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if stride_change:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    shapes += [(num_classes, cin), (num_classes,)]
    return shapes


def numel(shapes: Sequence[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


# ---- (a) FLGo-style model objects -------------------------------------------------------------
class FModule(nn.Module):
    """A model whose arithmetic builds new model objects, layer by layer (flgo's FModule style).

    Subclasses set ``SHAPES``. Construction allocates and randomly initialises every parameter
    (kaiming-uniform weights and uniform biases, as torch's Linear/Conv defaults), which is what
    ``m.__class__()`` costs in the official code.
    """

    SHAPES: tuple = ()
    DEVICE: str = "cpu"

    def __init__(self):
        super().__init__()
        self.layers = nn.ParameterList([nn.Parameter(torch.empty(s), requires_grad=False) for s in self.SHAPES])
        with torch.no_grad():
            for p in self.layers:
                if p.dim() >= 2:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                else:
                    bound = 1.0 / math.sqrt(max(1, p.numel()))
                    nn.init.uniform_(p, -bound, bound)
        if self.DEVICE != "cpu":  # built on the host, then moved (as the official code does)
            self.to(self.DEVICE)

    # every operator: a new model filled from a per-layer dict
    def _from_dict(self, md: dict) -> "FModule":
        res = self.__class__()
        res.load_state_dict(md)
        return res

    def __add__(self, other: "FModule") -> "FModule":
        a, b = self.state_dict(), other.state_dict()
        return self._from_dict({k: a[k] + b[k] for k in a})

    def __sub__(self, other: "FModule") -> "FModule":
        a, b = self.state_dict(), other.state_dict()
        return self._from_dict({k: a[k] - b[k] for k in a})


def fmodule_class(shapes: Sequence[Shape], device="cpu", name: str = "Model") -> type:
    """An FModule subclass with the given parameter shapes, living on ``device``."""
    return type(name, (FModule,), {"SHAPES": tuple(tuple(s) for s in shapes), "DEVICE": str(device)})


def model_to_tensor(m: FModule) -> torch.Tensor:
    return torch.cat([p.data.view(-1) for p in m.parameters()])


def model_from_tensor(t: torch.Tensor, cls: type) -> FModule:
    res = cls()
    pos = 0
    with torch.no_grad():
        for p in res.parameters():
            n = p.numel()
            p.copy_(t[pos:pos + n].view_as(p))
            pos += n
    return res


def model_sum(ms: list) -> FModule:
    """Sum of models: a Python loop over layers x clients, one new tensor per addition."""
    res = ms[0].__class__()
    mds = [m.state_dict() for m in ms]
    md_sum = {}
    for layer in mds[0]:
        md_sum[layer] = torch.zeros_like(mds[0][layer])
        for wid in range(len(mds)):
            md_sum[layer] = md_sum[layer] + mds[wid][layer]
    res.load_state_dict(md_sum)
    return res


def model_mul(m1: FModule, m2: FModule) -> FModule:
    a, b = m1.state_dict(), m2.state_dict()
    return m1._from_dict({k: a[k] * b[k] for k in a})


def official_aggregate(global_model: FModule, models: list) -> FModule:
    """(a) FedRAC's server aggregation (the non-zero rule), organised as the official code."""
    model_updates = [mi - global_model for mi in models]
    update_tensors = [model_to_tensor(ui) for ui in model_updates]
    model_masks = [torch.gt(torch.abs(u), 0).int() for u in update_tensors]
    count = sum(model_masks)
    sum_model_masks = torch.where(torch.isinf(1.0 / count), torch.full_like(1.0 / count, 0), 1.0 / count)
    mask = model_from_tensor(sum_model_masks, global_model.__class__)
    update = model_sum(model_updates)
    final = model_mul(mask, update)
    return global_model + final


def make_models(cls: type, g: torch.Tensor, deltas: torch.Tensor) -> tuple:
    """The global model object and the K client model objects w + delta_k (set-up, not timed)."""
    glob = model_from_tensor(g, cls)
    return glob, [model_from_tensor(g + deltas[k].float(), cls) for k in range(deltas.shape[0])]


# ---- (b) plain torch, vectorised --------------------------------------------------------------
def stacked_mean_update(g: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """(b) g + sum/count where count > 0, for stacked updates U [K, P]; returns the new g."""
    count = torch.count_nonzero(U, dim=0)
    total = U.sum(0, dtype=torch.float32)
    return torch.where(count > 0, g + total / count, g)


def stacked_mean_update_(g: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """(b), in place on g."""
    return g.copy_(stacked_mean_update(g, U))


def compiled_stacked() -> tuple:
    """(b') ``torch.compile`` of (b): (callable, None) or (None, reason it is unavailable)."""
    try:
        fn = torch.compile(stacked_mean_update, dynamic=False, fullgraph=True)
        return fn, None
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        return None, f"{type(exc).__name__}: {exc}"


def try_compiled(fn: Optional[Callable], *args) -> tuple:
    """Run a compiled callable once (this triggers compilation): (ok, reason)."""
    if fn is None:
        return False, "torch.compile unavailable"
    try:
        fn(*args)
        return True, None
    except Exception as exc:  # pragma: no cover - depends on the toolchain
        msg = str(exc).strip().splitlines()
        return False, f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


# ---- streaming plain torch (for the streamed case) --------------------------------------------
class StackedStreaming:
    """(b) streamed: per chunk, count and sum into float32/int32 state; then the where."""

    def __init__(self, P: int, device):
        self.num = torch.zeros(P, dtype=torch.float32, device=device)
        self.cnt = torch.zeros(P, dtype=torch.int32, device=device)

    def reset(self) -> None:
        self.num.zero_()
        self.cnt.zero_()

    def add(self, chunk: torch.Tensor) -> None:
        self.num += chunk.sum(0, dtype=torch.float32)
        self.cnt += torch.count_nonzero(chunk, dim=0).to(torch.int32)

    def apply_(self, g: torch.Tensor) -> torch.Tensor:
        return g.copy_(torch.where(self.cnt > 0, g + self.num / self.cnt, g))
