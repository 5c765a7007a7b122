"""Distributed runs on CPU: 2 Gloo processes on the loopback interface (torchrun --standalone, and two
processes started with torchrun's environment), compared with the single-process run; a rank that
fails stops both processes with a clear message and leaves the last checkpoint intact, which
resumes to the same bits as the uninterrupted run."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedrac.cli import main
from fedrac.distributed import shard_range
from fedrac.io import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
S10 = ",".join(f"{0.3 + 0.04 * k:.2f}" for k in range(10))
ROUNDS = 4
COMMON = ["--quiet", "--device", "cpu", "--rounds", str(ROUNDS), "--set", f"standalone_acc={S10}",
          "--set", "plots=false", "--set", "client_batch=3"]
TIMEOUT = 180

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with Gloo")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    env.pop("FEDRAC_FAIL_AT", None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fedrac", "run", "--distributed"] + list(args)
    p = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)
    return p


def two_processes(args, **env):
    """Two ranks started by hand with torchrun's (static rendezvous) environment: per-process exit
    codes and messages."""
    port = str(_free_port())
    procs = []
    for r in (0, 1):
        e = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_PORT=port, **env)
        procs.append(subprocess.Popen([sys.executable, "-m", "fedrac", "run", "--distributed"] + list(args),
                                      cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=TIMEOUT)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def records(run: Path):
    return [{k: v for k, v in json.loads(x).items() if k != "time_s"}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def state(run: Path):
    ck = load_checkpoint(run / "checkpoint.pt")
    return ck["round"], ck["algorithm"], ck["rng"]


def test_shard_range_is_contiguous_balanced_and_complete():
    for K in (0, 1, 2, 10, 17, 1000):
        for W in (1, 2, 3, 7, 16):
            parts = [shard_range(K, W, r) for r in range(W)]
            assert [k for p in parts for k in p] == list(range(K))
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    assert main(["run", "--out", str(run)] + COMMON) == 0
    return run


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The run on 2 processes launched by torchrun."""
    run = tmp_path_factory.mktemp("dist") / "full"
    p = torchrun(["--out", str(run)] + COMMON)
    assert p.returncode == 0, p.stdout + p.stderr
    return run, p


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    """The same configuration with rank 1 failing when round 2 starts (two processes started by hand)."""
    run = tmp_path_factory.mktemp("dist") / "fail"
    return run, two_processes(["--out", str(run)] + COMMON, FEDRAC_FAIL_AT="1:2")


def test_two_processes_match_the_single_process_run(single, full):
    run, p = full
    assert "run directory" in p.stdout and p.stdout.count("run directory") == 1     # rank 0 prints
    # the same metrics as the single process (up to float association of the partial sums)
    a, b = records(run), records(single)
    assert len(a) == len(b) == ROUNDS
    for x, y in zip(a, b):
        assert x["submodel_size"] == y["submodel_size"]
        for key in ("max_accuracy", "mean_accuracy", "min_accuracy"):
            assert abs(x[key] - y[key]) <= 0.01, (key, x[key], y[key])
    ra, sa, ga = state(run)
    rb, sb, gb = state(single)
    assert ra == rb == ROUNDS
    assert float((sa["w"] - sb["w"]).abs().max()) <= 1e-5 * float(sb["w"].abs().max())
    assert torch.equal(sa["freq"], sb["freq"])
    # every client's RNG stream is in the checkpoint, advanced exactly as in the single process
    assert all(torch.equal(x, y) for x, y in zip(ga["clients"], gb["clients"]))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["device"] == "cpu" and cfg["client_batch"] == 3


def test_failing_rank_stops_every_process_and_keeps_the_checkpoint(failed):
    run, out = failed
    (c0, o0, e0), (c1, o1, e1) = out
    assert c0 != 0 and c1 != 0, out
    assert "rank 1 failed in round 2" in e0 and "injected failure" in e0 and "checkpoint of round 1" in e0, e0
    assert "injected failure" in e1 and "[rank 1]" in e1, e1
    assert "Traceback" not in e0 + e1
    assert state(run)[0] == 1 and len(records(run)) == 1
    assert not (run / "summary.json").exists()


