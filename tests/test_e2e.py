"""End to end on the embedded digits data: every output of a run present and finite; every FedRAC
option and ablation runs."""
import json
import math
from pathlib import Path

import pytest

from fedrac.cli import main

S10 = ",".join(f"{0.3 + 0.04 * k:.2f}" for k in range(10))


def finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "run"
    code = main(["run", "--out", str(out), "--data-dir", str(tmp / "data"), "--rounds", "12", "--quiet",
                 "--set", "standalone_epochs=3"])
    assert code == 0
    return out


def test_all_outputs_present(run_dir):
    for name in ("config.json", "metrics.jsonl", "summary.json", "partition.json", "partition.png",
                 "checkpoint.pt", "plots/accuracy.png", "plots/fairness.png", "plots/rewards.png",
                 "plots/frequency.png"):
        p = run_dir / name
        assert p.exists() and p.stat().st_size > 0, name
    assert not list(run_dir.glob(".*.tmp"))                 # no leftovers of atomic writes


def test_metrics_lines_are_complete_and_finite(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == list(range(1, 13))
    for r in recs:
        assert len(r["client_accuracy"]) == 10 and all(finite(a) and 0 <= a <= 1 for a in r["client_accuracy"])
        for key in ("max_accuracy", "mean_accuracy", "min_accuracy", "rate", "in_bound_fraction", "freq_var",
                    "freq_mean", "time_s"):
            assert finite(r[key]), (key, r)
        assert isinstance(r["violations"], int)
        assert r["min_accuracy"] <= r["mean_accuracy"] <= r["max_accuracy"]
    # round 1 everybody holds the full model (fairness undefined: null), allocation from round 2
    assert recs[0]["submodel_size"] == [400] * 10 and recs[0]["fairness"] is None
    for r in recs[1:]:
        assert finite(r["fairness"]) and finite(r["al"]) and finite(r["a_g"])
        assert len(r["candidate_acc"]) == 50 and max(r["submodel_size"]) == 400


def test_summary_and_config(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    for key in ("fairness", "max_accuracy", "rate", "client_accuracy", "standalone_accuracy", "rounds", "best"):
        assert key in s
    assert s["rounds"] == 12 and s["complete"] and s["state"] == "last"
    assert finite(s["fairness"]) and finite(s["max_accuracy"]) and finite(s["rate"])
    assert all(finite(v) for v in s["client_accuracy"] + s["standalone_accuracy"])
    assert finite(s["best"]["fairness"]["value"]) and 1 <= s["best"]["max_accuracy"]["round"] <= 12
    c = json.loads((run_dir / "config.json").read_text())
    assert c["standalone_acc"] == s["standalone_accuracy"]        # computed once, shared with the metrics
    assert c["rounds"] == 12 and c["algorithm"] == "fedrac" and c["standalone_epochs"] == 3


def test_standalone_accuracies_are_cached(run_dir, capsys):
    data = run_dir.parent / "data"
    cached = list((data / "standalone").glob("digits-K10-*.json"))
    assert len(cached) == 1
    code = main(["run", "--out", str(run_dir.parent / "again"), "--data-dir", str(data), "--rounds", "1",
                 "--set", "standalone_epochs=3", "--set", "progress=false", "--set", "plots=false"])
    assert code == 0
    assert "standalone accuracies: cached" in capsys.readouterr().err
    again = json.loads((run_dir.parent / "again" / "config.json").read_text())
    first = json.loads((run_dir / "config.json").read_text())
    assert again["standalone_acc"] == first["standalone_acc"]


@pytest.mark.parametrize("extra", [
    ["--set", "assign_offset=fixed", "--set", "strict_increase=false"],
    ["--set", "ordering=fixed"],
    ["--set", "ordering=importance"],
    ["--set", "reputation=constant_al"],
    ["--set", "reputation=static"],
    ["--set", "aggregation=structural_mean"],
    ["--set", "allocation_start_round=1", "--clients", "12", "--set", "phases=2:0.5:16,inf:0.9:8"],
    ["--algorithm", "fedrac_no_reputation"],
    ["--algorithm", "fedrac_no_rolling", "--partition", "dir:3.0"],
    ["--partition", "cla", "--set", "local_steps=2"],
    ["--set", "client_metrics=true"],
])
def test_options_and_ablations_run(tmp_path, extra):
    clients = 12 if "12" in extra else 10
    s = ",".join(f"{0.3 + 0.03 * k:.2f}" for k in range(clients))
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--rounds", "4", "--quiet", "--set", f"standalone_acc={s}",
                 "--set", "plots=false"] + extra)
    assert code == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(finite(r["max_accuracy"]) for r in recs)
    cfg = json.loads((out / "config.json").read_text())
    if "--algorithm" in extra:
        want = {"fedrac_no_reputation": ("reputation", "constant_al"),
                "fedrac_no_rolling": ("ordering", "fixed")}[extra[1]]
        assert cfg[want[0]] == want[1]
    if "ordering=fixed" in extra[-1:]:
        assert all(r["submodel_size"] for r in recs)
    if "client_metrics=true" in extra:
        for r in recs:
            assert all(finite(r[k]) for k in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy"))
            assert len(r["client_train_accuracy"]) == len(r["client_valid_accuracy"]) == 10


def test_tensorboard_logs(tmp_path):
    """The scalars read back from the event files are the metrics.jsonl values, one per round, also
    across a stop + resume (the resumed writer purges nothing it should keep and duplicates no step)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    common = ["--quiet", "--tensorboard", "--set", f"standalone_acc={S10}", "--set", "plots=false"]
    assert main(["run", "--out", str(out), "--rounds", "3", "--set", "stop_after=2"] + common) == 0
    assert main(["run", "--resume", str(out), "--quiet", "--tensorboard"]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2, 3]
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    for key in ("max_accuracy", "mean_accuracy", "rate", "fairness", "freq_var"):
        events = ea.Scalars(key)
        got = {e.step: e.value for e in events}
        want = {r["round"]: r[key] for r in recs if r[key] is not None}
        assert len(events) == len(want) and sorted(got) == sorted(want), key
        for step, v in want.items():
            assert got[step] == pytest.approx(v, rel=1e-6, abs=1e-7), (key, step)
    # per-client accuracies: one run per client (add_scalars), the last round's values
    for k in (0, 9):
        sub = EventAccumulator(str(out / "tensorboard" / f"client_accuracy_{k}"))
        sub.Reload()
        (tag,) = sub.Tags()["scalars"]
        vals = {e.step: e.value for e in sub.Scalars(tag)}
        assert sorted(vals) == [1, 2, 3]
        assert vals[3] == pytest.approx(recs[-1]["client_accuracy"][k], rel=1e-6)
