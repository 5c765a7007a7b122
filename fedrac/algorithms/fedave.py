"""FedAVE - adaptive distribution-aware rewards (Wang et al. 2024), ALGORITHMS.md §5.5.

Official algorithm (``wangzihuixmu/FedAVE/algorithm/FedAVE.py``) inside the common harness: local
work = ``sim.local_train`` (num_steps SGD steps), defaults beta = 2, a = 0.95, Gamma = 0.5, and
distinct personal models from the start ([R] of §5.5; the reference code's round-1 aliasing of
one model object is not reproduced).

State: personal models ``v_i`` (rows of ``V``), reputations ``r`` (float64). Round r (the
reference's t = r - 1):

1. distribution similarity, before training: ``L_srv`` = per-batch mean cross-entropy of ``v_i`` on
   the server validation set V, ``L_cli`` = the same on client i's data (batches of
   ``loss_batch_size`` = 64 in data order, last batch partial); both truncated to the shorter
   length; ``KL_i = sum p log(p / q)`` with ``p = L_cli / sum L_cli``, ``q = L_srv / sum L_srv``
   (scipy's ``entropy(client, server)``); ``kappa_i = 1 / KL_i`` (KL floored at 1e-12 so identical
   lists give a huge, finite kappa), ``kappa /= sum kappa``, then ``kappa /= max kappa``;
2. client i trains ``v_i`` -> ``w_i``; ``g_i = Gamma (w_i - v_i) / (||w_i - v_i|| + 1e-7)``;
3. ``acc_i`` = accuracy of ``w_i`` on V; ``score_i = acc_i kappa_i^2``;
4. ``u = sum_i (n_i / sum n) g_i`` (data-share weights; the reputation is not used here);
5. ``r = score`` in round 1, else ``r <- a r + (1 - a) score``; ``r <- max(r, 1e-3)``; ``r /= sum r``;
6. ``q_i = kappa_i tanh(beta r_i) / max_j tanh(beta r_j)``;
7. from round 2 on: ``v_i <- v_i + layer-wise top-q_i of u`` (``fedrac_kernels.layerwise_topq_add_``,
   the CGSV operator); round 1 only initialises the reputation (its training is discarded).

Logged per round: ``kappa``, ``kl``, ``score``, ``reputation``, ``q``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fedrac_kernels as fk

from ..config import Option
from . import register
from ._personal import PersonalAlgorithm, data_share, finite, need, unit_scaled, weighted_sum
from .cgsv import REPUTATION_FLOOR

KL_FLOOR = 1e-12


@torch.no_grad()
def batch_losses(model, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """float64 ``[ceil(n / batch_size)]``: mean cross-entropy of every consecutive batch."""
    from ..models import bind_flat_parameters_

    first = next(model.parameters())
    if first.data_ptr() != params.data_ptr():
        bind_flat_parameters_(model, params.detach())
    out = []
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i:i + batch_size])
        out.append(F.cross_entropy(logits, y[i:i + batch_size]).to(torch.float64))
    return torch.stack(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def kl_divergence(client: torch.Tensor, server: torch.Tensor) -> float:
    """``sum p log(p / q)`` of the two loss lists truncated to the shorter length and each
    normalised to sum 1 (``0 log 0 = 0``; ``p > 0 = q`` gives inf)."""
    n = min(client.numel(), server.numel())
    if n == 0:
        return math.nan
    p = client[:n].to(torch.float64)
    q = server[:n].to(torch.float64)
    p = p / p.sum()
    q = q / q.sum()
    terms = torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))
    return float(terms.sum())


def similarity_weights(kl) -> torch.Tensor:
    """``kappa = (1/KL) / sum(1/KL)`` then divided by its max (float64, max 1)."""
    kl = torch.as_tensor(kl, dtype=torch.float64).clamp(min=KL_FLOOR)
    kappa = 1.0 / kl
    kappa = kappa / kappa.sum()
    return kappa / kappa.max()


def reputation_step(rep: torch.Tensor, score: torch.Tensor, a: float, first: bool) -> torch.Tensor:
    """``r = score`` (first round) or ``a r + (1 - a) score``; floor 1e-3; normalise to sum 1."""
    score = score.to(torch.float64)
    r = score.clone() if first else a * rep.to(torch.float64) + (1.0 - a) * score
    r = torch.clamp(r, min=REPUTATION_FLOOR)
    return r / r.sum()


def reward_fractions(rep: torch.Tensor, kappa: torch.Tensor, beta: float) -> torch.Tensor:
    """``q = kappa tanh(beta r) / max tanh(beta r)`` (float64)."""
    t = torch.tanh(beta * rep.to(torch.float64))
    return kappa.to(torch.float64) * (t / t.max())


@register("fedave")
class FedAVE(PersonalAlgorithm):
    """FedAVE: reputation = validation accuracy x distribution similarity^2, rewards = top-q of u."""

    options = {
        "beta": Option(2.0, "float", "reward sharpness beta: q = kappa tanh(beta r) / max tanh(beta r)"),
        "reputation_decay": Option(0.95, "float", "a of the reputation update r <- a r + (1 - a) score"),
        "gamma": Option(0.5, "float", "Gamma: L2 norm of the normalised client updates"),
        "loss_batch_size": Option(64, "int", "batch size of the per-batch loss lists behind the KL similarity"),
    }
    state_fields = ("rep",)

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        need(finite(cfg["beta"]) and cfg["beta"] > 0, f"beta={cfg['beta']}: must be > 0")
        need(finite(cfg["reputation_decay"]) and 0 <= cfg["reputation_decay"] <= 1,
             f"reputation_decay={cfg['reputation_decay']}: must be in [0, 1]")
        need(finite(cfg["gamma"]) and cfg["gamma"] > 0, f"gamma={cfg['gamma']}: must be > 0")
        need(cfg["loss_batch_size"] >= 1, f"loss_batch_size={cfg['loss_batch_size']}: must be >= 1")
        return {}

    def init_state(self) -> None:
        self.rep = torch.zeros(self.sim.K, dtype=torch.float64)

    def similarity(self) -> tuple[torch.Tensor, list[float]]:
        """(kappa float64 [K], KL per client) of the current personal models."""
        sim = self.sim
        bs = int(self.cfg["loss_batch_size"])
        xv, yv = sim.val_data()
        kls = []
        for k in range(sim.K):
            server = batch_losses(sim.model, self.V[k], xv, yv, bs)
            xc, yc = sim.client_data(k)
            client = batch_losses(sim.model, self.V[k], xc, yc, bs)
            kls.append(kl_divergence(client, server))
        return similarity_weights(kls), kls

    def round(self, r: int) -> dict:
        sim, cfg = self.sim, self.cfg
        kappa, kls = self.similarity()
        W = self.train_all()
        acc = torch.tensor([self.val_accuracy(W[k]) for k in range(sim.K)], dtype=torch.float64)
        G = unit_scaled(W.sub_(self.V), float(cfg["gamma"]))
        del W
        score = acc * kappa * kappa
        u = weighted_sum(G, data_share(sim))
        del G
        self.rep = reputation_step(self.rep, score, float(cfg["reputation_decay"]), first=(r == 1))
        q = reward_fractions(self.rep, kappa, float(cfg["beta"]))
        if r > 1:
            fk.layerwise_topq_add_(self.V, u, self.segments, q)
        return {"kappa": kappa.tolist(), "kl": kls, "score": score.tolist(), "reputation": self.rep.tolist(),
                "q": q.tolist()}

    def client_columns(self) -> dict:
        return {"reputation": self.rep.tolist()}
