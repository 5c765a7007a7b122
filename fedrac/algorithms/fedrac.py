"""FedRAC (CVPR 2026): dynamic reputation + rolling allocation of nested submodels.

ALGORITHMS.md §4. Contributions ``c_hat = 100 exp(beta s) / max exp(beta s)`` come from the
standalone accuracies ``s`` (§3.1-3.2) and never change; clients are ranked by ascending ``c_hat``
(stable, ties by client index). Round ``r`` (§4.2), from allocation_start_round (default 2) on:

1. ``A, pack = phase(r)``; ``pi`` = stable ascending argsort of the neuron frequency table ``F``
   (``fk.lowest_frequency_order``; ``ordering=fixed``: identity; ``importance``: descending
   first-order Taylor importance on V, FedSAC-like).
2. Nested candidates ``S_j = pi[:(j+1) pack]``, ``j = 0..C-1``, evaluated on the server validation
   set V in ONE fused pass (``evaluation.nested_candidate_accuracy``); ``a_g`` = the full model's
   accuracy (the last candidate holds every neuron).
3. ``al = A (1 - 1/ln(0.3 r + 3))``; for the clients in ascending contribution order, the monotone
   search of §4.6 with ``prev`` (:func:`allocate_sizes`); the top client gets all N neurons.
4. ``F += masks`` (``fk.frequency_update_``, nested form); every client trains ``w`` with its mask;
   ``w`` <- masked mean (non-zero rule, ``fk.masked_mean_update_``; or ``aggregation=structural_mean``).

Round 1 (before allocation_start_round): everybody trains the full model, F is not counted.
Every quirk of §4.12 is an option (defaults = §4.15, i.e. the official behaviour):
``assign_offset`` (paper: mask = pack j*, one pack fewer than the candidate that passed; fixed:
pack (j*+1)), ``strict_increase`` (each rank at least one candidate above the previous; false lets
equal sizes through, quirk 5), ``ordering``, ``reputation`` (dynamic | constant_al: al = constant_al,
the "w/o reputation" ablation of §4.14 | static: tau = a_g c_hat/100), top client = rank K-1 for any K.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

import fedrac_kernels as fk

from ..config import ConfigError, Option, parse_phases
from . import register
from .base import Allocation, MaskedAlgorithm, stable_argsort

MLP_PHASES = "100:0.2:8,inf:0.8:8"
RESNET_PHASES = "200:0.95:32,inf:0.95:8"


# ------------------------------------------------------------------------------ pure definitions

def contributions(standalone: torch.Tensor, beta: float) -> torch.Tensor:
    """``c_hat_k = 100 exp(beta s_k) / max_j exp(beta s_j)`` (float64, in (0, 100]; §3.2)."""
    from ..metrics import contribution_weights

    return contribution_weights(standalone, beta)


def al_schedule(r: int, A: float) -> float:
    """``al(r) = A (1 - 1/ln(0.3 r + 3))`` (natural log; §4.5)."""
    return A * (1.0 - 1.0 / math.log(0.3 * r + 3.0))


def phase_at(phases: Sequence[tuple], r: int) -> tuple[float, int]:
    """(A, pack) of the first phase whose ``until_round >= r`` (the last phase beyond them all)."""
    for until, A, pack in phases:
        if r <= until:
            return float(A), int(pack)
    return float(phases[-1][1]), int(phases[-1][2])


def candidate_sizes(N: int, pack: int) -> list[int]:
    """Sizes of the nested candidates: ``(j+1) pack`` for j = 0..C-1, C = ceil(N/pack), capped at N."""
    C = -(-N // pack)
    return [min((j + 1) * pack, N) for j in range(C)]


def allocate_sizes(cand_acc: Sequence[float], *, a_g: float, standalone: Sequence[float],
                   contrib: Sequence[float], al: float, pack: int, N: int,
                   assign_offset: str = "paper", strict_increase: bool = True,
                   reputation: str = "dynamic") -> tuple[list[int], list[Optional[int]]]:
    """The monotone search of ALGORITHMS.md §4.2/§4.6 -> (neurons per client, j* per client).

    ``cand_acc[j]`` = validation accuracy of candidate j (``(j+1) pack`` neurons). Clients are
    visited in ascending ``contrib`` order (stable); ``prev`` starts at 0. For every client but the
    last (the top contributor, who gets N and j* None):

    * ``tau = s_k + (1 - al) a_g c_hat_k / 100`` (``reputation=static``: ``tau = a_g c_hat_k / 100``;
      ``constant_al`` is the dynamic formula with a constant ``al`` passed in);
    * ``j* = max{ j : lo <= j <= C-1, A_j <= tau }`` with ``lo = prev + 1`` (``strict_increase``)
      or ``max(prev, 1)``; if none qualifies ``j* = lo`` capped at ``C - 1`` (saturation);
    * neurons ``pack j*`` (``assign_offset=paper``: the official off-by-one) or
      ``min(pack (j*+1), N)`` (``fixed``); ``prev = j*``.
    """
    C = len(cand_acc)
    K = len(standalone)
    if C < 2:
        raise ValueError(f"cand_acc: need at least 2 candidates (pack={pack} < N={N})")
    if len(contrib) != K:
        raise ValueError("contrib: one value per client")
    order = stable_argsort(torch.as_tensor(contrib, dtype=torch.float64)).tolist()
    sizes: list[int] = [0] * K
    jstar: list[Optional[int]] = [None] * K
    prev = 0
    for q, k in enumerate(order):
        if q == K - 1:
            sizes[k] = N
            break
        if reputation == "static":
            tau = a_g * float(contrib[k]) / 100.0
        else:
            tau = float(standalone[k]) + (1.0 - al) * a_g * float(contrib[k]) / 100.0
        lo = prev + 1 if strict_increase else max(prev, 1)
        j = None
        for cand in range(C - 1, lo - 1, -1):            # the code scans downwards: largest first
            if cand_acc[cand] <= tau:
                j = cand
                break
        if j is None:
            j = min(lo, C - 1)
        sizes[k] = pack * j if assign_offset == "paper" else min(pack * (j + 1), N)
        jstar[k] = j
        prev = j
    return sizes, jstar


# ---------------------------------------------------------------------------------- the algorithm

@register("fedrac")
class FedRAC(MaskedAlgorithm):
    """FedRAC; the ablations of §4.14 are option settings (``reputation=constant_al``,
    ``ordering=fixed``), also registered as their own names below."""

    options = {
        "beta": Option("auto", "float", "contribution sharpness beta (3.2); auto = 80 (mlp), 10 (resnet18)",
                       auto=True),
        "phases": Option("auto", "phases", "reputation phases until_round:A:pack,...; auto = "
                         f"{MLP_PHASES} (mlp), {RESNET_PHASES} (resnet18)", auto=True),
        "allocation_start_round": Option(2, "int", "first round with submodels (earlier rounds: full model)"),
        "assign_offset": Option("paper", "str", "paper: mask = pack*j* (official off-by-one); "
                                "fixed: pack*(j*+1)", choices=("paper", "fixed")),
        "strict_increase": Option(True, "bool", "each rank gets at least one candidate more than the "
                                  "previous (false allows equal sizes)"),
        "ordering": Option("frequency", "str", "neuron order of the candidates: frequency (rolling), "
                           "fixed (identity), importance (Taylor, descending)",
                           choices=("frequency", "fixed", "importance")),
        "reputation": Option("dynamic", "str", "dynamic (al schedule), constant_al (al = constant_al), "
                             "static (tau = a_g*c_hat/100)", choices=("dynamic", "constant_al", "static")),
        "constant_al": Option(0.4, "float", "al of reputation=constant_al"),
    }

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        out = {}
        resnet = cfg["model"] != "mlp"
        beta = cfg["beta"]
        if beta == "auto":
            beta = out["beta"] = 10.0 if resnet else 80.0
        if not (math.isfinite(beta) and beta >= 0):
            raise ConfigError(f"beta={beta}: must be a finite number >= 0")
        phases = cfg["phases"]
        if phases == "auto":
            phases = out["phases"] = RESNET_PHASES if resnet else MLP_PHASES
        parsed = parse_phases(phases)
        last = -math.inf
        for until, A, pack in parsed:
            if until <= last:
                raise ConfigError(f"phases={phases}: until_round values must increase")
            if pack < 1 or not math.isfinite(A):
                raise ConfigError(f"phases={phases}: pack must be >= 1 and A a number")
            last = until
        if cfg["allocation_start_round"] < 1:
            raise ConfigError("allocation_start_round must be >= 1")
        if not math.isfinite(cfg["constant_al"]):
            raise ConfigError("constant_al must be a number")
        return out

    def setup(self) -> None:
        super().setup()
        sim = self.sim
        self.phases = parse_phases(self.cfg["phases"])
        for _, _, pack in self.phases:
            if pack >= sim.N:
                raise ConfigError(f"phases: pack={pack} leaves fewer than 2 candidates for the model's "
                                  f"N={sim.N} neurons; use a smaller pack")
        self.s = torch.as_tensor(sim.standalone, dtype=torch.float64).cpu()
        self.c_hat = contributions(self.s, float(self.cfg["beta"]))
        self.rank_order = stable_argsort(self.c_hat)

    # ---------------------------------------------------------------------------------------------
    def neuron_order(self) -> torch.Tensor:
        how = self.cfg["ordering"]
        if how == "frequency":
            return fk.lowest_frequency_order(self.freq).to(torch.int64).cpu()
        if how == "fixed":
            return torch.arange(self.sim.N, dtype=torch.int64)
        return stable_argsort(self.taylor_importance(), descending=True)

    def taylor_importance(self) -> torch.Tensor:
        """``|d mean-loss(V) / d m_j|`` at m = 1 = ``|E_V[h_j dL/dh_j]|`` (first-order Taylor)."""
        import torch.nn.functional as F

        from ..models import bind_flat_parameters_

        sim = self.sim
        model = sim.model
        x, y = sim.val_data()
        bind_flat_parameters_(model, self.w.detach().clone())
        mask = torch.ones(sim.N, dtype=torch.float32, device=self.w.device, requires_grad=True)
        n = x.shape[0]
        bs = sim.eval_batch_size or 1024
        was = model.training
        model.eval()
        try:
            with torch.enable_grad():
                for i in range(0, n, bs):
                    loss = F.cross_entropy(model(x[i:i + bs], mask=mask), y[i:i + bs], reduction="sum") / n
                    loss.backward()
        finally:
            model.train(was)
        return mask.grad.detach().abs().to(torch.float64).cpu()

    def allocate(self, r: int) -> Optional[Allocation]:
        cfg, sim = self.cfg, self.sim
        if r < cfg["allocation_start_round"]:
            return None
        A, pack = phase_at(self.phases, r)
        order = self.neuron_order()
        sizes_c = candidate_sizes(sim.N, pack)
        acc = sim.nested_accuracy(self.w, order, sizes_c, split="val").tolist()
        a_g = acc[-1]
        if cfg["reputation"] == "constant_al":
            al = float(cfg["constant_al"])
        else:
            al = al_schedule(r, A)
        sizes, jstar = allocate_sizes(acc, a_g=a_g, standalone=self.s.tolist(), contrib=self.c_hat.tolist(),
                                      al=al, pack=pack, N=sim.N, assign_offset=cfg["assign_offset"],
                                      strict_increase=cfg["strict_increase"], reputation=cfg["reputation"])
        self.extras = {"al": al, "a_g": a_g, "pack": pack, "j_star": jstar, "candidate_acc": acc}
        return Allocation(sim.K, sim.N, order=order, sizes=torch.tensor(sizes, dtype=torch.int64))

    def client_columns(self) -> dict[str, list]:
        rank = torch.empty(self.sim.K, dtype=torch.int64)
        rank[self.rank_order] = torch.arange(self.sim.K)
        return {"c_hat": [round(v, 3) for v in self.c_hat.tolist()], "rank": rank.tolist(),
                **super().client_columns()}
