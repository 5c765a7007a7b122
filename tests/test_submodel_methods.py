"""HeteroFL, FedRolex and FjORD as simulator algorithms (fedrac/algorithms/{heterofl,fedrolex,fjord}.py).

Every server step is checked against a dense re-computation of the method's own rule written
here (no kernels, float64): HeteroFL / FedRolex scatter each client's sliced update into the
global shape and divide by the count of holders; FjORD runs its per-width average literally
(widths from large to small, prefix averaged over the clients with p_max >= width, weighted by
example counts).
"""
import json
import math
from pathlib import Path

import pytest
import torch

import fedrac_kernels as fk
from fedrac import runner
from fedrac.algorithms import get, options_of
from fedrac.algorithms._width import WidthPlan, assign_levels, level_counts, sorted_levels
from fedrac.algorithms.fjord import eligible_widths, runs

S10 = [round(0.3 + 0.04 * k, 2) for k in range(10)]
RATES = [1.0, 0.5, 0.25, 0.125, 0.0625]


def finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def prepare(tmp_path, algorithm, *, rounds=3, sets=None, name="run", clients=10):
    s = S10 if clients == 10 else [round(0.3 + 0.05 * k, 2) for k in range(clients)]
    layer = {"algorithm": algorithm, "rounds": str(rounds), "out": str(tmp_path / name), "clients": str(clients),
             "data_dir": str(tmp_path / "data"), "standalone_acc": s, "progress": "false", "plots": "false"}
    return runner.prepare([("test", layer), ("--set", {k: str(v) for k, v in (sets or {}).items()})])


# ----------------------------------------------------------------------------- dense oracles

def ceil_count(p, w):
    return min(w, math.ceil(p * w))


def prefix_sets(sites, rates):
    return [{s: torch.arange(ceil_count(p, w)) for s, w in sites} for p in rates]


def rolled_sets(sites, rates, r):
    """FedRolex, round r (1-based): local position j holds neuron (j - (r - 1)) mod w."""
    return [{s: torch.tensor([(j - (r - 1)) % w for j in range(ceil_count(p, w))]) for s, w in sites}
            for p in rates]


def _param_views(model, flat):
    off, out = 0, {}
    for name, p in model.named_parameters():
        out[name] = flat[off:off + p.numel()].view(p.shape)
        off += p.numel()
    return out


def _index(shape, gate, ns):
    """Index of the client's slice: its rows x its columns (ungated dims whole)."""
    out_site, in_site = gate
    rows = ns[out_site] if out_site else slice(None)
    if len(shape) == 1:
        return (rows,)
    cols = ns[in_site] if in_site else slice(None)
    if out_site and in_site:
        return torch.meshgrid(rows, cols, indexing="ij")
    return (rows, cols)


def scatter_count_oracle(model, old, trained, sets, weights=None):
    """HeteroFL / FedRolex combine: per element, sum of the clients' sliced updates scattered into
    the global shape / (weighted) count of holders; old value where nobody holds it."""
    gates = model.parameter_gates()
    old64 = old.double()
    new = old64.clone()
    g_old, g_new = _param_views(model, old64), _param_views(model, new)
    clients = [_param_views(model, x) for x in trained]
    for name, p in model.named_parameters():
        num = torch.zeros(p.shape, dtype=torch.float64)
        den = torch.zeros(p.shape, dtype=torch.float64)
        for k, x in enumerate(clients):
            idx = _index(p.shape, gates.get(name, (None, None)), sets[k])
            local = x[name].double()[idx] - g_old[name][idx]     # the client's sub-model update (local order)
            wk = 1.0 if weights is None else float(weights[k])
            num[idx] += wk * local
            den[idx] += wk
        held = den > 0
        g_new[name].copy_(torch.where(held, g_old[name] + num / torch.where(held, den, 1.0), g_old[name]))
    return new


