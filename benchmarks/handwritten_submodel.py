"""Hand-written submodel aggregations, re-implemented here as benchmark baselines.

These are *our own* re-implementations of the forms that submodel-FL code bases write by hand
(see /work/shared/research/FRAMEWORKS.md §2.2 and KERNELS.md §1.2), kept deliberately in their
usual shape so the benchmark compares against what people run today:

* :func:`heterofl_combine` -- the HeteroFL / FedRolex server ``combine``: for every parameter and
  every client, scatter the client's slice into a model-sized sum through a ``meshgrid`` of its
  row/column indices and bump a model-sized ``count`` array the same way; at the end divide where
  ``count > 0`` and keep the old value elsewhere. (Unweighted by default, as in both papers' code;
  ``weights=`` adds the sample-weighted variant.)
* :func:`fjord_average_numpy` -- the FjORD (Flower baseline) per-width NumPy average: clients send
  full-size arrays; every array is first multiplied by the client's example count; then, for each
  width ``p`` from large to small, the nested prefix ``[:out_p, :in_p]`` is overwritten by the sum
  of the slices of the clients with ``p_max >= p`` divided by their example total.

Both are exact descriptions of a structural masked mean, so ``fedrac_kernels`` must reproduce them
to float32 rounding (tests/test_interop.py checks that with independent dense re-computations).

Index helpers (:func:`heterofl_param_idx`, :func:`fjord_layer_dims`) turn the neuron sets used by
:mod:`fedrac_kernels.interop` into the per-parameter index tuples / prefix sizes these forms use;
HeteroFL computes them once per round at distribution time, so the benchmark builds them outside
the timed region.
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Mapping, Optional, Sequence

import numpy as np
import torch


# ---- index helpers (outside the timed region: the originals compute them when distributing) ----
def heterofl_param_idx(shapes: Mapping[str, tuple], gates: Mapping[str, tuple],
                       neuron_set: Optional[Mapping[str, object]]) -> dict:
    """Per-parameter index tuples of one client, HeteroFL's ``param_idx`` form.

    ``shapes``: {key: shape} of the global model; ``gates``: {key: (out_site, in_site)};
    ``neuron_set``: {site: indices} (the client's neurons in local order) or None for all.
    Returns {key: tuple of int64 index tensors for the leading 1 or 2 dims} for gated keys and
    ``None`` for keys the client holds whole.
    """
    out = {}
    for key, shape in shapes.items():
        g = gates.get(key)
        if g is None or neuron_set is None or (g[0] not in neuron_set and g[1] not in neuron_set):
            out[key] = None
            continue
        o_site, i_site = g
        rows = _site_idx(neuron_set, o_site, shape[0])
        if len(shape) == 1:
            out[key] = (rows,)
        else:
            cols = _site_idx(neuron_set, i_site, shape[1])
            out[key] = (rows, cols)
    return out


def _site_idx(neuron_set, site, width) -> torch.Tensor:
    if site is None or site not in neuron_set:
        return torch.arange(width, dtype=torch.int64)
    return torch.as_tensor(neuron_set[site], dtype=torch.int64)


def fjord_layer_dims(shapes: Mapping[str, tuple], gates: Mapping[str, tuple], widths: Mapping[str, int],
                     p: float) -> dict:
    """{key: (out_dim, in_dim)} prefix sizes of width ``p`` (``ceil(p * width)`` on gated dims)."""
    def dim(site, full):
        return full if site is None else _ceil_frac(p, widths[site])

    out = {}
    for key, shape in shapes.items():
        o_site, i_site = gates.get(key, (None, None))
        rows = dim(o_site, shape[0]) if len(shape) >= 1 else 1
        cols = dim(i_site, shape[1]) if len(shape) >= 2 else None
        out[key] = (rows, cols)
    return out


def _ceil_frac(rate: float, width: int) -> int:
    return max(1, int(math.ceil(rate * width - 1e-9 * width)))


# ---- HeteroFL / FedRolex combine -----------------------------------------------------------------
def heterofl_combine(global_state: Mapping[str, torch.Tensor], client_states: Sequence[Mapping[str, torch.Tensor]],
                     param_idx: Sequence[Mapping[str, Optional[tuple]]], weights: Optional[Sequence[float]] = None) -> dict:
    """HeteroFL-style ``combine``: meshgrid scatter of every client's slice into a sum + a count.

    ``client_states[k][key]`` is client k's slice of ``key`` (shape ``len(rows) x len(cols) x ...``)
    and ``param_idx[k][key]`` its index tuple (or None when the client holds the whole tensor).
    Returns a new state dict; non-float entries are copied from ``global_state``.
    """
    out = {}
    for key, v in global_state.items():
        if not v.is_floating_point():
            out[key] = v.clone()
            continue
        tmp = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        count = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for k, state in enumerate(client_states):
            if key not in state:
                continue
            local = state[key].to(torch.float32)
            w = 1.0 if weights is None else float(weights[k])
            idx = param_idx[k].get(key)
            if idx is None:
                if weights is None:
                    tmp += local
                else:
                    tmp += w * local
                count += w
            else:
                grid = torch.meshgrid(*idx, indexing="ij") if len(idx) > 1 else idx
                if weights is None:
                    tmp[grid] += local
                else:
                    tmp[grid] += w * local
                count[grid] += w
        new = v.clone()
        hit = count > 0
        new[hit] = (tmp[hit] / count[hit]).to(v.dtype)
        out[key] = new
    return out


# ---- FjORD per-width NumPy average ---------------------------------------------------------------
def fjord_average_numpy(global_arrays: Sequence[np.ndarray], client_arrays: Sequence[Sequence[np.ndarray]],
                        num_examples: Sequence[int], p_max: Sequence[float],
                        layer_dims: Mapping[float, Sequence[tuple]]) -> list:
    """FjORD-style nested average over full-size client arrays (NumPy, per layer, per width).

    ``global_arrays``: the current model, one array per layer; ``client_arrays[k]``: client k's
    full-size arrays (same shapes); ``layer_dims[p][i] = (out_dim, in_dim)`` the prefix of layer
    i at width p (``in_dim`` None for 1-D layers). Widths are visited from large to small; each
    width's prefix is overwritten by ``sum_{p_max_k >= p} n_k x_k[prefix] / sum n_k``.
    """
    weighted = [[a * int(n) for a in arrays] for arrays, n in zip(client_arrays, num_examples)]
    ps = sorted(layer_dims, reverse=True)
    out = []
    for i, g in enumerate(global_arrays):
        update = g.copy()
        for p in ps:
            sel = [k for k in range(len(client_arrays)) if p_max[k] >= p]
            if not sel:
                continue
            n_p = sum(num_examples[k] for k in sel)
            out_dim, in_dim = layer_dims[p][i]
            sl = (slice(0, out_dim),) if update.ndim == 1 or in_dim is None else (slice(0, out_dim), slice(0, in_dim))
            update[sl] = reduce(np.add, [weighted[k][i][sl] for k in sel]) / n_p
        out.append(update)
    return out
