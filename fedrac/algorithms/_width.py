"""Shared machinery of the width-prefix submodel methods: HeteroFL, FedRolex and FjORD.

The three methods are allocation policies over the shared masked aggregation
(:class:`~fedrac.algorithms.base.MaskedAlgorithm`). What they have in common lives here:

* **Capability levels.** Every client has a width rate from the list ``rates`` (default
  ``1, 1/2, 1/4, 1/8, 1/16``, HeteroFL's a-e). ``rate_proportions`` says which share of the clients
  gets each rate (default: equal shares; counts by largest remainder, ties to the larger rate);
  ``rate_assignment`` says which clients get which rate:

  - ``index``: the largest rates go to the lowest client indices (HeteroFL's ``fix`` mode, in
    client order): with K = 10 and five rates, clients 0-1 get 1, 2-3 get 1/2, ..., 8-9 get 1/16;
  - ``size``: by descending data size (ties: lower index first);
  - ``standalone``: by descending standalone accuracy s (the contribution FedRAC uses);
  - ``random``: a seeded random permutation of the ``index`` assignment (drawn once, from the
    server generator, at set-up; checkpointed);
  - ``dynamic``: HeteroFL's ``dynamic`` mode: every round each client draws its rate i.i.d. from
    the proportions (server generator).

* **Width sets.** At rate ``p`` a mask site of width ``w`` keeps ``ceil(p w)`` of its neurons (the
  per-site counts come from :func:`fedrac_kernels.interop.heterofl_neuron_sets`, so the float
  guard is the one the state_dict helpers use). HeteroFL and FjORD keep the prefix
  ``0 .. ceil(p w) - 1``; FedRolex keeps the rolled window of
  :func:`fedrac_kernels.interop.fedrolex_neuron_sets` (``roll = round mod w`` per site). Because all
  clients of a round share one roll per site, the kept sets of every rate are nested, so every
  allocation is the base class's *nested* form: one joint order of the N neurons (:meth:`WidthPlan.order`)
  and a size per client. That gives the fused nested evaluation of the rewards and the O(N)
  frequency update; the dense masks are never needed.

* **Compact uploads.** A client's upload is its active sub-tensors: for every parameter, the rows
  and columns of its kept neurons of the gating sites, in its *local* order (the rolled order for
  FedRolex; :func:`fedrac_kernels.compact_pack` with the client's list of flat neuron indices),
  ungated parameters whole. The server accumulates them one client at a time in a
  :class:`fedrac_kernels.StreamingAggregator` (``add_compact``: O(P) server memory, no [K, P]
  buffer), so the new global model is, per element, ``sum_k w_k x_ke / sum_k w_k`` over the
  clients that hold element e (old value where nobody does): HeteroFL's and FedRolex's
  ``combine`` (w_k = 1: sum of the scattered slices / count of holders) and FjORD's per-width
  average (w_k = examples). ``aggregation=structural_mean`` computes the same rule from dense
  [P] updates (bit for bit the same result), ``nonzero_mean`` is FedRAC's rule (an ablation).

* **Structural correctness.** Clients start from the global model and train their submodel with
  activation masks, plain SGD (momentum 0, weight decay 0) and a global clipping factor. A masked
  neuron then gets exactly zero gradient on every *gated* parameter slice (the declared
  ``parameter_gates``), so the dense update is exactly zero outside the client's submodel and the
  compact upload loses nothing (``check_structure=true`` verifies this for every client and
  raises otherwise; the tests check it for the MLP and the ResNet).

  - MLP: the gates are every row/bias producing a hidden unit and every column consuming one, so
    a client at rate p trains exactly HeteroFL's width-p MLP (input and output layers full).
  - GroupNorm ResNet-18: the masks sit only at the five sites (after the stem and after each
    stage, and at the pooled features); GroupNorm couples the channels of a group, and the
    channels inside the blocks are not masked. The gated slices (consumers of a masked channel:
    the next stage's first conv and shortcut input slices, ``fc`` columns; the GN affine of the
    last norm before each site) are exactly zero outside the submodel, and those are the only
    slices the compact upload leaves out; every ungated tensor (block convs, inner norms) *is*
    updated by every client and is sent whole and averaged over all clients, as the structural
    rule counts it. So the upload is exact for the model as it is masked, but a client at rate p
    is not HeteroFL's width-p ResNet (which narrows every conv): it is the same structural rule
    applied to the submodel the activation masks define. Narrowing the inner channels too needs
    more mask sites in the model (``fedrac/models.py``).

HeteroFL's label-split masking of the classifier rows and static batch norm are not modelled
(GroupNorm needs no running statistics).
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional, Sequence

import torch

from fedrac_kernels.interop import fedrolex_neuron_sets, heterofl_neuron_sets

from ..config import ConfigError, Option
from .base import Allocation, MaskedAlgorithm, stable_argsort

DEFAULT_RATES = (1.0, 0.5, 0.25, 0.125, 0.0625)
ASSIGNMENTS = ("index", "size", "standalone", "random", "dynamic")
_TOL = 1e-12


# ------------------------------------------------------------------------------------ levels

def sorted_levels(rates: Sequence[float], proportions: Optional[Sequence[float]] = None):
    """(rates descending, proportions in the same order); equal proportions when None."""
    rates = [float(r) for r in rates]
    props = [1.0] * len(rates) if proportions is None else [float(p) for p in proportions]
    if len(props) != len(rates):
        raise ValueError(f"proportions: {len(props)} values for {len(rates)} rates")
    idx = sorted(range(len(rates)), key=lambda i: (-rates[i], i))
    return [rates[i] for i in idx], [props[i] for i in idx]


def level_counts(K: int, proportions: Sequence[float]) -> list[int]:
    """Clients per level: ``floor(K p_l / sum p)``, the remainder to the largest fractional parts
    (ties: the lower level index, i.e. the larger rate). Sums to K."""
    tot = float(sum(proportions))
    exact = [K * float(p) / tot for p in proportions]
    counts = [int(math.floor(e + 1e-12)) for e in exact]
    rest = K - sum(counts)
    frac = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in frac[:rest]:
        counts[i] += 1
    return counts


def assign_levels(K: int, proportions: Sequence[float], rule: str, *, sizes=None, standalone=None,
                  generator: Optional[torch.Generator] = None) -> list[int]:
    """Level index per client (0 = the largest rate) under ``rule`` (module doc).

    ``proportions`` are in level order (descending rate). ``random`` and ``dynamic`` draw from
    ``generator`` (``dynamic``: one multinomial draw of K levels with replacement).
    """
    if rule == "dynamic":
        p = torch.tensor([float(x) for x in proportions], dtype=torch.float64)
        return torch.multinomial(p, K, replacement=True, generator=generator).tolist()
    counts = level_counts(K, proportions)
    block = [lvl for lvl, c in enumerate(counts) for _ in range(c)]      # level of rank position i
    if rule == "index":
        ranked = list(range(K))
    elif rule == "size":
        ranked = stable_argsort(torch.as_tensor(list(sizes), dtype=torch.float64), descending=True).tolist()
    elif rule == "standalone":
        ranked = stable_argsort(torch.as_tensor(list(standalone), dtype=torch.float64), descending=True).tolist()
    elif rule == "random":
        ranked = torch.randperm(K, generator=generator).tolist()
    else:
        raise ValueError(f"rule: unknown rate assignment {rule!r}; one of {ASSIGNMENTS}")
    out = [0] * K
    for pos, k in enumerate(ranked):
        out[k] = block[pos]
    return out


# ----------------------------------------------------------------------------------- width sets

class WidthPlan:
    """Width sets of one model: per-site kept counts of every level, the joint nested order.

    ``sites``: ``[(name, width), ...]`` in the model's site order (flat neuron numbering);
    ``levels``: every rate that can occur (client rates, FjORD's step widths).
    """

    def __init__(self, sites: Sequence[tuple[str, int]], levels: Sequence[float]):
        self.sites = [(str(s), int(w)) for s, w in sites]
        self.widths = {s: w for s, w in self.sites}
        self.offsets = {}
        off = 0
        for s, w in self.sites:
            self.offsets[s] = off
            off += w
        self.N = off
        self.levels = sorted({float(p) for p in levels} | {1.0})                   # ascending
        sets = heterofl_neuron_sets(self.widths, self.levels)
        self._counts = {p: {s: int(ns[s].numel()) for s, _ in self.sites} for p, ns in zip(self.levels, sets)}
        # key[s][j]: index (ascending) of the smallest level whose site-s count exceeds position j
        self._keys = {}
        for s, w in self.sites:
            key = torch.full((w,), len(self.levels) - 1, dtype=torch.int64)
            for li in range(len(self.levels) - 1, -1, -1):
                key[: self._counts[self.levels[li]][s]] = li
            self._keys[s] = key
        self._order_cache: dict = {}

    def _level(self, p: float) -> float:
        for q in self.levels:
            if abs(q - float(p)) <= _TOL:
                return q
        raise ValueError(f"rate {p!r} is not one of the plan's levels {self.levels}")

    def counts(self, p: float) -> dict[str, int]:
        """``{site: kept neurons}`` at rate ``p``."""
        return dict(self._counts[self._level(p)])

    def size(self, p: float) -> int:
        """Neurons kept at rate ``p`` over all sites."""
        return sum(self._counts[self._level(p)].values())

    def rolls(self, roll_round: Optional[int]) -> dict[str, int]:
        return {s: (0 if roll_round is None else int(roll_round) % w) for s, w in self.sites}

    def neuron_sets(self, rates: Sequence[float], roll_round: Optional[int] = None) -> list[dict]:
        """Per client ``{site: int64 indices in local order}`` (the interop helpers' form)."""
        rates = [self._level(p) for p in rates]
        if roll_round is None:
            return heterofl_neuron_sets(self.widths, rates)
        return fedrolex_neuron_sets(self.widths, rates, int(roll_round))

    def kept(self, rates: Sequence[float], roll_round: Optional[int] = None) -> list[torch.Tensor]:
        """Per client the flat neuron indices of its submodel, site by site, in local order."""
        return [torch.cat([ns[s] + self.offsets[s] for s, _ in self.sites])
                for ns in self.neuron_sets(rates, roll_round)]

    def order(self, roll_round: Optional[int] = None) -> torch.Tensor:
        """int64 [N]: the joint order whose prefix of length ``size(p)`` is the rate-p set of every
        site (the rolled windows for ``roll_round``). Keys: the smallest level holding the local
        position, stable over (site, local position)."""
        rolls = self.rolls(roll_round)
        ck = tuple(rolls.values())
        if ck not in self._order_cache:
            keys, flat = [], []
            for s, w in self.sites:
                j = torch.arange(w, dtype=torch.int64)
                keys.append(self._keys[s])
                flat.append(torch.remainder(j - rolls[s], w) + self.offsets[s])
            keys, flat = torch.cat(keys), torch.cat(flat)
            self._order_cache = {ck: flat[stable_argsort(keys)]}      # keep one (rolls change per round)
        return self._order_cache[ck].clone()

    def mask(self, p: float, roll_round: Optional[int] = None) -> Optional[torch.Tensor]:
        """bool [N] of rate ``p`` (None at full width)."""
        n = self.size(p)
        if n >= self.N:
            return None
        m = torch.zeros(self.N, dtype=torch.bool)
        m[self.order(roll_round)[:n]] = True
        return m


# ----------------------------------------------------------------------------------- algorithm

def _check_rates(key: str, vals) -> None:
    if not isinstance(vals, list) or not vals:
        raise ConfigError(f"{key}: expected a non-empty list of numbers, e.g. {key}=1,0.5,0.25")
    for v in vals:
        if not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise ConfigError(f"{key}={Option(None, 'floats', '').render(vals)}: every rate must lie in (0, 1]")
    if len({round(v, 12) for v in vals}) != len(vals):
        raise ConfigError(f"{key}={Option(None, 'floats', '').render(vals)}: rates must be distinct")


class WidthAlgorithm(MaskedAlgorithm):
    """Base of HeteroFL / FedRolex / FjORD (module doc). Subclasses set ``rolling`` and
    ``default_weighting`` and may override :meth:`train_client` (with :meth:`local_runs` when it
    makes other local-training calls than one of ``local_steps``) / :meth:`allocate`.

    The round is :class:`MaskedAlgorithm`'s: :meth:`train_chunk` trains the clients one by one
    (:meth:`chunk_size` 1) through :meth:`train_client`, :meth:`check_update` runs
    ``check_structure``, :meth:`compact_indices` gives each client's kept neurons in local order
    for ``aggregation=compact`` (streamed ``compact_pack`` + ``add_compact``, one client at a
    time). So the methods also run with ``stream_aggregation`` and ``fedrac run --distributed``."""

    rolling: ClassVar[bool] = False
    default_weighting: ClassVar[str] = "uniform"

    options: ClassVar[dict[str, Option]] = {
        "rates": Option(list(DEFAULT_RATES), "floats", "capability levels: width rates in (0, 1] "
                        "(a site of width w keeps ceil(rate w) neurons)"),
        "rate_proportions": Option("auto", "floats", "share of the clients at each rate (same order as "
                                   "rates); auto = equal shares", auto=True),
        "rate_assignment": Option("index", "str", "which client gets which rate: index (largest rates to "
                                  "the lowest indices), size (descending data size), standalone "
                                  "(descending standalone accuracy), random (seeded permutation), dynamic "
                                  "(redrawn every round from the proportions)", choices=ASSIGNMENTS),
        "weighting": Option("auto", "str", "client weights of the mean: uniform (count of holders), size "
                            "(data sizes); auto = the method's rule (HeteroFL/FedRolex uniform, FjORD size)",
                            auto=True, choices=("uniform", "size")),
        "aggregation": Option("compact", "str", "compact: compact uploads (active sub-tensors + index lists) "
                              "streamed into the structural mean; structural_mean: the same rule from "
                              "dense updates; nonzero_mean: FedRAC's non-zero rule (ablation)",
                              choices=("compact", "structural_mean", "nonzero_mean")),
        "check_structure": Option(False, "bool", "verify that every client's update is exactly zero outside "
                                  "its submodel (what the compact upload assumes); raise otherwise"),
    }

    @classmethod
    def resolve_options(cls, cfg) -> dict:
        out = {}
        rates = cfg["rates"]
        _check_rates("rates", rates)
        props = cfg["rate_proportions"]
        if props == "auto":
            props = out["rate_proportions"] = [1.0] * len(rates)
        if len(props) != len(rates):
            raise ConfigError(f"rate_proportions: {len(props)} values for {len(rates)} rates; give one per rate")
        if not all(math.isfinite(p) and p >= 0 for p in props) or sum(props) <= 0:
            raise ConfigError("rate_proportions: values must be >= 0 with a positive sum")
        if cfg["weighting"] == "auto":
            out["weighting"] = cls.default_weighting
        return out

    # set-up ---------------------------------------------------------------------------------------
    def plan_levels(self) -> list[float]:
        return list(self.cfg["rates"])

    def setup(self) -> None:
        super().setup()
        sim, cfg = self.sim, self.cfg
        self.plan = WidthPlan([(s.name, s.width) for s in sim.layout.sites], self.plan_levels())
        if self.plan.N != sim.N:
            raise ValueError(f"layout: {self.plan.N} neurons over the sites, the model has N={sim.N}")
        self.levels, self.proportions = sorted_levels(cfg["rates"], cfg["rate_proportions"])
        rule = cfg["rate_assignment"]
        if rule == "dynamic":
            self.client_level = [0] * sim.K                  # drawn every round
        else:
            self.client_level = assign_levels(sim.K, self.proportions, rule, sizes=sim.client_sizes,
                                              standalone=sim.standalone.tolist(), generator=sim.generator)
        self.rates_k = [self.levels[lv] for lv in self.client_level]
        self.alloc = Allocation(sim.K, sim.N, order=self.plan.order(None),
                                sizes=torch.full((sim.K,), sim.N, dtype=torch.int64))
        self.kept_k: list = []

    # allocation -----------------------------------------------------------------------------------
    def roll_round(self, r: int) -> Optional[int]:
        """The round number the windows roll by (None: prefixes)."""
        return None

    def client_rates(self, r: int) -> list[float]:
        if self.cfg["rate_assignment"] == "dynamic":
            self.client_level = assign_levels(self.sim.K, self.proportions, "dynamic", generator=self.sim.generator)
        return [self.levels[lv] for lv in self.client_level]

    def allocate(self, r: int) -> Allocation:
        sim = self.sim
        self.rates_k = self.client_rates(r)
        rr = self.roll_round(r)
        order = self.plan.order(rr)
        sizes = torch.tensor([self.plan.size(p) for p in self.rates_k], dtype=torch.int64)
        self.kept_k = self.plan.kept(self.rates_k, rr)
        self.extras["rates"] = list(self.rates_k)
        return Allocation(sim.K, sim.N, order=order, sizes=sizes)

    def aggregation_weights(self, r: int):
        if self.cfg["weighting"] == "size":
            return [float(n) for n in self.sim.client_sizes]
        return None

    # clients --------------------------------------------------------------------------------------
    def train_client(self, k: int, alloc: Allocation, r: int) -> torch.Tensor:
        """Client k's new parameters (a new tensor) from ``self.w`` with its submodel."""
        return self.sim.local_train(k, self.w, mask=alloc.mask(k))

    def chunk_size(self) -> int:
        """1: the clients train one after another whatever ``client_batch``, so the round holds
        one client's update at a time (O(P) memory, as the compact uploads promise)."""
        return 1

    def train_chunk(self, ks: range, alloc: Allocation, r: int) -> torch.Tensor:
        """The clients of the chunk one after another through :meth:`train_client` (the width
        methods' clients always train sequentially, whatever ``client_batch``)."""
        return self._one_by_one(ks, lambda k: self.train_client(k, alloc, r))

    def check_update(self, k: int, delta: torch.Tensor, alloc: Allocation) -> None:
        if self.cfg["check_structure"]:
            self._check_structure(k, delta, alloc)

    def compact_indices(self, k: int, alloc: Allocation) -> torch.Tensor:
        return self.kept_k[k]

    def _check_structure(self, k: int, delta: torch.Tensor, alloc: Allocation) -> None:
        m = alloc.mask(k)
        if m is None:
            return
        live = self.sim.layout.expand(m.view(1, -1).to(delta.device))[0]
        bad = int(torch.count_nonzero(delta[~live]))
        if bad:
            raise RuntimeError(f"check_structure: client {k}'s update has {bad} non-zero values outside its "
                               "submodel (weight decay / momentum or an unmasked path?); the compact upload "
                               "would drop them")

    # state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["client_level"] = list(self.client_level)
        sd["rates_k"] = list(self.rates_k)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.client_level = [int(v) for v in sd["client_level"]]
        self.rates_k = [float(v) for v in sd["rates_k"]]

    def client_columns(self) -> dict[str, list]:
        return {"rate": [round(p, 6) for p in self.rates_k], **super().client_columns()}


__all__ = ["DEFAULT_RATES", "ASSIGNMENTS", "WidthPlan", "WidthAlgorithm", "assign_levels", "level_counts",
           "sorted_levels"]
