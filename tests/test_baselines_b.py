"""Baselines part B: FedSAC (reconstruction), Aequa-style (reconstruction), FedPW, FedRAC ablations."""
import json
import math
from pathlib import Path

import pytest
import torch

from fedrac import runner
from fedrac.algorithms import get, options_of
from fedrac.algorithms.aequa import allocate_widths, width_grid, width_order, width_size
from fedrac.algorithms.fedpw import WeightState, drop_rates, layer_step
from fedrac.algorithms.fedsac import (explicit_ablation_importance, mlp_ablation_importance,
                                      taylor_importance)
from fedrac.evaluation import evaluate
from fedrac.models import MaskedMLP, flatten_parameters

S10 = [round(0.3 + 0.04 * k, 2) for k in range(10)]


def finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def prepare(tmp_path, algorithm, *, rounds=3, sets=None, name="run"):
    layer = {"algorithm": algorithm, "rounds": str(rounds), "out": str(tmp_path / name),
             "data_dir": str(tmp_path / "data"), "standalone_acc": S10, "progress": "false", "plots": "false"}
    return runner.prepare([("test", layer), ("--set", dict(sets or {}))])


# ---------------------------------------------------------------------------------------- FedSAC

@pytest.fixture
def tiny_mlp():
    torch.manual_seed(3)
    model = MaskedMLP(12, 5, hidden=9)
    params = flatten_parameters(model)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(53, 12, generator=g)
    y = torch.randint(0, 5, (53,), generator=g)
    return model, params, x, y


def test_fedsac_importance_equals_explicit_ablation(tiny_mlp):
    model, params, x, y = tiny_mlp
    fast = mlp_ablation_importance(model, params, x, y, budget=200)       # several row blocks
    brute = explicit_ablation_importance(model, params, x, y, neurons_per_pass=4, rows=20)
    assert fast.shape == (18,) and fast.dtype == torch.float64
    torch.testing.assert_close(fast, brute, rtol=0, atol=1e-6)
    # the definition, literally: one evaluation per ablated neuron
    base = evaluate(model, params, x, y)["loss"]
    for j in (0, 4, 9, 17):
        m = torch.ones(18)
        m[j] = 0
        assert float(fast[j]) == pytest.approx(evaluate(model, params, x, y, mask=m)["loss"] - base, abs=1e-6)


def test_fedsac_taylor_is_first_order_of_the_mask(tiny_mlp):
    model, params, x, y = tiny_mlp
    t = taylor_importance(model, params, x, y)
    eps = 1e-3
    for j in (1, 12):
        m = torch.ones(18)
        m[j] = 1 - eps
        d = (evaluate(model, params, x, y, mask=m)["loss"] - evaluate(model, params, x, y)["loss"]) / eps
        assert float(t[j]) == pytest.approx(abs(d), rel=2e-2, abs=1e-5)


@pytest.fixture
def fedsac_prep(tmp_path):
    prep = prepare(tmp_path, "fedsac")
    return prep


def scripted(prep, curve):
    calls = []

    def nested_accuracy(params, order, sizes, split="val"):
        calls.append((order.clone(), list(sizes), split))
        return torch.tensor(curve, dtype=torch.float64)

    prep.sim.nested_accuracy = nested_accuracy
    return calls


def test_fedsac_allocation_on_a_scripted_curve(fedsac_prep):
    algo = fedsac_prep.algo
    assert algo.cfg["assign_offset"] == "fixed" and algo.pack == 8 and algo.cfg["importance"] == "ablation"
    N, C = 400, 50
    curve = [(j + 1) / C for j in range(C)]                # a_g = 1.0
    calls = scripted(fedsac_prep, curve)
    algo.c_hat = torch.tensor([10.0 * (k + 1) for k in range(10)], dtype=torch.float64)   # tau_k = (k+1)/10
    imp = torch.linspace(0, 1, N, dtype=torch.float64)
    algo.importance_order = lambda r: torch.sort(-imp, stable=True).indices       # descending importance
    assert algo.allocate(1) is None                         # round 1: full model, not counted
    alloc = algo.allocate(2)
    order, sizes, split = calls[-1]
    assert split == "val" and sizes == [8 * (j + 1) for j in range(C)]
    assert order.tolist() == list(range(N - 1, -1, -1))  # most important first
    # client k: largest j with (j+1)/50 <= (k+1)/10 -> j* = 5k + 4 -> 8 (j*+1) = 40 (k+1); top client N
    assert alloc.sizes.tolist() == [40 * (k + 1) for k in range(9)] + [N]
    assert algo.extras["j_star"] == [5 * k + 4 for k in range(9)] + [None]
    assert algo.extras["reconstructed"] is True
    # the official off-by-one as an option: pack * j*
    algo.cfg["assign_offset"] = "paper"
    assert algo.allocate(3).sizes.tolist() == [8 * (5 * k + 4) for k in range(9)] + [N]


