"""Sparsified rewards (K9/K10) and cosine to the aggregate (K8): fedrac_kernels.sparsify vs a plain
per-layer Python loop.

Per case, timed round-robin in one process (benchmarks/common.py):

``topq`` - K clients each add their layer-wise top-q_k of one aggregate u to their parameter row
(CGSV / FedAVE / CFFL-layer rewards):

* ``loop``: what the reference code does, written out: for every client, for every parameter
  tensor, ``torch.topk`` of ``|u|`` at ``min(ceil(q n), n - 1)``, a masked copy of the tensor and an
  add into the client's model (K x S selections);
* ``ours[<backend>]``: ``fk.layerwise_topq_add_`` (``torch`` = the reference back end,
  ``fused`` = one selection per tensor for all clients + vectorised apply, ``triton`` = that
  selection + one Triton apply kernel; CUDA only).

``topk`` - global top-k downloads (CFFL ``largest_criterion=all``): ``loop`` (a ``torch.topk`` per
client over all of u) vs ``fk.global_topk_add_``.

``cosine`` - cos(U_k, u) for K clients (CGSV's phi): ``loop`` (``F.cosine_similarity`` per client, as
the reference) vs ``fk.cosine_to_aggregate``.

Every ``ours`` result is checked against the loop before timing (selections: bit for bit;
cosine: 1e-5). Printed and written: median / p10 / p90 and the speed-up loop / ours.

Cases:
  mlp10      K=10, the paper MLP 3072-200-200-10 (P = 656,810, 6 tensors)
  resnet10   K=10, the GroupNorm ResNet-18 parameter tensors (P ~ 11.2 M; --resnet-width scales it)
  mlp100     K=100, the MLP

On a shared CPU machine pass ``--threads 1``: with more threads than idle cores every parallel
torch op waits for a descheduled thread, and the per-op times of the chunked apply become erratic
(10x swings were seen on a 2-core box under foreign load).

Measured (2-core shared CPU box, torch 2.13, --threads 1, medians; loop / ours[fused]):
  mlp10     topq 434 ms / 28.8 ms (15.1x), topk 256 ms / 29.8 ms (8.6x), cosine 7.6 ms / 4.1 ms (1.9x)
  resnet10  topq 13.1 s / 1.10 s (11.9x), topk 9.4 s / 1.09 s (8.6x), cosine 1.14 s / 0.10 s (11.3x)

Usage::

    python -m benchmarks.bench_sparsify --cases mlp10 --threads 1 --out bench_out
    python -m benchmarks.bench_sparsify --device cuda --cases mlp10,resnet10,mlp100 --out gpu_out
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import device_info, fmt_time, measure_round_robin, write_results  # noqa: E402
import fedrac_kernels as fk  # noqa: E402
from fedrac_kernels import sparsify as sp  # noqa: E402

ALL_CASES = ("mlp10", "resnet10", "mlp100")


def mlp_segments(d_in=3072, hidden=200, classes=10) -> list:
    shapes = [(hidden, d_in), (hidden,), (hidden, hidden), (hidden,), (classes, hidden), (classes,)]
    out, off = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append((off, n))
        off += n
    return out


def resnet_segments(width: float) -> list:
    from fedrac.models import build_model

    model = build_model("resnet18", dataset="cifar10", num_classes=10, input_shape=(3, 32, 32))
    if width != 1.0:
        # scale every tensor's size (a stand-in with the same number of tensors, for small machines)
        segs, off = [], 0
        for _, p in model.named_parameters():
            n = max(1, int(p.numel() * width))
            segs.append((off, n))
            off += n
        return segs
    layout = fk.NeuronLayout.from_module(model)
    return [(s.offset, s.numel) for s in layout.segments]


def case_setup(name: str, width: float):
    if name == "mlp10":
        return mlp_segments(), 10
    if name == "mlp100":
        return mlp_segments(), 100
    if name == "resnet10":
        return resnet_segments(width), 10
    raise SystemExit(f"unknown case {name!r}; choose from {', '.join(ALL_CASES)}")


# ---- the plain loops (the reference code's structure, in our words) -------------------------------
def loop_topq_add_(T, u, segments, q):
    for k in range(T.shape[0]):
        for off, n in segments:
            c = min(math.ceil(float(q[k]) * n), n - 1)
            if c <= 0:
                continue
            layer = u[off:off + n]
            thr = torch.topk(layer.abs(), c).values[-1]
            part = layer.clone()
            part[layer.abs() < thr] = 0
            T[k, off:off + n] += part


def loop_topk_add_(T, u, counts):
    for k in range(T.shape[0]):
        c = int(counts[k])
        if c == 0:
            continue
        thr = torch.topk(u.abs(), c).values[-1]
        part = u.clone()
        part[u.abs() < thr] = 0
        T[k] += part


def loop_cosine(U, u, eps=1e-10):
    return torch.stack([F.cosine_similarity(U[k], u, 0, eps) for k in range(U.shape[0])]).double()


# ---- main --------------------------------------------------------------------------------------------
def run_case(name, args, device):
    segments, K = case_setup(name, args.resnet_width)
    P = segments[-1][0] + segments[-1][1]
    g = torch.Generator().manual_seed(0)
    u = torch.randn(P, generator=g).to(device)
    T0 = torch.randn(K, P, generator=g).to(device)
    U = torch.randn(K, P, generator=g).to(device)
    q = torch.linspace(0.3, 1.0, K, dtype=torch.float64)
    counts = [int(P * float(x) * 0.5) for x in q]
    backends = [b for b in (args.backends.split(",") if args.backends else sp.sparsify_backends(device))
                if b in sp.sparsify_backends(device)]
    records = []

    # correctness first
    ref = T0.clone()
    loop_topq_add_(ref, u, segments, q)
    for be in backends:
        X = T0.clone()
        fk.layerwise_topq_add_(X, u, segments, q, backend=be)
        assert torch.equal(X, ref), f"topq {be} differs from the loop"
    ref = T0.clone()
    loop_topk_add_(ref, u, counts)
    for be in backends:
        X = T0.clone()
        fk.global_topk_add_(X, u, counts, backend=be)
        assert torch.equal(X, ref), f"topk {be} differs from the loop"
    cref = loop_cosine(U, u).cpu()
    for be in backends:
        c = fk.cosine_to_aggregate(U, u, backend=be)
        assert torch.allclose(c, cref, atol=1e-5), f"cosine {be} differs from the loop"

    work = {"loop": T0.clone(), **{be: T0.clone() for be in backends}}
    ops = {
        "topq": ({"loop": lambda: loop_topq_add_(work["loop"], u, segments, q)},
                 lambda be: (lambda: fk.layerwise_topq_add_(work[be], u, segments, q, backend=be))),
        "topk": ({"loop": lambda: loop_topk_add_(work["loop"], u, counts)},
                 lambda be: (lambda: fk.global_topk_add_(work[be], u, counts, backend=be))),
        "cosine": ({"loop": lambda: loop_cosine(U, u)},
                   lambda be: (lambda: fk.cosine_to_aggregate(U, u, backend=be))),
    }
    for op, (base, mk) in ops.items():
        variants = dict(base)
        for be in backends:
            variants[f"ours[{be}]"] = mk(be)
        res = measure_round_robin(variants, device=device, warmup=args.warmup, reps=args.reps,
                                  max_time=args.max_time)
        t_loop = res["loop"]["median"]
        print(f"{name} K={K} P={P:,} S={len(segments)}  {op}")
        for v, r in res.items():
            speed = t_loop / r["median"] if r["median"] > 0 else float("nan")
            print(f"  {v:<14} median {fmt_time(r['median']):>10}  p10 {fmt_time(r['p10']):>10}  "
                  f"p90 {fmt_time(r['p90']):>10}  loop/this {speed:6.2f}x")
            records.append({"case": name, "op": op, "variant": v, "K": K, "P": P, "S": len(segments),
                            "median_s": r["median"], "p10_s": r["p10"], "p90_s": r["p90"], "n": r["n"],
                            "speedup_vs_loop": speed, "times": r["times"]})
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--cases", default="mlp10", help=f"comma list from {','.join(ALL_CASES)}")
    p.add_argument("--backends", default=None, help="comma list of torch,fused,triton (default: all usable)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-time", type=float, default=60.0, help="seconds per op and case (round-robin)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--resnet-width", type=float, default=1.0, help="size factor of the ResNet tensors")
    p.add_argument("--out", default=None, help="folder for sparsify.json / sparsify.csv")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET"):
        print("note: TRITON_INTERPRET is set; the triton back end is excluded from CPU timings")
        if not args.backends:
            args.backends = "torch,fused"
    records = []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        records += run_case(name, args, device)
    meta = device_info(device)
    meta["args"] = vars(args)
    if args.out:
        j, c = write_results(args.out, "sparsify", records, meta)
        print(f"wrote {j} and {c}")
    return records


if __name__ == "__main__":
    main()
