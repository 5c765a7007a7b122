"""Standalone (ALGORITHMS.md §5.2): every client's reward is a model trained on its own data only.

``standalone_mode=protocol`` (default): the reward of client k is exactly the model behind its
standalone accuracy ``s_k`` (§3.1 [R], :mod:`fedrac.standalone`): the common initial model trained
``standalone_epochs`` epochs on the client's data minus a ``standalone_holdout`` share, best epoch
on that holdout, with the same per-client random streams as the simulator's standalone
computation (``derive_seed(seed, "standalone", k)``). These models are trained once, in round 1,
and kept (and checkpointed); later rounds do nothing. So ``theta_k = s_k`` (bit for bit on the
same machine) whenever the simulator computed ``s`` itself (``standalone_acc=auto``); with a given
or ``paper`` vector, ``theta`` is the accuracy of our standalone models instead.

``standalone_mode=rounds``: the same-budget comparison: every round each client runs the common
client protocol (``sim.local_train``, ``local_steps`` SGD steps) on its own model, never
exchanging anything; ``theta_k`` is that model's test accuracy after round r.
"""
from __future__ import annotations

import torch

from ..config import Option
from . import register
from ._personal import PersonalAlgorithm


@register("standalone")
class Standalone(PersonalAlgorithm):
    """Per-client models trained alone (protocol of §3.1, or local_steps per round)."""

    options = {
        "standalone_mode": Option("protocol", "str", "protocol: reward = the §3.1 standalone model "
                                  "behind s (theta = s); rounds: local_steps SGD steps per round on "
                                  "the client's own model, no exchange", choices=("protocol", "rounds")),
    }
    state_fields = ("trained",)

    def init_state(self) -> None:
        self.trained = False

    def round(self, r: int) -> dict:
        if self.cfg["standalone_mode"] == "rounds":
            self.V = self.train_all()
            return {}
        if not self.trained:
            self._train_protocol()
            self.trained = True
        return {}

    def _train_protocol(self) -> None:
        from ..runner import derive_seed
        from ..training import train_epochs

        sim, cfg = self.sim, self.cfg
        for k in range(sim.K):
            x, y = sim.client_data(k)
            gen = torch.Generator().manual_seed(derive_seed(int(cfg["seed"]), "standalone", k))
            best, _ = train_epochs(sim.model, sim.init_params, x, y, epochs=int(cfg["standalone_epochs"]),
                                   batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]),
                                   clip_grad=float(cfg["clip_grad"]), generator=gen,
                                   holdout=float(cfg["standalone_holdout"]),
                                   eval_batch_size=int(cfg["eval_batch_size"]) or 1024)
            self.V[k].copy_(best)
