"""HeteroFL / FedRolex / FjORD aggregation: fedrac_kernels vs the usual hand-written forms.

For each model (the paper MLP 3072-200-200-10 and a GroupNorm ResNet-18-sized layer list with
HeteroFL-style channel sites), each K and each method, this times one server aggregation round:

* ``ours``: :func:`fedrac_kernels.interop.aggregate_state_dicts` -- state dicts in, new state dict
  out, everything included (index tables, gathering the uploads, the fused compact pass, keeping
  uncovered elements). Also ``ours_assume_finite`` (no NaN/Inf check: the fastest mode).
* ``hand``: :mod:`benchmarks.handwritten_submodel` -- HeteroFL/FedRolex ``combine`` (torch, meshgrid
  scatter + count, per key per client; index tuples prepared outside the timed region as the
  originals do at distribution time) and FjORD's per-width NumPy average (full-size client arrays).

Inputs: HeteroFL and FedRolex clients upload sub-models (their slices), rates 1, 1/2, 1/4, 1/8,
1/16 assigned round-robin, unweighted; FedRolex uses round 7. FjORD clients upload full-size
arrays (as the Flower baseline), p_max from the same five values, weighted by random example
counts; ``ours`` reads them as full-size state dicts (zero-copy views of the same NumPy memory).

Reported per case: median time (s), extra live bytes during the call (peak RSS growth on CPU,
measured with the glibc mmap threshold pinned so freed buffers really leave; peak
``torch.cuda.max_memory_allocated`` growth on CUDA), effective GB/s (the minimum traffic: every
held client value read once + the global model read and written, divided by the time; the same
numerator for both forms), the speed ratio hand/ours and the max |ours - hand|.

Usage::

    python benchmarks/bench_submodel_methods.py --models mlp,resnet18 --K 10,100 --out results.json
    python benchmarks/bench_submodel_methods.py --device cuda --out gpu.csv      # on a GPU
    python benchmarks/bench_submodel_methods.py --resnet-width 0.5 --repeats 3  # modest CPU sizes
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.handwritten_submodel import (fjord_average_numpy, fjord_layer_dims, heterofl_combine,  # noqa: E402
                                             heterofl_param_idx)
from fedrac_kernels import interop as fki  # noqa: E402

RATES = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16)
FEDROLEX_ROUND = 7


# ---- models: (sites, [(key, shape, out_site, in_site)]) ------------------------------------------
def mlp_layers():
    sites = {"h1": 200, "h2": 200}
    layers = [("fc1.weight", (200, 3072), "h1", None), ("fc1.bias", (200,), "h1", None),
              ("fc2.weight", (200, 200), "h2", "h1"), ("fc2.bias", (200,), "h2", None),
              ("fc3.weight", (10, 200), None, "h2"), ("fc3.bias", (10,), None, None)]
    return sites, layers


def resnet18_layers(width: float = 1.0, num_classes: int = 10):
    """GroupNorm ResNet-18 parameter list with HeteroFL-style channel sites.

    Site ``s{i}`` is stage i's residual stream (shared by the blocks' outputs and shortcuts, so the
    additions line up), ``b{i}{j}`` the inner channels of block j of stage i.
    """
    ch = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
    sites = {}
    layers = []
    sites["s1"] = ch[0]
    layers += [("conv1.weight", (ch[0], 3, 3, 3), "s1", None), ("gn1.weight", (ch[0],), "s1", None),
               ("gn1.bias", (ch[0],), "s1", None)]
    prev = "s1"
    for i, c in enumerate(ch, start=1):
        main = f"s{i}"
        sites.setdefault(main, c)
        for j in range(2):
            p = f"layer{i}.{j}"
            mid = f"b{i}{j}"
            sites[mid] = c
            c_in_site = prev if j == 0 else main
            c_in = sites[c_in_site]
            layers += [(f"{p}.conv1.weight", (c, c_in, 3, 3), mid, c_in_site),
                       (f"{p}.gn1.weight", (c,), mid, None), (f"{p}.gn1.bias", (c,), mid, None),
                       (f"{p}.conv2.weight", (c, c, 3, 3), main, mid),
                       (f"{p}.gn2.weight", (c,), main, None), (f"{p}.gn2.bias", (c,), main, None)]
            if j == 0 and prev != main:
                layers += [(f"{p}.shortcut.0.weight", (c, sites[prev], 1, 1), main, prev),
                           (f"{p}.shortcut.1.weight", (c,), main, None), (f"{p}.shortcut.1.bias", (c,), main, None)]
        prev = main
    layers += [("fc.weight", (num_classes, ch[3]), None, prev), ("fc.bias", (num_classes,), None, None)]
    return sites, layers


# ---- measurement helpers --------------------------------------------------------------------------
def _status_kb():
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _lock_memory() -> bool:
    """mlockall(MCL_CURRENT | MCL_FUTURE): the kernel may then not reclaim this process's pages while
    other processes press on memory, so peak-RSS growth only counts what a call allocates."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).mlockall(3) == 0
    except (OSError, AttributeError):
        return False


