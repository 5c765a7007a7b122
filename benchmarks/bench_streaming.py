"""Streaming aggregation from pinned host memory: K clients x P bf16 through StreamingAggregator.

The target case (KERNELS.md 5.7): K = 1000 clients x P = 10^8 bf16 parameters, 200 GB of updates,
which fit on no GPU, streamed host -> device in chunks of Kc clients and accumulated in O(P) device
memory. ``StreamingAggregator`` copies each chunk on a side stream in pieces of ``--piece-mb``
(double buffered) while the CUDA kernels accumulate the previous piece, so the end-to-end time
should approach the time of the bare host -> device copy of the same bytes.

Measured in one run, on the same pinned buffers:
  * copy:   the bare host -> device copy of the same bytes, piece by piece into two alternating
            device buffers on one stream (the ceiling: PCIe / NVLink-C2C bandwidth);
  * stream: StreamingAggregator.add(chunk) for every chunk, then apply_(g) (end-to-end wall time,
            synchronised);
  * ratio:  stream / copy (target <= 1.15, i.e. the kernels hidden behind the copy);
  * peak GPU memory of the streaming run (torch.cuda.max_memory_allocated);
  * kernel: the accumulate kernel alone on a device-resident chunk (CUDA events, L2 flushed),
            GB/s on its byte model Kc*P*2 (rows) + 16*P (read and write num/den), and as a
            fraction of the device copy bandwidth measured in the same run.

Host memory is bounded: ``--host-chunks`` distinct pinned chunks are generated (on the GPU, then
copied to the host) and cycled through, so 1000 clients cost host_chunks * Kc * P * 2 bytes of
pinned memory, not 200 GB. Everything scales down with ``--clients`` / ``--params``.

    python benchmarks/bench_streaming.py                              # 1000 x 1e8 bf16
    python benchmarks/bench_streaming.py --clients 64 --params 20000000 --chunk-clients 8
    python benchmarks/bench_streaming.py --piece-mb 256 --nonfinite raise --json out/streaming.json

Without a CUDA GPU it prints why and exits with status 0 (nothing to measure).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000, help="K, clients streamed (default 1000)")
    p.add_argument("--params", type=int, default=100_000_000, help="P, parameters per client (default 1e8)")
    p.add_argument("--chunk-clients", type=int, default=8, help="Kc, clients per add() call (default 8)")
    p.add_argument("--piece-mb", type=float, default=0.0,
                   help="StreamingAggregator transfer_bytes in MiB (0 = one whole chunk per piece)")
    p.add_argument("--host-chunks", type=int, default=3, help="distinct pinned host chunks cycled through")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--zero-frac", type=float, default=0.1, help="fraction of exact zeros in the updates")
    p.add_argument("--nonfinite", choices=("assume_finite", "raise", "drop"), default="assume_finite")
    p.add_argument("--backend", default="cuda", help="back end of the aggregator (default cuda)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of copy and stream (alternating)")
    p.add_argument("--kernel-reps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default="", help="write the results to this JSON file")
    return p.parse_args(argv)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_host_chunks(n, Kc, P, dtype, zero_frac, device, seed=0):
    """n pinned host tensors [Kc, P], filled on the GPU and copied down (fast, bounded memory)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(n):
        h = torch.empty((Kc, P), dtype=dtype, pin_memory=True)
        for k in range(Kc):
            row = torch.randn(P, generator=g, device=device, dtype=torch.float32) * 0.01
            if zero_frac > 0:
                row[torch.rand(P, generator=g, device=device) < zero_frac] = 0.0
            h[k].copy_(row.to(dtype))
            del row
        out.append(h)
    torch.cuda.synchronize(device)
    return out


