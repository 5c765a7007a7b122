"""FedRAC's allocation step (ALGORITHMS.md §4.2-4.7, §4.12) on scripted accuracy curves."""
import math

import pytest
import torch

import fedrac_kernels as fk
from fedrac.algorithms.fedrac import (MLP_PHASES, RESNET_PHASES, al_schedule, allocate_sizes, candidate_sizes,
                                      contributions, phase_at)
from fedrac.config import parse_phases

N, PACK, C = 400, 8, 50


def linear_curve(lo=0.1, hi=0.9, C=C):
    return [lo + j * (hi - lo) / (C - 1) for j in range(C)]


def run(curve, s, chat, *, al=0.0, a_g=None, pack=PACK, n=N, **kw):
    return allocate_sizes(curve, a_g=curve[-1] if a_g is None else a_g, standalone=s, contrib=chat, al=al,
                          pack=pack, N=n, **kw)


def expected_j(curve, tau, lo):
    js = [j for j in range(lo, len(curve)) if curve[j] <= tau]
    return max(js) if js else min(lo, len(curve) - 1)


# ------------------------------------------------------------------------------ al schedule, phases

@pytest.mark.parametrize("phases,r,value", [
    (MLP_PHASES, 2, 0.0439), (MLP_PHASES, 10, 0.0884), (MLP_PHASES, 100, 0.1428), (MLP_PHASES, 101, 0.5718),
    (MLP_PHASES, 500, 0.6410), (MLP_PHASES, 1000, 0.6600), (MLP_PHASES, 2000, 0.6750),
    (RESNET_PHASES, 2, 0.2084), (RESNET_PHASES, 200, 0.7207), (RESNET_PHASES, 1000, 0.7837),
])
def test_al_schedule_matches_spec_table(phases, r, value):
    A, _ = phase_at(parse_phases(phases), r)
    assert al_schedule(r, A) == pytest.approx(value, abs=5e-5)


def test_phases_switch_pack_and_A():
    p = parse_phases(RESNET_PHASES)
    assert phase_at(p, 200) == (0.95, 32)
    assert phase_at(p, 201) == (0.95, 8)
    m = parse_phases(MLP_PHASES)
    assert phase_at(m, 100) == (0.2, 8) and phase_at(m, 101) == (0.8, 8)
    assert phase_at(parse_phases("5:0.1:4,10:0.5:2"), 50) == (0.5, 2)   # beyond the last: last phase


def test_candidate_sizes():
    assert candidate_sizes(400, 8) == [8 * (j + 1) for j in range(50)]
    assert candidate_sizes(1024, 32)[-1] == 1024 and len(candidate_sizes(1024, 32)) == 32
    assert candidate_sizes(20, 8) == [8, 16, 20]          # N not a multiple of pack: last = N


def test_contributions_transform():
    s = [0.2819, 0.3426, 0.3600, 0.3544, 0.3791, 0.3897, 0.3975, 0.4010, 0.4050, 0.4068]
    c = contributions(torch.tensor(s), 80.0)
    assert float(c[-1]) == 100.0
    # ALGORITHMS.md §3.2 example (beta = 80, CIFAR-10 POW code values)
    ref = [0.005, 0.59, 2.37, 1.51, 10.9, 25.5, 47.5, 62.9, 86.6, 100]
    for a, b in zip(c.tolist(), ref):
        assert a == pytest.approx(b, rel=0.03, abs=0.002)


# --------------------------------------------------------------------------------- monotone search

def test_monotone_search_on_linear_curve():
    curve = linear_curve()
    s, chat = [0.2, 0.3, 0.4, 0.5], [1.0, 10.0, 50.0, 100.0]
    sizes, js = run(curve, s, chat, al=0.0)
    a_g = curve[-1]
    prev, exp = 0, []
    for k in range(3):
        tau = s[k] + a_g * chat[k] / 100
        j = expected_j(curve, tau, prev + 1)
        exp.append(j)
        prev = j
    assert js[:3] == exp == [6, 17, 45]
    assert sizes == [8 * 6, 8 * 17, 8 * 45, N]           # paper offset: pack * j*
    assert js[3] is None                                   # top client