def live_bytes(fn, device):
    """Extra peak bytes while ``fn()`` runs (result kept until the measurement ends)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del res
        return int(peak)
    if not _reset_peak():
        return None
    rss0 = _status_kb().get("VmRSS")
    res = fn()
    hwm = _status_kb().get("VmHWM")
    del res
    if rss0 is None or hwm is None:
        return None
    return int(max(0, hwm - rss0) * 1024)


def time_it(fn, device, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def _kept(n_rate: float, width: int) -> int:
    return max(1, int(math.ceil(n_rate * width - 1e-9 * width)))


# ---- one case -------------------------------------------------------------------------------------
def build_case(model: str, method: str, K: int, device, seed: int, resnet_width: float):
    sites, layers = mlp_layers() if model == "mlp" else resnet18_layers(resnet_width)
    gates = {k: (o, i) for k, _, o, i in layers if (o, i) != (None, None)}
    shapes = {k: s for k, s, _, _ in layers}
    gen = torch.Generator().manual_seed(seed)
    global_sd = {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}
    rates = [RATES[k % len(RATES)] for k in range(K)]
    weights = None
    if method == "heterofl":
        sets = fki.heterofl_neuron_sets(sites, rates)
    elif method == "fedrolex":
        sets = fki.fedrolex_neuron_sets(sites, rates, round=FEDROLEX_ROUND)
    elif method == "fjord":
        sets = fki.fjord_neuron_sets(sites, rates)
        weights = [int(x) for x in torch.randint(50, 500, (K,), generator=gen)]
    else:
        raise ValueError(f"method: unknown {method!r}")

    held_values = 0
    if method in ("heterofl", "fedrolex"):
        clients = []
        for s in sets:
            st = {}
            for k, shp in shapes.items():
                sub = list(shp)
                o, i = gates.get(k, (None, None))
                if o is not None:
                    sub[0] = len(s[o])
                if i is not None:
                    sub[1] = len(s[i])
                st[k] = torch.randn(sub, generator=gen).to(device)
                held_values += st[k].numel()
            clients.append(st)
        case = dict(clients=clients, np_clients=None)
    else:
        np_clients, clients = [], []
        for s in sets:
            arrs = [torch.randn(shp, generator=gen).numpy() for shp in shapes.values()]
            np_clients.append(arrs)
            st = {k: torch.from_numpy(a) for k, a in zip(shapes, arrs)}
            if device.type != "cpu":
                st = {k: v.to(device) for k, v in st.items()}
            clients.append(st)
            for k, shp in shapes.items():
                o, i = gates.get(k, (None, None))
                r = len(s[o]) if o is not None else shp[0]
                c = (len(s[i]) if i is not None else shp[1]) if len(shp) > 1 else 1
                held_values += r * c * int(np.prod(shp[2:]))
        case = dict(clients=clients, np_clients=np_clients)
    P = sum(int(np.prod(s)) for s in shapes.values())
    case.update(sites=sites, gates=gates, shapes=shapes, global_sd=global_sd, sets=sets, weights=weights,
                rates=rates, P=P, held_values=held_values)
    return case


def run_case(model, method, K, device, backend, repeats, seed, resnet_width, phase="time"):
    c = build_case(model, method, K, device, seed, resnet_width)
    g, clients, sets, gates, sites, w = c["global_sd"], c["clients"], c["sets"], c["gates"], c["sites"], c["weights"]
    up_bytes = c["held_values"] * 4
    min_bytes = up_bytes + 2 * 4 * c["P"]

    def ours(nonfinite="raise"):
        return fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=gates, sites=sites, weights=w,
                                         backend=backend, nonfinite=nonfinite)

    if method in ("heterofl", "fedrolex"):
        idx = [heterofl_param_idx(c["shapes"], gates, s) for s in sets]
        idx = [{k: (tuple(t.to(device) for t in v) if v is not None else None) for k, v in d.items()} for d in idx]

        def hand():
            return heterofl_combine(g, clients, idx, weights=w)
        hand_name = "heterofl_combine (torch meshgrid scatter + count)"
    else:
        keys = list(c["shapes"])
        dims = {p: [fjord_layer_dims(c["shapes"], gates, sites, p)[k] for k in keys] for p in set(c["rates"])}
        g_np = [g[k].cpu().numpy() for k in keys]

        def hand():
            return fjord_average_numpy(g_np, c["np_clients"], w, c["rates"], dims)
        hand_name = "fjord_average (NumPy per width)"

    rows = []
    err = float("nan")
    if phase == "time":   # (the memory phase measures ours before hand ever runs: allocator caches)
        res_ours = ours()
        res_hand = hand()
        if isinstance(res_hand, list):
            res_hand = {k: torch.from_numpy(a) for k, a in zip(c["shapes"], res_hand)}
        err = max(float((res_ours[k].double().cpu() - res_hand[k].double().cpu()).abs().max()) for k in c["shapes"])
        del res_ours, res_hand
    forms = [("ours", lambda: ours()), ("ours_assume_finite", lambda: ours("assume_finite")), ("hand", hand)]
    times = {}
    for name, fn in forms:
        if phase == "time":
            t, all_t = time_it(fn, device, repeats)
            mem = None
        else:
            fn()                       # warm (first-call set-up is not live memory of the method)
            t, all_t = float("nan"), []
            mem = live_bytes(fn, device)
        times[name] = t
        rows.append(dict(model=model if model == "mlp" else f"resnet18x{resnet_width:g}", method=method, K=K,
                         form=name, impl=(hand_name if name == "hand" else f"aggregate_state_dicts[{backend or 'auto'}]"),
                         device=("cpu (numpy)" if (name == "hand" and method == "fjord") else str(device)),
                         P=c["P"], upload_MB=round(up_bytes / 1e6, 3), time_s=t, times_s=[round(x, 6) for x in all_t],
                         live_MB=(None if mem is None else round(mem / 1e6, 3)),
                         GBps=round(min_bytes / t / 1e9, 3)))
    for r in rows:
        r["speedup_vs_hand"] = round(times["hand"] / r["time_s"], 3)
        r["max_abs_diff_vs_hand"] = err
    return rows


def _child(args_list, phase, extra_env) -> list:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, f"{phase}.json")
        env = {**os.environ, **extra_env}
        cmd = [sys.executable, os.path.abspath(__file__), *args_list, "--phase", phase, "--phase-out", out]
        subprocess.run(cmd, check=True, env=env)
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,resnet18")
    ap.add_argument("--methods", default="heterofl,fedrolex,fjord")
    ap.add_argument("--K", default="10,100")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="kernel back end (default: automatic for the device)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--resnet-width", type=float, default=1.0, help="channel multiplier of the ResNet-18 list")
    ap.add_argument("--skip", default="", help="comma list of model:method:K cases to skip, e.g. resnet18:fjord:100")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write results (.json or .csv)")
    ap.add_argument("--phase", default=None, choices=("time", "memory"), help=argparse.SUPPRESS)
    ap.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase is None:
        return _orchestrate(args, sys.argv[1:] if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.phase == "memory" and device.type == "cpu":
        _lock_memory()
    skip = set(s for s in args.skip.split(",") if s)
    import fedrac_kernels.api as api

    env = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
               machine=platform.machine(), threads=torch.get_num_threads(), device=str(device),
               backends=api.available_backends(),
               gpu=(torch.cuda.get_device_name(device) if device.type == "cuda" else None))
    print(json.dumps(env))
    rows = []
    hdr = f"{'model':<14}{'method':<10}{'K':>4} {'form':<20}{'time_s':>10}{'live_MB':>10}{'GB/s':>8}{'x hand':>8}"
    print(hdr)
    for model in args.models.split(","):
        for K in [int(x) for x in args.K.split(",")]:
            for method in args.methods.split(","):
                if f"{model}:{method}:{K}" in skip:
                    continue
                rs = run_case(model, method, K, device, args.backend, args.repeats, args.seed, args.resnet_width,
                              phase=args.phase)
                for r in rs:
                    print(f"{r['model']:<14}{method:<10}{K:>4} {r['form']:<20}{r['time_s']:>10.4f}"
                          f"{(r['live_MB'] if r['live_MB'] is not None else float('nan')):>10.1f}{r['GBps']:>8.2f}"
                          f"{r['speedup_vs_hand']:>8.2f}   (max|diff| {r['max_abs_diff_vs_hand']:.1e})", flush=True)
                rows.extend(rs)
                gc.collect()
    with open(args.phase_out, "w") as f:
        json.dump(dict(env=env, rows=rows), f)
    return rows


def _strip(argv, opts) -> list:
    """``argv`` without the options ``opts`` (``--opt value`` and ``--opt=value`` forms)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in opts:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in opts):
            continue
        out.append(a)
    return out


