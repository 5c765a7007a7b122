"""FedSAC (Wang et al., KDD 2024) - a RECONSTRUCTION (no official code exists; ALGORITHMS.md §5.7).

Reconstructed from the abstract, the FedRAC poster's description and the FedRAC code that grew out
of it; every run reports ``reconstructed: true`` with a note (round extras), so that tables can
say so.

* Reputation, fixed for the whole run: ``c_hat_k = 100 exp(beta s_k) / max_j exp(beta s_j)``
  from the standalone accuracies s (§3.2). beta is FedSAC's own hyper-parameter and unknown [Q];
  FedRAC's beta = 80 would starve every low contributor (threshold a_g c_hat/100 ~ 0), so the
  default here is beta = 2: for s spread over ~0.1-0.2 it keeps a_g c_hat/100 between the
  lower (s_k) and upper (alpha-BCF) bounds, i.e. close to the shape the bound asks for (§3.5).
* Neuron importance evaluation (NIE), recomputed every ``importance_every`` rounds on the server
  validation set V with the current global model: importance of neuron j = mean cross-entropy on
  V with neuron j's activation set to 0 minus the loss of the full model (exact ablation). For the
  MLP all ablations of a layer are one tensor op: removing hidden unit j of layer 1 is the rank-1
  change ``z2 - h1_j W2[:, j]`` of the next pre-activation, removing unit j of layer 2 changes the
  logits by ``- h2_j W3[:, j]`` (spec K14). Other models: ``importance=taylor``, first-order
  ``|E_V[h_j dL/dh_j]|`` (one forward + backward), or the generic exact ablation (N masked passes).
* Allocation (round >= allocation_start_round): neurons in DESCENDING importance order (stable);
  candidate j = the ``(j+1) pack`` most important neurons, evaluated on V in one fused pass;
  ``a_g`` = the full model's accuracy; for the clients in ascending contribution order the
  monotone search of FedRAC (§4.6, shared code) with the static threshold ``tau_k = a_g c_hat_k/100``:
  the largest candidate above the previous client's whose accuracy is <= tau_k (at least one pack
  more than the previous rank); the top contributor gets the full model; no off-by-one by default
  (``assign_offset=fixed``; ``paper`` gives FedRAC's pack*j*).
* Dynamic aggregation: the per-parameter mean over the clients that updated it (§4.9, the shared
  masked mean). Rewards: the global model with each client's mask of the round.
Round 1 (before allocation_start_round): everybody trains the full model.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import ConfigError, Option
from . import register
from .base import Allocation, MaskedAlgorithm, stable_argsort
from .fedrac import allocate_sizes, candidate_sizes, contributions

NOTE = ("FedSAC has no official code: reconstruction per ALGORITHMS.md §5.7 (ablation importance, "
        "static threshold a_g*c_hat/100, monotone search, masked mean); beta is not published")


# --------------------------------------------------------------------------------- importance

def _bind(model, params: torch.Tensor) -> None:
    from ..models import bind_flat_parameters_

    bind_flat_parameters_(model, params.detach().clone())


@torch.no_grad()
def mlp_ablation_importance(model, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                            budget: int = 1 << 22) -> torch.Tensor:
    """Exact ablation importance of every hidden unit of a :class:`fedrac.models.MaskedMLP`.

    ``imp[j] = mean CE(V | a_j = 0) - mean CE(V)`` (float64 [N], N = 2H, site order h1 then h2),
    where ``a_j = 0`` zeroes the activation of unit j (as the model's mask does). Layer-1 unit j:
    ``z2' = z2 - h1_j W2[:, j]`` for all j at once ([rows, H, H] per row block of about
    ``budget`` values); layer-2 unit j: ``logits' = logits - h2_j W3[:, j]``.
    """
    _bind(model, params)
    W2, b2 = model.fc2.weight, model.fc2.bias
    W3, b3 = model.fc3.weight, model.fc3.bias
    H = model.hidden
    n = x.shape[0]
    if n == 0:
        raise ValueError("x: no validation samples")
    rows = max(1, budget // max(1, H * H))
    dev = x.device
    base = torch.zeros((), dtype=torch.float64, device=dev)
    drop1 = torch.zeros(H, dtype=torch.float64, device=dev)
    drop2 = torch.zeros(H, dtype=torch.float64, device=dev)
    for i in range(0, n, rows):
        xb, yb = x[i:i + rows], y[i:i + rows]
        h1 = model.forward_shared(xb)                          # relu(fc1 x)   [B, H]
        z2 = torch.addmm(b2, h1, W2.t())                       # [B, H]
        h2 = z2.clamp_min(0)
        logits = torch.addmm(b3, h2, W3.t())                   # [B, C]
        base += F.cross_entropy(logits.double(), yb, reduction="sum")
        # layer 1: [B, j, H] pre-activations with unit j removed
        z2j = z2.unsqueeze(1) - h1.unsqueeze(2) * W2.t().unsqueeze(0)
        lj = torch.matmul(z2j.clamp_min_(0), W3.t()) + b3      # [B, H, C]
        drop1 += _ce_sum(lj, yb)
        # layer 2: logits with unit j removed
        l2 = logits.unsqueeze(1) - h2.unsqueeze(2) * W3.t().unsqueeze(0)   # [B, H, C]
        drop2 += _ce_sum(l2, yb)
    base = base / n
    return torch.cat([drop1 / n - base, drop2 / n - base]).cpu()


def _ce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over the batch of CE for every ablation: logits [B, J, C] -> float64 [J]."""
    lg = logits.double()
    lse = torch.logsumexp(lg, dim=2)                                   # [B, J]
    picked = lg.gather(2, y.view(-1, 1, 1).expand(-1, lg.shape[1], 1)).squeeze(2)
    return (lse - picked).sum(0)


