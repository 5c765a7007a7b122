"""Scale: FedRAC round time, clients/s and peak memory vs clients K and model, for sequential vs
batched client training, single process vs distributed (torchrun; Gloo on CPU, NCCL on GPUs).

Each case runs in a fresh process (so its peak memory is its own) with exactly what ``fedrac run``
does per round (``runner.round_step``): allocation with the candidate sweep on V, every client's
local step(s), the masked aggregation streamed through ``fk.StreamingAggregator``
(``stream_aggregation=true``: O(P + client_batch x P) memory), and the reward accuracies on T
(one pass per distinct submodel, at most C of them). Round 1 (full models, no allocation) is the
warm-up; rounds 2 .. 1+R are timed. Breakdown per round: ``allocate`` (neuron order + candidate
sweep + search), ``train`` (local steps of this process's clients), ``aggregate`` (the rest of the
algorithm's round: chunk adds, all-reduce, apply, frequency table), ``metrics`` (reward evaluation).

Data: CIFAR-10 shapes (3x32x32, 10 classes) with synthetic images by default (``--archive PATH``
for the real/rebuilt archive), IID partition (every client gets pool/K samples), the embedded
standalone vector replaced by a fixed ramp (no standalone training), 1 local step, batch 32.

Memory: CUDA: ``torch.cuda.max_memory_allocated`` over the timed rounds (reset before them).
CPU: the resident set size sampled every 2 ms during the timed rounds (``round_peak_rss_mb``: its
maximum; ``round_extra_rss_mb``: that minus the RSS before the rounds, i.e. the rounds' working
set beyond data + model) and the process high-water mark (``peak_rss_mb``); plus the analytic
``client_state_mb`` = 2 x client_batch x P x 4 B (parameters + gradients of the chunk in training;
sequential: 10 x P x 4 B, local_train's two vectors and the 8-update chunk)
and ``aggregator_mb`` = 2 x P x 4 B.

    python benchmarks/bench_scale.py                                  # CPU: MLP, K = 10,100,1000
    python benchmarks/bench_scale.py --out bench_out                  # + JSON / CSV
    python benchmarks/bench_scale.py --device cuda --models mlp,resnet18 --nproc 0   # one GPU
    python benchmarks/bench_scale.py --device cuda --target           # the GPU target (below)
    python benchmarks/bench_scale.py --device cuda --nproc 8          # + NCCL over 8 GPUs

GPU target (``--target``): a FedRAC round of 1000 clients on ResNet-18 with one local step each in
under 10 s on one H100/H200, allocation, candidate sweep, aggregation and metrics included; the
script prints PASS/FAIL per batched/sequential variant.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

TARGET_S = 10.0


# ------------------------------------------------------------------------------------------ worker

def _synthetic_cifar(n_train: int, n_test: int, seed: int = 0):
    from fedrac import data as fdata

    g = torch.Generator().manual_seed(seed)
    ytr = torch.randint(0, 10, (n_train,), generator=g)
    yte = torch.randint(0, 10, (n_test,), generator=g)
    xtr = torch.randn(n_train, 3, 32, 32, generator=g) * 0.5 + ytr.view(-1, 1, 1, 1) * 0.05
    xte = torch.randn(n_test, 3, 32, 32, generator=g) * 0.5 + yte.view(-1, 1, 1, 1) * 0.05
    return fdata.DatasetBundle("cifar10", 10, (3, 32, 32), fdata.ArrayDataset(xtr, ytr),
                               fdata.ArrayDataset(xte, yte), canonical=False)


class _RssSampler:
    """Max resident set size (MiB) sampled every ``period`` seconds while running."""

    def __init__(self, period: float = 0.002):
        self.period = period
        self.peak = 0.0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._t = threading.Thread(target=self._run, daemon=True)

    def rss_mb(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page / 2**20

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mb())
            time.sleep(self.period)

    def __enter__(self):
        self.peak = self.rss_mb()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss_mb())


def _timed(fn, acc: dict, key: str, sync):
    def wrapper(*a, **k):
        sync()
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sync()
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
    return wrapper


def worker(case: dict) -> dict:
    """One case in this process (or in each process of a torchrun launch); returns rank 0's record."""
    import resource

    from fedrac import data as fdata
    from fedrac import runner
    from fedrac.distributed import worker_round

    torch.set_num_threads(int(case["threads"]))
    dist_ctx = None
    rank, world = 0, 1
    if case["nproc"] > 1:
        import datetime

        import torch.distributed as tdist

        from fedrac.distributed import DistContext, env_world

        rank, world, local_rank = env_world()
        cuda = case["device"].startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank)
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=1800))
        dist_ctx = DistContext(rank, world, local_rank, "nccl" if cuda else "gloo",
                               torch.device("cuda" if cuda else "cpu"))
    if case["archive"]:
        data_layer = {"archive": case["archive"], "verify": "false", "download": "false",
                      "data_dir": case["data_dir"]}
    else:
        bundle = _synthetic_cifar(case["train_size"], case["test_size"])
        fdata.load_dataset = lambda *a, **k: bundle          # benchmark only: serve the synthetic set
        data_layer = {}
    K = int(case["clients"])
    ramp = ",".join(f"{0.2 + 0.4 * k / max(1, K - 1):.4f}" for k in range(K))
    work = Path(tempfile.mkdtemp(prefix="fedrac-scale-"))
    layers = [("bench", dict({
        "dataset": "cifar10", "partition": "iid", "clients": str(K), "rounds": "1000000", "seed": "0",
        "model": case["model"], "local_steps": str(case["local_steps"]), "standalone_acc": ramp,
        "client_batch": str(case["client_batch"]), "stream_aggregation": str(case["stream"]).lower(),
        "progress": "false", "plots": "false", "threads": str(case["threads"]), "device": case["device"],
        "out": str(work / "run"), "checkpoint_every": "0",
    }, **data_layer))]
    t = time.perf_counter()
    prep = runner.prepare(layers)
    setup_s = time.perf_counter() - t
    sim, algo, cfg = prep.sim, prep.algo, prep.cfg
    dev = torch.device(cfg["device"])
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    if dist_ctx is not None:
        sim.dist = dist_ctx
        dist_ctx.begin(1, 10**6)
    acc: dict = {}
    algo.allocate = _timed(algo.allocate, acc, "allocate", sync)
    sim.local_train_many = _timed(sim.local_train_many, acc, "train", sync)
    sim.evaluate_rewards = _timed(sim.evaluate_rewards, acc, "metrics", sync)

    def one_round(r: int) -> dict:
        acc.clear()
        sync()
        t0 = time.perf_counter()
        if rank == 0:
            runner.round_step(prep, r)
        else:
            worker_round(prep, r)                  # the round + this rank's share of the rewards
        sync()
        if dist_ctx is not None:
            dist_ctx.round_end(r)
        total = time.perf_counter() - t0
        rest = total - sum(acc.values())
        return {"round_s": total, "allocate_s": acc.get("allocate", 0.0), "train_s": acc.get("train", 0.0),
                "metrics_s": acc.get("metrics", 0.0), "aggregate_s": rest}

    one_round(1)                                   # warm-up: full models, no allocation
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = _RssSampler()
    rss_before = sampler.rss_mb()
    rounds = []
    with sampler:
        for r in range(2, 2 + int(case["rounds"])):
            rounds.append(one_round(r))
    rec = {k: v for k, v in case.items() if k not in ("archive", "data_dir")}
    rec.update(P=sim.P, N=sim.N, K=sim.K, client_batch=int(cfg["client_batch"]), world=world,
               setup_s=setup_s, data="archive" if case["archive"] else "synthetic")
    for key in ("round_s", "allocate_s", "train_s", "aggregate_s", "metrics_s"):
        vals = [x[key] for x in rounds]
        rec[key] = statistics.median(vals)
        rec[key.replace("_s", "_min_s")] = min(vals)
    rec["rounds_s"] = [x["round_s"] for x in rounds]
    rec["clients_per_s"] = sim.K / rec["round_s"]
    mine = sim.K if dist_ctx is None else len(dist_ctx.shard(sim.K))
    rec["train_clients_per_s"] = mine / rec["train_s"] if rec["train_s"] > 0 else None
    cb = rec["client_batch"]
    # batched: parameters + gradients of the chunk; sequential: local_train's params + grad, and the
    # 8-row chunk of updates handed to the aggregator
    rec["client_state_mb"] = (2 * cb if cb > 1 else 2 + 8) * sim.P * 4 / 2**20
    rec["aggregator_mb"] = 2 * sim.P * 4 / 2**20
    rec["updates_if_held_mb"] = sim.K * sim.P * 4 / 2**20
    rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec["round_peak_rss_mb"] = sampler.peak
    rec["round_extra_rss_mb"] = sampler.peak - rss_before
    if cuda:
        rec["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rec["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    if dist_ctx is not None:
        import torch.distributed as tdist

        mem_keys = ("peak_rss_mb", "round_peak_rss_mb", "round_extra_rss_mb", "cuda_peak_allocated_mb")
        mine_mem = {k: rec.get(k) for k in mem_keys}
        allm: list = [None] * world
        tdist.all_gather_object(allm, mine_mem)
        for k in mem_keys:
            vals = [m[k] for m in allm if m.get(k) is not None]
            if vals:
                rec[k + "_per_rank"] = vals
                rec[k] = max(vals)
        tdist.destroy_process_group()
    return rec


# ------------------------------------------------------------------------------------------ driver

def _run_case(case: dict, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if case["nproc"] > 1:
        if not case["device"].startswith("cuda"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env["OMP_NUM_THREADS"] = str(case["threads"])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(case["nproc"]),
               str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.case_timeout)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
        return dict(case, error=f"exit {p.returncode}: " + " | ".join(tail))
    return json.loads(lines[-1])


def _cases(args) -> list:
    cases = []
    cuda = args.device.startswith("cuda")
    models = ["resnet18"] if args.target else args.models.split(",")
    clients = [1000] if args.target else [int(v) for v in args.clients.split(",")]
    nprocs = [1]
    if args.nproc > 1 and not args.target:
        nprocs.append(args.nproc)
    for model in models:
        for K in clients:
            for nproc in nprocs:
                variants = [("sequential", 1, True), ("batched", args.client_batch, True)]
                if args.held and K == max(clients) and nproc == 1:
                    variants.append(("batched-held", args.client_batch, False))
                for name, cb, stream in variants:
                    cases.append({
                        "model": model, "clients": K, "variant": name, "client_batch": cb, "stream": stream,
                        "nproc": nproc, "device": args.device, "rounds": args.rounds, "local_steps": args.local_steps,
                        "threads": args.threads if not cuda else max(1, args.threads),
                        "train_size": args.train_size, "test_size": args.test_size,
                        "archive": args.archive or "", "data_dir": args.data_dir,
                    })
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", default="mlp", help="comma list: mlp, resnet18")
    ap.add_argument("--clients", default="10,100,1000", help="comma list of K")
    ap.add_argument("--client-batch", default="auto", help="client_batch of the batched variant (auto = the "
                    "simulator's default for the model and device)")
    ap.add_argument("--nproc", type=int, default=None, help="processes of the distributed variant (0/1 = none; "
                    "default: 2 on CPU, the number of GPUs on CUDA)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per case (after 1 warm-up round)")
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    ap.add_argument("--train-size", type=int, default=50_000, help="synthetic training images")
    ap.add_argument("--test-size", type=int, default=10_000, help="synthetic test images")
    ap.add_argument("--archive", default="", help="a CIFAR-10 archive instead of synthetic data")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "fedrac-bench-data"))
    ap.add_argument("--held", action="store_true", help="also the largest K with stream_aggregation=false "
                    "(all K updates held: the K x P memory the streaming avoids)")
    ap.add_argument("--target", action="store_true", help=f"only the GPU target: FedRAC, ResNet-18, 1000 clients, "
                    f"1 local step, sequential vs batched; PASS if a round < {TARGET_S:g} s")
    ap.add_argument("--case-timeout", type=float, default=3600)
    ap.add_argument("--out", help="write bench_scale.json / .csv here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        rec = worker(json.loads(args.worker))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(rec), flush=True)
        return 0
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if args.device.startswith("cuda") else 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    from common import device_info, write_results

    meta = device_info(args.device)
    meta["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    records = []
    head = (f"{'model':<9}{'K':>6} {'variant':<13}{'cb':>4}{'procs':>6} {'round s':>9}{'alloc':>8}{'train':>8}"
            f"{'aggr':>8}{'metric':>8} {'clients/s':>10} {'peak MiB':>9} {'extra MiB':>9}")
    print(head)
    print("-" * len(head))
    for case in _cases(args):
        rec = _run_case(case, args)
        records.append(rec)
        if "error" in rec:
            print(f"{case['model']:<9}{case['clients']:>6} {case['variant']:<13} nproc={case['nproc']}: "
                  f"FAILED {rec['error']}", flush=True)
            continue
        peak = rec.get("cuda_peak_allocated_mb", rec["round_peak_rss_mb"])
        extra = rec.get("cuda_peak_allocated_mb", rec["round_extra_rss_mb"])
        print(f"{rec['model']:<9}{rec['K']:>6} {rec['variant']:<13}{rec['client_batch']:>4}{rec['world']:>6} "
              f"{rec['round_s']:>9.3f}{rec['allocate_s']:>8.3f}{rec['train_s']:>8.3f}{rec['aggregate_s']:>8.3f}"
              f"{rec['metrics_s']:>8.3f} {rec['clients_per_s']:>10.1f} {peak:>9.0f} {extra:>9.0f}", flush=True)
        if args.target:
            ok = rec["round_s"] < TARGET_S
            print(f"  target ({TARGET_S:g} s per FedRAC round, 1000 clients, ResNet-18): "
                  f"{'PASS' if ok else 'FAIL'} ({rec['round_s']:.2f} s)")
    if args.out:
        j, c = write_results(args.out, "bench_scale", records, meta)
        print(f"wrote {j} and {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
