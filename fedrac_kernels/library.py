"""The ops registered with ``torch.library.custom_op`` under the ``fedrac`` namespace.

Each op takes the *normalised* arguments the public functions in :mod:`fedrac_kernels.api` build
(lists of contiguous rows, float32 weights, index tables; ``backend=""`` means automatic choice)
and runs the checked back-end call of :mod:`fedrac_kernels._dispatch`. A fake implementation gives
``torch.compile``/``torch.export`` the output metadata, so a function calling the public API traces
into one graph node per op. Mutating ops declare their mutated argument and return a *new* tensor
(custom ops may not return an alias of an input): the aggregation ops return the int32 [K] flags of
clients with non-finite values (the dropped clients under ``nonfinite="drop"``).

Schemas (``Tensor(a!)`` = mutated in place)::

    fedrac::masked_mean_update_(Tensor(a!) global_params, Tensor[] rows, Tensor weights,
                                Tensor[] masks, str backend, str nonfinite) -> Tensor
    fedrac::structured_mean_update_(Tensor(a!) global_params, Tensor[] rows, Tensor weights,
                                    Tensor segments, int N, Tensor? neuron_masks, Tensor? rank,
                                    Tensor? sizes, bool nonzero, str backend, str nonfinite) -> Tensor
    fedrac::compact_mean_update_(Tensor(a!) global_params, Tensor[] uploads, Tensor weights,
                                 Tensor segments, int N, Tensor inv, Tensor seg_off,
                                 Tensor seg_cols, str backend, str nonfinite) -> Tensor
    fedrac::compact_pack(Tensor delta, Tensor segments, Tensor inv, Tensor seg_off,
                         Tensor seg_cols, int length) -> Tensor
    fedrac::frequency_update_(Tensor(a!) freq, Tensor? masks, Tensor? rank, Tensor? sizes,
                              str backend) -> ()
    fedrac::lowest_frequency_order(Tensor freq, str backend) -> Tensor
    fedrac::nested_masks(Tensor order, Tensor sizes, str backend) -> Tensor

``masks=[]`` means "no masks" (the non-zero rule): schema inference has no optional tensor list.
"""
# No ``from __future__ import annotations`` here: custom_op infers the schema from real annotations.
from typing import List, Optional

import torch

from . import _dispatch

NAMESPACE = "fedrac"


@torch.library.custom_op("fedrac::masked_mean_update_", mutates_args=("global_params",))
def masked_mean_update_(global_params: torch.Tensor, rows: List[torch.Tensor], weights: torch.Tensor,
                        masks: List[torch.Tensor], backend: str, nonfinite: str) -> torch.Tensor:
    return _dispatch.finalize("dense", (list(masks) if len(masks) > 0 else None,), global_params, list(rows),
                              weights, backend, nonfinite)


@masked_mean_update_.register_fake
def _(global_params, rows, weights, masks, backend, nonfinite):
    return torch.empty(len(rows), dtype=torch.int32, device=global_params.device)


@torch.library.custom_op("fedrac::structured_mean_update_", mutates_args=("global_params",))
def structured_mean_update_(global_params: torch.Tensor, rows: List[torch.Tensor], weights: torch.Tensor,
                            segments: torch.Tensor, N: int, neuron_masks: Optional[torch.Tensor],
                            rank: Optional[torch.Tensor], sizes: Optional[torch.Tensor], nonzero: bool,
                            backend: str, nonfinite: str) -> torch.Tensor:
    return _dispatch.finalize("structured", (segments, N, neuron_masks, rank, sizes, bool(nonzero)),
                              global_params, list(rows), weights, backend, nonfinite)


@structured_mean_update_.register_fake
def _(global_params, rows, weights, segments, N, neuron_masks, rank, sizes, nonzero, backend, nonfinite):
    return torch.empty(len(rows), dtype=torch.int32, device=global_params.device)


@torch.library.custom_op("fedrac::compact_mean_update_", mutates_args=("global_params",))
def compact_mean_update_(global_params: torch.Tensor, uploads: List[torch.Tensor], weights: torch.Tensor,
                         segments: torch.Tensor, N: int, inv: torch.Tensor, seg_off: torch.Tensor,
                         seg_cols: torch.Tensor, backend: str, nonfinite: str) -> torch.Tensor:
    return _dispatch.finalize("compact", (segments, N, inv, seg_off, seg_cols), global_params, list(uploads),
                              weights, backend, nonfinite, arg="uploads")


@compact_mean_update_.register_fake
def _(global_params, uploads, weights, segments, N, inv, seg_off, seg_cols, backend, nonfinite):
    return torch.empty(len(uploads), dtype=torch.int32, device=global_params.device)


@torch.library.custom_op("fedrac::compact_pack", mutates_args=())
def compact_pack(delta: torch.Tensor, segments: torch.Tensor, inv: torch.Tensor, seg_off: torch.Tensor,
                 seg_cols: torch.Tensor, length: int) -> torch.Tensor:
    return _dispatch.compact_pack(delta, segments, inv, seg_off, seg_cols, length)


@compact_pack.register_fake
def _(delta, segments, inv, seg_off, seg_cols, length):
    return delta.new_empty(length)


@torch.library.custom_op("fedrac::frequency_update_", mutates_args=("freq",))
def frequency_update_(freq: torch.Tensor, masks: Optional[torch.Tensor], rank: Optional[torch.Tensor],
                      sizes: Optional[torch.Tensor], backend: str) -> None:
    _dispatch.frequency_update(freq, masks, rank, sizes, backend)


@frequency_update_.register_fake
def _(freq, masks, rank, sizes, backend):
    return None


@torch.library.custom_op("fedrac::lowest_frequency_order", mutates_args=())
def lowest_frequency_order(freq: torch.Tensor, backend: str) -> torch.Tensor:
    return _dispatch.stable_argsort(freq, backend)


@lowest_frequency_order.register_fake
def _(freq, backend):
    return torch.empty(freq.shape[0], dtype=torch.int64, device=freq.device)


@torch.library.custom_op("fedrac::nested_masks", mutates_args=())
def nested_masks(order: torch.Tensor, sizes: torch.Tensor, backend: str) -> torch.Tensor:
    return _dispatch.nested_masks(order, sizes, backend)


@nested_masks.register_fake
def _(order, sizes, backend):
    return torch.empty(sizes.shape[0], order.shape[0], dtype=torch.bool, device=order.device)


#: every registered op (the tests run ``torch.library.opcheck`` over these)
OPS = {
    "masked_mean_update_": masked_mean_update_,
    "structured_mean_update_": structured_mean_update_,
    "compact_mean_update_": compact_mean_update_,
    "compact_pack": compact_pack,
    "frequency_update_": frequency_update_,
    "lowest_frequency_order": lowest_frequency_order,
    "nested_masks": nested_masks,
}


def use_ops(*tensors) -> bool:
    """Route through the registered ops (tracing, fake or subclass tensors) or call directly (eager).

    Eager calls skip the dispatcher (~30 us per call on a small CPU); under ``torch.compile`` /
    ``torch.export`` or with tensor subclasses (FakeTensor, FunctionalTensor) the op is used.
    """
    if torch.compiler.is_compiling():
        return True
    for t in tensors:
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return True
    return False