@torch.no_grad()
def explicit_ablation_importance(model, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                                 neurons_per_pass: int = 16, rows: int = 256) -> torch.Tensor:
    """The same quantity for any masked model by brute force: one masked forward per neuron (the
    masks of ``neurons_per_pass`` neurons stacked along the batch). The oracle of the MLP path."""
    _bind(model, params)
    N = model.num_neurons
    n = x.shape[0]
    dev = params.device
    base = torch.zeros((), dtype=torch.float64, device=dev)
    out = torch.zeros(N, dtype=torch.float64, device=dev)
    for i in range(0, n, rows):
        xb, yb = x[i:i + rows], y[i:i + rows]
        B = xb.shape[0]
        h = model.forward_shared(xb)
        base += F.cross_entropy(model.forward_rest(h).double(), yb, reduction="sum")
        for j0 in range(0, N, neurons_per_pass):
            J = list(range(j0, min(N, j0 + neurons_per_pass)))
            m = torch.ones(len(J), N, dtype=torch.float32, device=dev)
            m[torch.arange(len(J)), torch.tensor(J)] = 0
            mask = m.repeat_interleave(B, dim=0)                       # [len(J) * B, N]
            hh = h.repeat((len(J),) + (1,) * (h.dim() - 1))
            logits = model.forward_rest(hh, mask).double()
            loss = F.cross_entropy(logits, yb.repeat(len(J)), reduction="none").view(len(J), B).sum(1)
            out[j0:j0 + len(J)] += loss
    return (out / n - base / n).cpu()


def taylor_importance(model, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                      rows: int = 1024) -> torch.Tensor:
    """First-order Taylor importance ``|d mean-CE(V) / d m_j|`` at m = 1 (= ``|E_V[a_j dL/da_j]|``)."""
    _bind(model, params)
    N = model.num_neurons
    n = x.shape[0]
    mask = torch.ones(N, dtype=torch.float32, device=params.device, requires_grad=True)
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for i in range(0, n, rows):
                loss = F.cross_entropy(model(x[i:i + rows], mask=mask), y[i:i + rows], reduction="sum") / n
                loss.backward()
    finally:
        model.train(was)
        for p in model.parameters():
            p.grad = None
    return mask.grad.detach().abs().to(torch.float64).cpu()


def neuron_importance(model, params, x, y, how: str) -> torch.Tensor:
    from ..models import MaskedMLP

    if how == "taylor":
        return taylor_importance(model, params, x, y)
    if isinstance(model, MaskedMLP):
        return mlp_ablation_importance(model, params, x, y)
    return explicit_ablation_importance(model, params, x, y)


# ---------------------------------------------------------------------------------- algorithm

