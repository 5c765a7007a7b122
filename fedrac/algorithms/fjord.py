"""FjORD (Horvath et al., NeurIPS 2021): ordered dropout with per-client maximum widths.

Every client has a maximum width ``p_max`` (its capability level: ``rates``, ``rate_assignment``,
``rate_proportions`` as for HeteroFL, :mod:`fedrac.algorithms._width`). In every local step it
draws a width ``p`` uniformly from the discrete set ``od_widths`` restricted to ``p <= p_max``
(the draws come from the server generator at the start of the round, so they are reproducible
and checkpointed) and trains the nested prefix of width ``p`` of every mask site (``ceil(p w)``
neurons). The parameters a client can change are therefore those of its ``p_max`` prefix; it
uploads them (compact: the sub-tensors of its ``p_max`` submodel). Aggregation is FjORD's
per-width average: for each width, from large to small, the prefix is averaged over the clients
with ``p_max`` at least that width, weighted by their example counts - the structural masked mean
over the ``p_max`` prefixes with ``weights = data sizes`` (``weighting=uniform`` drops the
weights). Client k's reward is the global model at ``p_max``.

Local steps with different widths: the simulator's client-training call takes one mask for all
its steps, so the steps are run as consecutive runs of equal width, one ``local_train`` call per
run; each call starts a fresh shuffled pass of the client's data (a client that draws one width for
all its steps - e.g. at the smallest level - trains exactly as one call would). Distributed runs
replay exactly those calls' draws for the clients of other ranks (:meth:`FjORD.local_runs`); the
step widths come from the server generator in ``allocate``, which every rank runs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import ConfigError, Option
from . import register
from ._width import WidthAlgorithm, _check_rates

_TOL = 1e-12


def eligible_widths(od_widths, p_max: float) -> list[float]:
    """The widths a client with ``p_max`` may draw, ascending."""
    return sorted(float(p) for p in od_widths if float(p) <= float(p_max) + _TOL)


def sample_step_widths(od_widths, p_max: float, steps: int, generator: Optional[torch.Generator]) -> list[float]:
    """``steps`` widths drawn uniformly from :func:`eligible_widths` (one ``randint`` call)."""
    cands = eligible_widths(od_widths, p_max)
    if not cands:
        raise ValueError(f"od_widths: no width <= p_max={p_max}")
    idx = torch.randint(len(cands), (int(steps),), generator=generator)
    return [cands[i] for i in idx.tolist()]


def runs(widths) -> list[tuple[float, int]]:
    """Consecutive runs of equal width: ``[0.5, 0.5, 1, 0.5] -> [(0.5, 2), (1, 1), (0.5, 1)]``."""
    out: list[list] = []
    for p in widths:
        if out and out[-1][0] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return [(p, n) for p, n in out]


@register("fjord")
class FjORD(WidthAlgorithm):
    """FjORD: ordered dropout up to p_max, example-weighted per-width average."""

    rolling = False
    default_weighting = "size"

    options = {
        "od_widths": Option("auto", "floats", "the discrete width set ordered dropout samples from (uniform "
                            "over the widths <= the client's p_max, per local step); auto = rates",
                            auto=True),
    }

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        out = super().resolve_options(cfg)
        od = cfg["od_widths"]
        if od == "auto":
            od = out["od_widths"] = list(cfg["rates"])
        _check_rates("od_widths", od)
        low = min(od)
        for p in cfg["rates"]:
            if p < low - _TOL:
                raise ConfigError(f"od_widths: rate {p:g} has no width <= it to sample; add one (smallest is {low:g})")
        return out

    def plan_levels(self) -> list[float]:
        return sorted(set(self.cfg["rates"]) | set(self.cfg["od_widths"]))

    def setup(self) -> None:
        super().setup()
        self.step_widths: list = [[] for _ in range(self.sim.K)]

    def allocate(self, r: int):
        alloc = super().allocate(r)
        steps = int(self.cfg["local_steps"])
        od = self.cfg["od_widths"]
        self.step_widths = [sample_step_widths(od, p, steps, self.sim.generator) for p in self.rates_k]
        self.extras["mean_step_width"] = [(sum(w) / len(w)) if w else math.nan for w in self.step_widths]
        return alloc

    def train_client(self, k: int, alloc, r: int) -> torch.Tensor:
        sim = self.sim
        wk = self.w
        for p, n in runs(self.step_widths[k]):
            wk = sim.local_train(k, wk, mask=self.plan.mask(p), num_steps=n)
        if wk is self.w:                    # no local steps
            wk = self.w.clone()
        return wk

    def local_runs(self, k: int, alloc, r: int) -> list:
        """One ``local_train`` call per run of equal step width (:meth:`train_client`): each call
        draws a fresh permutation of the client's data, so the runs, not ``local_steps``, say how
        far the client's stream moves."""
        return [n for _p, n in runs(self.step_widths[k])]

    def round_draws(self):
        """Every client's step widths (drawn in :meth:`allocate`)."""
        return self.step_widths
