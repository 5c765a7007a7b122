"""CFFL - collaborative fair federated learning (Lyu et al. 2020), ALGORITHMS.md §5.3.

``cffl_variant=official`` (default, [R] of §5.3): the official algorithm
(``XinyiYS/CollaborativeFairFederatedLearning/pytorch/utils/Federated_Learner.py`` with
``Participant.py``) inside the common harness: local work = ``sim.local_train`` (num_steps SGD
steps instead of epochs, no learning-rate decay, no pre-training copy, no DSSGD/FedAvg shadows),
theta = 0.1, a = 5, g = 1e-3, ``largest_criterion=layer``, ``aggregate_mode=sum``.

State: local models ``v_i`` (rows of ``V``), server model ``w``, reputations ``rho`` (float64,
init 0), reputable set R (init everybody), threshold ``h = coef / |R|`` (coef = 1/3, or 1/6 for the
class-count split: ``threshold_coef=auto``). Round r:

1. client i trains its model -> raw update ``Delta_i`` (the model is restored);
2. ``c_i = clamp(Delta_i, -g, g)`` (value clipping); ``v_i += c_i``;
3. upload ``up_i`` = ``c_i`` sparsified to its largest-magnitude fraction theta: ``layer``: per
   parameter tensor, the K9 rule (``min(ceil(theta n), n - 1)``-th largest magnitude, ties kept);
   ``all``: over all parameters, the ``int(theta P)``-th largest (no cap; 0 keeps nothing);
4. for i in R: ``val_i`` = validation accuracy of ``w + up_i`` (theta = 1: of ``v_i``); then
   ``rho_i <- 0.8 rho_i + 0.2 val_i / sum_{j in R} val_j`` (i in R; ``reputation_fade=false``:
   the plain mean of the two), ``rho <- sinh(a rho)`` (a = ``sinh_alpha``, times ``1 + (r-1)/rounds``
   with ``alpha_decay``), ``rho /= sum rho``, R <- {i in R : rho_i >= h}, ``rho_i = 0`` for
   ``rho_i < h``; if R shrank: ``rho /= sum rho`` and ``h = coef / |R|``;
5. ``u = sum_{i in R} a_i up_i`` with ``a_i`` = 1 (``aggregate_mode=sum``), ``rho_i``
   (``reputation-sum``) or ``n_i / sum n`` (``mean``; class-count split: ``classes_i / C``); ``w += u``;
6. download, i in R: ``layer``: ``v_i += layer-wise top-rho_i of u`` (``fedrac_kernels``, K9);
   ``all``: the ``int(rho_i / max rho * m_i * P)`` largest-magnitude entries of u
   (``m_i = n_i / max n``, class-count split ``classes_i / C``; ``download=random``: that many
   entries at the first positions of one random permutation per round from ``sim.generator``,
   K10), count 0 downloading nothing; then ``v_i -= b_i up_i`` with ``b_i = m_i`` in ``mean`` mode,
   else 1.
7. reward: ``v_i``. Clients outside R keep training locally (step 2) but are not aggregated and
   receive nothing.

Deviation from the reference code: a download count of 0 downloads nothing (the reference's
``topk[num - 1]`` / empty index list would download *everything* in that corner case).

``cffl_variant=lineage`` [C-lineage] (the FedRAC authors' ``cffl`` module, decompiled in
``wangzihuixmu/FedAVE``): no clipping and no sparsified upload; client i keeps its trained model
``v_i <- v_i + Delta_i`` and uploads ``g_i = Gamma Delta_i / (||Delta_i|| + 1e-7)``; reputation
from the validation accuracy of the trained models, ``e_i = val_i / sum_{j in R} val_j``,
``rho_i = (sinh(a e_i) + e_i) / 2`` (i in R, else 0; no history), normalised, threshold removal as
above with the reference's two bugs reproduced: the threshold never changes (``h = 1/3 / K``
throughout) and the 1/6 class-split coefficient is never used; ``u = sum_{i in R} s_i g_i`` with
``s_i`` = data share (class-count split: ``classes_i / C``); download for i in R:
``v_i += layer-wise top-(m_i rho_i / max rho) of u`` and ``v_i -= m_i g_i``.

Logged per round: ``reputation``, ``reputable`` (R as a 0/1 list), ``threshold``, ``val_acc``.
"""
from __future__ import annotations