def test_fedsac_monotone_search_saturates(fedsac_prep):
    algo = fedsac_prep.algo
    C = 50
    curve = [0.9] * C                                         # nothing passes any threshold
    curve[-1] = 1.0
    scripted(fedsac_prep, curve)
    algo.c_hat = torch.tensor([50.0] * 9 + [100.0], dtype=torch.float64)
    algo.importance_order = lambda r: torch.arange(400)
    alloc = algo.allocate(2)
    # each rank gets one candidate more than the previous (j* = 1, 2, ..., 9): sizes 16, 24, ..., 80
    assert alloc.sizes.tolist() == [8 * (q + 2) for q in range(9)] + [400]


# ----------------------------------------------------------------------------------------- Aequa

def test_aequa_widths_are_nested_prefixes():
    widths = [5, 7, 3]
    order = width_order(widths)
    offs = [0, 5, 12]
    for rho in (0.25, 0.3, 0.5, 0.61, 0.99, 1.0):
        size = width_size(rho, widths)
        kept = set(order[:size].tolist())
        want = {offs[s] + i for s, H in enumerate(widths) for i in range(math.ceil(rho * H - 1e-12))}
        assert kept == want, rho
    assert width_size(0.3, [200, 200]) == 120                # ceil(60) exactly, no float overshoot
    assert width_size(0.25, [200, 200]) == 100
    g = width_grid(0.25, 0.05)
    assert [float(v) for v in g[:3]] == [0.25, 0.3, 0.35] and float(g[-1]) == 1.0 and len(g) == 16


def test_aequa_allocation_formula():
    grid = [0.25, 0.5, 0.75, 1.0]
    acc = [0.2, 0.4, 0.6, 0.8]
    s = [0.1, 0.2, 0.3, 0.5]
    idx, targets = allocate_widths(grid, acc, s)
    # frac = (s - 0.1) / 0.4 = 0, 0.25, 0.5, 1 -> a = 0.2, 0.35, 0.5, 0.8
    assert targets == pytest.approx([0.2, 0.35, 0.5, 0.8])
    assert idx == [0, 1, 2, 3]
    # a non-monotone curve: the smallest width reaching the target
    idx, _ = allocate_widths(grid, [0.5, 0.3, 0.7, 0.6], [0.0, 0.5, 1.0, 0.9])
    # targets: 0.5, 0.55, 0.6 (top -> width 1), 0.59
    assert idx == [0, 2, 3, 2]
    # equal contributions: everybody full width
    assert allocate_widths(grid, acc, [0.3, 0.3, 0.3])[0] == [3, 3, 3]


@pytest.mark.parametrize("mode", ["post_training", "training_time"])
def test_aequa_round_uses_the_curve(tmp_path, mode):
    prep = prepare(tmp_path, "aequa", rounds=2, sets={"allocation": mode})
    out = runner.execute(prep)
    recs = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    assert last["reconstructed"] is True and "reconstruction_note" in recs[0]
    assert len(last["width_acc"]) == 16
    widths = last["widths"]
    assert widths[S10.index(max(S10))] == 1.0
    # higher contribution never gets a narrower width than the target rule allows
    grid = [0.25 + 0.05 * g for g in range(15)] + [1.0]
    idx, _ = allocate_widths(grid, last["width_acc"], S10)
    assert widths == pytest.approx([grid[i] for i in idx])
    assert last["submodel_size"] == [width_size(w, [200, 200]) for w in widths]


# ----------------------------------------------------------------------------------------- FedPW

def test_fedpw_drop_rates_hand():
    r = drop_rates([1.0, 2.0, 3.0, 4.0], 0.3)
    inv = [10.0, 5.0, 10.0 / 3.0, 2.5]
    want = [4 * 0.3 * v / sum(inv) for v in inv]
    assert r.tolist() == pytest.approx(want)
    assert r.tolist() == pytest.approx([0.576, 0.288, 0.192, 0.144])
    assert drop_rates([1.0, 2.0, 3.0, 4.0], 0.9)[0] == 1.0      # capped at 1
    assert torch.isfinite(drop_rates([0.0, 1.0], 0.3)).all()    # [R] zero loss guarded


