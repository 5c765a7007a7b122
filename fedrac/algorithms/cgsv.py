"""CGSV - cosine-gradient Shapley-value rewards (Xu et al. 2021), ALGORITHMS.md §5.4.

Official algorithm (``XinyiYS/Gradient-Driven-Rewards-...``; the FedRAC authors' lineage calls it
``rffl``) inside the common harness: local work = ``sim.local_train`` (num_steps SGD steps), and the
lineage defaults beta = 2, a = 0.95, Gamma = 0.5 ([R] of §5.4).

State: personal models ``v_i`` (rows of ``V``), reputations ``r`` (float64, init 0), a server model
``w`` (not a reward; kept as in the reference). Round t:

1. client i trains its own ``v_i`` -> ``Delta_i``; ``v_i`` itself is not changed (restored);
2. ``g_i = Gamma Delta_i / (||Delta_i||_2 + 1e-7)`` (whole flattened update);
3. ``u = sum_i omega_i g_i`` with ``omega_i = n_i / sum n`` in the first round, ``omega = r`` after;
   ``w += u``;
4. ``phi_i = cos(g_i, u)`` (eps 1e-10; ``fedrac_kernels.cosine_to_aggregate``, K8);
5. ``r <- a r + (1 - a) phi``; ``r <- max(r, 1e-3)``; ``r <- r / sum r``;
6. ``q_i = tanh(beta r_i) / max_j tanh(beta r_j)`` (q = 1 for the top client);
7. ``v_i += layer-wise top-q_i of u`` (``fedrac_kernels.layerwise_topq_add_``, K9: per parameter
   tensor keep ``|u| >=`` the ``min(ceil(q_i n), n - 1)``-th largest magnitude; ties kept; the top
   client therefore still loses the smallest entry of every tensor).

Logged per round: ``reputation`` (r), ``phi``, ``q``.
"""
from __future__ import annotations

import torch

import fedrac_kernels as fk

from ..config import Option
from . import register
from ._personal import PersonalAlgorithm, data_share, finite, need, unit_scaled, weighted_sum

REPUTATION_FLOOR = 1e-3
COS_EPS = 1e-10


def reputation_update(r: torch.Tensor, phi: torch.Tensor, a: float) -> torch.Tensor:
    """``r' = normalise(max(a r + (1 - a) phi, 1e-3))`` (float64)."""
    r = a * r.to(torch.float64) + (1.0 - a) * phi.to(torch.float64)
    r = torch.clamp(r, min=REPUTATION_FLOOR)
    return r / r.sum()


def altruism(r: torch.Tensor, beta: float) -> torch.Tensor:
    """``q = tanh(beta r) / max tanh(beta r)`` (float64, in (0, 1], 1 for the top client)."""
    t = torch.tanh(beta * r.to(torch.float64))
    return t / t.max()


@register("cgsv", aliases=("rffl",))
class CGSV(PersonalAlgorithm):
    """CGSV with layer-wise top-q rewards of the aggregate."""

    options = {
        "beta": Option(2.0, "float", "altruism sharpness beta: q = tanh(beta r) / max tanh(beta r)"),
        "reputation_decay": Option(0.95, "float", "a of the reputation update r <- a r + (1 - a) cos"),
        "gamma": Option(0.5, "float", "Gamma: L2 norm of the normalised client updates"),
    }
    state_fields = ("rep", "w")

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        need(finite(cfg["beta"]) and cfg["beta"] > 0, f"beta={cfg['beta']}: must be > 0")
        need(finite(cfg["reputation_decay"]) and 0 <= cfg["reputation_decay"] <= 1,
             f"reputation_decay={cfg['reputation_decay']}: must be in [0, 1]")
        need(finite(cfg["gamma"]) and cfg["gamma"] > 0, f"gamma={cfg['gamma']}: must be > 0")
        return {}

    def init_state(self) -> None:
        self.rep = torch.zeros(self.sim.K, dtype=torch.float64)
        self.w = self.sim.init_params.detach().clone()

    def round(self, r: int) -> dict:
        cfg = self.cfg
        D = self.train_all().sub_(self.V)
        G = unit_scaled(D, float(cfg["gamma"]))
        del D
        omega = data_share(self.sim) if r == 1 else self.rep.tolist()
        u = weighted_sum(G, omega)
        self.w.add_(u)
        phi = fk.cosine_to_aggregate(G, u, eps=COS_EPS)
        self.rep = reputation_update(self.rep, phi, float(cfg["reputation_decay"]))
        q = altruism(self.rep, float(cfg["beta"]))
        fk.layerwise_topq_add_(self.V, u, self.segments, q)
        return {"reputation": self.rep.tolist(), "phi": phi.tolist(), "q": q.tolist()}

    def client_columns(self) -> dict:
        return {"reputation": self.rep.tolist()}
