"""IAFL - incentive-aware federated learning (Wu et al., ICLR 2024), ALGORITHMS.md §5.6.

Official algorithm (``ZhaoxuanWu/Incentive-Aware-FL/main_IAFL.py``) inside the common harness:
every client joins every round, local work = ``sim.local_train`` (num_steps SGD steps; the
reference uses one epoch of Adam), defaults kappa = 0, q = 0 and contributions ``p_i = s_i``
(the standalone accuracies, [R] of §5.6; ``contribution=data`` uses the data sizes).

State: personal models ``v_i`` (rows of ``V``), a server model ``w`` (max-reference). Round:

1. reward proportions ``gamma_i = min(p_i / max_j p_j, 1) ** (1 - kappa)``;
2. stochastic recovery: each client's model is replaced by ``w`` with probability ``q``
   (``recovery_prob``; one uniform draw per client from ``sim.generator``, only when q > 0);
3. client i trains its own model -> ``Delta_i`` (the model itself is restored);
4. ``k_i = ceil(gamma_i (K - 1))`` (float64); client i's row of the mixing matrix W has weight
   ``1 / (k_i + 1)`` on itself and on ``k_i`` other clients drawn uniformly without replacement
   (``torch.randperm(K - 1, generator=sim.generator)`` over the others in index order, first k_i);
   ``v_i += sum_j W_ij Delta_j`` (one ``W @ D`` product, K11);
5. ``w += sum_j W_{i*, j} Delta_j`` with ``i* = argmax gamma`` (the first maximum).

Logged per round: ``reward_size`` (k_i), ``recovered`` (clients reset to w).
"""
from __future__ import annotations

import math

import torch

from ..config import Option
from . import register
from ._personal import PersonalAlgorithm, finite, need


def reward_proportions(p, kappa: float) -> torch.Tensor:
    """``gamma_i = min(p_i / max p, 1) ** (1 - kappa)`` (float64)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    g = torch.clamp(p / p.max(), max=1.0)
    return g ** (1.0 - kappa)


def reward_sizes(gamma: torch.Tensor, n: int) -> list[int]:
    """``k_i = ceil(gamma_i (n - 1))`` (float64), within [0, n - 1]."""
    return [min(max(math.ceil(float(g) * (n - 1)), 0), n - 1) for g in gamma.tolist()]


def mixing_matrix(sizes, generator: torch.Generator) -> torch.Tensor:
    """float32 ``[K, K]``: row i has ``1 / (k_i + 1)`` at i and at k_i other clients drawn uniformly
    without replacement (one ``randperm(K - 1)`` per client from ``generator``, clients in order)."""
    K = len(sizes)
    W = torch.zeros((K, K), dtype=torch.float32)
    for i, k in enumerate(sizes):
        others = [j for j in range(K) if j != i]
        perm = torch.randperm(K - 1, generator=generator).tolist() if K > 1 else []
        chosen = [others[j] for j in perm[:k]] + [i]
        W[i, chosen] = 1.0 / (k + 1)
    return W


@register("iafl")
class IAFL(PersonalAlgorithm):
    """IAFL: every client receives the mean of its own and k_i random others' updates."""

    options = {
        "kappa": Option(0.0, "float", "sharing parameter kappa in [0, 1): gamma <- gamma ** (1 - kappa)"),
        "recovery_prob": Option(0.0, "float", "stochastic recovery: probability that a client's model is "
                                "reset to the server model at the start of a round"),
        "contribution": Option("standalone", "str", "contribution measure p: standalone (accuracies s) or "
                               "data (sample counts)", choices=("standalone", "data")),
    }
    state_fields = ("w",)

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        need(finite(cfg["kappa"]) and 0 <= cfg["kappa"] < 1, f"kappa={cfg['kappa']}: must be in [0, 1)")
        need(finite(cfg["recovery_prob"]) and 0 <= cfg["recovery_prob"] <= 1,
             f"recovery_prob={cfg['recovery_prob']}: must be in [0, 1]")
        return {}

    def init_state(self) -> None:
        self.w = self.sim.init_params.detach().clone()

    def contributions(self) -> torch.Tensor:
        sim = self.sim
        if self.cfg["contribution"] == "data":
            return torch.tensor([float(n) for n in sim.client_sizes], dtype=torch.float64)
        return sim.standalone.to(torch.float64)

    def round(self, r: int) -> dict:
        sim, cfg = self.sim, self.cfg
        K = sim.K
        p = self.contributions()
        if float(p.max()) <= 0:
            raise ValueError("iafl: every contribution is 0; reward proportions are undefined")
        gamma = reward_proportions(p, float(cfg["kappa"]))
        recovered = []
        qrec = float(cfg["recovery_prob"])
        if qrec > 0:
            draws = torch.rand(K, generator=sim.generator, dtype=torch.float64)
            recovered = [k for k in range(K) if float(draws[k]) < qrec]
            for k in recovered:
                self.V[k].copy_(self.w)
        D = self.train_all().sub_(self.V)
        sizes = reward_sizes(gamma, K)
        Wmix = mixing_matrix(sizes, sim.generator).to(self.V.device)
        self.V.addmm_(Wmix, D)
        top = int(torch.argmax(gamma))
        self.w.add_(Wmix[top] @ D)
        return {"reward_size": sizes, "recovered": recovered}
