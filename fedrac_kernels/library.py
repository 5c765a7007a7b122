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

Sparsified rewards (:mod:`fedrac_kernels.sparsify`) and the client Gram matrix / FedPW helpers
(:mod:`fedrac_kernels.gram`): each op's implementation is the public function itself (undecorated,
on real tensors: every check of the eager call runs inside the op too). ``targets`` / ``U`` hold
either one [K, P] tensor or the K rows [P]; ``segments`` is an int64 [S, 2] table of
(offset, length) rows; ``backend=""`` means automatic choice::

    fedrac::topq_counts(Tensor q, int[] lengths) -> Tensor                     # int64 [K, S], CPU
    fedrac::topk_thresholds(Tensor u, Tensor segments, Tensor counts, str backend) -> Tensor
    fedrac::threshold_add_(Tensor(a!)[] targets, Tensor u, Tensor segments, Tensor thresholds,
                           float alpha, str backend) -> ()
    fedrac::layerwise_topq_add_(Tensor(a!)[] targets, Tensor u, Tensor segments, Tensor q,
                                float alpha, str backend) -> ()
    fedrac::layerwise_topq(Tensor u, Tensor segments, Tensor q, str backend) -> Tensor
    fedrac::global_topk_add_(Tensor(a!)[] targets, Tensor u, Tensor counts, float alpha,
                             str backend) -> ()
    fedrac::global_topk(Tensor u, Tensor counts, str backend) -> Tensor
    fedrac::randomk_add_(Tensor(a!)[] targets, Tensor u, Tensor counts, Tensor perm, float alpha,
                         str backend) -> ()                 # perm: the permutation, drawn outside
    fedrac::cosine_to_aggregate(Tensor[] U, Tensor u, float eps, str backend)
        -> (Tensor cos, Tensor norms, Tensor u_norm)          # float64 [K], [K], [] on the CPU
    fedrac::gram_matrix(Tensor[] parts, bool rows, ScalarType accumulate, int chunk_size,
                        Device? device, str nonfinite) -> Tensor   # parts: [K, p] blocks or K rows
    fedrac::gram_add_(Tensor(a!) acc, Tensor(b!) buf, Tensor block, int fill) -> ()
    fedrac::bottomk_magnitude_mask(Tensor rows, Tensor counts, int sample_every) -> (Tensor, Tensor)
    fedrac::column_normalized_std(Tensor rows, float eps) -> Tensor
    fedrac::smallest_indices(Tensor values, int n) -> Tensor
