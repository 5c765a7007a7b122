"""Shared pieces of the personalised-reward baselines (ALGORITHMS.md §5.1-§5.6).

CF-FedAvg, Standalone, CFFL, CGSV, FedAVE and IAFL all reward client k with its own parameter
vector. :class:`PersonalAlgorithm` keeps those K vectors as the rows of one contiguous float32
tensor ``V [K, P]`` (so the fused sparsification kernels can update all of them in one pass),
returns them as :class:`ParamRewards`, and saves / restores them together with the attributes a
subclass lists in ``state_fields`` (tensors, numbers, lists, dicts of those).

Helpers (pure functions of tensors, used by several methods):

* :func:`layer_segments` - ``(offset, length)`` of every parameter tensor (the "layers" of the
  layer-wise rules), in ``named_parameters`` order;
* :func:`unit_scaled` - ``Gamma * d / (||d||_2 + 1e-7)`` row by row (CGSV / FedAVE / CFFL-lineage
  normalised updates);
* :func:`weighted_sum` - ``sum_k w_k rows_k`` accumulated in client order in float32 (element-wise,
  so the result does not depend on the thread count);
* :func:`data_share`, :func:`class_counts` - client weights from the local data.

This module's name starts with ``_``, so the registry does not import it as an algorithm.
"""
from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Sequence

import torch

from ..config import ConfigError
from .base import Algorithm, ParamRewards

NORM_EPS = 1e-7          # the ``norm + 1e-7`` of the CGSV / FedAVE / CFFL code


# ------------------------------------------------------------------------------------- helpers

def layer_segments(layout) -> list[tuple[int, int]]:
    """``[(offset, numel), ...]`` of the model's parameter tensors (``layout.segments`` order)."""
    return [(int(s.offset), int(s.numel)) for s in layout.segments]


def unit_scaled(D: torch.Tensor, gamma: float, eps: float = NORM_EPS) -> torch.Tensor:
    """Row k of the result = ``gamma * D[k] / (||D[k]||_2 + eps)`` (float32, new tensor).

    Order of operations as in the reference code: divide by ``norm + eps``, then multiply by
    ``gamma``."""
    if D.dim() == 1:
        return unit_scaled(D.unsqueeze(0), gamma, eps)[0]
    norms = torch.linalg.vector_norm(D, dim=1, keepdim=True)
    return D.div(norms + eps).mul_(gamma)


def weighted_sum(rows, weights: Sequence[float]) -> torch.Tensor:
    """``u = sum_k weights[k] * rows[k]`` (float32, accumulated in client order; zero weights skipped)."""
    rows = list(rows.unbind(0)) if isinstance(rows, torch.Tensor) else list(rows)
    if len(rows) != len(weights):
        raise ValueError(f"weights: {len(weights)} values for {len(rows)} rows")
    u = torch.zeros_like(rows[0])
    for r, w in zip(rows, weights):
        w = float(w)
        if w != 0.0:
            u.add_(r, alpha=w)
    return u


def data_share(sim) -> list[float]:
    """``n_k / sum n`` (float64 arithmetic)."""
    n = [float(v) for v in sim.client_sizes]
    tot = sum(n)
    return [v / tot for v in n]


def class_counts(sim) -> list[int]:
    """Number of distinct labels in every client's data (CLA: 1, 2, ..., 10 for K = 10)."""
    return [int(torch.unique(sim.client_data(k)[1]).numel()) for k in range(sim.K)]


def is_class_split(cfg) -> bool:
    """True for the class-count-skew partition (the CFFL / CGSV code's ``classimbalance`` split)."""
    return str(cfg["partition"]).strip().lower().startswith("cla")


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _copy_state(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    return copy.deepcopy(v)


# --------------------------------------------------------------------------------- base class

class PersonalAlgorithm(Algorithm):
    """K personal models ``V [K, P]`` (float32, rows = clients), rewarded as :class:`ParamRewards`.

    Subclasses implement :meth:`round` and may override :meth:`init_state` (extra state, called by
    :meth:`setup` after ``V`` is built from the common initial model) and list the attribute names
    of that extra state in ``state_fields`` for checkpoints.
    """

    state_fields: ClassVar[tuple] = ()

    def setup(self) -> None:
        sim = self.sim
        self.V = sim.init_params.detach().unsqueeze(0).repeat(sim.K, 1).contiguous()
        self.segments = layer_segments(sim.layout)
        self.init_state()

    def init_state(self) -> None:
        """Extra state of the method (fresh run; resume then loads over it)."""

    def rewards(self) -> ParamRewards:
        return ParamRewards(list(self.V.unbind(0)))

    def state_dict(self) -> dict:
        """The personal models and the ``state_fields`` (large tensors by reference: the loop
        serialises the dict at once; small values copied)."""
        sd = {"V": self.V}
        for f in self.state_fields:
            v = getattr(self, f)
            sd[f] = v if isinstance(v, torch.Tensor) and v.numel() > 4096 else _copy_state(v)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        sim = self.sim
        V = sd["V"]
        if not isinstance(V, torch.Tensor) or tuple(V.shape) != (sim.K, sim.P):
            raise ValueError(f"personal models: expected a [{sim.K}, {sim.P}] tensor")
        missing = [f for f in self.state_fields if f not in sd]
        if missing:
            raise KeyError(f"checkpoint state lacks {', '.join(missing)}")
        self.V = V.detach().to(device=sim.device, dtype=torch.float32).clone().contiguous()
        for f in self.state_fields:
            v = sd[f]
            if isinstance(v, torch.Tensor):
                v = v.detach().clone()
                if v.dim() == 1 and v.numel() == sim.P or v.dim() == 2 and v.shape[-1] == sim.P:
                    v = v.to(sim.device)
            else:
                v = copy.deepcopy(v)
            setattr(self, f, v)

    # shared steps ------------------------------------------------------------------------------
    def train_all(self, start=None) -> torch.Tensor:
        """``W [K, P]``: client k's local work (``sim.local_train``) from ``start[k]`` (default ``V[k]``)."""
        sim = self.sim
        start = self.V if start is None else start
        return torch.stack([sim.local_train(k, start[k]) for k in range(sim.K)])

    def val_accuracy(self, params: torch.Tensor) -> float:
        return self.sim.accuracy(params, "val")


__all__ = ["PersonalAlgorithm", "layer_segments", "unit_scaled", "weighted_sum", "data_share", "class_counts",
           "is_class_split", "need", "finite", "NORM_EPS"]
