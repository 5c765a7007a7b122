"""FedRolex (Alam, Liu, Yan, Zhang, NeurIPS 2022): HeteroFL's rates with a rolling window.

The capability levels are HeteroFL's (:mod:`fedrac.algorithms._width`), but the kept neurons of
each mask site of width ``w`` are a cyclic window that advances one neuron per round: in round
``r`` (1-based; the official server's round counter ``r - 1`` starts at 0, so round 1 is
HeteroFL's prefix) ``roll = (r - 1) mod w`` and a client at rate ``p`` keeps
``roll(arange(w), roll)[:ceil(p w)]`` - local position ``j`` holds neuron ``(j - roll) mod w``
(:func:`fedrac_kernels.interop.fedrolex_neuron_sets`). Over ``w`` rounds every neuron is trained
by every rate. All clients of a round share the roll, so the windows are nested and the
allocation is the nested form with a rolled order. Uploads are the clients' sub-tensors in
their rolled local order (index lists); the server averages them by count of holders (the
official ``combine`` with ``K = 1``). Client k's reward is the global model at the window it
trained in the last round.
"""
from __future__ import annotations

from typing import Optional

from . import register
from ._width import WidthAlgorithm


@register("fedrolex")
class FedRolex(WidthAlgorithm):
    """FedRolex: rolling width windows, count-of-holders average."""

    rolling = True
    default_weighting = "uniform"

    def roll_round(self, r: int) -> Optional[int]:
        return r - 1

    def allocate(self, r: int):
        alloc = super().allocate(r)
        self.extras["roll"] = list(self.plan.rolls(self.roll_round(r)).values())
        return alloc
