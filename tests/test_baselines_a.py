"""Baselines part A (ALGORITHMS.md §5.1-§5.6): CF-FedAvg / plain FedAvg, Standalone, CFFL (official and
lineage), CGSV, FedAVE, IAFL.

* the server steps on tiny hand-checked cases (pure functions, and one round of each method on a
  fake simulation whose local training adds a known update);
* every method runs 3 rounds on the embedded digits data through the real CLI with finite metrics;
* a stopped-and-resumed run is bit-identical to an uninterrupted one (CGSV, IAFL with recovery).
"""
import json
import math

import pytest
import torch

import fedrac_kernels as fk
from fedrac.algorithms import get, options_of
from fedrac.algorithms import cffl as cffl_mod
from fedrac.algorithms import cgsv as cgsv_mod
from fedrac.algorithms import fedave as fedave_mod
from fedrac.algorithms import iafl as iafl_mod
from fedrac.algorithms._personal import layer_segments, unit_scaled, weighted_sum
from fedrac.cli import main
from fedrac.config import Config
from fedrac.io import load_checkpoint
from fedrac.models import MaskedMLP


# ------------------------------------------------------------------------------ a fake simulation

class FakeSim:
    """What the algorithms read from ``sim``, with a tiny real MLP (P = 20, 6 parameter tensors).

    ``local_train(k, p)`` returns ``p + delta[k]`` and records its starting point; ``accuracy``
    returns ``acc_fn(params, split)``."""

    def __init__(self, K=3, seed=0, acc_fn=None, sizes=None, standalone=None):
        with torch.random.fork_rng():
            torch.manual_seed(0)              # the fake model's initialisation only
            self.model = MaskedMLP(3, 2, hidden=2)
        self.layout = fk.NeuronLayout.from_module(self.model)
        self.K, self.N, self.P = K, self.model.num_neurons, self.layout.P
        self.device = torch.device("cpu")
        self.num_classes = 2
        g = torch.Generator().manual_seed(seed)
        self.init_params = torch.randn(self.P, generator=g)
        self.delta = torch.randn(K, self.P, generator=g)
        self.client_sizes = list(sizes or [10 * (k + 1) for k in range(K)])
        self.standalone = torch.tensor(standalone or [0.2 + 0.1 * k for k in range(K)], dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.calls = []
        self.acc_fn = acc_fn or (lambda params, split: 0.5)
        self._data = [(torch.randn(self.client_sizes[k], 3, generator=g),
                       torch.randint(0, 2, (self.client_sizes[k],), generator=g)) for k in range(K)]
        self._val = (torch.randn(300, 3, generator=g), torch.randint(0, 2, (300,), generator=g))

    def local_train(self, k, params, mask=None, *, num_steps=None, lr=None):
        self.calls.append((k, params.detach().clone()))
        return params + self.delta[k]

    def accuracy(self, params, split="test", mask=None):
        return float(self.acc_fn(params, split))

    def client_data(self, k):
        return self._data[k]

    def val_data(self):
        return self._val


def make(name, sim, **over):
    cls = get(name)
    cfg = Config({k: o.default for k, o in options_of(cls).items()})
    cfg.update({"partition": "pow", "rounds": 10, "seed": 0, "standalone_epochs": 1})
    cfg.update(over)
    cfg.update(cls.resolve_options(cfg))
    algo = cls(sim, cfg)
    algo.setup()
    return algo


def bits(t):
    return t.contiguous().view(torch.int32)


# ----------------------------------------------------------------------------------- CF-FedAvg

def test_cf_fedavg_trains_from_own_models_then_three_finetune_calls():
    sim = FakeSim(K=3)
    algo = make("fedavg", sim)
    assert algo.cfg["finetune_calls"] == 3
    algo.round(1)
    K, d, v0 = sim.K, sim.delta, sim.init_params
    # K training calls from the clients' own models (round 1: the initial model) ...
    assert [k for k, _ in sim.calls[:K]] == [0, 1, 2]
    assert all(torch.equal(p, v0) for _, p in sim.calls[:K])
    # ... then 3 consecutive fine-tune calls per client starting from the uniform average
    w = v0 + d.mean(0)
    fin = sim.calls[K:]
    assert [k for k, _ in fin] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for k in range(K):
        starts = [p for kk, p in fin if kk == k]
        for j, p in enumerate(starts):
            assert torch.allclose(p, w + j * d[k], atol=1e-5)
        assert torch.allclose(algo.V[k], w + 3 * d[k], atol=1e-5)
    # rewards are the fine-tuned personal models; round 2 starts from them
    rw = algo.rewards()
    assert all(torch.equal(rw.params[k], algo.V[k]) for k in range(K))
    sim.calls.clear()
    algo.round(2)
    assert all(torch.allclose(p, w + 3 * d[k], atol=1e-5) for k, p in sim.calls[:K])


def test_fedavg_plain_rewards_everybody_with_the_average():
    sim = FakeSim(K=3)
    algo = make("fedavg_plain", sim)
    algo.round(1)
    assert torch.allclose(algo.w, sim.init_params + sim.delta.mean(0), atol=1e-6)
    rw = algo.rewards()
    assert len(rw.params) == 3 and all(p is rw.params[0] for p in rw.params)


def test_cf_fedavg_zero_finetune_is_the_average():
    sim = FakeSim(K=2)
    algo = make("fedavg", sim, finetune_calls=0)
    algo.round(1)
    assert len(sim.calls) == 2
    assert torch.allclose(algo.V[0], sim.init_params + sim.delta.mean(0), atol=1e-6)
    assert torch.equal(algo.V[0], algo.V[1])


# ----------------------------------------------------------------------------------------- CGSV

def test_cgsv_reputation_floor_and_tanh_altruism():
    r0 = torch.zeros(3, dtype=torch.float64)
    phi = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    r = cgsv_mod.reputation_update(r0, phi, 0.95)
    raw = [0.025, 0.001, 0.005]                          # 0.05 * phi, the negative one floored at 1e-3
    assert r.tolist() == pytest.approx([x / sum(raw) for x in raw])
    r2 = cgsv_mod.reputation_update(r, torch.tensor([0.2, 0.3, 0.0], dtype=torch.float64), 0.5)
    raw2 = [0.5 * a + 0.5 * b for a, b in zip(r.tolist(), [0.2, 0.3, 0.0])]
    assert r2.tolist() == pytest.approx([x / sum(raw2) for x in raw2])
    q = cgsv_mod.altruism(r, 2.0)
    t = [math.tanh(2.0 * x) for x in r.tolist()]
    assert q.tolist() == pytest.approx([x / max(t) for x in t])
    assert float(q.max()) == 1.0


def test_cgsv_round_hand_checked():
    sim = FakeSim(K=3)
    algo = make("cgsv", sim)
    assert (algo.cfg["beta"], algo.cfg["reputation_decay"], algo.cfg["gamma"]) == (2.0, 0.95, 0.5)
    V0 = algo.V.clone()
    algo.round(1)
    # normalised updates, data-share weights in the first round
    g = [0.5 * sim.delta[k] / (sim.delta[k].norm() + 1e-7) for k in range(3)]
    n = sim.client_sizes
    u = sum(n[k] / sum(n) * g[k] for k in range(3))
    assert torch.allclose(algo.w, sim.init_params + u, atol=1e-6)
    phi = torch.tensor([float(torch.dot(g[k], u) / (g[k].norm() * u.norm())) for k in range(3)],
                       dtype=torch.float64)
    r = torch.clamp(0.05 * phi, min=1e-3)
    r = r / r.sum()
    assert algo.rep.tolist() == pytest.approx(r.tolist(), rel=1e-5)
    q = torch.tanh(2 * r) / torch.tanh(2 * r).max()
    # rewards: layer-wise top-q of u added to the (restored) personal models
    top = int(torch.argmax(q))
    for k in range(3):
        expect = V0[k].clone()
        for o, m in layer_segments(sim.layout):
            c = min(math.ceil(float(q[k]) * m), m - 1)
            if c == 0:
                continue
            seg = u[o:o + m]
            t = seg.abs().sort(descending=True).values[c - 1]
            expect[o:o + m] += torch.where(seg.abs() >= t, seg, torch.zeros_like(seg))
        assert torch.allclose(algo.V[k], expect, atol=1e-6), k
    # the top client (q = 1) gets everything but the smallest-magnitude entry of every tensor
    gained = algo.V[top] - V0[top]
    for o, m in layer_segments(sim.layout):
        seg = u[o:o + m]
        smallest = int(seg.abs().argmin())
        assert float(gained[o + smallest]) == 0.0
        others = [i for i in range(m) if i != smallest]
        assert torch.allclose(gained[o:o + m][others], seg[others], atol=1e-6)
    # round 2 aggregates with the reputations as weights
    w_before = algo.w.clone()
    rep = algo.rep.clone()
    V1 = algo.V.clone()
    algo.round(2)
    g2 = [0.5 * sim.delta[k] / (sim.delta[k].norm() + 1e-7) for k in range(3)]
    u2 = sum(float(rep[k]) * g2[k] for k in range(3))
    assert torch.allclose(algo.w, w_before + u2, atol=1e-6)
    assert not torch.equal(algo.V, V1)


# ---------------------------------------------------------------------------------------- FedAVE

def test_fedave_kl_and_similarity_weights():
    kl = fedave_mod.kl_divergence(torch.tensor([1.0, 1.0, 5.0], dtype=torch.float64),
                                  torch.tensor([1.0, 3.0], dtype=torch.float64))
    # truncated to 2; p = (.5, .5), q = (.25, .75)
    assert kl == pytest.approx(0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75))
    kappa = fedave_mod.similarity_weights([0.5, 0.25, 1.0])   # 1/KL = 2, 4, 1 -> /7 -> /max
    assert kappa.tolist() == pytest.approx([0.5, 1.0, 0.25])
    assert fedave_mod.similarity_weights([0.0, 1.0]).tolist()[0] == 1.0     # KL floored, finite


