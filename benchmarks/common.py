"""Shared benchmark plumbing: timing, the copy-bandwidth ceiling, device info, JSON/CSV output.

Timing
    :func:`measure` runs a callable ``warmup`` times, then ``reps`` times (at least ``min_time``
    seconds in all), and reports the median and the 10th/90th percentiles. CPU: wall clock
    (``time.perf_counter``). CUDA: a pair of CUDA events around each call on the current stream,
    after writing a buffer larger than L2 so that every rep starts with a cold L2 (the flush is
    outside the events). :func:`measure_round_robin` times several variants in turns (shuffled
    order each round), so that on a shared machine a burst of foreign load hits every variant
    alike; compare ratios, not absolute times, when the machine is busy.

Copy ceiling
    :func:`copy_bandwidth` times ``dst.copy_(src)`` of ``nbytes / 2`` bytes, i.e. ``nbytes`` of
    memory traffic (read + write), in the same run as the kernels, and reports traffic / time. A
    kernel's fraction of it is its byte-model traffic / time divided by that figure.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- timing ---------------------------------------------------------------------------------------
def _percentile(sorted_vals: list, q: float) -> float:
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times: list) -> dict:
    """{'median', 'p10', 'p90', 'min', 'n'} of a list of seconds."""
    s = sorted(times)
    return {"median": statistics.median(s) if s else float("nan"), "p10": _percentile(s, 0.10),
            "p90": _percentile(s, 0.90), "min": s[0] if s else float("nan"), "n": len(s)}


class _L2Flush:
    """A device buffer bigger than L2; writing it evicts the kernel's inputs from L2."""

    def __init__(self, device: torch.device):
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 64 << 20)
        self.buf = torch.empty(max(2 * l2, 128 << 20) // 4, dtype=torch.float32, device=device)

    def __call__(self):
        self.buf.zero_()


def _cuda_time_once(fn: Callable, flush: Optional[_L2Flush]) -> float:
    if flush is not None:
        flush()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _cpu_time_once(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cpu_time_both(fn: Callable) -> tuple:
    """(wall seconds, CPU seconds of the calling thread) of one call."""
    c0 = time.thread_time()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    return t1 - t0, time.thread_time() - c0


def measure(fn: Callable, *, device: str | torch.device = "cpu", warmup: int = 3, reps: int = 20,
            min_time: float = 0.0, max_time: float = 60.0, flush_l2: bool = True) -> dict:
    """Time ``fn()``; returns summarize() of the per-call seconds plus the raw list under 'times'."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    flush = _L2Flush(device) if (cuda and flush_l2) else None
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times: list = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start) < min_time:
        times.append(_cuda_time_once(fn, flush) if cuda else _cpu_time_once(fn))
        if time.perf_counter() - t_start > max_time and len(times) >= 3:
            break
    out = summarize(times)
    out["times"] = times
    return out


def measure_round_robin(variants: dict, *, device: str | torch.device = "cpu", warmup: int = 2, reps: int = 15,
                        max_time: float = 120.0, flush_l2: bool = True, seed: int = 0) -> dict:
    """Time several callables in turns: each round runs every variant once, in shuffled order.

    Returns {name: summarize(times) + 'times'}; on the CPU also 'thread_cpu' (summarize() of the
    calling thread's CPU time per call) and 'thread_cpu_times'. With one thread (torch and the
    kernels run on the calling thread) the thread CPU time leaves out the time the process spent
    descheduled, so on a busy shared machine it is the steadier figure. A variant whose single call
    exceeds ``max_time / 3`` stops being repeated after 3 calls (the slow baselines would otherwise
    dominate a run).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    flush = _L2Flush(device) if (cuda and flush_l2) else None
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    rng = random.Random(seed)
    times: dict = {k: [] for k in variants}
    cpu_times: dict = {k: [] for k in variants}
    t_start = time.perf_counter()
    for r in range(reps):
        names = list(variants)
        rng.shuffle(names)
        for name in names:
            if len(times[name]) >= 3 and statistics.median(times[name]) > max_time / 3:
                continue
            fn = variants[name]
            if cuda:
                times[name].append(_cuda_time_once(fn, flush))
            else:
                wall, cpu = _cpu_time_both(fn)
                times[name].append(wall)
                cpu_times[name].append(cpu)
        if time.perf_counter() - t_start > max_time and r >= 2:
            break
    out = {}
    for name, ts in times.items():
        out[name] = summarize(ts)
        out[name]["times"] = ts
        if not cuda:
            out[name]["thread_cpu"] = summarize(cpu_times[name])
            out[name]["thread_cpu_times"] = cpu_times[name]
    return out


# ---- copy ceiling ---------------------------------------------------------------------------------
class CopyProbe:
    """``dst.copy_(src)`` moving ``nbytes`` of traffic (nbytes/2 read + nbytes/2 written)."""

    def __init__(self, nbytes: int, device: str | torch.device = "cpu"):
        n = max(1, int(nbytes) // 8)  # float32 elements per buffer
        self.nbytes = 8 * n
        self.src = torch.ones(n, dtype=torch.float32, device=device)
        self.dst = torch.empty_like(self.src)

    def __call__(self):
        self.dst.copy_(self.src)


def copy_bandwidth(nbytes: int, device: str | torch.device = "cpu", reps: int = 20) -> dict:
    """Copy ceiling: {'gbps', 'seconds', 'bytes'} for ``nbytes`` of read + write traffic."""
    probe = CopyProbe(nbytes, device)
    t = measure(probe, device=device, reps=reps)
    return {"gbps": probe.nbytes / t["median"] / 1e9, "seconds": t["median"], "bytes": probe.nbytes}


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds and seconds > 0 else float("nan")


# ---- environment ----------------------------------------------------------------------------------
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def busy_processes(min_cpu: float = 20.0) -> list:
    """Other processes using >= min_cpu % of a core right now (best effort, Linux `ps`)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]
    except Exception:
        return []
    me = os.getpid()
    busy = []
    for line in out:
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        try:
            pid, pcpu = int(parts[0]), float(parts[1])
        except ValueError:
            continue
        if pid != me and pcpu >= min_cpu:
            busy.append({"pid": pid, "pcpu": pcpu, "comm": parts[2]})
    return busy


def device_info(device: str | torch.device = "cpu") -> dict:
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    info["busy_processes"] = busy_processes()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_sm_count=p.multi_processor_count, cuda=torch.version.cuda,
                    gpu_l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    try:
        from fedrac_kernels.backends import cpu as _cpu_backend

        if _cpu_backend.available()[0]:
            info["cpu_backend"] = _cpu_backend.build_info()
    except Exception:
        pass
    return info


# ---- output ---------------------------------------------------------------------------------------
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (list, tuple)):
            continue  # raw time lists stay in the JSON only
        else:
            out[key] = v
    return out


def write_results(out_dir: str, name: str, records: list, meta: dict) -> tuple:
    """Write ``<out_dir>/<name>.json`` (meta + records) and ``<name>.csv`` (one flat row per record)."""
    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, f"{name}.json")
    cpath = os.path.join(out_dir, f"{name}.csv")
    with open(jpath, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1, default=str)
    rows = [_flat(r) for r in records]
    cols: list = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return jpath, cpath


def fmt_time(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "n/a"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"
