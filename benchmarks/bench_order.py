"""Stable ascending order of a frequency table: fk.lowest_frequency_order vs torch.sort(stable=True).

FedRAC sorts its neuron-frequency table every round (ascending, ties by lower index: spec §4.3).
For each N this times, round-robin in one process:

* ``ours[<backend>]``: :func:`fedrac_kernels.lowest_frequency_order` (public API: value checks and
  dispatch included) for each requested back end, and ``backend[<backend>]``: the back end's
  ``stable_argsort`` called directly (what the API adds is the difference);
* ``torch.sort``: ``torch.sort(freq, stable=True).indices`` (the same int64 result);

on two key distributions: ``freq`` (float32 counts 0..R*K, heavy ties: what FedRAC sorts) and
``random`` (float32 N(0, 1): every bit varies). Each result is checked equal to torch.sort's before
timing. Reported: median / p10 / p90, keys per second, GB/s on the lower-bound byte model (read a
4-byte key, write an 8-byte index) and the speed-up over torch.sort.

Usage::

    python -m benchmarks.bench_order --device cpu --out bench_out               # N = 400 .. 1e7
    python -m benchmarks.bench_order --device cuda --sizes 400,1024,1e6,1e8 --out gpu_out
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import common  # noqa: E402

import fedrac_kernels as fk  # noqa: E402
from fedrac_kernels.backends import get_backend  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--sizes", default=None, help="comma list of N (default 400..1e7 on CPU, ..1e8 on CUDA)")
    p.add_argument("--keys", default="freq,random", help="key distributions: freq, random")
    p.add_argument("--backends", default=None, help="default: cpu on CPU; cuda,triton on CUDA")
    p.add_argument("--rounds", type=int, default=500, help="freq keys: counts in 0..rounds*K")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--max-time", type=float, default=60.0, help="seconds per (N, keys) round-robin")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_keys(kind: str, N: int, args, gen) -> torch.Tensor:
    if kind == "freq":
        return torch.randint(0, args.rounds * args.clients + 1, (N,), generator=gen).to(torch.float32)
    if kind == "random":
        return torch.randn(N, generator=gen)
    raise ValueError(f"unknown key kind {kind!r}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_order: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    sizes = ([int(float(s)) for s in args.sizes.split(",")] if args.sizes else
             [400, 1024, 10_000, 100_000, 1_000_000, 10_000_000] + ([100_000_000] if cuda else []))
    backends = [b.strip() for b in (args.backends or ("cuda,triton" if cuda else "cpu")).split(",") if b.strip()]
    report = fk.backend_report()
    for be in list(backends):
        if not report.get(be, "").startswith("ok"):
            print(f"skip ours[{be}]: {report.get(be, 'unknown back end')}")
            backends.remove(be)
    gen = torch.Generator().manual_seed(args.seed)
    meta = common.device_info(device)
    meta["args"] = vars(args)
    meta["backends"] = report
    print(f"device: {meta.get('gpu', meta['cpu'])}, torch {meta['torch']}, threads {meta['torch_threads']}, "
          f"commit {meta['commit']}, load {meta.get('loadavg')}")
    if meta["busy_processes"]:
        print(f"note: other busy processes: {meta['busy_processes']}")
    cpu_clock = device.type == "cpu" and torch.get_num_threads() == 1
    print(f"{'keys':<7}{'N':>11}  {'variant':<18}{'median':>11}{'p10':>11}{'p90':>11}{'Mkeys/s':>9}{'GB/s':>7}"
          f"{'vs sort':>9}" + (f"{'cpu med':>11}{'vs sort':>9}" if cpu_clock else ""))
    records = []
    for kind in [k.strip() for k in args.keys.split(",") if k.strip()]:
        for N in sizes:
            freq = make_keys(kind, N, args, gen).to(device)
            ref = torch.sort(freq, stable=True).indices
            variants = {"torch.sort": lambda freq=freq: torch.sort(freq, stable=True).indices}
            checks = {}
            for be in backends:
                got = fk.lowest_frequency_order(freq, backend=be)
                checks[be] = bool(torch.equal(got, ref))
                variants[f"ours[{be}]"] = lambda freq=freq, be=be: fk.lowest_frequency_order(freq, backend=be)
                mod = get_backend(be)  # the back end alone: what the public API's checks and dispatch add
                variants[f"backend[{be}]"] = lambda freq=freq, mod=mod: mod.stable_argsort(freq)
            reps = args.reps if N <= 10_000_000 else max(5, args.reps // 4)
            t = common.measure_round_robin(variants, device=device, warmup=2, reps=reps, max_time=args.max_time,
                                           seed=args.seed)
            t_sort = t["torch.sort"]["median"]
            c_sort = t["torch.sort"]["thread_cpu"]["median"] if cpu_clock else None
            for vname in ["torch.sort"] + [f"{p}[{be}]" for be in backends for p in ("ours", "backend")]:
                r = t[vname]
                med = r["median"]
                nbytes = N * (4 + 8)
                line = (f"{kind:<7}{N:>11,}  {vname:<18}{common.fmt_time(med):>11}{common.fmt_time(r['p10']):>11}"
                        f"{common.fmt_time(r['p90']):>11}{N / med / 1e6:>9.1f}{common.gbps(nbytes, med):>7.2f}"
                        f"{t_sort / med:>8.2f}x")
                rec = {"keys": kind, "N": N, "variant": vname, "device": str(device),
                       "threads": torch.get_num_threads(), "median_s": med, "p10_s": r["p10"], "p90_s": r["p90"],
                       "n": r["n"], "keys_per_s": N / med, "gbps_lower_bound_bytes": common.gbps(nbytes, med),
                       "speedup_vs_torch_sort": t_sort / med, "times": r["times"]}
                if cpu_clock:
                    cmed = r["thread_cpu"]["median"]
                    line += f"{common.fmt_time(cmed):>11}{c_sort / cmed:>8.2f}x"
                    rec.update(thread_cpu_median_s=cmed, thread_cpu_speedup_vs_torch_sort=c_sort / cmed)
                print(line)
                be = vname[vname.index("[") + 1:-1] if "[" in vname else None
                rec["equal_to_torch_sort"] = checks.get(be) if be else True
                records.append(rec)
            bad = [be for be, ok in checks.items() if not ok]
            if bad:
                print(f"  MISMATCH vs torch.sort(stable=True): {bad}")
            del freq, ref
    meta["busy_processes_after"] = common.busy_processes()
    if args.out:
        j, c = common.write_results(args.out, "order", records, meta)
        print(f"\nwrote {j} and {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
