"""`fedrac compare` / `fedrac reproduce`: tables over seeds, shared standalone accuracies, resume,
one-line errors; the paper's numbers as data."""
import argparse
import csv
import json
from pathlib import Path

import pytest

from conftest import one_line_error
from fedrac import paper
from fedrac.compare import (Study, add_subcommands, cell, distinct_methods, main, mean_std, parse_seeds,
                            reproduce_report)

METHODS = "fedrac,fedsac"


def log(out: Path):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def compare(out, *extra, seeds="0,1", rounds="2"):
    return main(["compare", "--methods", METHODS, "--seeds", seeds, "--rounds", rounds, "--out", str(out),
                 "--set", "standalone_epochs=2", "--quiet", *extra])


# ------------------------------------------------------------------------------------------ pure

def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5") == [3, 4, 5]
    assert parse_seeds(" 7 ") == [7]
    for bad in ("a", "1,1", "", "-1", "5-3"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_mean_std_and_cells():
    st = mean_std([1.0, 0.9, 1.0])
    assert st["mean"] == pytest.approx(0.9666667) and st["std"] == pytest.approx(0.0577350)   # ddof = 1
    assert cell(st, 2) == "0.97 ± 0.06"                       # Table 3's "0.97 ± 0.06" = {1.0, 0.9, 1.0}
    one = mean_std([0.5])
    assert one["std"] is None and cell(one, 2) == "0.50"       # one seed: no ±
    assert mean_std([None, float("nan")])["n"] == 0 and cell(mean_std([]), 2) == "n/a"


def test_registered_duplicates_run_once():
    kept, dropped = distinct_methods(["fedrac", "fedrac_no_rolling", "fedrac_wo_allocation", "fedsac"])
    assert kept == ["fedrac", "fedrac_wo_allocation", "fedsac"]
    assert dropped == {"fedrac_no_rolling": "fedrac_wo_allocation"}
    kept, _ = distinct_methods(["fedpw", "fedpw_plain"])           # different rewards: both kept
    assert kept == ["fedpw", "fedpw_plain"]


def test_paper_numbers():
    assert paper.lookup("fairness", "fedrac", "cifar10", "pow") == (99.41, 0.2)
    assert paper.lookup("max_accuracy", "standalone", "svhn", "cla") == (58.95, 0.2)
    assert paper.lookup("rate", "fedavg", "emnist", "dir:7.0") == (0.13, 0.06)
    assert paper.lookup("fairness", "fedavg", "cifar10", "pow") == (-44.82, 24.6)
    assert paper.lookup("max_accuracy", "fedrac_wo_allocation", "cifar10", "dir:7.0") == (52.03, None)
    assert paper.lookup("fairness", "fedrac", "digits", "pow") is None
    assert len(paper.TABLES) == 12 * (7 + 8 + 7) and len(paper.ABLATIONS) == 2 * 3 * 3 * 4
    # Tables 4-9 repeat FedRAC's means of Tables 1-3
    for (metric, method, d, p), (v, _) in paper.ABLATIONS.items():
        if method == "fedrac":
            assert paper.TABLES[(metric, "fedrac", d, p)][0] == pytest.approx(v, abs=0.006)


def test_reproduce_report_puts_paper_next_to_ours():
    st = Study(out=Path("x"), dataset="cifar10", partition="pow", seeds=[0, 1], methods=["fedrac"])
    res = {"methods": {"fedrac": {"display": "FedRAC", "reconstructed": False, "seeds": {},
                                  "stats": {"fairness": mean_std([99.0, 99.2]), "max_accuracy": mean_std([48.0]),
                                            "rate": mean_std([1.0, 1.0])}}},
           "standalone_row": mean_std([40.0, 41.0])}
    rep = reproduce_report([(st, res)])
    rows = {(r["table"], r["method"]): r for r in rep["rows"]}
    assert rows[("fairness", "fedrac")]["diff"] == pytest.approx(99.1 - 99.41)
    assert rows[("max_accuracy", "standalone")]["paper_mean"] == 40.85
    assert "99.10 ± 0.14 / 99.41 ± 0.20 / Δ -0.31" in rep["markdown"]
    assert "C10 POW" in rep["markdown"]
    assert list(csv.reader(rep["csv"].splitlines()))[0][:5] == ["table", "method", "dataset", "partition", "ours_mean"]


def test_add_subcommands_hooks_into_a_parser():
    p = argparse.ArgumentParser(prog="fedrac")
    sub = p.add_subparsers(dest="command")
    add_subcommands(sub)
    a = p.parse_args(["compare", "--methods", "fedrac", "--seeds", "0"])
    assert a.command == "compare" and callable(a.handler) and a.dataset == "digits"
    b = p.parse_args(["reproduce", "--datasets", "svhn"])
    assert b.command == "reproduce" and b.partitions == "pow,cla,dir:3.0,dir:7.0"


# ------------------------------------------------------------------------------------- compare

def test_compare_tables_resume_and_no_rerun(tmp, capsys):
    out = tmp / "cmp"
    assert compare(out) == 0
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "Table 2" in printed and "Table 3" in printed and "±" in printed
    for name in ("tables.md", "tables.csv", "results.json", "rewards_vs_contribution.png", "compare.json",
                 "standalone/seed0.json", "standalone/seed1.json"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    assert [e["action"] for e in log(out)] == ["ran"] * 4
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"fedrac", "fedsac"}
    assert res["methods"]["fedsac"]["reconstructed"] is True and res["methods"]["fedrac"]["reconstructed"] is False
    for m in ("fedrac", "fedsac"):
        st = res["methods"][m]["stats"]
        assert st["fairness"]["n"] == 2 and st["max_accuracy"]["n"] == 2 and st["rate"]["n"] == 2
    # the same standalone accuracies for every method of a seed, computed once
    for s in ("0", "1"):
        shared = json.loads((out / "standalone" / f"seed{s}.json").read_text())["standalone_acc"]
        for m in ("fedrac", "fedsac"):
            assert res["methods"][m]["seeds"][s]["standalone_accuracy"] == shared
    assert res["standalone"]["0"] != res["standalone"]["1"]            # the seed varies the partition
    rows = list(csv.DictReader((out / "tables.csv").read_text().splitlines()))
    assert {r["table"] for r in rows} >= {"fairness", "max_accuracy", "rate"}
    md = (out / "tables.md").read_text()
    assert "FedSAC †" in md and "Standalone (max s)" in md
    summaries = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/summary.json")}
    assert len(summaries) == 4
    first = json.loads((out / "runs/fedsac/seed1/summary.json").read_text())

    # again: nothing runs
    assert compare(out) == 0
    capsys.readouterr()
    assert [e["action"] for e in log(out)][4:] == ["skipped"] * 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/summary.json")} == summaries

    # a half-finished run: stopped after round 1 (stop_after is not pinned), then resumed from its checkpoint
    import shutil

    shutil.rmtree(out / "runs/fedsac/seed1")
    assert compare(out, "--set", "stop_after=1") == 0
    capsys.readouterr()
    acts = log(out)[8:]
    assert [(e["method"], e["seed"], e["action"]) for e in acts] == [
        ("fedrac", 0, "skipped"), ("fedsac", 0, "skipped"), ("fedrac", 1, "skipped"), ("fedsac", 1, "ran")]
    assert acts[-1]["complete"] is False and acts[-1]["rounds"] == 1
    assert compare(out) == 0
    capsys.readouterr()
    acts = log(out)[12:]
    assert [e["action"] for e in acts] == ["skipped"] * 3 + ["resumed"]
    assert acts[-1]["detail"] == "resumed after round 1" and acts[-1]["complete"] is True
    again = json.loads((out / "runs/fedsac/seed1/summary.json").read_text())
    assert again["client_accuracy"] == first["client_accuracy"]          # deterministic, resumed bit for bit
    assert len((out / "runs/fedsac/seed1/metrics.jsonl").read_text().splitlines()) == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/fedrac/*/summary.json")} == \
        {p: t for p, t in summaries.items() if "fedrac" in str(p)}


def test_single_seed_shows_no_pm(tmp, capsys):
    out = tmp / "one"
    assert main(["compare", "--methods", "fedrac", "--seeds", "0", "--rounds", "1", "--out", str(out),
                 "--set", "standalone_epochs=2", "-q"]) == 0
    md = (out / "tables.md").read_text()
    assert "±" not in md.split("## Table 1")[1]


@pytest.mark.parametrize("args,words", [
    (["--methods", "fedracc"], ["unknown algorithm", "fedrac"]),
    (["--seeds", "x"], ["--seeds"]),
    (["--dataset", "cifar100"], ["unknown dataset"]),
    (["--partition", "dirr:3"], ["partition"]),
    (["--set", "lrr=0.1"], ["unknown config key 'lrr'"]),
    (["--set", "seed=3"], ["--seeds"]),
    (["--set", "avg_drop_rate=0.2", "--methods", "fedrac"], ["avg_drop_rate", "fedpw"]),
    (["--rounds", "0"], ["--rounds"]),
])
def test_bad_input_one_line_nothing_written(tmp, capsys, args, words):
    out = tmp / "bad"
    code = main(["compare", "--out", str(out), *args])
    _, err = capsys.readouterr()
    one_line_error(code, err, *words)
    assert not out.exists()


def test_out_dir_of_another_comparison(tmp, capsys):
    out = tmp / "cmp"
    assert main(["compare", "--methods", "fedrac", "--seeds", "0", "--rounds", "1", "--out", str(out),
                 "--set", "standalone_epochs=2", "-q"]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in out.iterdir())
    code = main(["compare", "--methods", "fedrac", "--seeds", "0", "--rounds", "3", "--out", str(out)])
    one_line_error(code, capsys.readouterr()[1], "rounds=1")
    assert sorted(p.name for p in out.iterdir()) == before


# ------------------------------------------------------------------------------------ reproduce

def test_reproduce_missing_data_exits_2_with_one_line(tmp, capsys):
    code = main(["reproduce", "--datasets", "svhn", "--partitions", "pow", "--data-dir", str(tmp / "nodata"),
                 "--out", str(tmp / "rep")])
    one_line_error(code, capsys.readouterr()[1], "SVHN", "train_32x32.mat")
    assert not (tmp / "rep").exists()


def test_reproduce_on_a_subset(tmp, capsys):
    out = tmp / "rep"
    code = main(["reproduce", "--datasets", "digits", "--partitions", "pow", "--methods", "fedrac", "--seeds", "0",
                 "--rounds", "1", "--out", str(out), "--set", "standalone_epochs=2", "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ours vs the paper" in printed and "digits POW" in printed
    assert (out / "reproduce.md").exists() and (out / "reproduce.csv").exists()
    assert (out / "digits-pow" / "tables.md").exists()
    cfg = json.loads((out / "digits-pow/runs/fedrac/seed0/config.json").read_text())
    assert cfg["clients"] == 10 and cfg["model"] == "mlp"
