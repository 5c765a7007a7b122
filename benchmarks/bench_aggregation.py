"""Masked-mean aggregation: fedrac_kernels vs FedRAC's own code, plain torch and torch.compile.

For every case this times, round-robin in one process (see benchmarks/common.py):

* ``ours[<backend>,<nonfinite>]``: :func:`fedrac_kernels.masked_mean_update_` (non-zero rule, no
  weights, as FedRAC) on the [K, P] updates, for each requested back end and for both the default
  ``nonfinite="raise"`` (checked: computed into a scratch buffer, copied into g) and
  ``"assume_finite"`` (fused in place); with ``--cpu-isas base,avx2,avx512`` the cpu back end once per
  kernel level, ``ours[cpu@<level>,<nonfinite>]``, in the same round-robin (all levels give the same bits);
  with ``--rules nonzero,masks`` also with explicit bool masks ``U != 0`` (the same active set, so
  the same result; each client is then two streams, values and mask bytes), ``ours[...,masks]``;
* ``(a) official``: FedRAC's aggregation on flgo-style model objects (benchmarks/official_fedrac.py);
* ``(b) stacked``: best plain torch on the stacked updates (count_nonzero, sum, where);
* ``(b') compiled``: ``torch.compile`` of (b) (skipped with the reason where it cannot compile);
* ``copy``: the copy ceiling -- ``dst.copy_(src)`` moving the same number of bytes as the dense byte
  model of the kernel, ``K*P*s_u + 2*P*4`` (read the updates, read and write g).

Printed and written per variant: median / p10 / p90 time, GB/s on the dense byte model, that as a
fraction of the copy GB/s, and the ratios time(a)/time, time(b)/time, time(b')/time. Before timing,
each ``ours`` result is checked bit for bit against the torch oracle and against (b) (max |diff|).

Cases:
  mlp10       K=10,  the paper MLP 3072-200-200-10 (P = 656,810)
  resnet10    K=10,  GroupNorm ResNet-18 layer list with fc 512->10 (P = 11,181,642; --resnet-width scales it)
  resnet100   K=100, same model
  stream1000  K=1000 bf16 clients streamed in chunks through fk.StreamingAggregator (P = 1e8 on CUDA;
              CPU: the scaled-down --stream-P, default 2,000,000), vs (b) streamed in torch

Usage::

    python -m benchmarks.bench_aggregation --device cpu --cases mlp10,resnet10 --out bench_out
    python -m benchmarks.bench_aggregation --device cpu --cases resnet100 --resnet-width 0.25
    python -m benchmarks.bench_aggregation --device cpu --cases mlp10 --threads 1 --cpu-isas base,avx2,avx512
    python -m benchmarks.bench_aggregation --device cpu --cases mlp10 --cpu-isas base,avx2 --rules nonzero,masks
    python -m benchmarks.bench_aggregation --device cuda --cases mlp10,resnet10,resnet100,stream1000 --out gpu_out
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import common  # noqa: E402
from benchmarks.official_fedrac import (StackedStreaming, compiled_stacked, fmodule_class, make_models,  # noqa: E402
                                        mlp_shapes, numel, official_aggregate, resnet18_shapes,
                                        stacked_mean_update, try_compiled)

import fedrac_kernels as fk  # noqa: E402
from fedrac_kernels.backends import Accum, torch_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALL_CASES = ("mlp10", "resnet10", "resnet100", "stream1000")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--cases", default="mlp10,resnet10", help=f"comma list from {','.join(ALL_CASES)}")
    p.add_argument("--backends", default=None,
                   help="fedrac_kernels back ends to time (default: cpu on CPU, cuda,triton on CUDA; add torch for the oracle)")
    p.add_argument("--nonfinite", default="raise,assume_finite", help="nonfinite modes for ours")
    p.add_argument("--cpu-isas", default=None,
                   help="dense cases: time the cpu back end at each of these kernel levels (comma list from "
                        "base,avx2,avx512, <= the CPU's) side by side in one round-robin, as ours[cpu@<level>,...] "
                        "(default: the active level only; FEDRAC_CPU_ISA caps it)")
    p.add_argument("--rules", default="nonzero",
                   help="dense cases: comma list from nonzero (masks=None, FedRAC's rule) and masks (explicit "
                        "bool masks U != 0: same result, K*P more bytes read; labelled ours[...,masks])")
    p.add_argument("--baselines", default="official,stacked,compiled", help="subset of official,stacked,compiled")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="update dtype (dense cases)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-time", type=float, default=120.0, help="seconds per case (round-robin)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (also the cpu back end's)")
    p.add_argument("--resnet-width", type=float, default=1.0, help="channel-width factor of the ResNet cases")
    p.add_argument("--zero-frac", type=float, default=0.25, help="fraction of exact-zero updates")
    p.add_argument("--official-max-gb", type=float, default=None,
                   help="skip (a) when 4*K*P*4 bytes exceed this (default: 6 on CPU, 40 on CUDA)")
    p.add_argument("--stream-K", type=int, default=1000)
    p.add_argument("--stream-P", type=int, default=None, help="default 1e8 on CUDA, 2e6 on CPU")
    p.add_argument("--stream-chunk", type=int, default=None, help="clients per chunk (default 100 CUDA, 50 CPU)")
    p.add_argument("--stream-source", default=None,
                   help="CUDA: 'device' (chunks resident) and/or 'host' (chunks on the host); default device")
    p.add_argument("--out", default=None, help="folder for aggregation.json / aggregation.csv")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---- inputs -----------------------------------------------------------------------------------
def make_updates(K: int, P: int, dtype, device, zero_frac: float, gen: torch.Generator) -> torch.Tensor:
    """[K, P] updates ~ 0.01 N(0, 1) with a fraction of exact zeros, built row by row on the host."""
    U = torch.empty(K, P, dtype=dtype, device=device)
    for k in range(K):
        row = torch.randn(P, generator=gen) * 0.01
        row.masked_fill_(torch.rand(P, generator=gen) < zero_frac, 0.0)
        U[k].copy_(row.to(dtype))
    return U


def case_spec(name: str, args) -> dict:
    if name == "mlp10":
        return {"K": 10, "shapes": mlp_shapes(), "model": "MLP 3072-200-200-10"}
    if name in ("resnet10", "resnet100"):
        return {"K": 10 if name == "resnet10" else 100, "shapes": resnet18_shapes(10, args.resnet_width),
                "model": f"GN ResNet-18 (width x{args.resnet_width:g})"}
    raise ValueError(f"unknown case {name!r}")


# ---- CPU kernel levels (--cpu-isas) -----------------------------------------------------------
def _cpu_ext():
    from fedrac_kernels.backends import cpu as cpu_backend

    return cpu_backend._cpu


def cpu_levels(args) -> list:
    """The --cpu-isas levels, or [None] (the active level, no switching)."""
    if not args.cpu_isas:
        return [None]
    return [x.strip() for x in args.cpu_isas.split(",") if x.strip()]


def with_isa(isa, fn):
    """fn, run at CPU kernel level isa (set before every call), or fn itself when isa is None."""
    if isa is None:
        return fn
    ext = _cpu_ext()

    def run():
        ext.set_isa(isa)
        return fn()
    return run


# ---- a dense case -----------------------------------------------------------------------------
def run_dense_case(name: str, args, backends: list, modes: list, device: torch.device, gen) -> list:
    spec = case_spec(name, args)
    K, shapes = spec["K"], spec["shapes"]
    P = numel(shapes)
    dtype = DTYPES[args.dtype]
    su = torch.tensor([], dtype=dtype).element_size()
    dense_bytes = K * P * su + 2 * P * 4
    print(f"\n== {name}: K={K}, P={P:,} ({spec['model']}), {args.dtype} updates, dense byte model "
          f"{dense_bytes / 1e6:.1f} MB", flush=True)

    g0 = (torch.randn(P, generator=gen) * 0.05).to(device)
    U = make_updates(K, P, dtype, device, args.zero_frac, gen)
    # make every update exactly what (a) recovers from the client model, (w + d) - w, so that all
    # variants aggregate the same deltas (else updates below ulp(w)/2 vanish in (a) and change its count)
    for k in range(K):
        U[k].copy_(((g0 + U[k].float()) - g0).to(dtype))
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    variants, notes = {}, {}
    checks = {}
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    bad_rules = [r for r in rules if r not in ("nonzero", "masks")]
    if bad_rules:
        raise ValueError(f"--rules: unknown {bad_rules} (nonzero, masks)")
    M = (U != 0) if "masks" in rules else None  # explicit masks: the non-zero rule's active set
    var_bytes = {}  # per-variant byte model where it differs from dense_bytes (masks: + K*P)
    var_check = {}  # ours[...] variant -> its key in checks

    # (b) and its reference result
    b_result = stacked_mean_update(g0, U) if dtype == torch.float32 else stacked_mean_update(g0, U.float())

    # ours: correctness first (fresh g), then the timed closure on a working copy; with --cpu-isas the
    # cpu back end once per kernel level (each call sets its level first), labelled cpu@<level>
    isa_prev = None
    ref = None      # the oracle's result: the same for every back end, level and rule
    for be in backends:
        status = fk.backend_report().get(be, "unavailable: unknown back end")
        if not status.startswith("ok"):
            notes[f"ours[{be}]"] = status
            print(f"  skip ours[{be}]: {status}")
            continue
        levels = cpu_levels(args) if be == "cpu" else [None]
        for isa in levels:
            label = be if isa is None else f"{be}@{isa}"
            if isa is not None and isa_prev is None:
                isa_prev = _cpu_ext().get_isa()
            for rule in rules:
                sfx = "" if rule == "nonzero" else ",masks"
                lr = label + sfx
                Mr = M if rule == "masks" else None
                try:
                    got = with_isa(isa, lambda: fk.masked_mean_update_(g0.clone(), U, masks=Mr, backend=be))()
                except Exception as exc:
                    notes[f"ours[{lr}]"] = f"{type(exc).__name__}: {exc}"
                    print(f"  skip ours[{lr}]: {notes[f'ours[{lr}]']}")
                    continue
                if ref is None:
                    ref = g0.clone()
                    rows = list(U.unbind(0))
                    torch_ref.dense(Accum(rows=rows, weights=torch.ones(K, device=device),
                                          flags=torch.zeros(K, dtype=torch.int32, device=device), P=P, g=ref,
                                          out=ref), None)
                checks[lr] = {"bitwise_vs_oracle": bool(torch.equal(got, ref)),
                              "max_abs_diff_vs_b": float((got - b_result).abs().max())}
                for mode in modes:
                    gw = g0.clone()
                    vname = f"ours[{label},{mode}{sfx}]"
                    var_check[vname] = lr
                    if rule == "masks":
                        var_bytes[vname] = dense_bytes + K * P
                    variants[vname] = with_isa(
                        isa, lambda gw=gw, be=be, mode=mode, Mr=Mr: fk.masked_mean_update_(gw, U, masks=Mr, backend=be,
                                                                                         nonfinite=mode))

    if "stacked" in baselines:
        Ub = U if dtype == torch.float32 else U.float()
        variants["(b) stacked"] = lambda: stacked_mean_update(g0, Ub)
    if "compiled" in baselines:
        fn, why = compiled_stacked()
        Ub = U if dtype == torch.float32 else U.float()
        ok, why = try_compiled(fn, g0, Ub) if fn is not None else (False, why)
        if ok:
            variants["(b') compiled"] = lambda: fn(g0, Ub)
        else:
            notes["(b') compiled"] = why
            print(f"  skip (b') compiled: {why}")
    official = None
    if "official" in baselines:
        limit = args.official_max_gb if args.official_max_gb is not None else (6.0 if device.type == "cpu" else 40.0)
        need = 4 * K * P * 4 / 1e9
        if need > limit:
            notes["(a) official"] = f"skipped: needs ~{need:.1f} GB (> --official-max-gb {limit:g})"
            print(f"  skip (a) official: {notes['(a) official']}")
        else:
            cls = fmodule_class(shapes, device)
            glob, models = make_models(cls, g0, U)
            official = (glob, models)
            res = official_aggregate(glob, models)
            a_vec = torch.cat([p.data.view(-1) for p in res.parameters()])
            checks["(a)"] = {"max_abs_diff_vs_b": float((a_vec - b_result).abs().max())}
            del res, a_vec
            variants["(a) official"] = lambda: official_aggregate(glob, models)
    probe = common.CopyProbe(dense_bytes, device)
    variants["copy"] = probe
    gc.collect()

    timings = common.measure_round_robin(variants, device=device, warmup=args.warmup, reps=args.reps,
                                         max_time=args.max_time, seed=args.seed)
    if isa_prev is not None:
        _cpu_ext().set_isa(isa_prev)
    copy_gbps = common.gbps(probe.nbytes, timings["copy"]["median"])
    for t in timings.values():
        if "thread_cpu" in t:
            t["thread_cpu"]["times"] = t.pop("thread_cpu_times")
    print(f"  copy ceiling: {copy_gbps:.1f} GB/s ({common.fmt_time(timings['copy']['median'])} for "
          f"{probe.nbytes / 1e6:.1f} MB of traffic)")
    records = []
    tables = [("wall", lambda t: t)]
    if device.type == "cpu" and torch.get_num_threads() == 1:
        tables.append(("thread CPU (excludes time descheduled; 1 thread)", lambda t: t["thread_cpu"]))
    for title, pick in tables:
        tt = {k: pick(v) for k, v in timings.items()}
        t_a = tt.get("(a) official", {}).get("median")
        t_b = tt.get("(b) stacked", {}).get("median")
        t_c = tt.get("(b') compiled", {}).get("median")
        copy_gbps = common.gbps(probe.nbytes, tt["copy"]["median"])
        nw = max([28] + [len(v) + 1 for v in tt])
        print(f"  [{title}]")
        print(f"  {'variant':<{nw}}{'median':>11}{'p10':>11}{'p90':>11}{'GB/s':>8}{'%copy':>7}"
              f"{'vs (a)':>9}{'vs (b)':>8}{'vs (b`)':>8}")
        for vname, t in tt.items():
            med = t["median"]
            vbytes = var_bytes.get(vname, dense_bytes)
            rate = common.gbps(vbytes, med) if vname != "copy" else copy_gbps
            frac = rate / copy_gbps if copy_gbps else float("nan")
            ra = t_a / med if t_a else float("nan")
            rb = t_b / med if t_b else float("nan")
            rc = t_c / med if t_c else float("nan")
            print(f"  {vname:<{nw}}{common.fmt_time(med):>11}{common.fmt_time(t['p10']):>11}"
                  f"{common.fmt_time(t['p90']):>11}{rate:>8.1f}{100 * frac:>6.0f}%{ra:>8.1f}x{rb:>7.2f}x{rc:>7.2f}x")
            records.append({"case": name, "variant": vname, "clock": "wall" if title == "wall" else "thread_cpu",
                            "K": K, "P": P, "dtype": args.dtype, "device": str(device),
                            "threads": torch.get_num_threads(), "bytes_model": vbytes, "median_s": med,
                            "p10_s": t["p10"], "p90_s": t["p90"], "n": t["n"], "gbps": rate, "copy_gbps": copy_gbps,
                            "frac_copy": frac, "speedup_vs_a": ra, "speedup_vs_b": rb, "speedup_vs_b_compiled": rc,
                            "check": (checks.get(var_check[vname]) if vname in var_check
                                      else checks.get("(a)") if vname == "(a) official" else None),
                            "times": t.get("times", t.get("thread_cpu_times"))})
    for vname, why in notes.items():
        records.append({"case": name, "variant": vname, "K": K, "P": P, "dtype": args.dtype,
                        "device": str(device), "skipped": why})
    for be, c in checks.items():
        if "bitwise_vs_oracle" in c:
            print(f"  check ours[{be}]: bitwise == torch oracle: {c['bitwise_vs_oracle']}, "
                  f"max |ours - (b)| = {c['max_abs_diff_vs_b']:.3g}")
    if "(a)" in checks:
        print(f"  check (a): max |(a) - (b)| = {checks['(a)']['max_abs_diff_vs_b']:.3g} (reciprocal product)")
    del U, M, official, variants
    gc.collect()
    return records


# ---- the streamed case ------------------------------------------------------------------------
def run_stream_case(args, backends: list, modes: list, device: torch.device, gen) -> list:
    cuda = device.type == "cuda"
    K = args.stream_K
    P = args.stream_P or (100_000_000 if cuda else 2_000_000)
    Kc = args.stream_chunk or (100 if cuda else 50)
    nchunks = (K + Kc - 1) // Kc
    sources = [s.strip() for s in (args.stream_source or "device").split(",")] if cuda else ["host"]
    dense_bytes = K * P * 2 + 2 * P * 4
    records = []
    for source in sources:
        where = device if source == "device" else torch.device("cpu")
        print(f"\n== stream1000: K={K} bf16 clients x P={P:,}, chunks of {Kc} ({nchunks} chunks, one chunk buffer "
              f"reused, on {where}), dense byte model {dense_bytes / 1e9:.2f} GB", flush=True)
        chunk = make_updates(Kc, P, torch.bfloat16, where, args.zero_frac, gen)
        sizes = [min(Kc, K - i * Kc) for i in range(nchunks)]
        g = (torch.randn(P, generator=gen) * 0.05).to(device)
        variants, notes = {}, {}
        for be in backends:
            for mode in modes:
                try:
                    agg = fk.StreamingAggregator(g, backend=be, nonfinite=mode)
                except Exception as exc:
                    notes[f"ours[{be},{mode}]"] = f"{type(exc).__name__}: {exc}"
                    continue

                def run(agg=agg):
                    agg.reset()
                    for n in sizes:
                        agg.add(chunk if n == Kc else chunk[:n])
                    agg.apply_(g)
                try:
                    run()
                except Exception as exc:
                    notes[f"ours[{be},{mode}]"] = f"{type(exc).__name__}: {exc}"
                    continue
                variants[f"ours[{be},{mode}]"] = run
        if "stacked" in args.baselines:
            st = StackedStreaming(P, device)

            def run_b():
                st.reset()
                for n in sizes:
                    c = chunk if n == Kc else chunk[:n]
                    st.add(c.to(device, non_blocking=True) if c.device != device else c)
                st.apply_(g)
            variants["(b) stacked, streamed"] = run_b
        notes["(a) official"] = "n/a: needs every client model at once (does not stream)"
        if source == "host" and cuda:
            try:
                host = chunk if chunk.is_pinned() else chunk.pin_memory()
                pinned = "pinned"
            except RuntimeError:  # pinning this much host memory can fail: measure pageable then
                host, pinned = chunk, "pageable"
            dev_buf = torch.empty_like(host, device=device)
            copy_bytes = K * P * 2
            variants["copy"] = lambda: [dev_buf.copy_(host, non_blocking=True) for _ in range(nchunks)]
            ceiling_note = f"H2D copy of the same update bytes ({pinned})"
        else:
            probe = common.CopyProbe(dense_bytes, device)
            copy_bytes = probe.nbytes
            variants["copy"] = probe
            ceiling_note = "device copy of the dense byte model"
        for v, why in notes.items():
            print(f"  skip {v}: {why}")
        reps = max(3, min(args.reps, 7))
        timings = common.measure_round_robin(variants, device=device, warmup=1, reps=reps, max_time=args.max_time,
                                             seed=args.seed)
        copy_gbps = common.gbps(copy_bytes, timings["copy"]["median"])
        t_b = timings.get("(b) stacked, streamed", {}).get("median")
        print(f"  ceiling ({ceiling_note}): {copy_gbps:.1f} GB/s")
        print(f"  {'variant':<28}{'median':>11}{'p10':>11}{'p90':>11}{'GB/s':>8}{'%copy':>7}{'vs (b)':>8}")
        for vname, t in timings.items():
            med = t["median"]
            rate = common.gbps(dense_bytes if vname != "copy" else copy_bytes, med)
            frac = rate / copy_gbps if copy_gbps else float("nan")
            rb = t_b / med if t_b else float("nan")
            print(f"  {vname:<28}{common.fmt_time(med):>11}{common.fmt_time(t['p10']):>11}"
                  f"{common.fmt_time(t['p90']):>11}{rate:>8.1f}{100 * frac:>6.0f}%{rb:>7.2f}x")
            records.append({"case": "stream1000", "source": source, "variant": vname, "K": K, "P": P, "chunk": Kc,
                            "dtype": "bf16", "device": str(device), "bytes_model": dense_bytes, "median_s": med,
                            "p10_s": t["p10"], "p90_s": t["p90"], "n": t["n"], "gbps": rate, "copy_gbps": copy_gbps,
                            "frac_copy": frac, "speedup_vs_b": rb, "times": t["times"]})
        for vname, why in notes.items():
            records.append({"case": "stream1000", "source": source, "variant": vname, "K": K, "P": P,
                            "skipped": why})
        del chunk, variants
        gc.collect()
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_aggregation: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b.strip() for b in (args.backends or ("cuda,triton" if device.type == "cuda" else "cpu"))
                .split(",") if b.strip()]
    modes = [m.strip() for m in args.nonfinite.split(",") if m.strip()]
    if args.cpu_isas:
        ok = fk.backend_report().get("cpu", "").startswith("ok")
        have = list(_cpu_ext().supported_isas()) if ok else []
        bad = [x for x in cpu_levels(args) if x not in have]
        if bad:
            print(f"bench_aggregation: --cpu-isas {','.join(bad)} not available (this CPU runs: "
                  f"{','.join(have) or 'no cpu back end'})", file=sys.stderr)
            return 2
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in ALL_CASES:
            print(f"bench_aggregation: unknown case {c!r}; choose from {', '.join(ALL_CASES)}", file=sys.stderr)
            return 2
    gen = torch.Generator().manual_seed(args.seed)
    meta = common.device_info(device)
    meta["args"] = vars(args)
    meta["backends"] = fk.backend_report()
    print(f"device: {meta.get('gpu', meta['cpu'])}, torch {meta['torch']}, threads {meta['torch_threads']}, "
          f"commit {meta['commit']}, load {meta.get('loadavg')}")
    if meta["busy_processes"]:
        print(f"note: other busy processes: {meta['busy_processes']}")
    records = []
    for c in cases:
        if c == "stream1000":
            records += run_stream_case(args, backends, modes, device, gen)
        else:
            records += run_dense_case(c, args, backends, modes, device, gen)
    meta["busy_processes_after"] = common.busy_processes()
    try:
        meta["loadavg_after"] = os.getloadavg()
    except OSError:
        pass
    if args.out:
        j, c = common.write_results(args.out, "aggregation", records, meta)
        print(f"\nwrote {j} and {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
