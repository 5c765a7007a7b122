"""Models of the FedRAC simulator with activation masks at declared sites (spec §1.2).

Every model here implements the ``fedrac_kernels`` module protocol (ARCHITECTURE.md §1), so
``fedrac_kernels.NeuronLayout.from_module(model)`` maps neuron gates onto the flat parameters:

* ``model.mask_sites()`` -> ordered ``[(site name, width), ...]``. The flat neuron index runs over
  the sites in this order, then over the channels of a site (spec §1.2.1 / §4.13).
* ``model.parameter_gates()`` -> ``{parameter name: (out site | None, in site | None)}``: exactly the
  parameters whose local update is *structurally* zero for a client lacking a neuron (dim 0 gated
  by the out site, dim 1 by the in site).
* ``model.num_neurons`` (``N``), ``model(x, mask=None)``.

Masks are activation masks: after the activation at a site the tensor is multiplied by the 0/1
mask of that site (broadcast over H x W for channels). ``mask`` is ``None`` (plain model), a float
or bool tensor ``[N]`` (one submodel for the whole batch) or ``[B, N]`` (one submodel per sample;
used to stack many candidate submodels along the batch).

The forward pass is split in two so evaluation can share work between submodels:
``forward(x, mask) == forward_rest(forward_shared(x), mask)``, where ``forward_shared`` is
everything before the first mask site (it does not depend on the mask).

Flat-parameter convention (used by training and evaluation): one float32 vector ``[P]`` holding
the parameters in ``named_parameters()`` order, each flattened row-major; see
:func:`flatten_parameters` and :func:`bind_flat_parameters_`.
"""
from __future__ import annotations

import contextlib
import abc
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "RESNET_VARIANTS",
    "MaskedModel",
    "MaskedMLP",
    "MaskedResNet18",
    "build_model",
    "flatten_parameters",
    "bind_flat_parameters_",
    "num_parameters",
]

MODELS = ("mlp", "resnet18")
# "imagenet_stem": FedRAC's CIFAR-10 ResNet (torchvision stem 7x7/2, max-pool skipped).
# "cifar_stem":    FedRAC's Tiny-ImageNet ResNet (3x3/1 stem, no max-pool).
RESNET_VARIANTS = ("imagenet_stem", "cifar_stem")
_VARIANT_ALIASES = {"cifar10": "imagenet_stem", "tinyimagenet": "cifar_stem"}


# --------------------------------------------------------------------------------------------
# flat parameters


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for _, p in model.named_parameters())


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """float32 ``[P]`` copy of the parameters in ``named_parameters()`` order."""
    ps = [p.detach().reshape(-1).to(torch.float32) for _, p in model.named_parameters()]
    return torch.cat(ps) if ps else torch.zeros(0)


def bind_flat_parameters_(model: nn.Module, flat: torch.Tensor,
                          grad: Optional[torch.Tensor] = None) -> None:
    """Make every parameter of ``model`` a view of ``flat`` (and its ``.grad`` a view of ``grad``).

    ``flat`` (and ``grad``) are 1-D float32 ``[P]`` in ``named_parameters()`` order. Afterwards an
    in-place change of ``flat`` is seen by the model and vice versa; with ``grad`` bound, autograd
    accumulates into ``grad`` (zero it before each backward, never set ``.grad = None``).
    The model may live on any device before the call: its parameters move to ``flat``'s.
    """
    P = num_parameters(model)
    if flat.dim() != 1 or flat.numel() != P:
        raise ValueError(f"flat: expected a 1-D tensor of {P} values, got shape {tuple(flat.shape)}")
    if flat.dtype != torch.float32:
        raise TypeError(f"flat: expected float32, got {flat.dtype}")
    if grad is not None and (grad.shape != flat.shape or grad.dtype != flat.dtype
                             or grad.device != flat.device):
        raise ValueError("grad: must match flat in shape, dtype and device")
    off = 0
    for _, p in model.named_parameters():
        n = p.numel()
        p.data = flat[off:off + n].view(p.shape)
        if grad is not None:
            p.grad = grad[off:off + n].view(p.shape)
        off += n


# --------------------------------------------------------------------------------------------
# masking


def _site_mask(mask: Optional[torch.Tensor], offset: int, width: int, h: torch.Tensor):
    """The slice of ``mask`` for one site, shaped to broadcast against activation ``h``."""
    if mask is None:
        return None
    extra = (1,) * (h.dim() - 2)
    if mask.dim() == 1:
        m = mask[offset:offset + width].view((width,) + extra)
    else:
        m = mask[:, offset:offset + width].reshape((mask.shape[0], width) + extra)
    if m.dtype != h.dtype:
        m = m.to(h.dtype)
    return m