def fjord_oracle(model, sites, old, trained, p_max, num_examples):
    """FjORD's per-width average, literally: for each width from large to small, the prefix of
    every tensor is set to the example-weighted mean of the clients with p_max >= width."""
    gates = model.parameter_gates()
    width = dict(sites)
    new = old.double().clone()
    g_new = _param_views(model, new)
    clients = [_param_views(model, x) for x in trained]
    for p in sorted(set(p_max), reverse=True):
        holders = [k for k in range(len(trained)) if p_max[k] >= p]
        ns = {s: torch.arange(ceil_count(p, width[s])) for s in width}
        tot = float(sum(num_examples[k] for k in holders))
        for name, prm in model.named_parameters():
            idx = _index(prm.shape, gates.get(name, (None, None)), ns)
            acc = sum(float(num_examples[k]) * clients[k][name].double()[idx] for k in holders)
            g_new[name][idx] = acc / tot
    return new


def assert_close_to(got, want, atol=2e-6):
    err = float((got.double() - want).abs().max())
    assert err <= atol, f"max abs error {err:g} > {atol:g}"


def run_round_spied(algo, r):
    """One server round; returns (global before, the clients' trained parameters, global after)."""
    trained = {}
    orig = algo.train_client

    def spy(k, alloc, rr):
        out = orig(k, alloc, rr)
        trained[k] = out.clone()
        return out

    algo.train_client = spy
    try:
        old = algo.w.clone()
        extras = algo.round(r)
    finally:
        del algo.train_client
    return old, [trained[k] for k in range(len(trained))], extras


def dense_mask(sites, ns):
    return torch.cat([torch.isin(torch.arange(w), ns[s]) for s, w in sites])


# ------------------------------------------------------------------------- levels, width sets

def test_registered_with_options():
    for name in ("heterofl", "fedrolex", "fjord"):
        opts = options_of(name)
        assert {"rates", "rate_assignment", "rate_proportions", "weighting", "aggregation"} <= set(opts)
        assert opts["rates"].default == RATES
    assert "od_widths" in options_of("fjord") and "od_widths" not in options_of("heterofl")
    assert get("heterofl").default_weighting == "uniform" and get("fedrolex").default_weighting == "uniform"
    assert get("fjord").default_weighting == "size"


def test_level_counts_and_assignment_rules():
    assert level_counts(10, [1] * 5) == [2] * 5
    assert level_counts(7, [1, 1, 1]) == [3, 2, 2]                  # remainder to the larger rate
    assert level_counts(10, [3, 1]) == [8, 2] and sum(level_counts(13, [0.2, 0.5, 0.3])) == 13
    assert sorted_levels([0.25, 1, 0.5], [1, 2, 3]) == ([1.0, 0.5, 0.25], [2.0, 3.0, 1.0])
    props = [1.0] * 5
    assert assign_levels(10, props, "index") == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    sizes = [5, 9, 9, 1, 7, 3, 2, 8, 6, 4]                          # ties: lower index first
    assert assign_levels(10, props, "size", sizes=sizes) == [2, 0, 0, 4, 1, 3, 4, 1, 2, 3]
    s = [0.1 * k for k in range(10)]
    assert assign_levels(10, props, "standalone", standalone=s) == [4, 4, 3, 3, 2, 2, 1, 1, 0, 0]
    g = torch.Generator().manual_seed(5)
    got = assign_levels(10, props, "random", generator=g)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    want = [0] * 10
    for pos, k in enumerate(perm):
        want[k] = pos // 2
    assert got == want
    got = assign_levels(10, [1, 0, 3], "dynamic", generator=torch.Generator().manual_seed(9))
    want = torch.multinomial(torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64), 10, replacement=True,
                             generator=torch.Generator().manual_seed(9)).tolist()
    assert got == want and 1 not in got


@pytest.mark.parametrize("sites", [[("h1", 200), ("h2", 200)], [("m0", 64), ("m1", 64), ("m2", 128), ("m3", 256),
                                                                  ("m4", 512)], [("a", 7), ("b", 10)]])
