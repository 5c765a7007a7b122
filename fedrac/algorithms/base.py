"""The algorithm contract: what a federated algorithm implements, and what the simulator gives it.

An algorithm is one small module in ``fedrac/algorithms/`` holding a class decorated with
:func:`fedrac.algorithms.register`. The simulation loop (:mod:`fedrac.runner`) owns everything
else: data, partitions, standalone accuracies, client RNG streams, metrics, outputs, checkpoints.

Per round ``r = 1, 2, ...`` the loop calls ``algo.round(r)`` then ``algo.rewards()`` and evaluates
the reward models on the server test set ``T``; fairness, rate, max/mean/min accuracy and the
per-client values are computed from those accuracies by the loop, never by the algorithm.

What an algorithm implements (subclass :class:`Algorithm`)::

    name: str                                  # set by @register("name")
    options: dict[str, Option]                 # its config keys (flat; settable with --set)
    @classmethod resolve_options(cls, cfg)     # fill its "auto" values, validate (ConfigError)
    setup()                                    # build the initial state from sim (fresh run AND resume)
    round(r) -> dict                           # one server round; returns JSON-able extras per round
    rewards() -> MaskRewards | ParamRewards    # the current reward model theta_k of every client
    state_dict() / load_state_dict(sd)         # everything the next round depends on
    client_columns() -> dict[str, list]        # optional per-client columns for the final table

What the simulator provides (``self.sim``, a :class:`fedrac.runner.Simulation`)::

    cfg                          resolved configuration (core keys + this algorithm's options)
    K, N, P, num_classes, device
    model, layout                scratch nn.Module (parameters passed explicitly) and its NeuronLayout
    init_params                  float32 [P], the common initial model (never modify in place)
    client_sizes                 list[int], samples per client
    standalone                   float64 [K], contributions s used by the algorithm (3.1)
    local_train(k, params, mask=None, num_steps=None, lr=None) -> float32 [P]
                                 client k's local work from ``params`` (a new tensor; ``params`` is
                                 untouched), with its own RNG stream, SGD/batch/clip from cfg
    local_train_many(ks, params, masks=None, num_steps=None, lr=None) -> float32 [len(ks), P]
                                 the same for up to ``cfg["client_batch"]`` clients as one batched
                                 computation (fedrac.batched); a reused work buffer
    accuracy(params, split="val"|"test"|"client:<k>", mask=None) -> float
    nested_accuracy(params, order, sizes, split) -> float64 [S]     fused (nested prefixes of order);
                                 split="val" is collective in distributed runs (each rank counts
                                 its 1/W of V): call it from the round, which every rank runs
    masks_accuracy(params, masks, split) -> float64 [S]              fused (distinct masks)
    client_data(k) -> (x, y);  val_data(); test_data()
    generator                    torch.Generator for the server's own randomness (checkpointed)

RNG: use only ``sim.generator`` (server) and ``sim.local_train`` (clients); the loop saves and
restores those streams, so a resumed run continues bit for bit. Never call ``torch.manual_seed``.

Two kinds of reward models:

* :class:`MaskRewards` - submodels of one global parameter vector (FedRAC, FedSAC, HeteroFL,
  FedRolex, FjORD, Aequa): the loop evaluates every *distinct* mask in one fused pass over ``T``.
* :class:`ParamRewards` - one parameter vector per client (CFFL, CGSV, FedAVE, IAFL, CF-FedAvg,
  FedPW); the same tensor object given for several clients is evaluated once.
* :class:`AccuracyRewards` - accuracies on T computed by the algorithm itself (Standalone: theta = s).

State: ``state_dict()`` may hold tensors, numbers, strings, None, lists and dicts only (checkpoints
are loaded with ``torch.load(weights_only=True)``); ``load_state_dict`` gets it back on the CPU.

Submodel methods subclass :class:`MaskedAlgorithm` and implement only :meth:`MaskedAlgorithm.allocate`
(which neurons each client gets this round); training from the global model with the mask, the
frequency table and the masked mean (``fedrac_kernels``) are shared. The shared round is never
overridden; methods that train or aggregate differently use its hooks::

    train_chunk(ks, alloc, r) -> float32 [len(ks), P]   new parameters of clients ks (default: one
                                                         batched sim.local_train_many call)
    chunk_size() -> int                                  clients per train_chunk call (default:
                                                         client_batch, 8 when it is <= 1)
    local_runs(k, alloc, r) -> [num_steps, ...]          the local_train calls train_chunk makes for k
    check_update(k, delta, alloc)                        optional per-client check before aggregation
    compact_indices(k, alloc) -> int64 indices           aggregation=compact: k's upload rows/columns
    reward_allocation(alloc, r) -> Allocation            the rewards' allocation after aggregation
    round_draws() -> value or None                       server-side draws of the round beyond the
                                                         allocation (part of the ranks' checked digest)

so every MaskedAlgorithm also runs with ``stream_aggregation`` and ``fedrac run --distributed``
(HeteroFL / FedRolex / FjORD: per-client training and compact uploads; Aequa: slimmable sub-steps
and the post-training allocation).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import torch

import fedrac_kernels as fk

from ..config import Config, ConfigError, Option

if TYPE_CHECKING:  # pragma: no cover
    from ..runner import Simulation


# ------------------------------------------------------------------------------------ reward kinds

@dataclass
class MaskRewards:
    """Client k's reward is ``params`` with neuron mask k.

    Give exactly one of: ``order`` + ``sizes`` (nested: client k holds ``order[:sizes[k]]``),
    ``masks`` (bool [K, N]), or neither (every client gets the full model).
    """

    params: torch.Tensor
    order: Optional[torch.Tensor] = None
    sizes: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None


@dataclass
class ParamRewards:
    """Client k's reward is ``params[k]`` (with ``masks[k]`` when given)."""

    params: Sequence[torch.Tensor]
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None