class MaskedModel(nn.Module, abc.ABC):
    """Base class: site bookkeeping and mask validation (subclasses define the layers)."""

    _sites: tuple = ()

    def mask_sites(self) -> list[tuple[str, int]]:
        return list(self._sites)

    @abc.abstractmethod
    def parameter_gates(self) -> dict[str, tuple[Optional[str], Optional[str]]]:
        """Implemented by each model (see the module docstring)."""

    @property
    def num_neurons(self) -> int:
        return sum(w for _, w in self._sites)

    @property
    def site_offsets(self) -> dict[str, tuple[int, int]]:
        """site name -> (first flat neuron index, width)."""
        out, off = {}, 0
        for name, w in self._sites:
            out[name] = (off, w)
            off += w
        return out

    def check_mask(self, mask: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
        if mask is None:
            return None
        N = self.num_neurons
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a tensor, got {type(mask).__name__}")
        if mask.dim() == 1 and mask.shape[0] == N:
            return mask
        if mask.dim() == 2 and mask.shape == (batch, N):
            return mask
        raise ValueError(f"mask: expected shape [{N}] or [{batch}, {N}], got {tuple(mask.shape)}")

    @abc.abstractmethod
    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """Implemented by each model (see the module docstring)."""

    @abc.abstractmethod
    def forward_rest(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Implemented by each model (see the module docstring)."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = self.check_mask(mask, x.shape[0])
        return self.forward_rest(self.forward_shared(x), mask)


# --------------------------------------------------------------------------------------------
# MLP (spec §1.2.1)


class MaskedMLP(MaskedModel):
    """FedRAC's MLP: flatten -> Linear(D, 200) -> ReLU -> (*m1) -> Linear(200, 200) -> ReLU -> (*m2)
    -> Linear(200, classes).

    Sites ``h1`` (neurons 0..199) and ``h2`` (200..399). With weight decay and momentum 0, a client
    lacking hidden neuron j gets exactly zero updates on the row/bias producing j and on the column
    consuming j; those are the declared gates. The output bias is always trained.
    ``forward_shared`` is ``relu(fc1(x))`` (before ``m1``).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 200):
        super().__init__()
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.hidden = int(hidden)
        self.fc1 = nn.Linear(self.in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, self.num_classes)
        self._sites = (("h1", hidden), ("h2", hidden))

    def parameter_gates(self):
        return {
            "fc1.weight": ("h1", None),
            "fc1.bias": ("h1", None),
            "fc2.weight": ("h2", "h1"),
            "fc2.bias": ("h2", None),
            "fc3.weight": (None, "h2"),
        }

    def forward_shared(self, x):
        return F.relu(self.fc1(x.reshape(x.shape[0], -1)))

    def forward_rest(self, h, mask=None):
        H = self.hidden
        m1 = _site_mask(mask, 0, H, h)
        if m1 is not None:
            h = h * m1
        h = F.relu(self.fc2(h))
        m2 = _site_mask(mask, H, H, h)
        if m2 is not None:
            h = h * m2
        return self.fc3(h)


# --------------------------------------------------------------------------------------------
# GroupNorm ResNet-18 (spec §1.2.2)


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(2, c)


class BasicBlock(nn.Module):
    """conv3x3 -> GN(2) -> ReLU -> conv3x3 -> GN(2), plus a shortcut (1x1 conv -> GN(2) when the
    shape changes), then ReLU of the sum. All convs are bias-free."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = _gn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = _gn(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _gn(cout))

    def forward(self, x):
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        sc = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + sc)


class MaskedResNet18(MaskedModel):
    """GroupNorm(2) ResNet-18 with channel masks m0..m4 (64, 64, 128, 256, 512; N = 1024).

    ``variant="imagenet_stem"`` is FedRAC's CIFAR-10 net (torchvision stem: 7x7 conv stride 2,
    64 ch; the max-pool is skipped, so no max-pool is built); ``variant="cifar_stem"`` is the
    Tiny-ImageNet net (3x3 conv stride 1). Then GN(2) + ReLU, four stages of two BasicBlocks
    (64, 128, 256, 512 channels; strides 1, 2, 2, 2), adaptive average pool and ``fc``.

    Sites: ``m0`` after the stem ReLU, ``m1``..``m3`` after stages 1..3, ``m4`` after the average
    pool (input of ``fc``). Masks are applied only at these points, never inside blocks.

    Only *partially structured* (spec §1.2.2): GroupNorm couples the channels of a group through
    its mean and variance, so the conv producing a masked channel still receives non-zero
    gradient. The declared gates are exactly the parameters whose update is structurally zero:
    the consumers of a masked channel (input slices of the next stage's first conv and of its
    shortcut conv; ``fc`` columns for ``m4``) and, as out gate, the GN affine (weight, bias) of
    the last norm before each site. Aggregation rules built on these gates therefore leave the
    other parameters to the non-zero rule (spec §4.9).
    ``forward_shared`` is the stem (conv, GN, ReLU; before ``m0``).
    """

    widths = (64, 128, 256, 512)

    def __init__(self, num_classes: int, in_channels: int = 3, variant: str = "imagenet_stem"):
        super().__init__()
        variant = _VARIANT_ALIASES.get(variant, variant)
        if variant not in RESNET_VARIANTS:
            raise ValueError(f"variant: expected one of {RESNET_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.num_classes = int(num_classes)
        if variant == "imagenet_stem":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.gn1 = _gn(64)
        cin = 64
        for i, (w, s) in enumerate(zip(self.widths, (1, 2, 2, 2))):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, s), BasicBlock(w, w, 1)))
            cin = w
        self.fc = nn.Linear(512, self.num_classes)
        self._sites = (("m0", 64), ("m1", 64), ("m2", 128), ("m3", 256), ("m4", 512))

    def parameter_gates(self):
        g = {"gn1.weight": ("m0", None), "gn1.bias": ("m0", None),
             "layer1.0.conv1.weight": (None, "m0")}
        for stage in (1, 2, 3, 4):
            out_site = f"m{stage}"
            g[f"layer{stage}.1.gn2.weight"] = (out_site, None)
            g[f"layer{stage}.1.gn2.bias"] = (out_site, None)
            if stage < 4:
                g[f"layer{stage + 1}.0.conv1.weight"] = (None, out_site)
                g[f"layer{stage + 1}.0.shortcut.0.weight"] = (None, out_site)
        g["fc.weight"] = (None, "m4")
        return g

    def forward_shared(self, x):
        return F.relu(self.gn1(self.conv1(x)))

    def forward_rest(self, h, mask=None):
        offs = ((0, 64), (64, 64), (128, 128), (256, 256), (512, 512))
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        for i in range(5):
            if i == 4:
                h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
            m = _site_mask(mask, offs[i][0], offs[i][1], h)
            if m is not None:
                h = h * m
            if i < 4:
                h = layers[i](h)
        return self.fc(h)


