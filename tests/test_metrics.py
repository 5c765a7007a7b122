"""Metrics of spec §3 on tiny vectors computed by hand (values chosen dyadic where a bound is hit
exactly, so float rounding cannot move a client across it)."""
import math

import pytest
import torch

from fedrac.metrics import (accuracy_stats, bcf_rate, contribution_weights, fairness, mean_std,
                            round_metrics, summarise)


def test_contribution_weights_by_hand():
    # beta = 10, s = (0.3, 0.4, 0.5): z = (3, 4, 5) -> 100 * e^(-2, -1, 0)
    c = contribution_weights([0.3, 0.4, 0.5], beta=10)
    assert c.dtype == torch.float64
    assert c.tolist() == pytest.approx([100 * math.exp(-2), 100 * math.exp(-1), 100.0], rel=1e-12)
    # order does not matter, the best client gets exactly 100
    assert contribution_weights([0.5, 0.3], beta=80).tolist() == pytest.approx([100.0, 100 * math.exp(-16)])


def test_contribution_weights_stable_and_spec_example():
    # exp(80 * 20) overflows a float64; the shifted form does not
    c = contribution_weights([10.0, 20.0], beta=80)
    assert c.tolist() == [0.0, 100.0]
    # spec §3.2, CIFAR-10 POW allocation vector, beta = 80
    s = [0.2819, 0.3426, 0.3600, 0.3544, 0.3791, 0.3897, 0.3975, 0.4010, 0.4050, 0.4068]
    expect = [0.005, 0.59, 2.37, 1.51, 10.9, 25.5, 47.5, 62.9, 86.6, 100]
    got = contribution_weights(s, beta=80).tolist()
    for g, e in zip(got, expect):
        assert g == pytest.approx(e, rel=0.06, abs=5e-4)
    with pytest.raises(ValueError, match="s"):
        contribution_weights([0.1, float("nan")], beta=1)


def test_fairness_by_hand():
    assert fairness([1, 2, 3], [2, 4, 6]) == pytest.approx(100.0)
    assert fairness([1, 2, 3], [3, 2, 1]) == pytest.approx(-100.0)
    # ds = (-1, 0, 1), dt = (-1, 1, 0): cov 1, var 2 and 2 -> r = 0.5
    assert fairness([1, 2, 3], [1, 3, 2]) == pytest.approx(50.0)


def test_fairness_constant_vector_is_nan():
    assert math.isnan(fairness([0.3, 0.4, 0.5], [0.6, 0.6, 0.6]))   # identical rewards
    assert math.isnan(fairness([0.4, 0.4], [0.1, 0.2]))
    assert math.isnan(fairness([0.4], [0.5]))
    with pytest.raises(ValueError, match="theta"):
        fairness([0.1, 0.2], [0.1])


def test_bcf_rate_all_inside():
    # max s = 0.5, max theta = 0.625; upper_0 = (0.5 * 0.25 / 0.5 + 0.5) * 0.625 = 0.46875
    # (= theta_0: the upper bound is inclusive), upper_1 = (0.5 + 0.5) * 0.625 = 0.625
    r = bcf_rate([0.25, 0.5], [0.46875, 0.625])
    assert r["upper_bounds"] == [0.46875, 0.625]
    assert r["rate"] == 1.0 and r["in_bound_fraction"] == 1.0 and r["violations"] == 0
    assert r["in_bound"] == [True, True]


def test_bcf_rate_reset_to_minus_ten():
    # s = (0.25, 0.125, 0.5, 0.0625), theta = (0.25, 0.25, 0.5, 0.5); max s = max theta = 0.5
    # k=0: theta <= s (0.25 <= 0.25)             -> rate = -10 (reset), violation
    # k=1: upper = (0.5*0.125/0.5 + 0.5)*0.5 = 0.3125, 0.125 < 0.25 <= 0.3125 -> -9
    # k=2: 0.5 < 0.5 fails and theta <= s        -> reset again: -10, violation
    # k=3: upper = (0.0625 + 0.5)*0.5 = 0.28125 < 0.5 -> above the bound, no change
    r = bcf_rate([0.25, 0.125, 0.5, 0.0625], [0.25, 0.25, 0.5, 0.5])
    assert r["upper_bounds"] == [0.375, 0.3125, 0.5, 0.28125]
    assert r["rate"] == -10 / 4
    assert r["in_bound"] == [False, True, False, False]
    assert r["in_bound_fraction"] == 0.25 and r["violations"] == 2


