"""The two FedRAC ablations of the paper's Tables 4-9 as selectable methods (ALGORITHMS.md §4.14).

The code of the paper has no switch for them; both are settings of FedRAC's own options
(:mod:`fedrac.algorithms.fedrac`), so every other FedRAC option still applies and can be changed
with ``--set``:

* ``fedrac_wo_reputation`` - "w/o reputation" (no dynamic reputation): the ``al`` schedule is
  replaced by the constant ``al = constant_al = 0.4`` (``reputation=constant_al``; the otherwise
  unused ``alpha: 0.4`` of the official code and its commented line ``al = self.alpha``). The
  alternative reading of §4.14, FedSAC's static threshold ``tau_k = a_g c_hat_k / 100``, is
  ``--set reputation=static``.
* ``fedrac_wo_allocation`` - "w/o allocation" (no rolling allocation): the neuron frequency table
  is ignored for the candidate order, which is the identity permutation (``ordering=fixed``:
  nested prefixes of the neuron indices). ``--set ordering=importance`` gives the FedSAC-like
  Taylor-importance order instead.
"""
from __future__ import annotations

from ..config import Option
from . import register
from .fedrac import FedRAC

REPUTATIONS = ("dynamic", "constant_al", "static")
ORDERINGS = ("frequency", "fixed", "importance")


@register("fedrac_wo_reputation", aliases=("fedrac_no_reputation", "fedrac-wo-reputation"))
class FedRACWithoutReputation(FedRAC):
    """FedRAC w/o reputation (Tables 4-9, §4.14): constant al = 0.4 instead of the al schedule."""

    ablation = "w/o reputation"
    options = {
        "reputation": Option("constant_al", "str", "w/o reputation: constant_al (al = constant_al, default) "
                             "or static (tau = a_g*c_hat/100); dynamic = FedRAC", choices=REPUTATIONS),
        "constant_al": Option(0.4, "float", "the constant al of the ablation (the official code's alpha = 0.4)"),
    }


@register("fedrac_wo_allocation", aliases=("fedrac_no_rolling", "fedrac_no_allocation", "fedrac-wo-allocation"))
class FedRACWithoutAllocation(FedRAC):
    """FedRAC w/o allocation (Tables 4-9, §4.14): fixed neuron order instead of the rolling frequency order."""

    ablation = "w/o allocation"
    options = {
        "ordering": Option("fixed", "str", "w/o allocation: fixed (identity order, default) or importance "
                           "(Taylor); frequency = FedRAC", choices=ORDERINGS),
    }
