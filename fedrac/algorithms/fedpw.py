"""FedPW (Guan, Huang et al., NeurIPS 2025), ALGORITHMS.md §5.9, with the [R] guards.

FedPW aims at *performance* fairness and yields one global model ``w``. Round r (all clients):

1. Client i trains from ``w`` (the common client protocol of the simulator) and reports its mean
   training loss ``l_i``; its update is ``d_i = w - w_i`` (global minus local).
2. Client weights ``f``: Gram ``G = sum_layers D_L D_L^T`` (``fedrac_kernels.gram_matrix``,
   streamed), ``g = G 1``, ``dot_i = g_i / sum g``, ``lhat_i = l_i / sum l``. In the first round
   ``l0 = mean l`` and ``g0 = mean g`` are stored; ``b_l = beta mean(l) / l0``, ``b_d = beta mean(g) / g0``;
   momentum integrators (from 0): ``dp <- (1 - b_l) dp + b_l lhat``, ``p <- p + dp``, ``p /= sum p``;
   ``dd <- (1 - b_d) dd + b_d dot``, ``pd <- pd + dd``, ``pd /= sum pd``;
   ``lam = std(p) / (std(p) + std(pd))`` (unbiased std); ``f = lam p + (1 - lam) pd``.
3. Drop rates ``rho_i = min(K rho_bar (1/lhat_i) / sum_j (1/lhat_j), 1)`` (lower loss drops more).
4. Aggregation per parameter tensor (layer) L with ``D_L`` [K, |L|]: first round ``g0 = f^T D_L``;
   later rounds: (a) zero the ``floor(|L| rho_i)`` smallest-magnitude entries of row i and take
   ``m_drop`` = the mean over clients of the mean |value| of every 10th dropped entry;
   (b) rows to unit L2 norm, then columns to unit L2 norm, unbiased std of every column;
   (c) ``g0 = f^T (masked D_L)``; (d) the ``floor(|L| rho_bar)`` coordinates with the smallest std
   get ``g0 *= 1 + m_drop / m_res``, ``m_res`` = mean |g0| over every 10th of them, only if
   ``m_res != 0`` and ``m_drop / m_res < 1``; (e) ``w <- w - g0``.

[R] guards (documented deviations from the official code, which has none): norms below 1e-12
count as 1e-12 (zero rows/columns give 0, not NaN); a loss or ``sum g`` of 0 and a zero std sum
fall back to uniform / lam = 1/2; clients that drop nothing are left out of ``m_drop`` (the
official mean turns NaN and silently skips the rescale); masking and rescaling touch parameters
only (our models have no buffers).

Client loss: the simulator's local training returns parameters, not its minibatch losses, so
``l_i`` is estimated (``client_loss``): ``mean`` (default) = the average of the client's mean
cross-entropy on its data before and after local training (trapezoid estimate of the mean loss
over its steps), ``start`` / ``end`` = either one. With the paper's 1-10 local steps these are
close to the official mean-over-minibatches.

Rewards (FedPW is not a collaborative-fairness method; spec [R]):

* ``fedpw`` - the CF protocol of FedAvg (§5.1): every client fine-tunes the new global model with
  ``finetune_calls`` (3) local-training calls; those personal copies are its reward. (They are
  not the next round's start: FedPW restarts every client from ``w``.)
* ``fedpw_plain`` - every client is rewarded with the global model ``w`` itself.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

import fedrac_kernels as fk

from ..config import ConfigError, Option
from . import register
from .base import Algorithm, ParamRewards

EPS = 1e-12


# ------------------------------------------------------------------------------- pure helpers

def _normalise(v: torch.Tensor) -> torch.Tensor:
    s = float(v.sum())
    if not math.isfinite(s) or abs(s) < EPS:
        return torch.full_like(v, 1.0 / v.numel())
    return v / s


def drop_rates(losses: Sequence[float], avg_drop_rate: float) -> torch.Tensor:
    """``rho_i = min(K rho_bar (1/lhat_i) / sum_j (1/lhat_j), 1)``, ``lhat = l / sum l`` (float64 [K])."""
    l = torch.as_tensor(list(losses), dtype=torch.float64).clamp_min(EPS)
    lhat = l / l.sum()
    inv = 1.0 / lhat
    return torch.clamp(l.numel() * avg_drop_rate * inv / inv.sum(), max=1.0)


class WeightState:
    """FedPW's client-weight integrators (``update()`` of the official code), float64 [K]."""

    def __init__(self, K: int, beta: float):
        self.K, self.beta = K, float(beta)
        z = torch.zeros(K, dtype=torch.float64)
        self.dp, self.p, self.dd, self.pd = z.clone(), z.clone(), z.clone(), z.clone()
        self.loss0: Optional[float] = None
        self.dot0: Optional[float] = None

    def step(self, losses: Sequence[float], G: torch.Tensor) -> dict:
        l = torch.as_tensor(list(losses), dtype=torch.float64).clamp_min(EPS)
        g = G.to(torch.float64).cpu() @ torch.ones(self.K, dtype=torch.float64)
        dot = _normalise(g)
        lhat = l / l.sum()
        loss_avg, dot_avg = float(l.mean()), float(g.mean())
        if self.loss0 is None:
            self.loss0, self.dot0 = loss_avg, dot_avg
        b_l = self.beta * loss_avg / self.loss0 if abs(self.loss0) > EPS else self.beta
        b_d = self.beta * dot_avg / self.dot0 if abs(self.dot0) > EPS else self.beta
        self.dp = (1 - b_l) * self.dp + b_l * lhat
        self.p = _normalise(self.p + self.dp)
        self.dd = (1 - b_d) * self.dd + b_d * dot
        self.pd = _normalise(self.pd + self.dd)
        sp, sd = float(torch.std(self.p)), float(torch.std(self.pd))
        lam = sp / (sp + sd) if (sp + sd) > EPS and math.isfinite(sp + sd) else 0.5
        f = lam * self.p + (1 - lam) * self.pd
        return {"f": f, "lambda": lam, "beta_loss": b_l, "beta_dot": b_d, "dot": dot, "g": g}

    def state_dict(self) -> dict:
        return {"dp": self.dp, "p": self.p, "dd": self.dd, "pd": self.pd, "loss0": self.loss0, "dot0": self.dot0}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("dp", "p", "dd", "pd"):
            setattr(self, key, sd[key].to(torch.float64).clone())
        self.loss0, self.dot0 = sd["loss0"], sd["dot0"]