def test_fedpw_client_weights_hand():
    ws = WeightState(2, beta=0.3)
    G = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = ws.step([1.0, 3.0], G)
    # g = [4, 1], dot = [0.8, 0.2]; lhat = [0.25, 0.75]; round 1: b_l = b_d = beta
    assert out["beta_loss"] == pytest.approx(0.3) and out["beta_dot"] == pytest.approx(0.3)
    assert ws.p.tolist() == pytest.approx([0.25, 0.75]) and ws.pd.tolist() == pytest.approx([0.8, 0.2])
    # lambda = std(p) / (std(p) + std(pd)) = 0.5 / 1.1; f = [121/220, 99/220]
    assert out["lambda"] == pytest.approx(5 / 11)
    assert out["f"].tolist() == pytest.approx([0.55, 0.45])
    # round 2: losses [2, 2] (mean 2 = l0 -> b_l = 0.3), G = ones (g = [2, 2], mean 2 vs g0 = 2.5 -> b_d = 0.24)
    out = ws.step([2.0, 2.0], torch.ones(2, 2, dtype=torch.float64))
    assert out["beta_loss"] == pytest.approx(0.3) and out["beta_dot"] == pytest.approx(0.24)
    dp = [0.7 * 0.075 + 0.3 * 0.5, 0.7 * 0.225 + 0.3 * 0.5]           # [0.2025, 0.3075]
    p = [0.25 + dp[0], 0.75 + dp[1]]
    p = [v / sum(p) for v in p]
    dd = [0.76 * 0.24 + 0.24 * 0.5, 0.76 * 0.06 + 0.24 * 0.5]
    pd = [0.8 + dd[0], 0.2 + dd[1]]
    pd = [v / sum(pd) for v in pd]
    assert ws.p.tolist() == pytest.approx(p) and ws.pd.tolist() == pytest.approx(pd)
    sp, sd = abs(p[0] - p[1]) / math.sqrt(2), abs(pd[0] - pd[1]) / math.sqrt(2)
    lam = sp / (sp + sd)
    assert out["f"].tolist() == pytest.approx([lam * p[i] + (1 - lam) * pd[i] for i in range(2)])


def _layer_step_by_hand(D, f, rates, rho_bar):
    """FedPW step 4 for one layer, written out with Python loops (independent of layer_step)."""
    K, L = len(D), len(D[0])
    masked, dropped_means = [], []
    for i in range(K):
        n = math.floor(L * rates[i])
        order = sorted(range(L), key=lambda c: (abs(D[i][c]), c))
        drop = set(order[:n])
        if n:
            samp = order[:n][::10]
            dropped_means.append(sum(abs(D[i][c]) for c in samp) / len(samp))
        masked.append([0.0 if c in drop else D[i][c] for c in range(L)])
    m_drop = sum(dropped_means) / len(dropped_means)
    rn = [math.sqrt(sum(v * v for v in row)) or 1e-12 for row in masked]
    R = [[v / rn[i] for v in masked[i]] for i in range(K)]
    stds = []
    for c in range(L):
        cn = math.sqrt(sum(R[i][c] ** 2 for i in range(K))) or 1e-12
        col = [R[i][c] / cn for i in range(K)]
        mu = sum(col) / K
        stds.append(math.sqrt(sum((v - mu) ** 2 for v in col) / (K - 1)))
    g0 = [sum(f[i] * masked[i][c] for i in range(K)) for c in range(L)]
    n = math.floor(L * rho_bar)
    idx = sorted(range(L), key=lambda c: (stds[c], c))[:n]
    samp = idx[::10]
    m_res = sum(abs(g0[c]) for c in samp) / len(samp)
    scale = 1.0
    if m_res != 0 and m_drop / m_res < 1:
        scale = 1 + m_drop / m_res
        for c in idx:
            g0[c] *= scale
    return g0, scale, masked


