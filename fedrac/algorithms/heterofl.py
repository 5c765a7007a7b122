"""HeteroFL (Diao, Ding, Tarokh, ICLR 2021) as an allocation policy over the shared masked mean.

Every client has a capability level, a width rate ``p`` from ``rates`` (default 1, 1/2, 1/4, 1/8,
1/16) given by ``rate_assignment`` / ``rate_proportions`` (:mod:`fedrac.algorithms._width`). It
trains the width-``p`` prefix of every mask site - ``ceil(p w)`` neurons of a site of width ``w``,
the same rate every round (static; ``rate_assignment=dynamic`` is HeteroFL's dynamic mode) - from
the global model, and uploads its sub-tensors (compact). The server's ``combine``: every element
becomes the sum of the clients' sliced values scattered into the global shape divided by the
count of clients holding it (old value where nobody does), i.e. the structural masked mean with
unit weights (``weighting=size`` weights by data size instead). Client k's reward is the global
model at its width.
"""
from __future__ import annotations

from . import register
from ._width import WidthAlgorithm


@register("heterofl")
class HeteroFL(WidthAlgorithm):
    """HeteroFL: static width-prefix submodels, count-of-holders average."""

    rolling = False
    default_weighting = "uniform"
