"""Client Gram matrix G = U U^T summed over layers (spec §7 K12, FedPW's dot weights): the streamed
op ``fedrac_kernels.gram_matrix`` vs a naive per-layer loop.

Cases (the clients' updates already in memory, as a simulator holds them):

* ``mlp``: FedRAC's CIFAR-10 MLP, K = 10, layers 3072x200, 200, 200x200, 200, 10x200, 10
  (P = 656,810); the updates as one [K, P] buffer and as K per-client vectors.
* ``resnet10``: FedPW's own setting, K = 20 clients, a ResNet-10-sized update (P ~ 4.9 M in 12
  tensors; ``--cases resnet10``; about 0.4 GB of float32 updates).

Variants (timed round-robin, medians):

* ``naive_layers``   - FedPW's code: per layer, stack the K client tensors of the layer, one
  float32 GEMM, add into the [K, K] result (the layer copies are what it pays for)
* ``naive_pairs``    - K(K+1)/2 dot products per layer (the textbook loop; K = 10 only)
* ``dense_f64``      - ``U.double() @ U.double().T`` (the oracle; materialises a float64 copy of U)
* ``ours_f64``       - ``gram_matrix(U)`` float64 accumulation, 64 k-column chunks (default)
* ``ours_f32``       - ``gram_matrix(U, accumulate=float32)``
* ``ours_rows``      - ``gram_matrix(list of K client vectors)`` (no [K, P] buffer needed)

Every variant is checked against the oracle (relative error reported). Effective bandwidth =
bytes of U read once / time.

    python benchmarks/bench_gram.py --threads 1 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from fedrac_kernels.gram import gram_matrix, gram_reference  # noqa: E402

MLP_LAYERS = [(200, 3072), (200,), (200, 200), (200,), (10, 200), (10,)]
# ResNet-10-like (BasicBlock x1 per stage, 64-128-256-512 channels), 12 tensors, ~4.9 M parameters
RESNET10_LAYERS = [(64, 3, 3, 3), (64, 64, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3),
                   (128, 64, 1, 1), (256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1), (512, 256, 3, 3),
                   (512, 512, 3, 3), (512, 256, 1, 1)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def naive_layers(updates: list, layers) -> torch.Tensor:
    """FedPW's update(): for each layer, stack the K clients' layer tensors, GEMM, accumulate (float32)."""
    K = len(updates)
    G = torch.zeros(K, K)
    off = 0
    for shape in layers:
        n = _numel(shape)
        D = torch.stack([u[off:off + n] for u in updates]).to(torch.float32)
        G += torch.mm(D, D.t())
        off += n
    return G


def naive_pairs(updates: list, layers) -> torch.Tensor:
    K = len(updates)
    G = torch.zeros(K, K, dtype=torch.float64)
    off = 0
    for shape in layers:
        n = _numel(shape)
        for i in range(K):
            for j in range(i, K):
                v = float(torch.dot(updates[i][off:off + n], updates[j][off:off + n]))
                G[i, j] += v
                if i != j:
                    G[j, i] += v
        off += n
    return G


def run_case(name: str, K: int, layers, *, device: torch.device, reps: int, seed: int, pairs: bool) -> list:
    P = sum(_numel(s) for s in layers)
    g = torch.Generator().manual_seed(seed)
    U = (torch.randn(K, P, generator=g) * 1e-2).to(device)
    rows = [U[k].clone() for k in range(K)]
    ref = gram_reference(U)
    variants = {
        "naive_layers": lambda: naive_layers(rows, layers),
        "dense_f64": lambda: gram_reference(U),
        "ours_f64": lambda: gram_matrix(U),
        "ours_f32": lambda: gram_matrix(U, accumulate=torch.float32),
        "ours_rows": lambda: gram_matrix(rows),
    }
    if pairs:
        variants["naive_pairs"] = lambda: naive_pairs(rows, layers)
    err = {}
    for vname, fn in variants.items():
        G = fn().to(torch.float64).cpu()
        err[vname] = float(((G - ref.cpu()).abs().max() / ref.abs().max()).item())
    res = common.measure_round_robin(variants, device=device, reps=reps, warmup=1)
    nbytes = K * P * 4
    out = []
    base = res["naive_layers"]["median"]
    for vname, r in res.items():
        out.append({"case": name, "variant": vname, "K": K, "P": P, "layers": len(layers),
                    "median_s": r["median"], "p10_s": r["p10"], "p90_s": r["p90"], "n": r["n"],
                    "speedup_vs_naive_layers": base / r["median"],
                    "effective_GBps": common.gbps(nbytes, r["median"]), "max_rel_error": err[vname],
                    "times": r["times"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cases", default="mlp", help="mlp,resnet10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for bench_gram.json / .csv")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    records = []
    for case in args.cases.split(","):
        case = case.strip()
        if case == "mlp":
            records += run_case("mlp", 10, MLP_LAYERS, device=device, reps=args.reps, seed=args.seed, pairs=True)
        elif case == "resnet10":
            records += run_case("resnet10", 20, RESNET10_LAYERS, device=device, reps=args.reps, seed=args.seed,
                                pairs=False)
        else:
            raise SystemExit(f"--cases: unknown case {case!r} (mlp, resnet10)")
    print(f"{'case':<9} {'variant':<13} {'K':>3} {'P':>9} {'median':>11} {'vs naive':>9} {'GB/s':>7} {'rel err':>9}")
    for r in records:
        print(f"{r['case']:<9} {r['variant']:<13} {r['K']:>3} {r['P']:>9} {common.fmt_time(r['median_s']):>11} "
              f"{r['speedup_vs_naive_layers']:>8.2f}x {r['effective_GBps']:>7.2f} {r['max_rel_error']:>9.1e}")
    if args.out:
        meta = {"device": common.device_info(device), "threads": torch.get_num_threads(),
                "commit": common.git_commit(), "busy": common.busy_processes()}
        j, c = common.write_results(args.out, "bench_gram", records, meta)
        print(f"wrote {j} and {c}")


if __name__ == "__main__":
    main()