def test_resume_after_the_failure_is_bit_identical(failed, full, tmp_path):
    """The intact checkpoint resumes (torchrun) to the same bits as the uninterrupted distributed
    run: the same configuration gives the same results twice."""
    run = tmp_path / "resumed"
    shutil.copytree(failed[0], run)
    p = torchrun(["--resume", str(run), "--quiet"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert records(run) == records(full[0])
    ra, sa, ga = state(run)
    rb, sb, gb = state(full[0])
    assert ra == rb == ROUNDS and torch.equal(sa["w"], sb["w"]) and torch.equal(sa["freq"], sb["freq"])
    assert all(torch.equal(x, y) for x, y in zip(ga["clients"], gb["clients"]))


def test_width_methods_and_aequa_match_the_single_process_run_bit_for_bit(tmp_path):
    """The shared round's hooks on 2 processes: FjORD (compact uploads, dynamic rates; several
    ``local_train`` calls per client - its runs of equal step width - replayed call by call for the
    other rank's clients) and Aequa (slimmable 1-step sub-steps; round 1 full model with the
    post-training allocation, round 2 training-time widths). With 3 clients (ranks hold 0-1 and 2)
    the all-reduce adds the partial sums in the single process's order, so every bit agrees:
    metrics, model, frequency table and every client's RNG stream."""
    for algo, sets in (("fedrac", []),                  # its candidate sweep split across the ranks
                       ("fjord", ["aggregation=compact", "rate_assignment=dynamic"]),
                       ("aequa", ["allocation=training_time", "allocation_start_round=2", "slimmable=true"])):
        args = ["--quiet", "--device", "cpu", "-a", algo, "--clients", "3", "--rounds", "2", "--set",
                "standalone_acc=0.3,0.5,0.7", "--set", "plots=false", "--set", "local_steps=4"]
        for kv in sets:
            args += ["--set", kv]
        one, two = tmp_path / f"{algo}-1", tmp_path / f"{algo}-2"
        assert main(["run", "--out", str(one)] + args) == 0
        p = torchrun(["--out", str(two)] + args)
        assert p.returncode == 0, p.stdout + p.stderr
        assert records(two) == records(one), algo
        ra, sa, ga = state(two)
        rb, sb, gb = state(one)
        assert ra == rb == 2
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in ("w", "freq")), algo
        assert torch.equal(ga["server"], gb["server"])
        assert all(torch.equal(x, y) for x, y in zip(ga["clients"], gb["clients"])), algo


def test_candidate_sweep_is_split_across_the_ranks_exactly(tmp_path):
    """Simulation.nested_accuracy on V (the candidate sweep) and on T (nested reward accuracies) in
    a run of W ranks: each rank counts its 1/W of the rows (whole evaluation blocks) and hands the
    counts to the EVAL step; the summed counts give exactly the one-process accuracies. The other
    ranks join rank 0's reward evaluation through evaluate_rewards(collective_only=True)."""
    from fedrac import runner
    from fedrac.algorithms.base import MaskRewards

    layer = {"algorithm": "fedrac", "rounds": "2", "out": str(tmp_path / "run"), "progress": "false",
             "plots": "false", "standalone_acc": S10, "eval_batch_size": "16"}
    sim = runner.prepare([("test", layer)]).sim
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(sim.P, generator=gen) * 0.1
    order = torch.randperm(sim.N, generator=gen)
    sizes = list(range(8, sim.N + 1, 8))

    class Ranks:                       # W fake ranks: sum_counts collects each rank's share
        def __init__(self, rank, world, shares):
            self.rank, self.world, self.shares = rank, world, shares

        def sum_counts(self, counts):
            self.shares.append(counts.clone())
            return torch.stack(self.shares).sum(0) if len(self.shares) == self.world else counts

    for split, data in (("val", sim.val_data()), ("test", sim.test_data())):
        ref = sim.nested_accuracy(w, order, sizes, split=split)
        n = data[0].shape[0]
        assert n > 3 * 16 and 0 < float(ref.min()) and float(ref.max()) < 1
        for W in (2, 3):
            shares: list = []
            for rank in range(W):
                sim.dist = Ranks(rank, W, shares)
                acc = sim.nested_accuracy(w, order, sizes, split=split)
            sim.dist = None
            assert len(shares) == W and all(0 < int(c.sum()) < int(sum(c.sum() for c in shares)) for c in shares)
            assert torch.equal(acc, ref), (split, W)                 # the last rank saw the full sum
            assert torch.equal(torch.stack(shares).sum(0).double() / n, ref)
    # the reward evaluation: rank 1 mirrors rank 0's nested evaluation (same shapes), nothing else
    rewards = MaskRewards(params=w, order=order, sizes=torch.tensor([8, 400, 8, 64] + [400] * 6))
    theta = sim.evaluate_rewards(rewards)
    shares = []
    sim.dist = Ranks(1, 2, shares)
    assert sim.evaluate_rewards(rewards, collective_only=True) is None
    sim.dist = Ranks(0, 2, shares)
    assert torch.equal(sim.evaluate_rewards(rewards), theta) and len(shares) == 2
    sim.dist = Ranks(0, 2, [])
    assert sim.evaluate_rewards(MaskRewards(params=w), collective_only=True) is None
    assert sim.dist.shares == []                             # full-model rewards: not split
    sim.dist = None


def test_failure_in_the_sharded_sweep_stops_every_process(tmp_path):
    """A rank failing inside its share of round 2's candidate sweep (before the EVAL step) joins
    the pending gate with its flag: both ranks stop with one line, round 1's checkpoint intact."""
    run = tmp_path / "sweep-fail"
    (c0, o0, e0), (c1, o1, e1) = two_processes(["--out", str(run)] + COMMON, FEDRAC_FAIL_AT="1:2:sweep")
    assert c0 != 0 and c1 != 0
    assert "rank 1 failed in round 2" in e0 and "injected failure" in e0 and "checkpoint of round 1" in e0, e0
    assert "Traceback" not in e0 + e1
    assert state(run)[0] == 1 and len(records(run)) == 1


def test_algorithms_with_their_own_round_are_refused_in_one_line():
    from types import SimpleNamespace

    from fedrac import algorithms
    from fedrac.config import ConfigError
    from fedrac.distributed import _check_algorithm, distributed_support, supported_algorithms

    ok = supported_algorithms()
    assert {"fedrac", "fedsac", "heterofl", "fedrolex", "fjord", "aequa"} <= set(ok)
    for name in ("cffl", "cgsv", "fedave", "fedavg", "fedpw", "iafl", "standalone"):
        assert name not in ok and distributed_support(algorithms.get(name)) is not None
    cls = algorithms.get("fedavg")
    with pytest.raises(ConfigError) as e:
        _check_algorithm(SimpleNamespace(cfg={"algorithm": "fedavg"}, algo=cls.__new__(cls)))
    msg = str(e.value)
    assert "--distributed does not support fedavg" in msg and "without --distributed" in msg
    assert "fjord" in msg and "\n" not in msg


def test_distributed_needs_torchrun(tmp_path, capsys):
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        assert main(["run", "--distributed", "--out", str(tmp_path / "x")] + COMMON) == 2
    finally:
        os.environ.update(env)
    err = capsys.readouterr().err
    assert "torchrun" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_bench_scale_runs_its_distributed_cases(tmp_path):
    """benchmarks/bench_scale.py drives the round itself (timers around the steps): its 2-process
    cases must follow the same protocol as `fedrac run --distributed` (worker_round) and finish."""
    out = tmp_path / "scale"
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--models", "mlp", "--clients", "4", "--rounds", "1",
           "--train-size", "400", "--test-size", "100", "--nproc", "2", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = json.loads((out / "bench_scale.json").read_text())["records"]
    assert sorted((r["variant"], r["world"]) for r in recs) == [("batched", 1), ("batched", 2),
                                                                 ("sequential", 1), ("sequential", 2)], p.stdout
    assert all("error" not in r and r["round_s"] > 0 and r["metrics_s"] > 0 for r in recs), recs