def test_bcf_rate_later_clients_add_after_reset():
    # s = (0.25, 0.375, 0.5), theta = (0.25, 0.4, 0.625); upper = (s + 0.5) * 0.625
    # k=0: theta <= s -> -10; k=1: 0.375 < 0.4 <= 0.546875 -> -9; k=2: 0.5 < 0.625 <= 0.625 -> -8
    r = bcf_rate([0.25, 0.375, 0.5], [0.25, 0.4, 0.625])
    assert r["upper_bounds"] == [0.46875, 0.546875, 0.625]
    assert r["rate"] == pytest.approx(-8 / 3) and r["violations"] == 1
    assert r["in_bound_fraction"] == pytest.approx(2 / 3)


def test_bcf_rate_identical_rewards_fedavg_signature():
    # every client gets the same theta: only the top client can satisfy its upper bound
    s = [0.25, 0.375, 0.5]
    r = bcf_rate(s, [0.625] * 3)
    # upper = (0.5 * s/0.5 + 0.5) * 0.625: 0.46875, 0.546875, 0.625
    assert r["upper_bounds"] == [0.46875, 0.546875, 0.625]
    assert r["rate"] == pytest.approx(1 / 3) and r["violations"] == 0
    assert r["in_bound"] == [False, False, True]
    with pytest.raises(ValueError, match="s"):
        bcf_rate([0.0, 0.0], [0.1, 0.2])


def test_alpha_changes_the_bound():
    r = bcf_rate([0.25, 0.5], [0.375, 0.5], alpha=0.0)   # upper = s/max(s) * max(theta)
    assert r["upper_bounds"] == [0.25, 0.5]
    assert r["in_bound"] == [False, False] and r["violations"] == 1


def test_accuracy_stats_and_round_metrics():
    assert accuracy_stats([0.25, 0.5, 0.75]) == {"max_acc": 0.75, "mean_acc": 0.5, "min_acc": 0.25}
    rm = round_metrics([0.25, 0.375], [0.375, 0.5])
    assert rm["fairness"] == pytest.approx(100.0) and rm["rate"] == 1.0
    assert set(rm) == {"fairness", "max_acc", "mean_acc", "min_acc", "rate", "in_bound_fraction",
                       "violations"}


def test_summarise_best_and_last():
    hist = [{"round": 1, "fairness": 50.0, "violations": 2, "rate": -3.0},
            {"round": 2, "fairness": float("nan"), "violations": 0, "rate": 0.5},
            {"round": 5, "fairness": 40.0, "violations": 0, "rate": 0.5}]
    s = summarise(hist)
    assert s["fairness"] == {"last": 40.0, "last_round": 5, "best": 50.0, "best_round": 1}
    assert s["violations"] == {"last": 0.0, "last_round": 5, "best": 0.0, "best_round": 2}
    assert s["rate"]["best"] == 0.5 and s["rate"]["best_round"] == 2
    only_nan = summarise([{"fairness": float("nan")}], keys=["fairness"])["fairness"]
    assert math.isnan(only_nan["best"]) and only_nan["best_round"] is None
    assert only_nan["last_round"] == 1
    with pytest.raises(ValueError):
        summarise([])


def test_mean_std_sample_deviation():
    m, s = mean_std([1.0, 1.0, 0.9])                       # spec §1.4: 0.97 +- 0.06
    assert round(m, 2) == 0.97 and round(s, 2) == 0.06
    assert mean_std([2.0, 4.0]) == (3.0, math.sqrt(2.0))
    m1, s1 = mean_std([0.5])
    assert m1 == 0.5 and math.isnan(s1)
