"""fedrac_kernels: fused kernels for submodel federated learning.

Masked-mean aggregation (dense masks, neuron-structured masks, compact uploads, streaming), the
frequency table, its stable ascending order and nested prefix masks, over interchangeable back ends
(``torch`` reference, ``cpu`` C++/OpenMP, ``cuda``, ``triton``) that agree bit for bit.
See docs/ARCHITECTURE.md section 1 for the contract.

    >>> import fedrac_kernels as fk
    >>> fk.available_backends()          # e.g. ['torch', 'cpu']
"""
from . import library  # registers the torch.ops.fedrac.* operators
from ._dispatch import available_backends, backend_report
from .api import (compact_mean_update_, compact_pack, frequency_update_, lowest_frequency_order,
                  masked_mean_update_, nested_masks, structured_mean_update_)
from .layout import (CompactTables, MaskSite, NestedMasks, NeuronLayout, Segment, bind_flat_parameters_,
                     flatten_parameters)
from .streaming import StreamingAggregator

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "backend_report",
    "masked_mean_update_",
    "structured_mean_update_",
    "compact_pack",
    "compact_mean_update_",
    "StreamingAggregator",
    "frequency_update_",
    "lowest_frequency_order",
    "nested_masks",
    "NestedMasks",
    "NeuronLayout",
    "MaskSite",
    "Segment",
    "CompactTables",
    "flatten_parameters",
    "bind_flat_parameters_",
]
from .gram import GramAccumulator, bottomk_magnitude_mask, column_normalized_std, gram_matrix  # noqa: E402,F401
from .sparsify import cosine_to_aggregate, global_topk, global_topk_add_, layerwise_topq, layerwise_topq_add_, randomk_add_, threshold_add_, topk_thresholds, topq_counts  # noqa: E402,F401