def chunk_sizes(K, Kc):
    sizes = [Kc] * (K // Kc)
    if K % Kc:
        sizes.append(K % Kc)
    return sizes


def run_copy(host, sizes, piece_bytes, device):
    """The bare host -> device copy of the same bytes (pieces into two alternating buffers)."""
    elem = host[0].element_size()
    P = host[0].shape[1]
    rows_per_piece = max(1, piece_bytes // (P * elem)) if piece_bytes else max(sizes)
    bufs = [torch.empty((min(rows_per_piece, max(sizes)), P), dtype=host[0].dtype, device=device) for _ in range(2)]
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    j = 0
    for i, kc in enumerate(sizes):
        h = host[i % len(host)]
        for a in range(0, kc, rows_per_piece):
            b = min(kc, a + rows_per_piece)
            bufs[j][: b - a].copy_(h[a:b], non_blocking=True)
            j ^= 1
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    del bufs
    return dt


def run_stream(fk, host, sizes, P, piece_bytes, args, device):
    """End-to-end: every chunk through StreamingAggregator.add, then apply_ (synchronised)."""
    g = torch.zeros(P, dtype=torch.float32, device=device)
    agg = fk.StreamingAggregator(P, device=device, backend=args.backend, nonfinite=args.nonfinite,
                                 transfer_bytes=int(piece_bytes))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i, kc in enumerate(sizes):
        h = host[i % len(host)]
        agg.add(h[:kc] if kc != h.shape[0] else h)
    agg.apply_(g)
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device)
    clients = agg.clients
    del agg
    return dt, peak, clients, g


def kernel_rate(cb, Accum, host_chunk, P, reps, device, common):
    """The accumulate kernel alone on a device-resident chunk (num/den read and written)."""
    chunk = host_chunk.to(device)
    Kc = chunk.shape[0]
    rows = list(chunk.unbind(0))
    w = torch.ones(Kc, dtype=torch.float32, device=device)
    flags = torch.zeros(Kc, dtype=torch.int32, device=device)
    num = torch.zeros(P, dtype=torch.float32, device=device)
    den = torch.zeros(P, dtype=torch.float32, device=device)

    def once():
        cb.dense(Accum(rows, w, flags, P, init_num=num, init_den=den, acc_num=num, acc_den=den), None)

    t = common.measure(once, device=device, warmup=2, reps=reps)
    nbytes = Kc * P * chunk.element_size() + 16 * P
    del chunk, rows, num, den
    return t, nbytes


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_streaming: needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure.")
        return 0
    import fedrac_kernels as fk
    from benchmarks import common
    from fedrac_kernels.backends import Accum
    from fedrac_kernels.backends import cuda as cb

    if args.backend == "cuda":
        ok, why = cb.available()
        if not ok:
            print(f"bench_streaming: the cuda back end is unavailable: {why}")
            return 0
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    K, P, Kc = args.clients, args.params, min(args.chunk_clients, args.clients)
    elem = torch.empty((), dtype=dtype).element_size()
    sizes = chunk_sizes(K, Kc)
    piece_bytes = int(args.piece_mb * 2**20) if args.piece_mb > 0 else Kc * P * elem
    total = K * P * elem
    meta = common.device_info(device)
    meta["args"] = vars(args)
    print(f"device: {meta.get('gpu')}, torch {meta['torch']}, CUDA {meta.get('cuda')}, commit {meta['commit']}")
    print(f"K={K} clients x P={P:,} {args.dtype} = {total / 1e9:.1f} GB in {len(sizes)} chunks of <= {Kc} "
          f"clients, pieces of {piece_bytes / 2**20:.0f} MiB, nonfinite={args.nonfinite}, backend={args.backend}")

    t0 = time.perf_counter()
    host = make_host_chunks(min(args.host_chunks, len(sizes)), Kc, P, dtype, args.zero_frac, device)
    print(f"pinned host chunks: {len(host)} x {Kc * P * elem / 1e9:.2f} GB (built in {time.perf_counter() - t0:.1f} s)")

    # device copy ceiling (for the kernel's fraction)
    dev_copy = common.copy_bandwidth(min(4 << 30, max(256 << 20, 2 * Kc * P * elem)), device)
    # kernel alone
    kt, kbytes = kernel_rate(cb, Accum, host[0], P, args.kernel_reps, device, common)
    k_gbps = kbytes / kt["median"] / 1e9
    print(f"kernel (accumulate {Kc} clients, device-resident): {common.fmt_time(kt['median'])} median, "
          f"{k_gbps:.0f} GB/s = {k_gbps / dev_copy['gbps']:.0%} of the device copy ({dev_copy['gbps']:.0f} GB/s)")
    gc.collect()
    torch.cuda.empty_cache()

    # warm up both paths once (allocator, pinned staging, CUB/kernel first launches)
    warm = sizes[: min(2, len(sizes))]
    run_copy(host, warm, piece_bytes, device)
    run_stream(fk, host, warm, P, piece_bytes, args, device)
    copies, streams, peaks = [], [], []
    result_g = None
    for r in range(args.reps):
        copies.append(run_copy(host, sizes, piece_bytes, device))
        dt, peak, clients, result_g = run_stream(fk, host, sizes, P, piece_bytes, args, device)
        streams.append(dt)
        peaks.append(peak)
        assert clients == K, (clients, K)
        print(f"  rep {r}: copy {copies[-1]:.3f} s ({total / copies[-1] / 1e9:.1f} GB/s), stream {dt:.3f} s "
              f"({total / dt / 1e9:.1f} GB/s), ratio {dt / copies[-1]:.3f}")
    c_med, s_med = statistics.median(copies), statistics.median(streams)
    ratio = s_med / c_med
    ok = bool(torch.isfinite(result_g).all())
    print(f"\ncopy   {c_med:.3f} s  ({total / c_med / 1e9:.1f} GB/s host->device)")
    print(f"stream {s_med:.3f} s  ({total / s_med / 1e9:.1f} GB/s end to end)")
    print(f"ratio  {ratio:.3f}  (target <= 1.15)  {'OK' if ratio <= 1.15 else 'ABOVE TARGET'}")
    print(f"peak GPU memory of the streaming run: {max(peaks) / 2**30:.2f} GiB (g + num/den: "
          f"{12 * P / 2**30:.2f} GiB, two device pieces: {2 * piece_bytes / 2**30:.2f} GiB)")
    print(f"result finite: {ok}")
    res = {"meta": meta, "K": K, "P": P, "chunk_clients": Kc, "piece_bytes": piece_bytes, "dtype": args.dtype,
           "bytes": total, "copy_s": copies, "stream_s": streams, "copy_median_s": c_med, "stream_median_s": s_med,
           "ratio": ratio, "peak_gpu_bytes": max(peaks), "kernel_median_s": kt["median"], "kernel_bytes": kbytes,
           "kernel_gbps": k_gbps, "device_copy_gbps": dev_copy["gbps"], "kernel_frac_copy": k_gbps / dev_copy["gbps"],
           "result_finite": ok}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