# --------------------------------------------------------------------------------------------


def build_model(name: str, *, dataset: str, num_classes: int, input_shape: Sequence[int],
                variant: Optional[str] = None, seed: Optional[int] = None) -> MaskedModel:
    """Build a masked model (default PyTorch initialisation).

    ``name``: ``"mlp"`` (input flattened, D = prod(input_shape)) or ``"resnet18"``.
    ResNet variant by dataset: ``"tinyimagenet"`` -> ``"cifar_stem"`` (3x3 stem), every other
    dataset -> ``"imagenet_stem"`` (FedRAC's CIFAR-10 net); ``variant=`` overrides (also accepts
    the aliases ``"cifar10"`` and ``"tinyimagenet"``). ``seed``: if given, the initial weights
    are drawn from ``torch.manual_seed(seed)`` without disturbing the global RNG.

    Parameter counts: MLP 656,810 (3x32x32, 10 classes), 209,662 (1x28x28, 62);
    ResNet-18 11,181,642 (imagenet_stem, 10) and 11,271,432 (cifar_stem, 200).
    """
    input_shape = tuple(int(s) for s in input_shape)
    if num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        if name == "mlp":
            D = 1
            for s in input_shape:
                D *= s
            return MaskedMLP(D, num_classes)
        if name == "resnet18":
            if len(input_shape) != 3:
                raise ValueError(f"input_shape: resnet18 needs (C, H, W), got {input_shape}")
            if variant is None:
                variant = "cifar_stem" if dataset == "tinyimagenet" else "imagenet_stem"
            return MaskedResNet18(num_classes, in_channels=input_shape[0], variant=variant)
    raise ValueError(f"name: unknown model {name!r}; choose one of {MODELS}")