def _orchestrate(args, argv) -> list:
    """Run the timing phase, then (unless --no-memory) the memory phase, in child processes; merge.

    The timings run with the default allocator. On Linux CPUs the live-byte phase runs with glibc's
    mmap threshold pinned (MALLOC_MMAP_THRESHOLD_), so large freed buffers really leave and the
    peak-RSS growth measures the bytes a call keeps live. ``--threads n`` also sets
    OMP_NUM_THREADS (the native back end's OpenMP pool); on a shared, oversubscribed machine use
    ``--threads 1``, or parallel regions wait on the scheduler.
    """
    env_t = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    timed = _child(argv, "time", env_t)
    rows, env = timed["rows"], timed["env"]
    if not args.no_memory:
        env_m = dict(env_t)
        if args.device == "cpu" and sys.platform.startswith("linux"):
            env_m["MALLOC_MMAP_THRESHOLD_"] = "65536"
        mem = []
        for model in args.models.split(","):        # one fresh process per case: no allocator caches
            for K in args.K.split(","):
                for method in args.methods.split(","):
                    if f"{model}:{method}:{K}" in set(args.skip.split(",")):
                        continue
                    one = _strip(argv, ("--models", "--K", "--methods", "--out"))
                    one += ["--models", model, "--K", K, "--methods", method]
                    mem += _child(one, "memory", env_m)["rows"]
        key = lambda r: (r["model"], r["method"], r["K"], r["form"])  # noqa: E731
        live = {key(r): r["live_MB"] for r in mem}
        for r in rows:
            r["live_MB"] = live.get(key(r))
    print()
    print(f"{'model':<14}{'method':<10}{'K':>4} {'form':<20}{'time_s':>10}{'live_MB':>10}{'GB/s':>8}{'x hand':>8}")
    for r in rows:
        lmb = r["live_MB"] if r["live_MB"] is not None else float("nan")
        print(f"{r['model']:<14}{r['method']:<10}{r['K']:>4} {r['form']:<20}{r['time_s']:>10.4f}{lmb:>10.1f}"
              f"{r['GBps']:>8.2f}{r['speedup_vs_hand']:>8.2f}   (max|diff| {r['max_abs_diff_vs_hand']:.1e})")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.out.endswith(".csv"):
            cols = [k for k in rows[0] if k != "times_s"] if rows else []
            with open(args.out, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
                wr.writeheader()
                wr.writerows(rows)
        else:
            with open(args.out, "w") as f:
                json.dump(dict(env=env, rows=rows), f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
