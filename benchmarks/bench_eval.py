"""Fused nested-candidate evaluation (spec §7 K5) vs C separate forwards.

Cases (data already in memory / on the device, as a simulator holding tensors would have it):

* ``mlp``: FedRAC CIFAR-10 MLP (3072-200-200-10), B validation samples (default 5,000 = |V|),
  C = 50 nested prefixes of 8 over a random joint order of the 400 hidden neurons.
* ``resnet``: FedRAC CIFAR-10 GroupNorm ResNet-18 (7x7/2 stem, 3x32x32), C prefixes of
  1024 / C channels (phase 1: 32 prefixes of 32); small B on the CPU.

Variants, timed round-robin (every variant once per repetition, shuffled order; medians):

* ``fused``     -- :func:`fedrac.evaluation.nested_candidate_accuracy`
* ``separate``  -- C calls of :func:`fedrac.evaluation.accuracy` with one mask each
* ``one_full``  -- one evaluation of the full model (the unit of the "<= 2x" target)
* ``masks``     -- :func:`fedrac.evaluation.masks_accuracy` on the C dense masks (MLP only:
  shared layer 1, float32 per-mask rest)

The script checks that fused and separate give identical correct counts per candidate.

    python benchmarks/bench_eval.py --threads 1 --out bench_eval_cpu.json
    python benchmarks/bench_eval.py --device cuda --out bench_eval_gpu.json
    python benchmarks/bench_eval.py --device cuda --cases mlp --mlp-rows 16384   # the simulator's rows

On a GPU the torch walk would issue ~3-4 small kernels per candidate per block of rows and a
separate forward ~11 (plus a host sync per batch): both launch-bound, a ratio of a few x. So on
CUDA the walk's logits come from one Triton launch per block (fedrac._walk_triton; the torch walk
with ``FEDRAC_EVAL_WALK=torch``, to compare); ``--mlp-rows`` 1024 vs 16384 shows the effect of
the block size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fedrac.evaluation import (accuracy, masks_accuracy, nested_candidate_accuracy,  # noqa: E402
                               nested_masks)
from fedrac.models import build_model, flatten_parameters  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev):
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(dev)
    return out, time.perf_counter() - t0, time.process_time() - c0


def run_case(name, model, x, y, order, sizes, reps, dev, with_masks, rows=None):
    params = flatten_parameters(model).to(dev)
    masks = nested_masks(order, sizes).to(dev)
    n = x.shape[0]
    variants = {
        "fused": lambda: nested_candidate_accuracy(model, params, x, y, order, sizes, batch_size=rows),
        "separate": lambda: torch.tensor([accuracy(model, params, x, y, mask=m, batch_size=rows) for m in masks],
                                         dtype=torch.float64),
        "one_full": lambda: accuracy(model, params, x, y, batch_size=rows),
    }
    if with_masks:
        variants["masks"] = lambda: masks_accuracy(model, params, x, y, masks, batch_size=rows)
    results = {}
    for v, fn in variants.items():                      # warm-up (and the results to compare)
        results[v] = fn()
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    rng = random.Random(0)
    for _ in range(reps):
        names = list(variants)
        rng.shuffle(names)
        for v in names:
            _, w, c = _timed(variants[v], dev)
            wall[v].append(w)
            cpu[v].append(c)
    fused_counts = (results["fused"] * n).round().long()
    sep_counts = (results["separate"] * n).round().long()
    mismatches = int((fused_counts != sep_counts).sum())
    med = {v: statistics.median(t) for v, t in wall.items()}
    out = {
        "B": n, "C": int(sizes.numel()), "N": model.num_neurons, "reps": reps, "rows": rows,
        "variants": {v: {"median_s": med[v], "min_s": min(wall[v]), "wall_s": wall[v],
                         "cpu_s_median": statistics.median(cpu[v])} for v in variants},
        "speedup_fused_vs_separate": med["separate"] / med["fused"],
        "fused_over_one_full": med["fused"] / med["one_full"],
        "counts_identical": mismatches == 0,
        "candidates_with_different_counts": mismatches,
        "fused_counts": fused_counts.tolist(),
    }
    if with_masks:
        m_counts = (results["masks"] * n).round().long()
        out["masks_counts_identical"] = bool(torch.equal(m_counts, sep_counts))
        out["speedup_masks_vs_separate"] = med["separate"] / med["masks"]
    print(f"[{name}] B={n} C={sizes.numel()} N={model.num_neurons} reps={reps}")
    for v in variants:
        print(f"  {v:9s} median {med[v] * 1e3:10.2f} ms   min {min(wall[v]) * 1e3:10.2f} ms   "
              f"cpu {statistics.median(cpu[v]) * 1e3:10.2f} ms")
    print(f"  fused vs separate: {out['speedup_fused_vs_separate']:.1f}x faster; "
          f"fused / one full evaluation = {out['fused_over_one_full']:.2f}; "
          f"correct counts identical: {out['counts_identical']} ({mismatches} candidates differ)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mlp-batch", type=int, default=5000)
    ap.add_argument("--mlp-candidates", type=int, default=50)
    ap.add_argument("--resnet-batch", type=int, default=None, help="default 16 on CPU, 2000 on GPU")
    ap.add_argument("--resnet-candidates", type=int, default=None, help="default 32 on CPU, 128 on GPU")
    ap.add_argument("--resnet-reps", type=int, default=None, help="default 2 on CPU, --reps on GPU")
    ap.add_argument("--cases", default="mlp,resnet")
    ap.add_argument("--mlp-rows", type=int, default=None, help="eval batch_size (rows per chunk) of every MLP "
                    "variant (default: the evaluation module's, 1024; the simulator's auto is 16384)")
    ap.add_argument("--resnet-rows", type=int, default=None, help="the same for the ResNet (default 256; the "
                    "simulator's CUDA auto is 4096)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else ("cpu" if args.device == "auto" else args.device))
    gpu = dev.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 path: counts must match
        torch.backends.cudnn.allow_tf32 = False
    report = {
        "benchmark": "bench_eval", "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "cases": {},
    }
    g = torch.Generator().manual_seed(args.seed)
    cases = args.cases.split(",")
    if "mlp" in cases:
        model = build_model("mlp", dataset="cifar10", num_classes=10, input_shape=(3, 32, 32),
                            seed=args.seed).to(dev)
        x = torch.randn(args.mlp_batch, 3, 32, 32, generator=g).to(dev)
        y = torch.randint(0, 10, (args.mlp_batch,), generator=g).to(dev)
        C = args.mlp_candidates
        order = torch.randperm(400, generator=g)
        sizes = torch.arange(1, C + 1) * (400 // C)
        report["cases"]["mlp_cifar10"] = run_case("mlp_cifar10", model, x, y, order, sizes,
                                                  args.reps, dev, with_masks=True, rows=args.mlp_rows)
    if "resnet" in cases:
        B = args.resnet_batch or (2000 if gpu else 16)
        C = args.resnet_candidates or (128 if gpu else 32)
        reps = args.resnet_reps or (args.reps if gpu else 2)
        model = build_model("resnet18", dataset="cifar10", num_classes=10, input_shape=(3, 32, 32),
                            seed=args.seed).to(dev)
        x = torch.randn(B, 3, 32, 32, generator=g).to(dev)
        y = torch.randint(0, 10, (B,), generator=g).to(dev)
        order = torch.randperm(1024, generator=g)
        sizes = torch.arange(1, C + 1) * (1024 // C)
        report["cases"]["resnet18_cifar10"] = run_case("resnet18_cifar10", model, x, y, order, sizes,
                                                       reps, dev, with_masks=False, rows=args.resnet_rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
