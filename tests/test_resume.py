"""Checkpoint and resume: a run stopped (or killed) after r rounds and resumed ends bit-identical to
an uninterrupted run; the same seed gives the same results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedrac.cli import main
from fedrac.io import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
S10 = ",".join(f"{0.3 + 0.04 * k:.2f}" for k in range(10))
ROUNDS = 14
# a phase switch at round 8 and a checkpoint interval that does not divide the stop round
COMMON = ["--quiet", "--set", f"standalone_acc={S10}", "--set", "phases=8:0.2:8,inf:0.8:8",
          "--set", "plots=false"]


def cli(args, capsys=None):
    code = main(list(args))
    err = capsys.readouterr().err if capsys else ""
    assert code == 0, err
    return code


def metrics(run: Path):
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("time_s")
        out.append(rec)
    return out


def final_state(run: Path):
    ck = load_checkpoint(run / "checkpoint.pt")
    return ck["round"], ck["algorithm"]


def assert_same_state(a, b):
    ra, sa = a
    rb, sb = b
    assert ra == rb
    assert torch.equal(sa["w"], sb["w"])                      # bitwise
    assert torch.equal(sa["freq"], sb["freq"])
    assert torch.equal(sa["alloc"]["order"], sb["alloc"]["order"])
    assert torch.equal(sa["alloc"]["sizes"], sb["alloc"]["sizes"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    run = tmp / "full"
    cli(["run", "--out", str(run), "--rounds", str(ROUNDS), "--set", "checkpoint_every=5"] + COMMON)
    return run


def test_stop_and_resume_is_bit_identical(reference, tmp_path, capsys):
    run = tmp_path / "part"
    cli(["run", "--out", str(run), "--rounds", str(ROUNDS), "--set", "stop_after=6",
         "--set", "checkpoint_every=4"] + COMMON, capsys)
    assert len(metrics(run)) == 6
    assert json.loads((run / "summary.json").read_text())["complete"] is False
    assert final_state(run)[0] == 6
    cli(["run", "--resume", str(run), "--quiet"], capsys)
    assert metrics(run) == metrics(reference)
    assert_same_state(final_state(run), final_state(reference))
    summary = json.loads((run / "summary.json").read_text())
    ref = json.loads((reference / "summary.json").read_text())
    assert summary["complete"] is True and summary["rounds"] == ROUNDS
    for key in ("fairness", "max_accuracy", "client_accuracy", "standalone_accuracy", "best", "rate"):
        assert summary[key] == ref[key]


def test_resume_can_extend_the_round_budget(reference, tmp_path, capsys):
    run = tmp_path / "short"
    cli(["run", "--out", str(run), "--rounds", "9"] + COMMON, capsys)
    cli(["run", "--resume", str(run), "--rounds", str(ROUNDS), "--quiet"], capsys)
    assert metrics(run) == metrics(reference)
    assert_same_state(final_state(run), final_state(reference))


def test_same_seed_same_results_other_seed_differs(reference, tmp_path, capsys):
    again = tmp_path / "again"
    cli(["run", "--out", str(again), "--rounds", str(ROUNDS)] + COMMON, capsys)
    assert metrics(again) == metrics(reference)
    assert_same_state(final_state(again), final_state(reference))
    other = tmp_path / "other"
    cli(["run", "--out", str(other), "--rounds", "3", "--seed", "1", "--partition-seed", "0"] + COMMON, capsys)
    assert metrics(other) != metrics(reference)[:3]


def test_killed_run_resumes_bit_identical(reference, tmp_path, capsys):
    """SIGKILL a real process in the middle of its rounds; the resumed run matches the reference."""
    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "fedrac", "run", "--out", str(run), "--rounds", str(ROUNDS),
                          "--set", "checkpoint_every=1", "--set", "rounds=100000"] + COMMON,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = run / "metrics.jsonl"
            if m.exists() and m.read_text().count("\n") >= 5:
                break
            if p.poll() is not None:
                pytest.fail(f"run ended early: {p.stderr.read().decode()}")
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert not (run / "summary.json").exists()
    done = final_state(run)[0]
    assert done >= 4                  # the 5th line may be logged before its checkpoint
    # finish at the reference's budget: the rounds after the checkpoint are redone identically
    cli(["run", "--resume", str(run), "--rounds", str(max(ROUNDS, done)), "--quiet"], capsys)
    if done <= ROUNDS:
        assert metrics(run) == metrics(reference)
        assert_same_state(final_state(run), final_state(reference))
    else:  # pragma: no cover - the machine ran past the reference budget before the kill
        assert metrics(run)[:ROUNDS] == metrics(reference)


def test_resume_rejects_changed_settings_and_corrupt_files(reference, tmp_path, capsys):
    run = tmp_path / "r"
    cli(["run", "--out", str(run), "--rounds", "4", "--set", "stop_after=2"] + COMMON, capsys)
    assert main(["run", "--resume", str(run), "--set", "lr=0.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot change when resuming" in err and err.count("\n") == 1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1].replace("fairness", "fairnesz") + "\n")
    assert main(["run", "--resume", str(run), "--quiet"]) == 2
    assert "does not match checkpoint" in capsys.readouterr().err
    (run / "checkpoint.pt").write_bytes(b"garbage")
    assert main(["run", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "corrupt" in err and err.count("\n") == 1


def test_torn_metrics_line_after_checkpoint_is_dropped(reference, tmp_path, capsys):
    run = tmp_path / "torn"
    cli(["run", "--out", str(run), "--rounds", str(ROUNDS), "--set", "stop_after=7"] + COMMON, capsys)
    with open(run / "metrics.jsonl", "a") as f:           # a crash while appending round 8
        f.write('{"round": 8, "fairness": 1')
    cli(["run", "--resume", str(run), "--quiet"], capsys)
    assert metrics(run) == metrics(reference)