"""
# No ``from __future__ import annotations`` here: custom_op infers the schema from real annotations.
import functools
from typing import List, Optional, Tuple

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


def _no_output(*args):
    """The fake implementation of an op that only mutates its arguments."""
    return None


@torch.library.custom_op("fedrac::frequency_update_", mutates_args=("freq",))
def frequency_update_(freq: torch.Tensor, masks: Optional[torch.Tensor], rank: Optional[torch.Tensor],
                      sizes: Optional[torch.Tensor], backend: str) -> None:
    _dispatch.frequency_update(freq, masks, rank, sizes, backend)


frequency_update_.register_fake(_no_output)


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


# ---- sparsify ------------------------------------------------------------------------------------
def _sp():
    from . import sparsify  # imported on first use: sparsify imports this module

    return sparsify


def _gr():
    from . import gram

    return gram


def _stacked_or_rows(ts) -> object:
    """One [K, P] tensor (a list holding a single 2-D tensor) or the list of K rows."""
    return ts[0] if len(ts) == 1 and ts[0].dim() == 2 else list(ts)


def _leading(t: torch.Tensor) -> int:
    """K of a per-client argument: its leading size (a 0-dim tensor is one client)."""
    return t.shape[0] if t.dim() >= 1 else 1


@torch.library.custom_op("fedrac::topq_counts", mutates_args=())
def topq_counts(q: torch.Tensor, lengths: List[int]) -> torch.Tensor:
    return _sp().topq_counts.__wrapped__(q, list(lengths))


@topq_counts.register_fake
def _(q, lengths):
    return torch.empty(q.numel(), len(lengths), dtype=torch.int64, device="cpu")


@torch.library.custom_op("fedrac::topk_thresholds", mutates_args=())
def topk_thresholds(u: torch.Tensor, segments: torch.Tensor, counts: torch.Tensor, backend: str) -> torch.Tensor:
    return _sp().topk_thresholds.__wrapped__(u, segments, counts, backend=backend or None)


@topk_thresholds.register_fake
def _(u, segments, counts, backend):
    return u.new_empty(_leading(counts), segments.shape[0])


@torch.library.custom_op("fedrac::threshold_add_", mutates_args=("targets",))
def threshold_add_(targets: List[torch.Tensor], u: torch.Tensor, segments: torch.Tensor, thresholds: torch.Tensor,
                   alpha: float, backend: str) -> None:
    _sp().threshold_add_.__wrapped__(_stacked_or_rows(targets), u, segments, thresholds, alpha=alpha,
                                     backend=backend or None)


threshold_add_.register_fake(_no_output)


@torch.library.custom_op("fedrac::layerwise_topq_add_", mutates_args=("targets",))
def layerwise_topq_add_(targets: List[torch.Tensor], u: torch.Tensor, segments: torch.Tensor, q: torch.Tensor,
                        alpha: float, backend: str) -> None:
    _sp().layerwise_topq_add_.__wrapped__(_stacked_or_rows(targets), u, segments, q, alpha=alpha,
                                          backend=backend or None)


layerwise_topq_add_.register_fake(_no_output)


@torch.library.custom_op("fedrac::layerwise_topq", mutates_args=())
def layerwise_topq(u: torch.Tensor, segments: torch.Tensor, q: torch.Tensor, backend: str) -> torch.Tensor:
    return _sp().layerwise_topq.__wrapped__(u, segments, q, backend=backend or None)


@layerwise_topq.register_fake
def _(u, segments, q, backend):
    return u.new_empty(_leading(q), u.shape[0])


@torch.library.custom_op("fedrac::global_topk_add_", mutates_args=("targets",))
def global_topk_add_(targets: List[torch.Tensor], u: torch.Tensor, counts: torch.Tensor, alpha: float,
                     backend: str) -> None:
    _sp().global_topk_add_.__wrapped__(_stacked_or_rows(targets), u, counts, alpha=alpha, backend=backend or None)


global_topk_add_.register_fake(_no_output)


@torch.library.custom_op("fedrac::global_topk", mutates_args=())
def global_topk(u: torch.Tensor, counts: torch.Tensor, backend: str) -> torch.Tensor:
    return _sp().global_topk.__wrapped__(u, counts, backend=backend or None)


@global_topk.register_fake
def _(u, counts, backend):
    return u.new_empty(_leading(counts), u.shape[0])


@torch.library.custom_op("fedrac::randomk_add_", mutates_args=("targets",))
def randomk_add_(targets: List[torch.Tensor], u: torch.Tensor, counts: torch.Tensor, perm: torch.Tensor,
                 alpha: float, backend: str) -> None:
    _sp().randomk_with_perm_(_stacked_or_rows(targets), u, counts, perm, alpha=alpha, backend=backend or None)


randomk_add_.register_fake(_no_output)


@torch.library.custom_op("fedrac::cosine_to_aggregate", mutates_args=())
def cosine_to_aggregate(U: List[torch.Tensor], u: torch.Tensor, eps: float,
                        backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = _sp().cosine_to_aggregate.__wrapped__(_stacked_or_rows(U), u, eps=eps, return_norms=True,
                                              backend=backend or None)
    return r.cos, r.norms, torch.tensor(r.u_norm, dtype=torch.float64)


@cosine_to_aggregate.register_fake
def _(U, u, eps, backend):
    K = len(_stacked_or_rows(U))
    f64 = dict(dtype=torch.float64, device="cpu")
    return torch.empty(K, **f64), torch.empty(K, **f64), torch.empty((), **f64)


# ---- gram -------------------------------------------------------------------------------------------
@torch.library.custom_op("fedrac::gram_matrix", mutates_args=())
def gram_matrix(parts: List[torch.Tensor], rows: bool, accumulate: torch.dtype, chunk_size: int,
                device: Optional[torch.device], nonfinite: str) -> torch.Tensor:
    updates = list(parts) if rows or len(parts) != 1 else parts[0]
    return _gr().gram_matrix.__wrapped__(updates, accumulate=accumulate, chunk_size=chunk_size, device=device,
                                         nonfinite=nonfinite)


@gram_matrix.register_fake
def _(parts, rows, accumulate, chunk_size, device, nonfinite):
    K = len(parts) if rows else parts[0].shape[0]
    return torch.empty(K, K, dtype=accumulate, device=device if device is not None else parts[0].device)


@torch.library.custom_op("fedrac::gram_add_", mutates_args=("acc", "buf"))
def gram_add_(acc: torch.Tensor, buf: torch.Tensor, block: torch.Tensor, fill: int) -> None:
    _gr().gram_add_checked_(acc, buf, block, fill)


gram_add_.register_fake(_no_output)


@torch.library.custom_op("fedrac::bottomk_magnitude_mask", mutates_args=())
def bottomk_magnitude_mask(rows: torch.Tensor, counts: torch.Tensor,
                           sample_every: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _gr().bottomk_magnitude_mask.__wrapped__(rows, counts, sample_every=sample_every)


@bottomk_magnitude_mask.register_fake
def _(rows, counts, sample_every):
    return torch.empty_like(rows, memory_format=torch.contiguous_format), \
        torch.empty(rows.shape[0], dtype=torch.float64, device="cpu")


@torch.library.custom_op("fedrac::column_normalized_std", mutates_args=())
def column_normalized_std(rows: torch.Tensor, eps: float) -> torch.Tensor:
    return _gr().column_normalized_std.__wrapped__(rows, eps=eps)


@column_normalized_std.register_fake
def _(rows, eps):
    return rows.new_empty(rows.shape[1])


@torch.library.custom_op("fedrac::smallest_indices", mutates_args=())
def smallest_indices(values: torch.Tensor, n: int) -> torch.Tensor:
    return _gr().smallest_indices.__wrapped__(values, n)


@smallest_indices.register_fake
def _(values, n):
    return torch.empty(n, dtype=torch.int64, device=values.device)


#: every registered op (the tests run ``torch.library.opcheck`` over these)
OPS = {
    "masked_mean_update_": masked_mean_update_,
    "structured_mean_update_": structured_mean_update_,
    "compact_mean_update_": compact_mean_update_,
    "compact_pack": compact_pack,
    "frequency_update_": frequency_update_,
    "lowest_frequency_order": lowest_frequency_order,
    "nested_masks": nested_masks,
    "topq_counts": topq_counts,
    "topk_thresholds": topk_thresholds,
    "threshold_add_": threshold_add_,
    "layerwise_topq_add_": layerwise_topq_add_,
    "layerwise_topq": layerwise_topq,
    "global_topk_add_": global_topk_add_,
    "global_topk": global_topk,
    "randomk_add_": randomk_add_,
    "cosine_to_aggregate": cosine_to_aggregate,
    "gram_matrix": gram_matrix,
    "gram_add_": gram_add_,
    "bottomk_magnitude_mask": bottomk_magnitude_mask,
    "column_normalized_std": column_normalized_std,
    "smallest_indices": smallest_indices,
}


def _plain(t) -> bool:
    return type(t) is torch.Tensor or type(t) is torch.nn.Parameter


def use_ops_args(args, kwargs) -> bool:
    """:func:`use_ops` over a call's arguments: its tensors and the tensors in its lists/tuples."""
    if torch.compiler.is_compiling():
        return True
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            if not _plain(a):
                return True
        elif isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor) and not _plain(t):
                    return True
    return False


def routed(to_op):
    """Decorator for a public function with a registered op: eager calls on plain tensors run the
    function as written; under ``torch.compile`` / ``torch.export`` or with fake / subclass tensors
    ``to_op(*args, **kwargs)`` normalises the arguments and calls the ``torch.ops.fedrac`` op, whose
    implementation is the undecorated function (``public.__wrapped__``) on real tensors."""
    def deco(impl):
        @functools.wraps(impl)
        def public(*args, **kwargs):
            if use_ops_args(args, kwargs):
                return to_op(*args, **kwargs)
            return impl(*args, **kwargs)
        return public
    return deco


def use_ops(*tensors) -> bool:
    """Route through the registered ops (tracing, fake or subclass tensors) or call directly (eager).

    Eager calls skip the dispatcher (~30 us per call on a small CPU); under ``torch.compile`` /
    ``torch.export`` or with tensor subclasses (FakeTensor, FunctionalTensor) the op is used.
    """
    if torch.compiler.is_compiling():
        return True
    return not all(map(_plain, tensors))