def test_width_plan_is_nested_and_matches_the_sets(sites):
    levels = RATES + [0.2, 0.75, 0.3]
    plan = WidthPlan(sites, levels)
    offs = torch.cumsum(torch.tensor([0] + [w for _, w in sites]), 0)
    for roll_round in (None, 0, 1, 2, 13, 1000):
        order = plan.order(roll_round)
        assert sorted(order.tolist()) == list(range(plan.N))
        for p in levels:
            if roll_round is None:
                ns = prefix_sets(sites, [p])[0]
            else:
                ns = rolled_sets(sites, [p], roll_round + 1)[0]
            assert plan.size(p) == sum(len(v) for v in ns.values())
            want = dense_mask(sites, ns)
            got = torch.zeros(plan.N, dtype=torch.bool)
            got[order[:plan.size(p)]] = True
            assert torch.equal(got, want)                           # the nested prefix is the width set
            kept = plan.kept([p], roll_round)[0]                    # local order, site by site
            assert torch.equal(kept, torch.cat([ns[s] + int(offs[i]) for i, (s, _) in enumerate(sites)]))


# ------------------------------------------------------------------------ server aggregation

@pytest.mark.parametrize("rates", [None, "0.5,0.25,0.125"])
def test_heterofl_server_step_equals_scatter_count(tmp_path, rates):
    sets = {"rates": rates} if rates else {}
    prep = prepare(tmp_path, "heterofl", sets=sets)
    algo, model = prep.algo, prep.sim.model
    sites = model.mask_sites()
    for r in (1, 2):
        old, trained, extras = run_round_spied(algo, r)
        p_k = extras["rates"]
        levels = sorted((float(x) for x in (rates or "1,0.5,0.25,0.125,0.0625").split(",")), reverse=True)
        assert p_k == [levels[k * len(levels) // 10] for k in range(10)]           # index rule, static
        want = scatter_count_oracle(model, old, trained, prefix_sets(sites, p_k))
        assert_close_to(algo.w, want)
        unheld = want == old.double()
        assert torch.equal(algo.w[unheld], old[unheld])              # nobody holds them: untouched
        if rates:
            assert unheld.sum() > 0.3 * old.numel()
        assert extras["submodel_size"] == [2 * ceil_count(p, 200) for p in p_k]


@pytest.mark.parametrize("rates", [None, "0.5,0.25,0.125"])
def test_fedrolex_server_step_equals_rolled_scatter_count(tmp_path, rates):
    sets = {"rates": rates} if rates else {}
    prep = prepare(tmp_path, "fedrolex", sets=sets)
    algo, model = prep.algo, prep.sim.model
    sites = model.mask_sites()
    for r in (1, 2, 5):
        old, trained, extras = run_round_spied(algo, r)
        assert extras["roll"] == [(r - 1) % w for _, w in sites]
        sets_r = rolled_sets(sites, extras["rates"], r)
        want = scatter_count_oracle(model, old, trained, sets_r)
        assert_close_to(algo.w, want)
        # the reward masks are this round's windows
        rw = algo.rewards()
        for k in range(10):
            m = torch.zeros(prep.sim.N, dtype=torch.bool)
            m[rw.order[:int(rw.sizes[k])]] = True
            assert torch.equal(m, dense_mask(sites, sets_r[k]))


def test_fedrolex_window_advances_with_the_round(tmp_path):
    prep = prepare(tmp_path, "fedrolex")
    algo = prep.algo
    # round 3, rate 1/16 on h1 (w = 200): ceil(12.5) = 13 neurons starting at -(3 - 1) mod 200
    algo.allocate(3)
    assert algo.kept_k[9][:13].tolist() == [198, 199] + list(range(11))
    assert algo.kept_k[9][13:].tolist() == [200 + j for j in [198, 199] + list(range(11))]
    seen = torch.zeros(prep.sim.N, dtype=torch.int64)
    for r in range(1, 201):                                          # one full period of the window
        alloc = algo.allocate(r)
        m = alloc.mask(9)
        seen += m.to(torch.int64)
        if r > 1:
            assert not torch.equal(m, prev)
        prev = m
    assert int(seen.min()) == 13 and int(seen.max()) == 13          # every neuron equally often
    assert torch.equal(algo.allocate(201).mask(9), algo.allocate(1).mask(9))


@pytest.mark.parametrize("rates", [None, "0.75,0.5,0.2"])
def test_fjord_server_step_equals_per_width_average(tmp_path, rates):
    sets = {"local_steps": 3}
    if rates:
        sets["rates"] = rates
    prep = prepare(tmp_path, "fjord", sets=sets)
    algo, model, sim = prep.algo, prep.sim.model, prep.sim
    assert prep.cfg["weighting"] == "size" and prep.cfg["od_widths"] == prep.cfg["rates"]
    for r in (1, 2):
        old, trained, extras = run_round_spied(algo, r)
        want = fjord_oracle(model, model.mask_sites(), old, trained, extras["rates"], sim.client_sizes)
        assert_close_to(algo.w, want)


def test_fjord_sampling_and_training_masks(tmp_path):
    prep = prepare(tmp_path, "fjord", sets={"local_steps": 4, "rate_assignment": "dynamic"})
    algo, sim = prep.algo, prep.sim
    od = prep.cfg["od_widths"]
    calls = []
    orig = sim.local_train

    def spy(k, params, mask=None, *, num_steps=None, lr=None):
        calls.append((k, None if mask is None else int(mask.sum()), num_steps))
        return orig(k, params, mask, num_steps=num_steps, lr=lr)

    sim.local_train = spy
    for r in (1, 2):
        g = torch.Generator()
        g.set_state(sim.generator.get_state())
        levels = torch.multinomial(torch.ones(5, dtype=torch.float64), 10, replacement=True, generator=g).tolist()
        p_max = [RATES[lv] for lv in levels]
        widths = []
        for p in p_max:
            cands = sorted(q for q in od if q <= p)
            widths.append([cands[i] for i in torch.randint(len(cands), (4,), generator=g).tolist()])
        calls.clear()
        extras = algo.round(r)
        assert extras["rates"] == p_max and algo.step_widths == widths
        assert torch.equal(sim.generator.get_state(), g.get_state())
        want = []
        for k in range(10):
            assert all(q <= p_max[k] for q in widths[k]) and eligible_widths(od, p_max[k])[0] == min(od)
            for q, n in runs(widths[k]):
                want.append((k, None if q == 1.0 else 2 * ceil_count(q, 200), n))
        assert calls == want
        assert extras["submodel_size"] == [2 * ceil_count(p, 200) for p in p_max]
    assert runs([0.5, 0.5, 1.0, 0.5]) == [(0.5, 2), (1.0, 1), (0.5, 1)]


def test_compact_equals_dense_structural_and_fedavg(tmp_path):
    """The compact streamed upload gives the same bits as the dense structural mean; at rate 1 for
    everybody HeteroFL is plain FedAvg (same bits as fedavg_plain)."""
    ws = []
    for i, mode in enumerate(("compact", "structural_mean")):
        prep = prepare(tmp_path, "fedrolex", sets={"aggregation": mode, "rates": "1,0.5,0.2"}, name=f"m{i}")
        for r in (1, 2):
            prep.algo.round(r)
        ws.append(prep.algo.w)
    assert torch.equal(ws[0], ws[1])
    a = prepare(tmp_path, "heterofl", sets={"rates": "1"}, name="h")
    b = prepare(tmp_path, "fedavg_plain", name="f")
    for r in (1, 2):
        a.algo.round(r)
        b.algo.round(r)
    assert torch.equal(a.algo.w, b.algo.w)


# --------------------------------------------------------------------------- structure (MLP)

def test_updates_are_zero_outside_the_submodel_mlp(tmp_path):
    prep = prepare(tmp_path, "fedrolex", sets={"local_steps": 3})
    sim, algo = prep.sim, prep.algo
    alloc = algo.allocate(4)
    for k in (3, 9):
        m = alloc.mask(k)
        delta = sim.local_train(k, algo.w, mask=m) - algo.w
        live = sim.layout.expand(m.view(1, -1))[0]
        assert int(torch.count_nonzero(delta[~live])) == 0
        assert int(torch.count_nonzero(delta[live])) > 0.5 * int(live.sum())
        # the compact upload is lossless: scattering it back gives the dense update
        g = torch.zeros_like(delta)
        fk.compact_mean_update_(g, [fk.compact_pack(delta, sim.layout, algo.kept_k[k])], sim.layout,
                                [algo.kept_k[k]])
        assert torch.equal(g[live], delta[live])


def test_check_structure_raises_on_leaks(tmp_path):
    prep = prepare(tmp_path, "heterofl", sets={"check_structure": "true"})
    algo = prep.algo
    orig = algo.train_client
    algo.train_client = lambda k, alloc, r: orig(k, alloc, r) + 1e-3        # an update everywhere
    with pytest.raises(RuntimeError, match="check_structure: client 2"):
        algo.round(1)


# ------------------------------------------------------------------------------ ResNet-18

def test_resnet_fedrolex_round_structure_and_rule(tmp_path):
    """Tiny GroupNorm ResNet-18 run (3 clients): updates exactly zero outside the submodel on the
    gated slices (check_structure), ungated tensors averaged over everyone, rolled windows."""
    prep = prepare(tmp_path, "fedrolex", clients=3, rounds=2,
                   sets={"model": "resnet18", "rates": "0.5,0.25,0.125", "check_structure": "true"})
    algo, model = prep.algo, prep.sim.model
    sites = model.mask_sites()
    old, trained, extras = run_round_spied(algo, 2)                 # roll 1
    assert extras["rates"] == [0.5, 0.25, 0.125]
    sets_r = rolled_sets(sites, extras["rates"], 2)
    want = scatter_count_oracle(model, old, trained, sets_r)
    assert_close_to(algo.w, want)
    # an ungated inner conv: plain mean over the three clients; fc columns outside every window: old
    views_new, views_old = _param_views(model, algo.w), _param_views(model, old)
    inner = "layer1.0.conv1.weight"
    assert not torch.equal(views_new[inner], views_old[inner])
    outside = [j for j in range(512) if j not in set(sets_r[0]["m4"].tolist())]
    assert torch.equal(views_new["fc.weight"][:, outside], views_old["fc.weight"][:, outside])
    rec = runner.round_step(prep, 3)
    assert all(finite(v) for v in rec["client_accuracy"])


# ------------------------------------------------------------------------- whole runs, resume

@pytest.mark.parametrize("algorithm", ["heterofl", "fedrolex", "fjord"])
def test_three_rounds_finite(tmp_path, algorithm):
    out = runner.execute(prepare(tmp_path, algorithm, sets={"check_structure": "true"}))
    s = out.summary
    assert out.complete and s["rounds"] == 3
    assert finite(s["max_accuracy"]) and finite(s["mean_accuracy"]) and finite(s["rate"]) and finite(s["fairness"])
    assert s["client_columns"]["rate"] == [RATES[k // 2] for k in range(10)]
    recs = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    for rec in recs:
        assert all(finite(v) and 0 <= v <= 1 for v in rec["client_accuracy"])
        assert rec["submodel_size"] == [2 * ceil_count(RATES[k // 2], 200) for k in range(10)]
    if algorithm == "fedrolex":
        assert [rec["roll"] for rec in recs] == [[0, 0], [1, 1], [2, 2]]


def test_stop_and_resume_bit_identical(tmp_path):
    sets = {"rate_assignment": "dynamic", "local_steps": 3}
    full = runner.execute(prepare(tmp_path, "fjord", sets=sets, name="full"))
    part = runner.execute(prepare(tmp_path, "fjord", sets={**sets, "stop_after": 2}, name="part"))
    assert not part.complete
    resumed = runner.execute(runner.prepare_resume(part.run_dir, {}))
    assert resumed.complete
    a = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        x.pop("time_s"), y.pop("time_s")
        assert x == y
    assert a[0]["rates"] != a[2]["rates"] or a[0]["mean_step_width"] != a[2]["mean_step_width"]
    ca = torch.load(Path(full.run_dir) / "checkpoint.pt", weights_only=False)["algorithm"]
    cb = torch.load(Path(resumed.run_dir) / "checkpoint.pt", weights_only=False)["algorithm"]
    assert torch.equal(ca["w"], cb["w"]) and torch.equal(ca["freq"], cb["freq"])
    assert ca["rates_k"] == cb["rates_k"]