def test_fedave_kl_matches_scipy_entropy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    assert fedave_mod.kl_divergence(a, b) == pytest.approx(float(stats.entropy(a[:5].numpy(), b.numpy())))


def test_fedave_score_reputation_and_fractions():
    score = torch.tensor([0.4, 0.1, 0.0], dtype=torch.float64)
    r1 = fedave_mod.reputation_step(torch.zeros(3, dtype=torch.float64), score, 0.95, first=True)
    raw = [0.4, 0.1, 1e-3]
    assert r1.tolist() == pytest.approx([x / sum(raw) for x in raw])
    r2 = fedave_mod.reputation_step(r1, score, 0.95, first=False)
    raw2 = [max(0.95 * a + 0.05 * b, 1e-3) for a, b in zip(r1.tolist(), score.tolist())]
    assert r2.tolist() == pytest.approx([x / sum(raw2) for x in raw2])
    kappa = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    q = fedave_mod.reward_fractions(r2, kappa, 2.0)
    t = [math.tanh(2 * x) for x in r2.tolist()]
    assert q.tolist() == pytest.approx([c * x / max(t) for c, x in zip(kappa.tolist(), t)])


def test_fedave_round_one_only_initialises_the_reputation():
    sim = FakeSim(K=3, acc_fn=lambda p, split: 0.25, sizes=[100, 150, 260])
    algo = make("fedave", sim)
    V0 = algo.V.clone()
    out = algo.round(1)
    assert torch.equal(algo.V, V0)                                  # training discarded in round 1
    kappa = torch.tensor(out["kappa"], dtype=torch.float64)
    assert float(kappa.max()) == pytest.approx(1.0)
    score = 0.25 * kappa * kappa
    r = torch.clamp(score, min=1e-3)
    assert out["reputation"] == pytest.approx((r / r.sum()).tolist())
    # round 2: v_i <- v_i + layer-wise top-q_i of the data-share aggregate of the normalised updates
    out2 = algo.round(2)
    g = unit_scaled(sim.delta, 0.5)
    n = sim.client_sizes
    u = weighted_sum(g, [x / sum(n) for x in n])
    expect = V0.clone()
    fk.layerwise_topq_add_(expect, u, layer_segments(sim.layout), out2["q"], backend="torch")
    assert torch.allclose(algo.V, expect, atol=1e-6)
    q = fedave_mod.reward_fractions(torch.tensor(out2["reputation"], dtype=torch.float64),
                                    torch.tensor(out2["kappa"], dtype=torch.float64), 2.0)
    assert out2["q"] == pytest.approx(q.tolist())