def test_threshold_uses_al():
    curve = linear_curve()
    s, chat = [0.2, 0.3, 0.5], [50.0, 80.0, 100.0]
    _, js0 = run(curve, s, chat, al=0.0)
    _, js1 = run(curve, s, chat, al=0.5)
    assert js1[0] < js0[0]                                 # larger al -> smaller reputation bonus
    tau = 0.2 + (1 - 0.5) * curve[-1] * 0.5
    assert js1[0] == expected_j(curve, tau, 1)


def test_prev_forces_one_more_candidate_when_none_qualifies():
    curve = linear_curve()
    # client 1 (higher contribution) has a threshold below every candidate above prev
    s, chat = [0.5, 0.0, 0.9], [1.0, 2.0, 100.0]
    sizes, js = run(curve, s, chat, al=0.0)
    assert js[0] == expected_j(curve, 0.5 + curve[-1] * 0.01, 1)
    assert js[1] == js[0] + 1                              # nothing qualifies: prev + 1
    assert sizes[1] == PACK * (js[0] + 1)


def test_order_is_by_contribution_not_index():
    curve = linear_curve()
    s, chat = [0.4, 0.2, 0.9, 0.3], [50.0, 1.0, 100.0, 10.0]   # rank order: 1, 3, 0, 2
    sizes, js = run(curve, s, chat, al=0.0)
    assert sizes[2] == N and js[2] is None
    assert js[1] < js[3] < js[0]


def test_saturation_at_last_candidate():
    curve = linear_curve(C=5)                      # N = 40, pack 8: C = 5
    K = 8
    s = [0.95] * (K - 1) + [0.99]
    chat = [float(k + 1) for k in range(K)]
    sizes, js = run(curve, s, chat, pack=8, n=40)
    assert js[:K - 1] == [4] * (K - 1)             # everybody saturates at C-1 = 4
    assert sizes[:K - 1] == [32] * (K - 1)         # paper offset: 8 * 4
    assert sizes[-1] == 40


def test_strict_increase_when_nothing_qualifies_then_saturates():
    curve = [0.9] * 5                              # nothing ever qualifies
    K = 7
    s = [0.0] * K
    chat = [float(k + 1) for k in range(K)]
    sizes, js = run(curve, s, chat, pack=8, n=40, a_g=0.0)
    assert js[:K - 1] == [1, 2, 3, 4, 4, 4]
    assert sizes == [8, 16, 24, 32, 32, 32, 40]


def test_off_by_one_flag():
    curve = linear_curve()
    s, chat = [0.2, 0.3, 0.9], [1.0, 10.0, 100.0]
    paper, js = run(curve, s, chat, assign_offset="paper")
    fixed, js2 = run(curve, s, chat, assign_offset="fixed")
    assert js == js2
    for k in range(2):
        assert paper[k] == PACK * js[k]
        assert fixed[k] == PACK * (js[k] + 1)
    # the best non-top client can get at most N - pack with the official offset, N when fixed
    high = [0.99] * 49 + [0.99]
    p, _ = run(high, [1.0, 1.0], [50.0, 100.0], a_g=0.99, assign_offset="paper")
    f, _ = run(high, [1.0, 1.0], [50.0, 100.0], a_g=0.99, assign_offset="fixed")
    assert p[0] == N - PACK and f[0] == N


def test_top_client_gets_full_model_for_any_K():
    for K in (2, 3, 10, 12, 60):
        torch.manual_seed(K)
        s = torch.rand(K).tolist()
        chat = contributions(torch.tensor(s), 10.0).tolist()
        sizes, js = run(linear_curve(), s, chat)
        top = max(range(K), key=lambda k: (chat[k], k))
        assert sizes[top] == N and js[top] is None
        assert sum(j is None for j in js) == 1


def test_ties_in_contribution_are_broken_by_index():
    curve = linear_curve()
    s, chat = [0.3, 0.3, 0.3], [1.0, 1.0, 1.0]
    sizes, js = run(curve, s, chat)
    assert sizes[2] == N                              # last index among equals is the top rank
    assert js[0] < js[1]                              # rank 0 = client 0, rank 1 = client 1


