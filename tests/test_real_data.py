"""FedRAC on the rebuilt CIFAR-10 of /work/shared/data, reproduction flags (``--preset paper``: every
4.12 quirk at its official behaviour, the authors' Appendix B CIFAR10_POW vectors), MLP, POW, 10 clients,
1 local step, batch 32, lr 0.03, clip 1, one CPU thread. Skipped when the archive is absent.

Reference (data/README.md, the official code on this archive): after 300 rounds best fairness 89.7,
max test accuracy 0.371, still rising. Our full 300-round run on this machine (same flags, seed 0):
best fairness 94.4 (round 299; 92.7 at round 300), max test accuracy 0.363 (round 295), still rising.
Observed shape, which the thresholds below follow (with margins):

* rounds 2 .. ~85: every candidate's validation accuracy lies below the lowest standalone accuracy
  (0.2819), so every non-top client saturates at the largest candidate (392 neurons, official
  off-by-one) and theta takes two values: fairness is exactly +-31.7 (the Pearson correlation of s
  with the indicator of the top client), or undefined (null) in a round where both values coincide;
* from round ~90 the global model passes client 0's standalone accuracy, allocations differentiate
  and fairness jumps to 60-85 (84.4 at round 90; >= 77 in every round 120..150; 82-83 around
  round 200, 88 at 280, 92.7 at 300);
* max test accuracy: 0.214 at round 20, 0.264 at 50, 0.271 at 60, 0.301 at 100, 0.316 at 150,
  0.336 at 200, 0.360 at 300.

Thresholds (rounds = 150, ~1-3.5 min here): |fairness| = 31.7 +- 0.5 (or null, at most 5 times) in
rounds 2..60; fairness >= 70
in at least 80% of rounds 120..150 and best >= 75; max accuracy >= 0.25 at round 60, >= 0.27 by
round 100, >= 0.28 at round 150 and increasing from round 20 to 100 and to 150.
"""
import json
import math
from pathlib import Path

import pytest

from fedrac.cli import main

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / \
    "cifar-10-python.REBUILT-from-jpeg-q75.tar.gz"
ROUNDS = 150

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ARCHIVE.exists(), reason=f"{ARCHIVE} not present")]


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar")
    out = tmp / "run"
    code = main(["run", "--preset", "paper", "--dataset", "cifar10", "--partition", "pow", "--clients", "10",
                 "--set", f"archive={ARCHIVE}", "--no-verify", "--set", "download=false",
                 "--data-dir", str(tmp / "data"), "--rounds", str(ROUNDS), "--set", "threads=1",
                 "--out", str(out), "--quiet", "--set", "plots=false"])
    assert code == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, {r["round"]: r for r in recs}


def test_reproduction_config(paper_run):
    out, _ = paper_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["standalone_acc"][0] == 0.2819 and cfg["standalone_acc"][-1] == 0.4068          # alloc vector
    assert cfg["metrics_standalone_acc"][0] == 0.2784 and cfg["metrics_standalone_acc"][-1] == 0.4030  # logger
    assert (cfg["assign_offset"], cfg["strict_increase"], cfg["ordering"], cfg["reputation"],
            cfg["aggregation"]) == ("paper", True, "frequency", "dynamic", "nonzero_mean")
    assert (cfg["local_steps"], cfg["batch_size"], cfg["lr"], cfg["clip_grad"], cfg["beta"]) == (1, 32, 0.03, 1.0, 80.0)
    assert cfg["phases"] == "100:0.2:8,inf:0.8:8"


def test_early_phase_two_valued_rewards(paper_run):
    _, m = paper_run
    undefined = 0
    for r in range(2, 61):
        f = m[r]["fairness"]
        if f is None:           # both reward values happened to be equal: Pearson undefined (round 54)
            undefined += 1
            continue
        assert abs(abs(f) - 31.7) < 0.5, (r, f)
    assert undefined <= 5


def test_fairness_after_differentiation(paper_run):
    _, m = paper_run
    late = [m[r]["fairness"] for r in range(120, ROUNDS + 1)]
    assert sum(f >= 70 for f in late) >= 0.8 * len(late), late
    assert max(late) >= 75


def test_max_accuracy_rises_toward_030(paper_run):
    out, m = paper_run
    acc = {r: m[r]["max_accuracy"] for r in m}
    assert acc[60] >= 0.25
    assert max(acc[r] for r in range(90, 101)) >= 0.27
    assert acc[ROUNDS] >= 0.28
    assert acc[20] < acc[100] < max(acc[r] for r in range(140, ROUNDS + 1))
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds"] == ROUNDS and math.isfinite(s["best"]["fairness"]["value"])