# ------------------------------------------------------------------------------------------ IAFL

def test_iafl_proportions_sizes_and_mixing_rows():
    g = iafl_mod.reward_proportions([0.8, 0.4, 0.16, 0.0], 0.0)
    assert g.tolist() == pytest.approx([1.0, 0.5, 0.2, 0.0])
    assert iafl_mod.reward_proportions([0.8, 0.2], 0.5).tolist() == pytest.approx([1.0, 0.5])   # 0.25 ** 0.5
    sizes = iafl_mod.reward_sizes(g, 4)
    assert sizes == [3, 2, 1, 0]                    # ceil(gamma (n - 1))
    W = iafl_mod.mixing_matrix(sizes, torch.Generator().manual_seed(3))
    for i, k in enumerate(sizes):
        row = W[i]
        nz = row.nonzero().flatten().tolist()
        assert len(nz) == k + 1 and i in nz                       # itself + k_i distinct others
        assert torch.allclose(row[nz], torch.full((k + 1,), 1.0 / (k + 1)))
        assert float(row.sum()) == pytest.approx(1.0)


def test_iafl_round_applies_w_times_updates():
    sim = FakeSim(K=4, standalone=[0.8, 0.4, 0.16, 0.05])
    algo = make("iafl", sim)
    V0 = algo.V.clone()
    w0 = algo.w.clone()
    replay = torch.Generator()
    replay.set_state(sim.generator.get_state())
    out = algo.round(1)
    sizes = out["reward_size"]
    assert sizes == [3, 2, 1, 1]
    W = iafl_mod.mixing_matrix(sizes, replay)
    assert torch.allclose(algo.V, V0 + W @ sim.delta, atol=1e-6)
    assert torch.allclose(algo.w, w0 + W[0] @ sim.delta, atol=1e-6)      # i* = argmax gamma = 0


