"""Time one full FedRAC round: the simulator vs the official loop organisation (benchmarks/official_round.py).

Setting (data/README.md): CIFAR-10, POW, 10 clients, the MLP, batch 32, 1 local step, lr 0.03, clip 1,
the authors' standalone vector, ONE CPU thread, and the same logging every round on both sides, in
two settings (``--logging``):

* ``paper``: every client's reward accuracy on the test set, fairness, rate, max/min accuracy - the
  quantities the paper reports (official: 51 validation passes + 10 test passes per round);
* ``full``: additionally every client's reward model on its own data and on its holdout (the official
  logger's train/valid loss, which feeds no reported metric; official: 51 + 30 passes, the README's
  8.5 s/round measurement). The simulator then runs with ``client_metrics=true``.

The simulator's round is exactly what ``fedrac run`` does per round (``runner.round_step``) plus its
per-round I/O (metrics line with fsync + atomic checkpoint).

Data: the rebuilt CIFAR-10 in /work/shared/data when present (or --archive PATH), else synthetic
CIFAR-shaped tensors (--synthetic forces them). Rounds alternate between the two loops (which one
goes first alternates too) so machine load affects both alike; round 1 (no allocation) is not timed.
Both wall time and process CPU time are recorded per round (CPU time is less sensitive to other
processes on a shared machine); the load average is printed and stored with the results.

    python benchmarks/bench_round.py                  # 6 rounds per setting, prints the ratios
    python benchmarks/bench_round.py --rounds 6 --json results.json
    python benchmarks/bench_round.py --check          # also compare the candidate sweep values
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data" / "cifar-10-python.REBUILT-from-jpeg-q75.tar.gz"
PAPER_POW = "0.2819,0.3426,0.3600,0.3544,0.3791,0.3897,0.3975,0.4010,0.4050,0.4068"


def synthetic_cifar(seed: int = 0):
    """A DatasetBundle of CIFAR-10's shapes and sizes with random images (for machines without the data)."""
    from fedrac import data as fdata

    g = torch.Generator().manual_seed(seed)
    ytr = torch.randint(0, 10, (50_000,), generator=g)
    yte = torch.randint(0, 10, (10_000,), generator=g)
    xtr = torch.randn(50_000, 3, 32, 32, generator=g) * 0.5 + ytr.view(-1, 1, 1, 1) * 0.05
    xte = torch.randn(10_000, 3, 32, 32, generator=g) * 0.5 + yte.view(-1, 1, 1, 1) * 0.05
    return fdata.DatasetBundle("cifar10", 10, (3, 32, 32), fdata.ArrayDataset(xtr, ytr),
                               fdata.ArrayDataset(xte, yte), canonical=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="rounds per loop (round 1 is not timed)")
    ap.add_argument("--archive", default=str(SHARED), help="CIFAR-10 archive (default: the shared rebuilt one)")
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "fedrac-bench-data"),
                    help="cache folder for the decoded data")
    ap.add_argument("--synthetic", action="store_true", help="random CIFAR-shaped data")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--logging", choices=("both", "paper", "full"), default="both",
                    help="paper: per-client test accuracy, fairness, rate (what the paper reports) on both sides; "
                         "full: also every client's reward model on its own data and holdout (the official "
                         "logger's train/valid loss) on both sides; both (default): time both settings")
    ap.add_argument("--check", action="store_true", help="compare the candidate sweep with the official passes")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fedrac import data as fdata

    synthetic = args.synthetic or not Path(args.archive).exists()
    if synthetic:
        bundle = synthetic_cifar()
        fdata.load_dataset = lambda *a, **k: bundle          # benchmark only: serve the synthetic set
    modes = ("paper", "full") if args.logging == "both" else (args.logging,)
    results = {"setting": "CIFAR-10 MLP, POW, K=10, 1 local step, batch 32, metrics logged every round",
               "data": "synthetic" if synthetic else "rebuilt CIFAR-10 (/work/shared/data)",
               "threads": args.threads, "modes": {}}
    for mode in modes:
        results["modes"][mode] = bench_mode(mode, args, synthetic)
    for mode, res in results["modes"].items():
        print(f"[{mode} logging] median s/round: simulator {res['simulator_s_per_round']:.3f}, official loop "
              f"{res['official_s_per_round']:.3f} -> speed-up {res['speedup']:.1f}x (fastest rounds: "
              f"{min(res['simulator_rounds_s']):.3f} vs {min(res['official_rounds_s']):.3f} s -> "
              f"{res['speedup_of_fastest_rounds']:.1f}x); CPU time: {res['simulator_cpu_s_per_round']:.3f} vs "
              f"{res['official_cpu_s_per_round']:.3f} s -> {res['speedup_cpu']:.1f}x; load average "
              f"{res['load_before'][0]:.2f} -> {res['load_after'][0]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def bench_mode(mode: str, args, synthetic: bool) -> dict:
    from fedrac import io as fio
    from fedrac import runner
    from official_round import OfficialFedRAC, flgo_test, from_flat

    work = Path(tempfile.mkdtemp(prefix="fedrac-bench-"))
    layers = [("bench", {
        "dataset": "cifar10", "partition": "pow", "clients": "10", "rounds": "100000", "seed": "0",
        "archive": "" if synthetic else args.archive, "verify": "false", "download": "false",
        "data_dir": args.data_dir, "standalone_acc": PAPER_POW, "progress": "false", "plots": "false",
        "threads": str(args.threads), "client_metrics": "true" if mode == "full" else "false",
        "out": str(work / "run"), "device": "cpu",
    })]
    t = time.perf_counter()
    prep = runner.prepare(layers)
    print(f"[{mode} logging] set-up {time.perf_counter() - t:.1f} s "
          f"({'synthetic' if synthetic else 'rebuilt CIFAR-10'} data, {args.threads} thread(s), "
          f"P={prep.sim.P}, N={prep.sim.N})", flush=True)
    prep.run_dir.mkdir(parents=True)
    sim = prep.sim
    official = OfficialFedRAC(from_flat(sim.init_params.cpu()),
                              [tuple(t.cpu() for t in sim.client_data(k)) for k in range(sim.K)],
                              tuple(t.cpu() for t in sim.val_data()), tuple(t.cpu() for t in sim.test_data()),
                              prep.cfg["standalone_acc"], csv_path=str(work / "freq.csv"),
                              log_client_data=(mode == "full"))
    ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
    state = {"digest": ""}
    metrics_path = prep.run_dir / "metrics.jsonl"

    def simulator_round(r):
        rec = runner.round_step(prep, r)
        line = fio.append_jsonl(metrics_path, rec, sync=True)
        state["digest"] = fio.chain_digest(state["digest"], line)
        runner._checkpoint(prep, r, state["digest"], "bench", 0.0)
        return rec

    def timed(fn, r):
        t, c = time.perf_counter(), time.process_time()
        out = fn(r)
        return out, time.perf_counter() - t, time.process_time() - c

    load_before = os.getloadavg()
    for r in range(1, args.rounds + 1):
        if r % 2:
            rec, w_ours, c_ours = timed(simulator_round, r)
            off, w_off, c_off = timed(official.iterate, r)
        else:
            off, w_off, c_off = timed(official.iterate, r)
            rec, w_ours, c_ours = timed(simulator_round, r)
        if r >= 2:
            ours.append(w_ours)
            theirs.append(w_off)
            ours_cpu.append(c_ours)
            theirs_cpu.append(c_off)
        fair = rec["fairness"] if rec["fairness"] is not None else float("nan")
        print(f"  round {r}: simulator {w_ours:7.3f} s, cpu {c_ours:6.3f} (fairness {fair:6.1f}, max "
              f"{rec['max_accuracy']:.3f}) | official loop {w_off:7.3f} s, cpu {c_off:6.3f} (fairness "
              f"{off['fairness']:6.1f}, max {off['max_accuracy']:.3f}) | load {os.getloadavg()[0]:.2f}", flush=True)
    res = {
        "logging": mode,
        "rounds_timed": len(ours),
        "simulator_s_per_round": statistics.median(ours),
        "official_s_per_round": statistics.median(theirs),
        "simulator_rounds_s": ours,
        "official_rounds_s": theirs,
        "simulator_cpu_s_per_round": statistics.median(ours_cpu),
        "official_cpu_s_per_round": statistics.median(theirs_cpu),
        "simulator_rounds_cpu_s": ours_cpu,
        "official_rounds_cpu_s": theirs_cpu,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
    }
    res["speedup"] = res["official_s_per_round"] / res["simulator_s_per_round"]
    res["speedup_of_fastest_rounds"] = min(theirs) / min(ours)
    res["speedup_cpu"] = res["official_cpu_s_per_round"] / res["simulator_cpu_s_per_round"]
    if args.check:
        import fedrac_kernels as fk
        from fedrac.algorithms.fedrac import candidate_sizes

        w = prep.algo.w
        order = fk.lowest_frequency_order(prep.algo.freq)
        sizes = candidate_sizes(sim.N, 8)
        fused = sim.nested_accuracy(w, order, sizes, split="val").tolist()
        model = from_flat(w.cpu())
        val = torch.utils.data.TensorDataset(*[t.cpu() for t in sim.val_data()])
        diffs = 0
        for j, n in enumerate(sizes):
            m = torch.zeros(sim.N)
            m[order[:n]] = 1
            model.set_mask(m)
            diffs += abs(flgo_test(model, val, 1024)["accuracy"] - fused[j]) > 0
        res["check_candidates_differing"] = diffs
        print(f"  check: {diffs} of {len(sizes)} candidate accuracies differ between the fused pass and separate "
              f"DataLoader passes", flush=True)
    return res


if __name__ == "__main__":
    sys.exit(main())