@dataclass
class AccuracyRewards:
    """The algorithm reports the reward accuracies on T itself (float [K]); e.g. Standalone, whose
    rewards are the standalone models already evaluated (theta = s). No model is evaluated."""

    accuracy: Sequence[float]


# ------------------------------------------------------------------------------------- allocation

@dataclass
class Allocation:
    """Which neurons each client holds this round (nested prefixes of ``order``, or dense masks)."""

    K: int
    N: int
    order: Optional[torch.Tensor] = None          # int64 [N]
    sizes: Optional[torch.Tensor] = None          # int64 [K]
    masks: Optional[torch.Tensor] = None          # bool [K, N]

    @classmethod
    def full(cls, K: int, N: int) -> "Allocation":
        return cls(K, N, order=torch.arange(N, dtype=torch.int64), sizes=torch.full((K,), N, dtype=torch.int64))

    @property
    def nested(self) -> bool:
        return self.masks is None

    def is_full(self, k: int) -> bool:
        if self.nested:
            return int(self.sizes[k]) >= self.N
        return bool(self.masks[k].all())

    def mask(self, k: int) -> Optional[torch.Tensor]:
        """bool [N] of client k, or None when it holds every neuron."""
        if self.is_full(k):
            return None
        if self.nested:
            m = torch.zeros(self.N, dtype=torch.bool)
            m[self.order[: int(self.sizes[k])]] = True
            return m
        return self.masks[k].clone()

    def chunk_masks(self, ks) -> torch.Tensor:
        """bool [len(ks), N]: the masks of clients ``ks`` (all True for a client holding every neuron)."""
        idx = torch.as_tensor(list(ks), dtype=torch.int64)
        if self.nested:
            rank = torch.empty(self.N, dtype=torch.int64)
            rank[self.order] = torch.arange(self.N)
            return rank.unsqueeze(0) < self.sizes[idx].unsqueeze(1)
        return self.masks[idx].to(torch.bool).cpu()

    def chunk_neuron_masks(self, ks):
        """The kernels' form for clients ``ks``: NestedMasks or dense bool [len(ks), N]."""
        idx = torch.as_tensor(list(ks), dtype=torch.int64)
        if self.nested:
            return fk.NestedMasks(self.order, self.sizes[idx])
        return self.masks[idx]

    def digest(self) -> bytes:
        """A hash of the allocation (distributed runs check that every rank computed the same one)."""
        import hashlib

        h = hashlib.sha256()
        for t in (self.order, self.sizes, self.masks):
            if t is None:
                h.update(b"-")
            else:
                t = t.detach().cpu().contiguous()
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.numpy().tobytes())
        return h.digest()

    def neuron_masks(self):
        """The form the kernels take: NestedMasks or dense bool [K, N]."""
        if self.nested:
            return fk.NestedMasks(self.order, self.sizes)
        return self.masks

    def counts(self) -> torch.Tensor:
        """int64 [K]: neurons per client."""
        if self.nested:
            return self.sizes.clone()
        return self.masks.sum(1).to(torch.int64)

    def state_dict(self) -> dict:
        return {"K": self.K, "N": self.N, "order": self.order, "sizes": self.sizes, "masks": self.masks}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "Allocation":
        return cls(sd["K"], sd["N"], order=sd["order"], sizes=sd["sizes"], masks=sd["masks"])

    def rewards(self, params: torch.Tensor) -> MaskRewards:
        if self.nested:
            return MaskRewards(params, order=self.order, sizes=self.sizes)
        return MaskRewards(params, masks=self.masks)