def test_iafl_recovery_resets_to_the_server_model():
    sim = FakeSim(K=3)
    algo = make("iafl", sim, recovery_prob=1.0)
    algo.V += 1.0
    algo.round(1)
    assert all(torch.equal(p, sim.init_params) for _, p in sim.calls)       # every client reset to w


# ------------------------------------------------------------------------------------------ CFFL

def test_cffl_reputation_update_and_threshold_removal():
    R = torch.ones(3, dtype=torch.bool)
    rho0 = torch.zeros(3, dtype=torch.float64)
    h = cffl_mod.threshold(3, 1 / 3)
    assert h == pytest.approx(1 / 9)
    rho, R1, h1 = cffl_mod.official_reputation_update(rho0, R, [0.5, 0.3, 0.2], alpha=5.0, h=h, coef=1 / 3)
    s = [math.sinh(5 * 0.2 * v) for v in (0.5, 0.3, 0.2)]          # 0.8 * 0 + 0.2 * share
    assert rho.tolist() == pytest.approx([x / sum(s) for x in s])
    assert R1.all() and h1 == h
    # a weak client is removed: its reputation is zeroed, the rest renormalised, h = coef / |R|
    rho, R2, h2 = cffl_mod.official_reputation_update(rho0, R, [0.9, 0.09, 0.01], alpha=5.0, h=h, coef=1 / 3)
    s = [math.sinh(5 * 0.2 * v) for v in (0.9, 0.09, 0.01)]
    norm = [x / sum(s) for x in s]
    assert norm[1] < h and norm[2] < h
    assert R2.tolist() == [True, False, False]
    assert rho.tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert h2 == pytest.approx(1 / 3)
    # history weight 0.8 on the old reputation; removed clients stay out (not re-evaluated)
    rho3, R3, _ = cffl_mod.official_reputation_update(torch.tensor([0.5, 0.3, 0.0], dtype=torch.float64),
                                                      torch.tensor([True, True, False]), [0.6, 0.2, 0.99],
                                                      alpha=5.0, h=1 / 6, coef=1 / 3)
    raw = [0.8 * 0.5 + 0.2 * 0.75, 0.8 * 0.3 + 0.2 * 0.25]
    s = [math.sinh(5 * x) for x in raw]
    assert rho3.tolist() == pytest.approx([s[0] / sum(s), s[1] / sum(s), 0.0])
    assert R3.tolist() == [True, True, False]
    # reputation_fade=false: the mean of old and new
    rho4, _, _ = cffl_mod.official_reputation_update(torch.tensor([0.5, 0.5], dtype=torch.float64),
                                                     torch.ones(2, dtype=torch.bool), [0.5, 0.5],
                                                     alpha=1.0, h=0.1, coef=1 / 3, fade=False)
    assert rho4.tolist() == pytest.approx([0.5, 0.5])


