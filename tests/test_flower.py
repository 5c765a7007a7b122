"""fedrac_kernels.flower.FedracFedAvg against Flower's own FedAvg (legacy strategy API).

Skipped without Flower (``pip install fedrac[flower]``). Tested with flwr 1.41.0 and 1.8.0.
"""
import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402

from fedrac_kernels import interop as fki  # noqa: E402
from fedrac_kernels.flower import FedracFedAvg  # noqa: E402

SHAPES = [(16, 12), (16,), (8, 16, 3, 3), (8,), (5, 8), (5,)]
NAMES = ["fc1.weight", "fc1.bias", "conv.weight", "conv.bias", "fc3.weight", "fc3.bias"]
SITES = {"h1": 16, "h2": 8}
GATES = {"fc1.weight": ("h1", None), "fc1.bias": ("h1", None), "conv.weight": ("h2", "h1"),
         "conv.bias": ("h2", None), "fc3.weight": (None, "h2")}


class Proxy:
    """Stands in for a ClientProxy: aggregate_fit only passes it through."""

    def __init__(self, cid):
        self.cid = cid


def fit_res(arrays, n, metrics=None):
    return FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(arrays),
                  num_examples=n, metrics=metrics or {})


def random_results(rng, K, dtype=np.float32, shapes=SHAPES):
    return [(Proxy(str(k)), fit_res([rng.standard_normal(s).astype(dtype) for s in shapes], int(rng.integers(1, 500))))
            for k in range(K)]


@pytest.mark.parametrize("K", [1, 3, 10])
@pytest.mark.parametrize("inplace", [True, False])
def test_dense_equals_flower_fedavg(K, inplace):
    rng = np.random.default_rng(K)
    results = random_results(rng, K)
    theirs, _ = FedAvg(inplace=inplace).aggregate_fit(1, results, [])
    ours, _ = FedracFedAvg().aggregate_fit(1, results, [])
    a, b = parameters_to_ndarrays(theirs), parameters_to_ndarrays(ours)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)
    # the weighting really is num_examples: equal weights would differ
    if K > 1:
        ns = [r.num_examples for _, r in results]
        arrs = [parameters_to_ndarrays(r.parameters) for _, r in results]
        want = sum(n * p[0].astype(np.float64) for n, p in zip(ns, arrs)) / sum(ns)
        np.testing.assert_allclose(b[0], want, rtol=1e-5, atol=1e-6)
        unweighted, _ = FedracFedAvg(weighted=False).aggregate_fit(1, results, [])
        np.testing.assert_allclose(parameters_to_ndarrays(unweighted)[0], np.mean([p[0] for p in arrs], 0),
                                   rtol=1e-5, atol=1e-6)


def test_float64_arrays_and_metrics():
    rng = np.random.default_rng(7)
    results = random_results(rng, 4, dtype=np.float64)
    for _, r in results:
        r.metrics["acc"] = float(rng.random())
    agg = lambda ms: {"acc": sum(n * m["acc"] for n, m in ms) / sum(n for n, _ in ms)}  # noqa: E731
    theirs, m1 = FedAvg(fit_metrics_aggregation_fn=agg).aggregate_fit(2, results, [])
    ours, m2 = FedracFedAvg(fit_metrics_aggregation_fn=agg).aggregate_fit(2, results, [])
    assert m1 == m2
    for x, y in zip(parameters_to_ndarrays(theirs), parameters_to_ndarrays(ours)):
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)   # float32 arithmetic inside


def test_no_results_and_failures_follow_fedavg():
    rng = np.random.default_rng(0)
    results = random_results(rng, 2)
    assert FedracFedAvg().aggregate_fit(1, [], []) == (None, {})
    assert FedracFedAvg(accept_failures=False).aggregate_fit(1, results, [RuntimeError("x")]) == (None, {})
    params, _ = FedracFedAvg(accept_failures=True).aggregate_fit(1, results, [RuntimeError("x")])
    assert params is not None