def layer_step(D: torch.Tensor, f: torch.Tensor, rates: Optional[torch.Tensor], avg_drop_rate: float,
               *, sample_every: int = 10) -> tuple[torch.Tensor, dict]:
    """FedPW's aggregate ``g0`` [|L|] of one layer from the client rows ``D`` [K, |L|] (step 4).

    ``rates=None``: the first round (``g0 = f^T D``). Returns (g0, info with m_drop, m_res, scale).
    """
    f32 = f.to(device=D.device, dtype=D.dtype)
    if rates is None:
        return f32 @ D, {"scale": 1.0}
    K, L = D.shape
    counts = [int(math.floor(L * float(r))) for r in rates]
    masked, dropped = fk.bottomk_magnitude_mask(D, counts, sample_every=sample_every)
    dropped = dropped[torch.isfinite(dropped)]
    m_drop = float(dropped.mean()) if dropped.numel() else 0.0
    std = fk.column_normalized_std(masked, eps=EPS)
    g0 = f32 @ masked
    n = int(math.floor(L * avg_drop_rate))
    info = {"m_drop": m_drop, "m_res": None, "scale": 1.0}
    if n == 0 or m_drop == 0.0:
        return g0, info
    idx = torch.sort(std, stable=True).indices[:n]
    m_res = float(g0[idx[::sample_every]].abs().to(torch.float64).mean())
    info["m_res"] = m_res
    if m_res != 0.0 and m_drop / m_res < 1.0:
        scale = 1.0 + m_drop / m_res
        g0[idx] *= scale
        info["scale"] = scale
    return g0, info


# ---------------------------------------------------------------------------------- algorithm