def test_cffl_lineage_reputation():
    rho, R = cffl_mod.lineage_reputation_update(torch.ones(3, dtype=torch.bool), [0.6, 0.3, 0.1], alpha=5.0,
                                                h=1 / 9)
    e = [0.6, 0.3, 0.1]
    raw = [(math.sinh(5 * x) + x) / 2 for x in e]
    norm = [x / sum(raw) for x in raw]
    keep = [x >= 1 / 9 for x in norm]
    kept = [x if k else 0.0 for x, k in zip(norm, keep)]
    assert R.tolist() == keep
    assert rho.tolist() == pytest.approx([x / sum(kept) for x in kept])


def test_cffl_official_round_hand_checked():
    # client 2's upload makes the validation accuracy 0 -> it drops out of R after round 1
    sim = FakeSim(K=3)
    sim.delta *= 1e-3
    sim.delta[2] *= 50.0
    algo = make("cffl", sim, theta=0.5)
    assert algo.cfg["threshold_coef"] == pytest.approx(1 / 3)
    V0, w0 = algo.V.clone(), algo.w.clone()
    segs = layer_segments(sim.layout)
    clip = torch.clamp((V0 + sim.delta) - V0, -1e-3, 1e-3)         # the update as the algorithm sees it
    ups = torch.stack([fk.layerwise_topq(clip[k], segs, [0.5], backend="torch")[0] for k in range(3)])
    evals = {}

    def acc(params, split):
        for k in range(3):
            if torch.allclose(params, w0 + ups[k], atol=0, rtol=0):
                evals[k] = split
                return [0.6, 0.4, 0.0][k]
        raise AssertionError("unexpected evaluation")

    sim.acc_fn = acc
    out = algo.round(1)
    assert evals == {0: "val", 1: "val", 2: "val"}              # w + upload_i on the validation set
    rho, R, h = cffl_mod.official_reputation_update(torch.zeros(3, dtype=torch.float64),
                                                    torch.ones(3, dtype=torch.bool), [0.6, 0.4, 0.0],
                                                    alpha=5.0, h=1 / 9, coef=1 / 3)
    assert R.tolist() == [True, True, False] and out["reputable"] == [1, 1, 0]
    assert out["reputation"] == pytest.approx(rho.tolist())
    assert out["threshold"] == pytest.approx(1 / 6)
    u = ups[0] + ups[1]                                           # aggregate_mode=sum over R
    assert torch.allclose(algo.w, w0 + u, atol=1e-7)
    for k in (0, 1):
        expect = V0[k] + clip[k]
        fk.layerwise_topq_add_([expect], u, segs, [float(rho[k])], backend="torch")
        expect -= ups[k]
        assert torch.allclose(algo.V[k], expect, atol=1e-7), k
    assert torch.allclose(algo.V[2], V0[2] + clip[2], atol=1e-7)    # out of R: own clipped update only


def test_cffl_all_criterion_download_counts():
    sim = FakeSim(K=2, sizes=[10, 20])
    algo = make("cffl", sim, largest_criterion="all", theta=1.0)
    algo.rho = torch.tensor([0.25, 0.75], dtype=torch.float64)
    u = torch.arange(1, sim.P + 1, dtype=torch.float32)
    V0 = algo.V.clone()
    algo._download(u, [0, 1], "all")
    # int(rho_i / max rho * n_i / max n * P): client 0: int(1/3 * 1/2 * 20) = 3, client 1: 20
    assert int((algo.V[0] != V0[0]).sum()) == 3
    assert torch.equal(algo.V[0] - V0[0] != 0, u > sim.P - 3)
    assert torch.allclose(algo.V[1], V0[1] + u)