# ------------------------------------------------------------------------------------------- base

class Algorithm(abc.ABC):
    """Base class of every algorithm (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, sim: "Simulation", cfg: Config):
        self.sim = sim
        self.cfg = cfg

    @classmethod
    def resolve_options(cls, cfg: Config) -> dict:
        """Return {key: value} for this algorithm's ``auto`` options (``cfg["model"]`` etc. are
        resolved already); raise ConfigError for invalid combinations. Default: nothing to do."""
        return {}

    def setup(self) -> None:
        """Build the initial state (called for fresh runs and before ``load_state_dict`` on resume)."""

    @abc.abstractmethod
    def round(self, r: int) -> dict:
        """One server round; returns JSON-able extras to log."""

    @abc.abstractmethod
    def rewards(self):
        """The current reward model of every client (MaskRewards / ParamRewards / AccuracyRewards)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        if sd:
            raise TypeError(f"{type(self).__name__} has state but does not implement load_state_dict")

    def client_columns(self) -> dict[str, list]:
        return {}

    # helpers ---------------------------------------------------------------------------------
    def option(self, key: str) -> Any:
        return self.cfg[key]


class MaskedAlgorithm(Algorithm):
    """Submodel training over one global model with the shared masked aggregation.

    State: global parameters ``w`` (float32 [P]), the cumulative neuron frequency table ``freq``
    (float32 [N], counts every client mask of every allocating round) and the current allocation.

    Round ``r``: ``alloc = allocate(r)`` (None = everybody trains the full model and ``freq`` is
    not counted); ``freq += masks``; client k trains ``w`` with its mask; ``w`` <- masked mean of
    the updates: ``aggregation=nonzero_mean`` counts a parameter for client k iff its update is
    non-zero (FedRAC's rule, ALGORITHMS.md 4.9, ``fk.masked_mean_update_``);
    ``structural_mean`` iff its neurons are in k's mask (``fk.structured_mean_update_``).
    Rewards: ``w`` with each client's mask of the last round.

    ``aggregation=compact`` (offered by the width methods) streams every client's compact upload
    (``fk.compact_pack`` of its :meth:`compact_indices`, ``StreamingAggregator.add_compact``, in
    client order): the structural rule computed from the clients' sub-tensors.

    Execution (same results up to float rounding; bit for bit for a given setting): clients train
    in chunks of :meth:`chunk_size` clients through :meth:`train_chunk` (default: ``client_batch``
    at a time as one batched computation, ``sim.local_train_many``); each update passes
    :meth:`check_update`; with ``stream_aggregation`` (always for ``compact``) the updates stream
    through ``fk.StreamingAggregator`` chunk by chunk (O(P + chunk_size x P) memory, the same bits
    as the one-call aggregation); in distributed runs (``sim.dist``) each rank trains its block of
    clients, replays the other clients' data draws (:meth:`local_runs`), and the ranks' partial
    (num, den) are summed by one all-reduce (:mod:`fedrac.distributed`).

    Hooks a subclass may override (defaults: the plain masked round): :meth:`train_chunk`,
    :meth:`chunk_size`, :meth:`local_runs`, :meth:`check_update`, :meth:`compact_indices`,
    :meth:`reward_allocation`, :meth:`round_draws`, :meth:`aggregation_weights`. Server-side randomness is drawn in
    :meth:`allocate` (which every rank runs), never in :meth:`train_chunk` (which a rank runs only
    for its own clients).
    """

    options: ClassVar[dict[str, Option]] = {
        "aggregation": Option("nonzero_mean", "str", "masked mean rule: nonzero_mean (a parameter counts "
                              "for a client iff its update is non-zero) or structural_mean (iff its "
                              "neurons are in the client's mask)",
                              choices=("nonzero_mean", "structural_mean")),
    }

    def setup(self) -> None:
        sim = self.sim
        self.w = sim.init_params.clone()
        self.freq = torch.zeros(sim.N, dtype=torch.float32, device=self.w.device)
        self.alloc = Allocation.full(sim.K, sim.N)
        self.extras: dict = {}

    # to implement ------------------------------------------------------------------------------
    def allocate(self, r: int) -> Optional[Allocation]:
        """The allocation of round r from the current state (``self.w`` before training), or None
        for "full model for everybody, not counted in the frequency table". May put per-round
        values to log into ``self.extras``. Every draw of server-side randomness the round needs
        (``sim.generator``) is made here, never while training: distributed ranks all run
        ``allocate`` but each trains only its own clients."""
        raise TypeError(f"{type(self).__name__} must implement allocate(r)")

    def aggregation_weights(self, r: int):
        """K client weights for the masked mean (None = all 1)."""
        return None

    # optional hooks (defaults: the plain masked round) -----------------------------------------
    def train_chunk(self, ks: range, alloc: Allocation, r: int) -> torch.Tensor:
        """float32 ``[len(ks), P]``: the new parameters of the consecutive clients ``ks`` trained
        from ``self.w`` with their submodels (at most :meth:`chunk_size` clients). Default: one
        batched computation, ``sim.local_train_many(ks, self.w, masks)``.

        The result may be a reused work buffer (the round subtracts ``self.w`` from it in place
        before the next call). Overrides train through ``sim.local_train`` /
        ``sim.local_train_many`` only, take any server-side randomness from what ``allocate``
        drew, and report the calls they make per client in :meth:`local_runs`."""
        return self.sim.local_train_many(ks, self.w, alloc.chunk_masks(ks))

    def chunk_size(self) -> int:
        """Clients per :meth:`train_chunk` call (the streamed round holds one ``[chunk_size, P]``
        chunk of updates). Default: ``client_batch`` (one batched computation), 8 when it is <= 1
        (the clients train one by one; their updates still reach the aggregator 8 at a time).
        Methods that always train their clients one by one return 1 (O(P) round memory)."""
        cb = int(self.cfg.get("client_batch", 1) or 1)
        return 8 if cb <= 1 else cb

    def local_runs(self, k: int, alloc: Allocation, r: int) -> list:
        """``num_steps`` of each local-training call :meth:`train_chunk` makes for client ``k`` in
        round ``r``, in order (every call starts a fresh shuffled pass of the client's data).
        Distributed runs replay exactly these draws for the clients another rank trains. Default:
        one call of ``local_steps``."""
        return [int(self.cfg["local_steps"])]

    def check_update(self, k: int, delta: torch.Tensor, alloc: Allocation) -> None:
        """Optional check of client ``k``'s update (``delta`` = new parameters - ``self.w``,
        float32 [P]) before it is aggregated; raise to stop the round. Default: none."""

    def compact_indices(self, k: int, alloc: Allocation) -> torch.Tensor:
        """``aggregation=compact``: client ``k``'s flat neuron indices in its local order (the rows
        and columns of its compact upload, :func:`fedrac_kernels.compact_pack`). Default: the
        neurons of its mask (nested: the prefix of ``order``, in that order)."""
        if alloc.nested:
            return alloc.order[: int(alloc.sizes[k])].clone()
        return torch.nonzero(alloc.masks[k].cpu(), as_tuple=False).view(-1)

    def reward_allocation(self, alloc: Allocation, r: int) -> Allocation:
        """The allocation the rewards use after round ``r`` (the model is aggregated already).
        Default: the training allocation."""
        return alloc

    def round_draws(self):
        """The server-side draws of this round that shape training beyond the allocation (drawn in
        :meth:`allocate`; e.g. FjORD's step widths), as a value with a stable ``repr``, or None.
        Part of :meth:`round_digest`."""
        return None

    def round_digest(self, alloc: Allocation) -> bytes:
        """What every distributed rank must have computed identically before training (checked
        in the round's all-reduce): the allocation and :meth:`round_draws`."""
        draws = self.round_draws()
        if draws is None:
            return alloc.digest()
        import hashlib

        return hashlib.sha256(alloc.digest() + repr(draws).encode()).digest()

    # shared -------------------------------------------------------------------------------------
    def round(self, r: int) -> dict:
        sim = self.sim
        self.extras = {}
        alloc = self.allocate(r)
        counted = alloc is not None
        if alloc is None:
            alloc = Allocation.full(sim.K, sim.N)
        if counted:
            if alloc.nested:
                fk.frequency_update_(self.freq, order=alloc.order.to(self.freq.device),
                                     sizes=alloc.sizes.to(self.freq.device))
            else:
                fk.frequency_update_(self.freq, alloc.masks.to(self.freq.device))
        if self._streaming():
            self._stream_round(alloc, r)
        else:
            deltas = []
            for ks in self._chunks(range(sim.K)):
                rows = self.train_chunk(ks, alloc, r).sub(self.w).unbind(0)
                for k, d in zip(ks, rows):
                    self.check_update(k, d, alloc)
                deltas.extend(rows)
            self.aggregate(deltas, alloc, r)
        self.alloc = self.reward_allocation(alloc, r)
        f = self.freq.to(torch.float64)
        out = {"freq_mean": float(f.mean()), "freq_var": float(f.var(unbiased=False)),
               "submodel_size": self.alloc.counts().tolist()}
        out.update(self.extras)
        return out

    def _chunks(self, clients: range):
        """Consecutive chunks of ``clients`` for :meth:`train_chunk`."""
        cb = max(1, int(self.chunk_size()))
        for a in range(clients.start, clients.stop, cb):
            yield range(a, min(a + cb, clients.stop))

    def _streaming(self) -> bool:
        sim = self.sim
        custom = type(self).aggregate is not MaskedAlgorithm.aggregate
        if self.cfg.get("aggregation") == "compact" or getattr(sim, "dist", None) is not None:
            if custom:
                raise ConfigError(f"{type(self).__name__} overrides aggregate(); compact uploads and distributed "
                                  "runs need the shared streamed aggregation")
            return True
        mode = self.cfg.get("stream_aggregation", False)
        if custom or mode is False:
            return False
        if mode == "auto":
            return sim.K * sim.P * 4 > (256 << 20)
        return bool(mode)

    def _stream_round(self, alloc: Allocation, r: int) -> None:
        """Train this process's clients chunk by chunk, streaming the updates into one
        ``fk.StreamingAggregator`` (``aggregation=compact``: every client's compact upload, one
        client at a time, in client order); in distributed runs the ranks' (num, den) are summed
        first."""
        sim, cfg = self.sim, self.cfg
        dist = getattr(sim, "dist", None)
        weights = self.aggregation_weights(r)
        if weights is not None:
            weights = [float(v) for v in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
            if len(weights) != sim.K:
                raise ValueError(f"weights: expected {sim.K} client weights, got {len(weights)}")
        mode = cfg["aggregation"]
        structural, compact = mode == "structural_mean", mode == "compact"
        agg = fk.StreamingAggregator(self.w, layout=sim.layout if (structural or compact) else None)
        mine = range(sim.K) if dist is None else dist.shard(sim.K)
        if dist is not None:
            dist.before_training(r, sim, mine, runs=lambda k: self.local_runs(k, alloc, r))
        for ks in self._chunks(mine):
            upd = self.train_chunk(ks, alloc, r)
            upd.sub_(self.w)
            for i, k in enumerate(ks):
                self.check_update(k, upd[i], alloc)
            wts = 1.0 if weights is None else weights[ks.start:ks.stop]
            try:
                if compact:
                    for i, k in enumerate(ks):
                        kept = self.compact_indices(k, alloc)
                        upload = fk.compact_pack(upd[i], sim.layout, kept)
                        agg.add_compact(upload, kept, weight=1.0 if weights is None else weights[k])
                elif structural:
                    nm = alloc.chunk_neuron_masks(ks)
                    if not alloc.nested:
                        nm = nm.to(self.w.device)
                    agg.add_structured(upd, nm, weight=wts, rule="structural")
                else:
                    agg.add(upd, weight=wts)
            except ValueError as e:
                bad = [k for i, k in enumerate(ks) if not bool(torch.isfinite(upd[i]).all())]
                if bad:
                    raise ValueError(f"deltas: non-finite values (NaN/Inf) in the update(s) of client(s) {bad} in "
                                     f"round {r}; the global model is unchanged") from None
                raise e
            del upd
        if dist is not None:
            dist.sum_aggregators(agg, self.round_digest(alloc))
        agg.apply_(self.w)

    def _one_by_one(self, ks: range, train) -> torch.Tensor:
        """For :meth:`train_chunk` overrides that train clients one after another: ``train(k)``
        (client k's new parameters) for every client of ``ks`` in order, in a reused float32
        ``[len(ks), P]`` work buffer."""
        n = len(ks)
        buf = getattr(self, "_row_buffer", None)
        if buf is None or buf.shape[0] < n or buf.device != self.w.device:
            buf = torch.empty(max(n, 1), self.sim.P, dtype=torch.float32, device=self.w.device)
            self._row_buffer = buf
        out = buf[:n]
        for i, k in enumerate(ks):
            out[i].copy_(train(k))
        return out

    def aggregate(self, deltas: list, alloc: Allocation, r: int) -> None:
        weights = self.aggregation_weights(r)
        if self.cfg["aggregation"] == "structural_mean":
            nm = alloc.neuron_masks()
            if not alloc.nested:
                nm = nm.to(self.w.device)
            fk.structured_mean_update_(self.w, deltas, self.sim.layout, nm, weights=weights, rule="structural")
        else:
            fk.masked_mean_update_(self.w, deltas, weights=weights, masks=None)

    def rewards(self) -> MaskRewards:
        return self.alloc.rewards(self.w)

    def state_dict(self) -> dict:
        return {"w": self.w, "freq": self.freq, "alloc": self.alloc.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.w = sd["w"].to(self.sim.device).clone()
        self.freq = sd["freq"].to(self.sim.device).clone()
        self.alloc = Allocation.from_state_dict(sd["alloc"])

    def client_columns(self) -> dict[str, list]:
        return {"neurons": self.alloc.counts().tolist()}


def stable_argsort(values: torch.Tensor, *, descending: bool = False) -> torch.Tensor:
    """Stable argsort, ties broken by the lower index (also for ``descending``)."""
    keys = -values if descending else values
    return torch.sort(keys, stable=True).indices.to(torch.int64)


def check_fraction(key: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{key}={value}: must be in [0, 1]")


__all__ = ["Algorithm", "MaskedAlgorithm", "Allocation", "MaskRewards", "ParamRewards", "AccuracyRewards",
           "stable_argsort", "check_fraction"]
