"""Optional Flower integration: a FedAvg strategy whose aggregation runs on the fused kernels.

Needs Flower (``pip install fedrac[flower]``); ``import fedrac_kernels`` never imports this module
or ``flwr``. Written against Flower's *legacy* strategy interface (``flwr.server.strategy.FedAvg``,
``aggregate_fit(server_round, results, failures)``, ``configure_fit``, ``FitRes.parameters`` /
``.num_examples``, ``flwr.common.parameters_to_ndarrays`` / ``ndarrays_to_parameters``). Tested
with flwr 1.41.0 and 1.8.0 (1.8.0 predates NumPy 2 and was run with an alias for ``np.float_``);
older releases are refused. Flower's newer Message-API strategies (``flwr.serverapp``) are not
covered.

``FedracFedAvg`` is a drop-in replacement for ``FedAvg``::

    from fedrac_kernels.flower import FedracFedAvg

    strategy = FedracFedAvg(min_fit_clients=10, min_available_clients=10)      # dense FedAvg

    # submodel training (HeteroFL / FedRolex / FjORD): tell it each client's neuron sets
    strategy = FedracFedAvg(
        param_names=[n for n in model.state_dict()],   # names of the arrays, in order
        sites={"h1": 200, "h2": 200},
        gates={"fc1.weight": ("h1", None), "fc2.weight": ("h2", "h1"), ...},
        neuron_sets_fn=lambda rnd, proxy, fit_res: my_sets[proxy.cid],  # {site: indices} or None
        weighted=False)                                  # HeteroFL/FedRolex count averaging

Aggregation: weights = ``num_examples`` (as Flower's FedAvg) unless ``weighted=False``; the
clients' arrays become torch tensors (zero-copy where possible) and
:func:`fedrac_kernels.interop.aggregate_state_dicts` computes the masked mean in one pass
(``device=`` puts it on a GPU). With no ``neuron_sets_fn`` every client holds everything and the
result is FedAvg's weighted mean (float32 arithmetic). With one, clients may send full-size or
sub-model arrays (shapes tell which) and elements no client holds keep the current global value:
the strategy remembers the global parameters it last saw in ``configure_fit`` / produced in
``aggregate_fit`` (or ``initial_parameters``).

Non-floating arrays are taken from the current global parameters (or, before there are any, from
the first client).
"""
from __future__ import annotations

try:
    import flwr
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "fedrac_kernels.flower needs Flower (flwr), which is not installed: pip install fedrac[flower] "
        "(or pip install 'flwr>=1.8')") from exc

from collections import OrderedDict
from logging import WARNING
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from .interop import aggregate_state_dicts

__all__ = ["FedracFedAvg", "FLWR_VERSION", "TESTED_FLWR_VERSIONS"]

FLWR_VERSION = getattr(flwr, "__version__", "unknown")
TESTED_FLWR_VERSIONS = ("1.8.0", "1.41.0")


def _check_flwr_version(version: str) -> None:
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return
    if (major, minor) < (1, 8):
        raise ImportError(f"fedrac_kernels.flower needs flwr>=1.8, found {version}: pip install fedrac[flower]")