def test_strict_increase_flag_allows_equal_sizes():
    curve = linear_curve()
    s, chat = [0.3, 0.3, 0.3, 0.9], [10.0, 10.0000001, 10.0000002, 100.0]
    strict, js = run(curve, s, chat, strict_increase=True)
    loose, jl = run(curve, s, chat, strict_increase=False)
    assert js[0] < js[1] < js[2]
    assert jl[0] == jl[1] == jl[2] == js[0]           # same threshold -> same candidate
    assert loose[0] == loose[1] == loose[2]


def test_non_monotone_curve_picks_largest_qualifying():
    curve = linear_curve()
    curve[30] = 0.95                                  # one failing spike below a passing candidate
    tau_s = 0.45
    sizes, js = run(curve, [tau_s, 0.9], [0.0, 100.0], a_g=0.9)
    assert js[0] == expected_j(curve, tau_s, 1)
    bumped = list(curve)
    bumped[10] = 0.99                                 # a failing candidate below the pick
    _, jb = run(bumped, [tau_s, 0.9], [0.0, 100.0], a_g=0.9)
    assert jb[0] == js[0]


def test_static_reputation_threshold():
    curve = linear_curve()
    s, chat = [0.8, 0.9], [40.0, 100.0]
    _, js = run(curve, s, chat, reputation="static", a_g=0.9)
    assert js[0] == expected_j(curve, 0.9 * 0.4, 1)   # tau = a_g c/100, s ignored


# --------------------------------------------------------------------- ordering, ties at round 2

def test_lowest_frequency_order_ties_by_index():
    F = torch.zeros(N)
    assert torch.equal(fk.lowest_frequency_order(F), torch.arange(N))
    sizes = torch.tensor([48, 136, 360, 400])
    fk.frequency_update_(F, order=torch.arange(N), sizes=sizes)
    order = fk.lowest_frequency_order(F)
    # after round 2: never-used neurons first (by index), then the ones used once, ...
    assert order[:40].tolist() == list(range(360, 400))
    assert order[40:264].tolist() == list(range(136, 360))
    assert order[-48:].tolist() == list(range(48))


@pytest.fixture(scope="module")
def digits_fedrac(tmp_path_factory):
    from fedrac import runner

    tmp = tmp_path_factory.mktemp("alloc")
    s = ",".join(f"{0.3 + 0.05 * k:.2f}" for k in range(10))
    prep = runner.prepare([("test", {"data_dir": str(tmp / "data"), "out": str(tmp / "run"), "progress": "false",
                                     "standalone_acc": s, "rounds": "3"})])
    return prep


def test_round_two_candidates_tie_order_and_dead_second_layer(digits_fedrac):
    prep = digits_fedrac
    algo, sim = prep.algo, prep.sim
    assert torch.equal(algo.neuron_order(), torch.arange(sim.N))        # F = 0: identity order
    algo.round(1)                                                        # full model, F not counted
    assert float(algo.freq.sum()) == 0.0
    alloc = algo.allocate(2)
    acc = algo.extras["candidate_acc"]
    assert len(acc) == 50 and acc[-1] == algo.extras["a_g"]
    # candidates 0..24 hold only hidden-layer-1 neurons: layer 2 is dead, logits = output bias
    assert len(set(acc[:25])) == 1
    assert torch.equal(alloc.order, torch.arange(sim.N))
    assert int(alloc.sizes[9]) == sim.N                                  # client 9 has the top s
    js = algo.extras["j_star"]
    # strictly increasing over ranks until saturation at C-1 (rank order = client order here)
    assert all(js[k] < js[k + 1] or js[k] == js[k + 1] == 49 for k in range(8))


def test_masked_round_counts_frequency_and_keeps_untouched_neurons(digits_fedrac):
    prep = digits_fedrac
    algo, sim = prep.algo, prep.sim
    algo.setup()
    algo.round(1)
    w_before = algo.w.clone()
    out = algo.round(2)
    sizes = algo.alloc.sizes
    expect = torch.zeros(sim.N)
    fk.frequency_update_(expect, order=algo.alloc.order, sizes=sizes)
    assert torch.equal(algo.freq, expect)
    assert out["freq_var"] == pytest.approx(float(expect.double().var(unbiased=False)))
    assert out["submodel_size"] == sizes.tolist()
    # a neuron nobody but the top client holds is only updated from the top client's delta
    assert not torch.equal(algo.w, w_before)
    assert math.isfinite(float(algo.w.abs().sum()))