@register("fedpw")
class FedPW(Algorithm):
    """FedPW (NeurIPS 2025, §5.9) with [R] guards; rewards: fine-tuned global model (CF protocol, §5.1)."""

    reward_mode = "finetune"
    options = {
        "pw_beta": Option(0.3, "float", "FedPW's beta: step size of the weight integrators"),
        "avg_drop_rate": Option(0.3, "float", "FedPW's mean drop rate rho_bar"),
        "client_loss": Option("mean", "str", "client loss estimate l_i: mean (before/after local "
                              "training), start, end", choices=("mean", "start", "end")),
        "finetune_calls": Option(3, "int", "local-training calls of the reward fine-tuning (CF protocol of "
                                 "FedAvg, §5.1; fedpw only)"),
        "gram_accumulate": Option("float64", "str", "accumulation dtype of the Gram matrix",
                                  choices=("float32", "float64")),
    }

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        if not (math.isfinite(cfg["pw_beta"]) and cfg["pw_beta"] > 0):
            raise ConfigError(f"pw_beta={cfg['pw_beta']}: must be a positive number")
        if not (math.isfinite(cfg["avg_drop_rate"]) and 0 <= cfg["avg_drop_rate"] <= 1):
            raise ConfigError(f"avg_drop_rate={cfg['avg_drop_rate']}: must be in [0, 1]")
        if cfg["finetune_calls"] < 0:
            raise ConfigError("finetune_calls must be >= 0")
        return {}

    def setup(self) -> None:
        sim = self.sim
        self.w = sim.init_params.clone()
        self.weights = WeightState(sim.K, float(self.cfg["pw_beta"]))
        self.rounds_done = 0
        self.f = torch.full((sim.K,), 1.0 / sim.K, dtype=torch.float64)
        self.rates = torch.zeros(sim.K, dtype=torch.float64)
        self.personal: Optional[list] = None
        self.segments = [(seg.offset, int(math.prod(seg.shape)) if seg.shape else 1)
                         for seg in sim.layout.segments]

    def client_loss(self, k: int, params: torch.Tensor) -> float:
        from ..evaluation import evaluate

        x, y = self.sim.client_data(k)
        return float(evaluate(self.sim.model, params, x, y, batch_size=self.sim.eval_batch_size)["loss"])

    def round(self, r: int) -> dict:
        sim, cfg = self.sim, self.cfg
        how = cfg["client_loss"]
        U = torch.empty(sim.K, sim.P, dtype=torch.float32, device=self.w.device)
        losses = []
        for k in range(sim.K):
            start = self.client_loss(k, self.w) if how in ("mean", "start") else None
            wk = sim.local_train(k, self.w)
            end = self.client_loss(k, wk) if how in ("mean", "end") else None
            losses.append(start if end is None else end if start is None else 0.5 * (start + end))
            torch.sub(self.w, wk, out=U[k])                      # d_k = w - w_k
        acc = torch.float64 if cfg["gram_accumulate"] == "float64" else torch.float32
        G = fk.gram_matrix(U, accumulate=acc)
        upd = self.weights.step(losses, G)
        self.f = upd["f"]
        self.rates = drop_rates(losses, float(cfg["avg_drop_rate"]))
        first = self.rounds_done == 0
        scales = []
        for off, n in self.segments:
            g0, info = layer_step(U[:, off:off + n], self.f, None if first else self.rates,
                                  float(cfg["avg_drop_rate"]))
            self.w[off:off + n] -= g0
            scales.append(info["scale"])
        self.rounds_done += 1
        self.personal = None
        if self.reward_mode == "finetune":
            self.personal = []
            for k in range(sim.K):
                v = self.w
                for _ in range(int(cfg["finetune_calls"])):
                    v = sim.local_train(k, v)
                self.personal.append(v)
        return {"client_weight": self.f.tolist(), "drop_rate": self.rates.tolist(), "client_loss": losses,
                "lambda": upd["lambda"], "rescaled_layers": sum(1 for s in scales if s != 1.0)}

    def rewards(self) -> ParamRewards:
        if self.personal is None:
            return ParamRewards([self.w] * self.sim.K)
        return ParamRewards(self.personal)

    def state_dict(self) -> dict:
        return {"w": self.w, "weights": self.weights.state_dict(), "rounds_done": self.rounds_done,
                "f": self.f, "rates": self.rates}

    def load_state_dict(self, sd: dict) -> None:
        self.w = sd["w"].to(self.sim.device).clone()
        self.weights.load_state_dict(sd["weights"])
        self.rounds_done = int(sd["rounds_done"])
        self.f = sd["f"].clone()
        self.rates = sd["rates"].clone()

    def client_columns(self) -> dict[str, list]:
        return {"weight_f": [round(v, 4) for v in self.f.tolist()],
                "drop_rate": [round(v, 3) for v in self.rates.tolist()]}


@register("fedpw_plain", aliases=("fedpw-plain",))
class FedPWPlain(FedPW):
    """FedPW (NeurIPS 2025, §5.9); every client rewarded with the plain global model."""

    reward_mode = "global"
    options = {"finetune_calls": Option(0, "int", "unused by fedpw_plain (rewards = the global model)")}
