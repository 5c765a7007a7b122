"""FedAvg as the FedRAC paper evaluates it for fairness (CF-FedAvg), and plain FedAvg.

``fedavg`` - CF-FedAvg (ALGORITHMS.md §5.1, ``my_algorithm/CF_fedavg.py`` @ d6ad575). Every client
keeps a personal model ``v_k`` (round 1: the common initial model). Round r:

1. client k trains from its own ``v_k`` (``sim.local_train``: num_steps SGD steps) -> ``u_k``;
2. ``w = (1/K) sum_k u_k`` (uniform average; ``weighting=data``: ``sum_k n_k u_k / sum n``),
   computed with the fused structural masked mean of ``fedrac_kernels`` (every parameter active
   for every client, so it is the plain mean);
3. every client fine-tunes ``w`` with ``finetune_calls`` (default 3) consecutive local-training
   calls (fresh optimizer and shuffle each) -> ``v_k``: its reward model and next starting point.

``finetune_calls=0`` makes ``v_k = w`` (then it is plain FedAvg with per-client copies).

``fedavg_plain`` - textbook FedAvg ([R] of §5.1): every client trains the global model ``w``,
``w`` <- mean of the updates, and every client is rewarded with ``w`` itself (one tensor, evaluated
once per round), so all clients have the same reward accuracy.
"""
from __future__ import annotations

import torch

import fedrac_kernels as fk

from ..config import Option
from . import register
from ._personal import PersonalAlgorithm, need
from .base import Algorithm, ParamRewards

_WEIGHTING = Option("uniform", "str", "client weights of the average: uniform (flgo's default, 1/K) or "
                    "data (n_k / sum n)", choices=("uniform", "data"))


def _mean_update_(w: torch.Tensor, rows, sim, weighting: str) -> torch.Tensor:
    """``w += sum_k a_k rows_k / sum_k a_k`` over every parameter (fused structural masked mean with
    all neurons on; ``a_k`` = 1 or ``n_k``)."""
    K = len(rows)
    full = torch.ones((K, sim.N), dtype=torch.bool, device=w.device)
    weights = None if weighting == "uniform" else [float(n) for n in sim.client_sizes]
    fk.structured_mean_update_(w, list(rows), sim.layout, full, weights=weights, rule="structural")
    return w


@register("fedavg", aliases=("cf_fedavg", "cf-fedavg"))
class CFFedAvg(PersonalAlgorithm):
    """CF-FedAvg: personal models = the average fine-tuned locally ``finetune_calls`` times."""

    options = {
        "finetune_calls": Option(3, "int", "local-training calls each client fine-tunes the average with "
                                 "(its reward and next starting model); 0 = reward the average itself"),
        "weighting": _WEIGHTING,
    }

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        need(cfg["finetune_calls"] >= 0, f"finetune_calls={cfg['finetune_calls']}: must be >= 0")
        return {}

    def round(self, r: int) -> dict:
        sim = self.sim
        U = self.train_all()
        w = torch.zeros(sim.P, dtype=torch.float32, device=self.V.device)
        _mean_update_(w, U.unbind(0), sim, self.cfg["weighting"])
        calls = int(self.cfg["finetune_calls"])
        for k in range(sim.K):
            p = w
            for _ in range(calls):
                p = sim.local_train(k, p)
            self.V[k].copy_(p)
        return {}


@register("fedavg_plain", aliases=("fedavg-plain", "plain_fedavg"))
class PlainFedAvg(Algorithm):
    """Plain FedAvg: one global model, trained by everybody, given to everybody."""

    options = {"weighting": _WEIGHTING}

    def setup(self) -> None:
        self.w = self.sim.init_params.detach().clone()

    def round(self, r: int) -> dict:
        sim = self.sim
        deltas = [sim.local_train(k, self.w).sub_(self.w) for k in range(sim.K)]
        _mean_update_(self.w, deltas, sim, self.cfg["weighting"])
        return {}

    def rewards(self) -> ParamRewards:
        return ParamRewards([self.w] * self.sim.K)

    def state_dict(self) -> dict:
        return {"w": self.w.detach().clone()}

    def load_state_dict(self, sd: dict) -> None:
        w = sd["w"]
        if not isinstance(w, torch.Tensor) or w.shape != (self.sim.P,):
            raise ValueError(f"w: expected a [{self.sim.P}] tensor")
        self.w = w.detach().to(device=self.sim.device, dtype=torch.float32).clone()