def test_cffl_lineage_round():
    sim = FakeSim(K=3)
    algo = make("cffl", sim, cffl_variant="lineage")
    V0 = algo.V.clone()
    sim.acc_fn = lambda p, split: 0.5
    out = algo.round(1)
    assert out["reputable"] == [1, 1, 1] and out["threshold"] == pytest.approx(1 / 9)
    rho = torch.tensor(out["reputation"], dtype=torch.float64)
    assert rho.tolist() == pytest.approx([1 / 3] * 3)
    g = unit_scaled(sim.delta, 0.5)
    n = sim.client_sizes
    u = weighted_sum(g, [x / sum(n) for x in n])
    m = [x / max(n) for x in n]
    for k in range(3):
        expect = (V0[k] + sim.delta[k]).clone()
        fk.layerwise_topq_add_([expect], u, layer_segments(sim.layout), [m[k]], backend="torch")
        expect -= m[k] * g[k]
        assert torch.allclose(algo.V[k], expect, atol=1e-6), k


def test_cffl_threshold_coef_auto_for_the_class_split():
    cls = get("cffl")
    cfg = Config({k: o.default for k, o in options_of(cls).items()})
    cfg.update({"partition": "cla"})
    assert cls.resolve_options(cfg)["threshold_coef"] == pytest.approx(1 / 6)


# ------------------------------------------------------------------------------- through the CLI

S4 = "0.30,0.45,0.50,0.62"
COMMON = ["--clients", "4", "--rounds", "3", "--quiet", "--set", "plots=false", "--set", f"standalone_acc={S4}"]
RUNS = {
    "fedavg": [], "fedavg_plain": [], "cgsv": [], "fedave": [], "iafl": [], "cffl": [],
    "cffl_lineage": ["--algorithm", "cffl", "--set", "cffl_variant=lineage"],
    "cffl_all_random": ["--algorithm", "cffl", "--set", "largest_criterion=all", "--set", "cffl_download=random",
                        "--set", "aggregate_mode=mean"],
}


def finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metrics(run):
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("time_s")
        out.append(rec)
    return out


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_method_runs_three_rounds_with_finite_metrics(tmp_path, name):
    extra = RUNS[name] or ["--algorithm", name]
    code = main(["run", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data")] + COMMON + extra)
    assert code == 0
    recs = metrics(tmp_path / "run")
    assert [r["round"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert len(r["client_accuracy"]) == 4 and all(finite(a) and 0 <= a <= 1 for a in r["client_accuracy"])
        for key in ("max_accuracy", "mean_accuracy", "min_accuracy", "rate", "in_bound_fraction"):
            assert finite(r[key]), (key, r)
        if name == "fedavg_plain":
            assert len(set(r["client_accuracy"])) == 1          # one reward model: Pearson undefined
        elif len(set(r["client_accuracy"])) > 1:
            assert finite(r["fairness"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] and summary["rounds"] == 3


def test_standalone_rewards_are_the_standalone_models(tmp_path):
    """theta = s bit for bit: the rewards are the §3.1 models behind the computed accuracies."""
    code = main(["run", "--algorithm", "standalone", "--out", str(tmp_path / "run"), "--data-dir",
                 str(tmp_path / "data"), "--clients", "4", "--rounds", "3", "--quiet", "--set", "plots=false",
                 "--set", "standalone_epochs=2", "--set", "standalone_cache=false"])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for r in metrics(tmp_path / "run"):
        assert r["client_accuracy"] == summary["standalone_accuracy"]
    assert summary["fairness"] == pytest.approx(100.0)


@pytest.mark.parametrize("name,extra", [
    ("cgsv", []),
    ("iafl", ["--set", "recovery_prob=0.5"]),
    ("cffl", ["--set", "largest_criterion=all", "--set", "cffl_download=random"]),
    ("fedave", []),
    ("standalone", ["--set", "standalone_epochs=1"]),
])
def test_stop_and_resume_is_bit_identical(tmp_path, name, extra):
    args = ["--algorithm", name, "--data-dir", str(tmp_path / "data"), "--clients", "4", "--rounds", "4",
            "--quiet", "--set", "plots=false", "--set", f"standalone_acc={S4}"] + extra
    assert main(["run", "--out", str(tmp_path / "full")] + args) == 0
    assert main(["run", "--out", str(tmp_path / "part"), "--set", "stop_after=2"] + args) == 0
    assert len(metrics(tmp_path / "part")) == 2
    assert main(["run", "--resume", str(tmp_path / "part"), "--quiet"]) == 0
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["algorithm"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["algorithm"]
    assert torch.equal(bits(a["V"]), bits(b["V"]))
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