_check_flwr_version(FLWR_VERSION)


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of ``a`` when possible (writable, native byte order), else a copy."""
    a = np.asarray(a)
    if not a.flags.writeable or not a.dtype.isnative:
        a = np.array(a, copy=True, order="C")
    try:
        return torch.from_numpy(a)
    except TypeError:  # a dtype torch cannot view (e.g. object, unicode): not aggregated
        raise TypeError(f"results: array of dtype {a.dtype} cannot become a tensor")


class FedracFedAvg(FedAvg):
    """Flower ``FedAvg`` whose ``aggregate_fit`` runs ``fedrac_kernels``' masked aggregation.

    Args (besides every ``FedAvg`` keyword argument, passed through):
        param_names: names of the parameter arrays, in order (keys of ``gates``); default
            ``"0", "1", ...``.
        sites: ``{site: width}``, the maskable neuron groups (with ``neuron_sets_fn``).
        gates: ``{name: (out_site, in_site)}``: which site gates dim 0 / dim 1 of an array.
        neuron_sets_fn: ``f(server_round, client_proxy, fit_res) -> {site: indices} | None``, the
            neurons the client held this round (local order; None = all). Without it every client
            holds everything (FedAvg).
        weighted: weight clients by ``num_examples`` (default, as FedAvg) or equally (HeteroFL,
            FedRolex).
        rule: ``"structural"`` (default) or ``"nonzero"`` (FedRAC's rule; full-size arrays only,
            needs the current global parameters).
        backend: kernel back end (None: automatic).
        device: where to aggregate (e.g. ``"cuda"``); default CPU.
        nonfinite: ``"raise"`` / ``"drop"`` / ``"assume_finite"`` (see ``masked_mean_update_``);
            with ``"drop"`` the dropped clients' indices go to the metrics as
            ``"fedrac_dropped_clients"`` (a comma-separated string).
    """

    def __init__(self, *, param_names: Optional[Sequence[str]] = None, sites=None,
                 gates: Optional[Mapping[str, tuple]] = None,
                 neuron_sets_fn: Optional[Callable] = None, weighted: bool = True, rule: str = "structural",
                 backend: Optional[str] = None, device=None, nonfinite: str = "raise", **kwargs) -> None:
        super().__init__(**kwargs)
        if neuron_sets_fn is not None and (gates is None or sites is None):
            raise ValueError("neuron_sets_fn: needs gates= and sites= to know which arrays the neurons gate")
        if neuron_sets_fn is not None and not callable(neuron_sets_fn):
            raise TypeError(f"neuron_sets_fn: expected a callable, got {type(neuron_sets_fn).__name__}")
        self.param_names = list(param_names) if param_names is not None else None
        self.sites = sites
        self.gates = dict(gates) if gates is not None else None
        self.neuron_sets_fn = neuron_sets_fn
        self.weighted = bool(weighted)
        self.rule = rule
        self.backend = backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.nonfinite = nonfinite
        self._current: Optional[list] = None
        init = kwargs.get("initial_parameters")
        if init is not None:
            self._current = parameters_to_ndarrays(init)

    def __repr__(self) -> str:
        return f"FedracFedAvg(accept_failures={self.accept_failures}, weighted={self.weighted}, rule={self.rule!r})"

    # Remember the global parameters the server sends out: elements no client holds keep them.
    def configure_fit(self, server_round, parameters, client_manager):
        if parameters is not None:
            self._current = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def _names(self, n: int) -> list:
        if self.param_names is None:
            return [str(i) for i in range(n)]
        if len(self.param_names) != n:
            raise ValueError(f"param_names: {len(self.param_names)} names, but the parameters have {n} arrays")
        return self.param_names

    def aggregate_fit(self, server_round, results, failures):
        """Aggregate fit results with the fused masked mean (weights = num_examples)."""
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}

        client_arrays = [parameters_to_ndarrays(fit_res.parameters) for _, fit_res in results]
        n_arrays = len(client_arrays[0])
        for k, arrs in enumerate(client_arrays):
            if len(arrs) != n_arrays:
                raise ValueError(f"results[{k}]: {len(arrs)} arrays, but results[0] has {n_arrays}")
        names = self._names(n_arrays)
        sets = None
        if self.neuron_sets_fn is not None:
            sets = [self.neuron_sets_fn(server_round, proxy, fit_res) for proxy, fit_res in results]
        if self._current is not None:
            template = self._current
            if len(template) != n_arrays:
                raise ValueError(f"results: clients sent {n_arrays} arrays, the global model has {len(template)}")
        elif sets is None and self.rule == "structural":
            template = client_arrays[0]  # every element is covered: only shapes / dtypes are used
        else:
            raise RuntimeError("FedracFedAvg: submodel aggregation needs the current global parameters; "
                               "pass initial_parameters= or let the server call configure_fit first")

        global_state = OrderedDict((nm, _to_tensor(a).to(self.device)) for nm, a in zip(names, template))
        client_states = []
        for arrs in client_arrays:
            st = OrderedDict()
            for nm, a, g in zip(names, arrs, template):
                if np.issubdtype(np.asarray(g).dtype, np.floating):
                    st[nm] = _to_tensor(a)
            client_states.append(st)
        weights = [fit_res.num_examples for _, fit_res in results] if self.weighted else None
        report: dict = {}
        new_state = aggregate_state_dicts(global_state, client_states, neuron_sets=sets, gates=self.gates,
                                          sites=self.sites, weights=weights, rule=self.rule, backend=self.backend,
                                          nonfinite=self.nonfinite, report=report)
        aggregated = [new_state[nm].detach().cpu().numpy() for nm in names]
        self._current = aggregated
        parameters_aggregated = ndarrays_to_parameters(aggregated)

        metrics_aggregated = {}
        if self.fit_metrics_aggregation_fn:
            fit_metrics = [(res.num_examples, res.metrics) for _, res in results]
            metrics_aggregated = self.fit_metrics_aggregation_fn(fit_metrics)
        elif server_round == 1:
            try:
                from flwr.common.logger import log

                log(WARNING, "No fit_metrics_aggregation_fn provided")
            except ImportError:  # pragma: no cover
                pass
        if report.get("dropped_clients"):
            metrics_aggregated = dict(metrics_aggregated)
            metrics_aggregated["fedrac_dropped_clients"] = ",".join(str(i) for i in report["dropped_clients"])
        return parameters_aggregated, metrics_aggregated