def test_fedpw_layer_step_hand():
    D = [[0.10, -2.00, 0.30, 4.00, -0.05, 1.00, 0.70, -0.20, 3.00, 0.02, 0.5, -1.5],
         [0.40, -1.00, 0.10, 2.00, 0.90, -0.30, 0.60, 0.05, 1.00, -0.80, 0.3, 2.5],
         [1.00, 0.50, -0.40, 0.20, 0.30, 0.25, -0.60, 0.15, 0.45, 0.35, -0.1, 0.8]]
    f = [0.5, 0.3, 0.2]
    rates = [0.25, 0.5, 0.1]                               # drop 3, 6, 1 of 12 entries
    g0, info = layer_step(torch.tensor(D, dtype=torch.float64), torch.tensor(f, dtype=torch.float64),
                          torch.tensor(rates), 0.3)
    want, scale, masked = _layer_step_by_hand(D, f, rates, 0.3)
    assert info["scale"] == pytest.approx(scale) and scale > 1.0        # the rescale step fired
    assert g0.tolist() == pytest.approx(want, abs=1e-12)
    # the three smallest |.| of row 0 are 0.02, -0.05, 0.10
    assert [c for c in range(12) if masked[0][c] == 0.0] == [0, 4, 9]
    # first round: the plain weighted sum
    g_first, _ = layer_step(torch.tensor(D, dtype=torch.float64), torch.tensor(f, dtype=torch.float64), None, 0.3)
    assert g_first.tolist() == pytest.approx([sum(f[i] * D[i][c] for i in range(3)) for c in range(12)])


def test_fedpw_layer_step_guards_zero_rows():
    D = torch.zeros(3, 20)
    D[0, :5] = 1.0
    g0, info = layer_step(D, torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor([0.5, 0.5, 0.5]), 0.3)
    assert torch.isfinite(g0).all()


# -------------------------------------------------------------------------------------- ablations

def test_ablation_options_as_spec_4_14():
    rep = options_of("fedrac_wo_reputation")
    assert rep["reputation"].default == "constant_al" and rep["constant_al"].default == 0.4
    assert "static" in rep["reputation"].choices                 # the alternative reading, by flag
    assert rep["ordering"].default == "frequency"
    alloc = options_of("fedrac_wo_allocation")
    assert alloc["ordering"].default == "fixed" and alloc["reputation"].default == "dynamic"
    base = options_of("fedrac")
    assert base["reputation"].default == "dynamic" and base["ordering"].default == "frequency"
    cfg, _ = runner.load_config([("t", {"algorithm": "fedrac_wo_reputation"})])
    assert cfg["reputation"] == "constant_al" and cfg["constant_al"] == 0.4 and cfg["beta"] == 80.0
    assert get("fedrac_wo_allocation").ablation == "w/o allocation"


def test_ablations_run_their_rule(tmp_path):
    prep = prepare(tmp_path, "fedrac_wo_reputation", rounds=3)
    runner.execute(prep)
    recs = [json.loads(x) for x in (prep.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("al") for r in recs[1:]] == [0.4, 0.4]
    prep = prepare(tmp_path, "fedrac_wo_allocation", rounds=3, name="alloc")
    assert prep.algo.neuron_order().tolist() == list(range(400))
    runner.execute(prep)


# ---------------------------------------------------------------------------- whole runs, resume

@pytest.mark.parametrize("algorithm", ["fedsac", "aequa", "fedpw", "fedpw_plain", "fedrac_wo_reputation",
                                       "fedrac_wo_allocation"])
def test_three_rounds_finite(tmp_path, algorithm):
    prep = prepare(tmp_path, algorithm)
    out = runner.execute(prep)
    s = out.summary
    assert out.complete and s["rounds"] == 3
    assert finite(s["max_accuracy"]) and finite(s["rate"]) and finite(s["mean_accuracy"])
    assert s["fairness"] is None or finite(s["fairness"])
    if algorithm != "fedpw_plain":
        assert finite(s["fairness"])
    assert all(finite(v) for v in s["client_accuracy"])
    for line in (out.run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert all(finite(v) and 0 <= v <= 1 for v in rec["client_accuracy"])


@pytest.mark.parametrize("algorithm", ["fedsac", "aequa", "fedpw"])
def test_stop_and_resume_bit_identical(tmp_path, algorithm):
    full = runner.execute(prepare(tmp_path, algorithm, name="full"))
    part = runner.execute(prepare(tmp_path, algorithm, name="part", sets={"stop_after": 2}))
    assert not part.complete
    resumed = runner.execute(runner.prepare_resume(part.run_dir, {}))
    assert resumed.complete
    a = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(a, b):
        x.pop("time_s"), y.pop("time_s")
        assert x == y
    ca = torch.load(Path(full.run_dir) / "checkpoint.pt", weights_only=False)["algorithm"]["w"]
    cb = torch.load(Path(resumed.run_dir) / "checkpoint.pt", weights_only=False)["algorithm"]["w"]
    assert torch.equal(ca, cb)