@register("fedsac")
class FedSAC(MaskedAlgorithm):
    """FedSAC (KDD 2024), reconstructed (§5.7): importance-ordered nested submodels, static reputation."""

    reconstructed = True          # no official code: tables mark it (fedrac.compare)
    reconstruction_note = NOTE

    options = {
        "beta": Option(2.0, "float", "contribution sharpness beta of c_hat (FedSAC's value is unpublished; "
                       "spec §5.7 suggests tuning in 1, 2, 5, 10)"),
        "pack": Option("auto", "int", "neurons per candidate step; auto = 8 (mlp), 32 (resnet18)", auto=True),
        "importance": Option("auto", "str", "neuron importance: ablation (exact; MLP batched as rank-1 "
                             "changes), taylor (first order); auto = ablation (mlp), taylor (resnet18)",
                             auto=True, choices=("ablation", "taylor")),
        "importance_every": Option(1, "int", "recompute the importance order every this many rounds"),
        "allocation_start_round": Option(2, "int", "first round with submodels (earlier rounds: full model)"),
        "assign_offset": Option("fixed", "str", "fixed: mask = the candidate that passed, pack*(j*+1); "
                                "paper: FedRAC's pack*j*", choices=("paper", "fixed")),
        "strict_increase": Option(True, "bool", "each rank gets at least one candidate more than the previous"),
    }

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        out = {}
        mlp = cfg["model"] == "mlp"
        if cfg["pack"] == "auto":
            out["pack"] = 8 if mlp else 32
        if cfg["importance"] == "auto":
            out["importance"] = "ablation" if mlp else "taylor"
        pack = out.get("pack", cfg["pack"])
        if pack < 1:
            raise ConfigError(f"pack={pack}: must be >= 1")
        beta = cfg["beta"]
        if not (math.isfinite(beta) and beta >= 0):
            raise ConfigError(f"beta={beta}: must be a finite number >= 0")
        if cfg["importance_every"] < 1:
            raise ConfigError("importance_every must be >= 1")
        if cfg["allocation_start_round"] < 1:
            raise ConfigError("allocation_start_round must be >= 1")
        return out

    def setup(self) -> None:
        super().setup()
        sim = self.sim
        self.pack = int(self.cfg["pack"])
        if self.pack >= sim.N:
            raise ConfigError(f"pack={self.pack} leaves fewer than 2 candidates for the model's N={sim.N} "
                              f"neurons; use a smaller pack")
        self.s = torch.as_tensor(sim.standalone, dtype=torch.float64).cpu()
        self.c_hat = contributions(self.s, float(self.cfg["beta"]))
        self.order: Optional[torch.Tensor] = None
        self.order_round = 0

    def importance_order(self, r: int) -> torch.Tensor:
        every = int(self.cfg["importance_every"])
        if self.order is None or r - self.order_round >= every:
            x, y = self.sim.val_data()
            imp = neuron_importance(self.sim.model, self.w, x, y, self.cfg["importance"])
            self.order = stable_argsort(imp, descending=True)
            self.order_round = r
            self.extras["importance_max"] = float(imp.max())
            self.extras["importance_min"] = float(imp.min())
        return self.order

    def allocate(self, r: int) -> Optional[Allocation]:
        cfg, sim = self.cfg, self.sim
        self.extras = {"reconstructed": True}
        if r == 1:
            self.extras["reconstruction_note"] = NOTE
        if r < cfg["allocation_start_round"]:
            return None
        order = self.importance_order(r)
        acc = sim.nested_accuracy(self.w, order, candidate_sizes(sim.N, self.pack), split="val").tolist()
        a_g = acc[-1]
        sizes, jstar = allocate_sizes(acc, a_g=a_g, standalone=self.s.tolist(), contrib=self.c_hat.tolist(),
                                      al=0.0, pack=self.pack, N=sim.N, assign_offset=cfg["assign_offset"],
                                      strict_increase=cfg["strict_increase"], reputation="static")
        self.extras.update({"a_g": a_g, "j_star": jstar, "candidate_acc": acc})
        return Allocation(sim.K, sim.N, order=order, sizes=torch.tensor(sizes, dtype=torch.int64))

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["order"] = self.order
        sd["order_round"] = self.order_round
        return sd

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.order = sd.get("order")
        self.order_round = int(sd.get("order_round", 0))

    def client_columns(self) -> dict[str, list]:
        return {"c_hat": [round(v, 3) for v in self.c_hat.tolist()], **super().client_columns()}