import math

import torch

import fedrac_kernels as fk

from ..config import ConfigError, Option
from . import register
from ._personal import (PersonalAlgorithm, class_counts, data_share, finite, is_class_split, need,
                        unit_scaled, weighted_sum)


# ------------------------------------------------------------------------------ pure definitions

def official_reputation_update(rho: torch.Tensor, reputable: torch.Tensor, val, *, alpha: float, h: float,
                               coef: float, fade: bool = True):
    """One reputation step of the official code (``compute_reputations_sinh``).

    ``rho`` float64 [K], ``reputable`` bool [K] (R), ``val`` K validation accuracies (only R's are
    read). Returns ``(rho', R', h')``."""
    rho = rho.to(torch.float64).clone()
    R = reputable.clone()
    val = torch.as_tensor(val, dtype=torch.float64)
    idx = R.nonzero().flatten()
    total = float(val[idx].sum())
    if total > 0:
        share = val[idx] / total
    else:                                   # every reputable model at 0 accuracy: equal shares
        share = torch.full((idx.numel(),), 1.0 / max(idx.numel(), 1), dtype=torch.float64)
    if fade:
        rho[idx] = rho[idx] * 0.8 + share * 0.2
    else:
        rho[idx] = (rho[idx] + share) * 0.5
    rho = torch.sinh(alpha * rho)
    rho = rho / rho.sum()
    before = int(R.sum())
    R = R & (rho >= h)
    rho = torch.where(rho < h, torch.zeros_like(rho), rho)
    if int(R.sum()) != before:
        rho = rho / rho.sum()
        h = threshold(int(R.sum()), coef)
    return rho, R, h


def lineage_reputation_update(reputable: torch.Tensor, val, *, alpha: float, h: float):
    """The lineage step: ``e = val / sum_R val``, ``rho = (sinh(a e) + e) / 2`` on R, normalise,
    drop ``rho < h`` (h unchanged: the reference's bug). Returns ``(rho, R')``."""
    R = reputable.clone()
    val = torch.as_tensor(val, dtype=torch.float64)
    idx = R.nonzero().flatten()
    total = float(val[idx].sum())
    rho = torch.zeros(R.numel(), dtype=torch.float64)
    if total > 0:
        e = val[idx] / total
    else:
        e = torch.full((idx.numel(),), 1.0 / max(idx.numel(), 1), dtype=torch.float64)
    rho[idx] = (torch.sinh(alpha * e) + e) / 2.0
    rho = rho / rho.sum()
    before = int(R.sum())
    R = R & (rho >= h)
    rho = torch.where(rho < h, torch.zeros_like(rho), rho)
    if int(R.sum()) != before:
        rho = rho / rho.sum()
    return rho, R


def threshold(size: int, coef: float) -> float:
    """``h = clamp(coef / |R|, 0, 1)``."""
    return min(max(coef / max(size, 1), 0.0), 1.0)


def upload_sparsify(c: torch.Tensor, segments, theta: float, criterion: str) -> torch.Tensor:
    """The upload ``up`` = ``c`` restricted to its largest-magnitude fraction theta (see module doc)."""
    if criterion == "layer":
        return fk.layerwise_topq(c, segments, [theta])[0]
    count = int(c.numel() * theta)
    return fk.global_topk(c, [count])[0]


# ---------------------------------------------------------------------------------- the method

