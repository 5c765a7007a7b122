"""Aequa-STYLE baseline (Tastan, Horvath, Nandakumar, ICML 2025) - a RECONSTRUCTION, not Aequa.

No code of Aequa is available (ALGORITHMS.md §5.8, open question Q10): this module implements the
reconstruction of the spec from the abstract and review text, and every run says so
(``reconstructed: true`` and a note in the round extras, hence in metrics.jsonl). Do not report
its numbers as Aequa's without validating against the paper.

* Slimmable global model with ordered (prefix) widths, FjORD-style: at width factor rho every
  mask site of width H keeps its first ``ceil(rho H)`` units. The kept sets of all widths are the
  nested prefixes of one joint order (neurons sorted by ``index_in_site / H_site``, stable), so
  every width grid is one fused nested evaluation and the masks are the kernels' nested form.
* Local training: in every local step the client trains its full (maximum) width and one width
  drawn uniformly from ``[rho_min, rho_max]`` (rho_min = 0.25; the draws come from the server's
  generator, all of a round's at its start in ``allocate``, client by client and step by step, so
  distributed ranks draw the same widths and replay the other ranks' clients' 1-step calls,
  :meth:`AequaStyle.local_runs`). The spec sums the two gradients at the same point; here the two
  steps are applied one after the other (each a 1-step ``local_train`` call with its own
  minibatch), equal to first order in the learning rate - the simulator exposes whole
  local-training calls, not gradients. The round is the shared
  :class:`~fedrac.algorithms.base.MaskedAlgorithm` round through its hooks (so
  ``stream_aggregation`` and ``fedrac run --distributed`` apply).
* Aggregation: the per-parameter mean over the clients that updated the parameter (§4.9).
* Allocation from the accuracy-vs-width curve ``acc(rho)`` on V over the grid
  ``rho_min, rho_min + width_step, ..., 1``: target ``a_k = acc(rho_min) + (s_k - min s) /
  (max s - min s) (acc(1) - acc(rho_min))`` and ``rho_k`` = the smallest grid width with
  ``acc(rho) >= a_k``; the top contributor (highest s, ties: higher index as FedRAC's rank) gets
  width 1; if all s are equal everybody gets width 1.
  - ``allocation=post_training`` (Aequa's main mode): everybody trains the full slimmable model;
    after every round the allocation is computed on the aggregated model and the reward of client
    k is the global model at width rho_k (so the reported round is "training stopped here").
  - ``allocation=training_time``: from ``allocation_start_round`` on, the allocation is computed
    at the start of the round on the current model and client k trains (and is rewarded with)
    width rho_k, its random widths drawn from ``[rho_min, rho_k]``.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Sequence

import torch

from ..config import ConfigError, Option
from . import register
from .base import Allocation, MaskedAlgorithm, stable_argsort

NOTE = ("Aequa-style reconstruction (ALGORITHMS.md §5.8; no Aequa code is public): prefix-width "
        "slimmable training, masked mean, width from the acc(rho) curve by the linear contribution "
        "target; not validated against the paper")


# ------------------------------------------------------------------------------- pure helpers

def width_order(site_widths: Sequence[int]) -> torch.Tensor:
    """Joint order of the neurons (site order, then index) by ``index_in_site / width``, stable:
    the units kept at any width factor rho are a prefix of it."""
    keys = []
    for H in site_widths:
        keys.append(torch.arange(H, dtype=torch.float64) / float(H))
    if not keys:
        raise ValueError("site_widths: the model declares no mask sites")
    return stable_argsort(torch.cat(keys))


def width_size(rho, site_widths: Sequence[int]) -> int:
    """Neurons kept at width factor ``rho``: ``sum_sites ceil(rho H)`` (exact for grid values)."""
    f = Fraction(rho).limit_denominator(1 << 20) if not isinstance(rho, Fraction) else rho
    return int(sum(min(H, math.ceil(f * H)) for H in site_widths))


def width_grid(rho_min: float, step: float) -> list[Fraction]:
    """``rho_min, rho_min + step, ...`` below 1, then 1 (exact fractions of the decimal inputs)."""
    lo, st = Fraction(str(rho_min)), Fraction(str(step))
    grid, g = [], lo
    while g < 1:
        grid.append(g)
        g += st
    grid.append(Fraction(1))
    return grid


def allocate_widths(grid: Sequence[float], acc: Sequence[float], s: Sequence[float]) -> tuple[list[int], list[float]]:
    """(grid index per client, target accuracy per client) of the Aequa-style rule (module doc).

    ``grid`` ascending with ``grid[0] = rho_min`` and ``grid[-1] = 1``; ``acc[g]`` the validation
    accuracy at ``grid[g]``.
    """
    if len(grid) != len(acc) or len(grid) < 1:
        raise ValueError("acc: one accuracy per grid width")
    K = len(s)
    lo, hi = float(acc[0]), float(acc[-1])
    smin, smax = min(s), max(s)
    top = int(stable_argsort(torch.as_tensor(list(s), dtype=torch.float64))[-1])
    idx, targets = [], []
    for k in range(K):
        frac = (s[k] - smin) / (smax - smin) if smax > smin else 1.0
        a_k = lo + frac * (hi - lo)
        targets.append(a_k)
        g = next((i for i, a in enumerate(acc) if a >= a_k - 1e-12), len(grid) - 1)
        idx.append(len(grid) - 1 if k == top else g)
    return idx, targets


# ---------------------------------------------------------------------------------- algorithm

@register("aequa", aliases=("aequa_style",))
class AequaStyle(MaskedAlgorithm):
    """Aequa-style slimmable-width allocation (ICML 2025), RECONSTRUCTED per §5.8 (no public code)."""

    reconstructed = True          # no official code: tables mark it (fedrac.compare)
    reconstruction_note = NOTE

    options = {
        "rho_min": Option(0.25, "float", "smallest width factor of the slimmable model"),
        "width_step": Option(0.05, "float", "spacing of the width grid on which acc(rho) is measured"),
        "allocation": Option("post_training", "str", "post_training: train the full slimmable model, "
                             "reward width rho_k from the curve after each round; training_time: "
                             "client k trains width rho_k", choices=("post_training", "training_time")),
        "allocation_start_round": Option(2, "int", "training_time: first round with allocated widths"),
        "slimmable": Option(True, "bool", "every local step also trains a random width in "
                            "[rho_min, rho_max] (false: only the client's maximum width)"),
    }

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        rho, step = cfg["rho_min"], cfg["width_step"]
        if not (math.isfinite(rho) and 0 < rho <= 1):
            raise ConfigError(f"rho_min={rho}: must be in (0, 1]")
        if not (math.isfinite(step) and 0 < step <= 1):
            raise ConfigError(f"width_step={step}: must be in (0, 1]")
        if cfg["allocation_start_round"] < 1:
            raise ConfigError("allocation_start_round must be >= 1")
        return {}

    def setup(self) -> None:
        super().setup()
        sim = self.sim
        self.site_widths = [int(w) for _, w in sim.model.mask_sites()]
        self.order = width_order(self.site_widths)
        self.grid = width_grid(float(self.cfg["rho_min"]), float(self.cfg["width_step"]))
        self.grid_sizes = [width_size(g, self.site_widths) for g in self.grid]
        self.s = [float(v) for v in torch.as_tensor(sim.standalone, dtype=torch.float64).tolist()]
        self.widths = [1.0] * sim.K
        self.sub_sizes: list = [[] for _ in range(sim.K)]

    # -----------------------------------------------------------------------------------------
    def curve(self) -> list[float]:
        return self.sim.nested_accuracy(self.w, self.order, self.grid_sizes, split="val").tolist()

    def allocation_from_curve(self, acc: list[float]) -> Allocation:
        idx, targets = allocate_widths([float(g) for g in self.grid], acc, self.s)
        self.widths = [float(self.grid[i]) for i in idx]
        self.extras.update({"width_acc": acc, "width_targets": targets, "widths": self.widths})
        sizes = torch.tensor([self.grid_sizes[i] for i in idx], dtype=torch.int64)
        return Allocation(self.sim.K, self.sim.N, order=self.order, sizes=sizes)

    def _mask(self, size: int) -> Optional[torch.Tensor]:
        if size >= self.sim.N:
            return None
        m = torch.zeros(self.sim.N, dtype=torch.bool)
        m[self.order[:size]] = True
        return m

    def _random_size(self, rho_max: float) -> int:
        lo = float(self.cfg["rho_min"])
        u = float(torch.rand((), generator=self.sim.generator, dtype=torch.float64))
        rho = lo + u * max(0.0, rho_max - lo)
        return width_size(rho, self.site_widths)

    # the round: MaskedAlgorithm's, through its hooks ------------------------------------------
    def _trains_allocated(self, r: int) -> bool:
        """Round ``r`` trains the allocated widths (``training_time`` from its start round); the
        rewards then use those widths, so allocation and rewards ask this one place."""
        return self.cfg["allocation"] == "training_time" and r >= self.cfg["allocation_start_round"]

    def allocate(self, r: int) -> Optional[Allocation]:
        """``training_time`` (from ``allocation_start_round``): the widths from the curve on the
        current model (counted in ``freq``); otherwise None (everybody trains the full model).
        Then every client's random sub-step widths of the round are drawn from the server
        generator, client by client and step by step (the order the training consumes them)."""
        sim, cfg = self.sim, self.cfg
        self.extras = {"reconstructed": True}
        if r == 1:
            self.extras["reconstruction_note"] = NOTE
        training_time = self._trains_allocated(r)
        alloc = self.allocation_from_curve(self.curve()) if training_time else None
        rho_max = list(self.widths) if training_time else [1.0] * sim.K
        steps = int(cfg["local_steps"])
        self.sub_sizes = [[self._random_size(rho_max[k]) for _ in range(steps)] if cfg["slimmable"] else []
                          for k in range(sim.K)]
        return alloc

    def _size_max(self, k: int, alloc: Allocation) -> int:
        return int(alloc.sizes[k])

    def chunk_size(self) -> int:
        return 1            # the clients train one after another (several local_train calls each)

    def train_client(self, k: int, alloc: Allocation) -> torch.Tensor:
        """Every local step: one step of the client's maximum width, then (``slimmable``) one step
        of its drawn sub-width when that is narrower; one ``local_train`` call each."""
        sim = self.sim
        size_max = self._size_max(k, alloc)
        top_mask = self._mask(size_max)
        wk = self.w
        for step in range(int(self.cfg["local_steps"])):
            wk = sim.local_train(k, wk, mask=top_mask, num_steps=1)
            if self.sub_sizes[k]:
                size = self.sub_sizes[k][step]
                if size < size_max:
                    wk = sim.local_train(k, wk, mask=self._mask(size), num_steps=1)
        return wk

    def train_chunk(self, ks: range, alloc: Allocation, r: int) -> torch.Tensor:
        return self._one_by_one(ks, lambda k: self.train_client(k, alloc))

    def local_runs(self, k: int, alloc: Allocation, r: int) -> list:
        """One 1-step ``local_train`` call per local step at the maximum width, and one per
        narrower sub-step (:meth:`train_chunk`)."""
        size_max = self._size_max(k, alloc)
        calls = int(self.cfg["local_steps"]) + sum(1 for size in self.sub_sizes[k] if size < size_max)
        return [1] * calls

    def reward_allocation(self, alloc: Allocation, r: int) -> Allocation:
        """``post_training`` (and ``training_time`` before its start round): the widths from the
        curve on the aggregated model; ``training_time``: the widths trained."""
        if self._trains_allocated(r):
            return alloc
        return self.allocation_from_curve(self.curve())

    def round_draws(self):
        """Every client's drawn sub-step sizes."""
        return self.sub_sizes

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["widths"] = list(self.widths)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.widths = [float(v) for v in sd.get("widths", [1.0] * self.sim.K)]

    def client_columns(self) -> dict[str, list]:
        return {"width": [round(w, 3) for w in self.widths], **super().client_columns()}
