"""Per-call cost of the public ops at sizes where the fixed (Python) overhead shows.

Each case calls one public op many times in one process; a *batch* times ``--calls`` calls with
``time.perf_counter`` and reports the per-call median of the batch; ``--batches`` batches run in
turns over all cases (so a burst of load from other processes hits every case alike) and the
table gives the lowest and the median of the batch medians. Inputs are built once; in-place ops
update the same buffers every call (the values drift, the work does not change).

    python -m benchmarks.bench_overhead                 # all cases, one torch thread
    python -m benchmarks.bench_overhead --cases masked_tiny,order400 --batches 9
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _cases(gen: torch.Generator) -> dict:
    import fedrac_kernels as fk
    from fedrac_kernels.layout import NeuronLayout

    def masked(P: int, K: int = 10, **kw):
        g = torch.zeros(P)
        d = torch.randn(K, P, generator=gen) * 1e-3
        d[d.abs() < 5e-4] = 0
        return lambda: fk.masked_mean_update_(g, d, **kw)

    # the FedRAC MLP 3072-200-200-10 (P = 656,810) and a tiny MLP 8-16-16-4 (P = 484)
    def mlp(widths):
        sites, params = [], []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(widths) - 2
            out_site = None if last else f"h{i}"
            in_site = None if i == 0 else f"h{i - 1}"
            if not last:
                sites.append((out_site, b))
            params.append((f"fc{i}.weight", (b, a), out_site, in_site))
            params.append((f"fc{i}.bias", (b,), out_site, None))
        return NeuronLayout(sites, params)

    def structured(widths, K: int = 10, **kw):
        lay = mlp(widths)
        g = torch.zeros(lay.P)
        d = torch.randn(K, lay.P, generator=gen) * 1e-3
        nm = torch.rand(K, lay.N, generator=gen) < 0.7
        return lambda: fk.structured_mean_update_(g, d, lay, nm, **kw)

    N, K = 400, 10
    f_dense = torch.zeros(N, dtype=torch.int64)
    fm = torch.rand(K, N, generator=gen) < 0.5
    f_nest = torch.zeros(N, dtype=torch.int64)
    order = torch.randperm(N, generator=gen)
    sizes = torch.tensor([40 * (k + 1) for k in range(K)])
    freq400 = torch.randint(0, 50, (N,), generator=gen).to(torch.float32)
    w = torch.rand(K, generator=gen) + 0.5
    return {
        "masked_mlp": masked(656_810),
        "masked_mlp_assume_finite": masked(656_810, nonfinite="assume_finite"),
        "masked_p11m_k2": masked(11_181_642, K=2),  # ResNet-18's P: the scratch buffer is 45 MB
        "masked_p11m_k2_assume_finite": masked(11_181_642, K=2, nonfinite="assume_finite"),
        "masked_tiny": masked(1000),
        "masked_tiny_weights": masked(1000, weights=w),
        "masked_tiny_assume_finite": masked(1000, nonfinite="assume_finite"),
        "structured_mlp": structured((3072, 200, 200, 10)),
        "structured_tiny": structured((8, 16, 16, 4)),
        "freq_dense400": lambda: fk.frequency_update_(f_dense, fm),
        "freq_nested400": lambda: fk.frequency_update_(f_nest, order=order, sizes=sizes),
        "order400": lambda: fk.lowest_frequency_order(freq400),
        "nested_masks400": lambda: fk.nested_masks(order, sizes),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--calls", type=int, default=0, help="calls per batch (default: by case size)")
    ap.add_argument("--batches", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = _cases(torch.Generator().manual_seed(0))
    if args.cases:
        cases = {k: cases[k] for k in args.cases.split(",")}
    per = {k: [] for k in cases}
    for fn in cases.values():  # warm-up: back-end choice, caches, first-touch allocations
        for _ in range(20):
            fn()
    for _ in range(args.batches):
        for name, fn in cases.items():
            n = args.calls or (10 if "p11m" in name else 100 if "mlp" in name else 2000)
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            per[name].append(statistics.median(ts))
    print(f"{'case':28s} {'best median':>12s} {'median of medians':>18s}")
    for name, meds in per.items():
        print(f"{name:28s} {min(meds) * 1e6:10.1f}us {statistics.median(meds) * 1e6:16.1f}us")


if __name__ == "__main__":
    main()