def test_non_float_arrays_come_from_the_global_model():
    rng = np.random.default_rng(3)
    shapes = [(4, 3), (4,)]
    init = [np.zeros((4, 3), np.float32), np.zeros(4, np.float32), np.array([5], np.int64)]
    results = [(Proxy(str(k)), fit_res([rng.standard_normal(s).astype(np.float32) for s in shapes]
                                       + [np.array([100 + k], np.int64)], 10)) for k in range(3)]
    ours, _ = FedracFedAvg(initial_parameters=ndarrays_to_parameters(init)).aggregate_fit(1, results, [])
    out = parameters_to_ndarrays(ours)
    assert out[2].dtype == np.int64 and out[2].tolist() == [5]
    ours, _ = FedracFedAvg().aggregate_fit(1, results, [])       # no global yet: the first client's
    assert parameters_to_ndarrays(ours)[2].tolist() == [100]


class _NoClients:
    """A client manager with no clients (configure_fit then samples nobody)."""

    def num_available(self):
        return 0

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return []


def test_submodel_hook_heterofl_and_fedrolex():
    rng = np.random.default_rng(11)
    gen = torch.Generator().manual_seed(11)
    global_sd = {n: torch.randn(s, generator=gen) for n, s in zip(NAMES, SHAPES)}
    rates = [1.0, 0.5, 0.25, 0.5, 0.125, 0.25]
    for rnd in (1, 6):
        sets = fki.fedrolex_neuron_sets(SITES, rates, round=rnd)
        subs = [fki.slice_state_dict(global_sd, s, GATES) for s in sets]
        subs = [{k: v + torch.randn(v.shape, generator=gen) for k, v in st.items()} for st in subs]
        ns = [int(n) for n in rng.integers(1, 100, len(rates))]
        results = [(Proxy(str(k)), fit_res([subs[k][n].numpy() for n in NAMES], ns[k])) for k in range(len(rates))]
        by_cid = {str(k): s for k, s in enumerate(sets)}
        strat = FedracFedAvg(param_names=NAMES, sites=SITES, gates=GATES, weighted=False,
                             neuron_sets_fn=lambda r, proxy, res: by_cid[proxy.cid])
        # the server hands the current global model to configure_fit; the strategy keeps it
        strat.configure_fit(rnd, ndarrays_to_parameters([global_sd[n].numpy() for n in NAMES]), _NoClients())
        params, _ = strat.aggregate_fit(rnd, results, [])
        got = parameters_to_ndarrays(params)
        want = fki.aggregate_state_dicts(global_sd, subs, neuron_sets=sets, gates=GATES, sites=SITES)
        for n, arr in zip(NAMES, got):
            np.testing.assert_array_equal(arr, want[n].numpy())
        # HeteroFL's rule written out for one gated tensor: sum of scattered slices / count of holders
        num = np.zeros((8, 16, 3, 3))
        cnt = np.zeros((8, 16, 3, 3))
        for k, s in enumerate(sets):
            r, c = s["h2"].numpy(), s["h1"].numpy()
            num[np.ix_(r, c)] += subs[k]["conv.weight"].numpy()
            cnt[np.ix_(r, c)] += 1
        ref = np.where(cnt > 0, num / np.maximum(cnt, 1), global_sd["conv.weight"].numpy())
        np.testing.assert_allclose(got[2], ref, rtol=1e-6, atol=1e-6)


def test_submodel_hook_needs_the_global_model():
    rng = np.random.default_rng(1)
    results = random_results(rng, 2)
    strat = FedracFedAvg(param_names=NAMES, sites=SITES, gates=GATES, neuron_sets_fn=lambda r, p, f: None)
    with pytest.raises(RuntimeError, match="global parameters"):
        strat.aggregate_fit(1, results, [])
    with pytest.raises(ValueError, match="neuron_sets_fn"):
        FedracFedAvg(neuron_sets_fn=lambda r, p, f: None)


def test_is_a_flower_fedavg():
    s = FedracFedAvg(min_fit_clients=3, fraction_fit=0.5)
    assert isinstance(s, FedAvg)
    assert s.min_fit_clients == 3 and s.fraction_fit == 0.5