@register("cffl")
class CFFL(PersonalAlgorithm):
    """CFFL: reputation-gated sparse uploads and reputation-sized downloads."""

    options = {
        "cffl_variant": Option("official", "str", "official (XinyiYS code in the common harness) or lineage "
                               "(the FedRAC authors' cffl module)", choices=("official", "lineage")),
        "theta": Option(0.1, "float", "upload fraction theta (largest-magnitude share of the clipped update)"),
        "sinh_alpha": Option(5.0, "float", "a of rho <- sinh(a rho)"),
        "alpha_decay": Option(False, "bool", "use a (1 + (r-1)/rounds) instead of a (official variant)"),
        "grad_clip_value": Option(1e-3, "float", "g: every update entry is clipped to [-g, g] (official variant)"),
        "largest_criterion": Option("layer", "str", "upload/download selection per parameter tensor (layer) "
                                    "or over all parameters (all)", choices=("layer", "all")),
        "aggregate_mode": Option("sum", "str", "upload weights: sum (1), reputation-sum (rho) or mean "
                                 "(data share)", choices=("sum", "reputation-sum", "mean")),
        "cffl_download": Option("topk", "str", "largest_criterion=all: download the largest entries (topk) or "
                           "random ones (random)", choices=("topk", "random")),
        "threshold_coef": Option("auto", "float", "coef of the reputation threshold h = coef/|R|; auto = 1/6 "
                                 "for the class-count split (cla), else 1/3", auto=True),
        "reputation_fade": Option(True, "bool", "rho <- 0.8 rho + 0.2 share (true) or (rho + share)/2 (false)"),
        "gamma": Option(0.5, "float", "Gamma of the normalised uploads (lineage variant)"),
    }
    state_fields = ("rho", "reputable", "h", "w")

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        out = {}
        if cfg["threshold_coef"] == "auto":
            out["threshold_coef"] = (1.0 / 6.0) if is_class_split(cfg) else (1.0 / 3.0)
        coef = out.get("threshold_coef", cfg["threshold_coef"])
        need(finite(coef) and 0 < coef < 1, f"threshold_coef={coef}: must be in (0, 1)")
        need(finite(cfg["theta"]) and 0 < cfg["theta"] <= 1, f"theta={cfg['theta']}: must be in (0, 1]")
        need(finite(cfg["sinh_alpha"]) and cfg["sinh_alpha"] > 0, f"sinh_alpha={cfg['sinh_alpha']}: must be > 0")
        need(finite(cfg["grad_clip_value"]) and cfg["grad_clip_value"] > 0,
             f"grad_clip_value={cfg['grad_clip_value']}: must be > 0")
        need(finite(cfg["gamma"]) and cfg["gamma"] > 0, f"gamma={cfg['gamma']}: must be > 0")
        if cfg["cffl_variant"] == "lineage" and cfg["largest_criterion"] != "layer":
            raise ConfigError("cffl_variant=lineage downloads per layer; largest_criterion=all is not part of it")
        return out

    # weights ----------------------------------------------------------------------------------
    def _coef(self) -> float:
        return float(self.cfg["threshold_coef"]) if self.cfg["cffl_variant"] == "official" else 1.0 / 3.0

    def _relative_size(self) -> list[float]:
        """``m_i``: ``n_i / max n``, or ``classes_i / C`` for the class-count split."""
        if is_class_split(self.cfg):
            return [c / self.sim.num_classes for c in class_counts(self.sim)]
        n = [float(v) for v in self.sim.client_sizes]
        return [v / max(n) for v in n]

    def _mean_weights(self) -> list[float]:
        """Aggregation weights of ``mean`` mode / the lineage: data share, or ``classes_i / C``."""
        if is_class_split(self.cfg):
            return [c / self.sim.num_classes for c in class_counts(self.sim)]
        return data_share(self.sim)

    def init_state(self) -> None:
        K = self.sim.K
        self.rho = torch.zeros(K, dtype=torch.float64)
        self.reputable = torch.ones(K, dtype=torch.bool)
        self.h = threshold(K, self._coef())
        self.w = self.sim.init_params.detach().clone()

    # round --------------------------------------------------------------------------------------
    def round(self, r: int) -> dict:
        if self.cfg["cffl_variant"] == "lineage":
            return self._round_lineage(r)
        return self._round_official(r)

    def _round_official(self, r: int) -> dict:
        sim, cfg = self.sim, self.cfg
        K = sim.K
        theta = float(cfg["theta"])
        crit = cfg["largest_criterion"]
        D = self.train_all().sub_(self.V)
        g = float(cfg["grad_clip_value"])
        C = D.clamp_(-g, g)
        self.V.add_(C)
        ups = torch.stack([upload_sparsify(C[k], self.segments, theta, crit) for k in range(K)])
        del D, C
        val = [math.nan] * K
        for k in range(K):
            if bool(self.reputable[k]):
                val[k] = self.val_accuracy(self.V[k] if theta == 1.0 else self.w + ups[k])
        alpha = float(cfg["sinh_alpha"])
        if cfg["alpha_decay"]:
            alpha *= 1.0 + (r - 1) / float(cfg["rounds"])
        self.rho, self.reputable, self.h = official_reputation_update(
            self.rho, self.reputable, [0.0 if math.isnan(v) else v for v in val], alpha=alpha, h=self.h,
            coef=self._coef(), fade=bool(cfg["reputation_fade"]))
        members = self.reputable.nonzero().flatten().tolist()
        mode = cfg["aggregate_mode"]
        if mode == "sum":
            agg = [1.0] * K
        elif mode == "reputation-sum":
            agg = self.rho.tolist()
        else:
            agg = self._mean_weights()
        agg = [agg[k] if k in members else 0.0 for k in range(K)]
        u = weighted_sum(ups, agg)
        self.w.add_(u)
        sub = self._relative_size() if mode == "mean" else [1.0] * K
        if members:
            self._download(u, members, crit)
            for k in members:
                self.V[k].sub_(ups[k], alpha=sub[k])
        return self._log(val)

    def _download(self, u: torch.Tensor, members: list[int], crit: str) -> None:
        sim = self.sim
        targets = [self.V[k] for k in members]
        if crit == "layer":
            fk.layerwise_topq_add_(targets, u, self.segments, [float(self.rho[k]) for k in members])
            return
        m = self._relative_size()
        top = float(self.rho.max())
        counts = [int(float(self.rho[k]) / top * m[k] * sim.P) for k in members]
        counts = [min(max(c, 0), sim.P) for c in counts]
        if self.cfg["cffl_download"] == "random":
            fk.randomk_add_(targets, u, counts, generator=sim.generator)
        else:
            fk.global_topk_add_(targets, u, counts)

    def _round_lineage(self, r: int) -> dict:
        sim, cfg = self.sim, self.cfg
        K = sim.K
        Wt = self.train_all()
        G = unit_scaled(Wt - self.V, float(cfg["gamma"]))
        self.V = Wt
        val = [math.nan] * K
        for k in range(K):
            if bool(self.reputable[k]):
                val[k] = self.val_accuracy(self.V[k])
        self.rho, self.reputable = lineage_reputation_update(
            self.reputable, [0.0 if math.isnan(v) else v for v in val], alpha=float(cfg["sinh_alpha"]), h=self.h)
        members = self.reputable.nonzero().flatten().tolist()
        share = self._mean_weights()
        u = weighted_sum(G, [share[k] if k in members else 0.0 for k in range(K)])
        self.w.add_(u)
        if members:
            m = self._relative_size()
            top = float(self.rho.max())
            q = [min(m[k] * float(self.rho[k]) / top, 1.0) for k in members]
            fk.layerwise_topq_add_([self.V[k] for k in members], u, self.segments, q)
            for k in members:
                self.V[k].sub_(G[k], alpha=m[k])
        return self._log(val)

    def _log(self, val) -> dict:
        return {"reputation": self.rho.tolist(), "reputable": [int(b) for b in self.reputable.tolist()],
                "threshold": self.h, "val_acc": [None if math.isnan(v) else v for v in val]}

    def client_columns(self) -> dict:
        return {"reputation": self.rho.tolist(), "reputable": [int(b) for b in self.reputable.tolist()]}
