"""Markdown for benchmarks/RESULTS.md from the output folders of benchmarks/gpu_session.sh.

    python benchmarks/gpu_report.py OUT_DIR [OUT_DIR ...] >> gpu_section.md
    python benchmarks/gpu_report.py --targets-only OUT_DIR      # only the target table
    python benchmarks/gpu_report.py gs_*.tar.gz                 # the archives of PACK=1 runs

Every folder holding an ``env.json`` (one per gpu_session.sh command) is one session part; the
result files under it are found by name (aggregation.json, order.json, eval.json,
streaming.json, bench_scale.json, round.json, sparsify.json, bench_gram.json,
submodel_methods.json, junit*.xml, steps.jsonl). Prints the device, date, commit, the commands
with their exit status and duration, the targets with PASS / FAIL, one table per benchmark and the
pytest summary. A missing file or field reads "n/a"; a target whose file is missing reads
"not run (...)"; a section that cannot be read says so and the rest follows.

GPU targets are judged only on CUDA records at the target sizes (full-width ResNet-18, MLP K=10,
1e8 keys, K=1000 x 1e8 bf16, B=|V|, 1000 clients); elsewhere (a CPU dry run, QUICK=1) they read
"n/a (why)" next to the measured value. The CPU targets (C++ back end vs (a) and (b), MLP K=10)
are judged on CPU records and listed only when a session part ran on the CPU.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter

NA = "n/a"

# The targets (shared/research/KERNELS.md §5.7 and the issue). ``cases``: where each applies.
# GPU targets are judged only on CUDA records at the target sizes; anything else reads
# "n/a (why)" with the measured value still shown. The CPU targets apply to CPU records only.
DENSE_COPY_FRAC = 0.85            # dense aggregation, fraction of the copy bandwidth of the same run
DENSE_COPY_CASES = ("resnet10", "resnet100")
RESNET_P = 11_181_642             # GroupNorm ResNet-18, fc 512->10, full width
MLP_LATENCY_S = 15e-6             # FedRAC MLP, K = 10, one aggregation
MLP_CASE = "mlp10"
MLP_P = 656_810                   # the paper MLP 3072-200-200-10
MLP_K = 10
VS_A = 200.0                      # over FedRAC's own aggregation (a), MLP K = 10
VS_A_CASES = ("mlp10",)
VS_B = 3.0                        # over plain torch (b) and torch.compile (b'), ResNet-18 K = 100
VS_B_CASES = ("resnet100",)
STREAM_RATIO = 1.15               # streamed end to end / the bare H2D copy of the same bytes
STREAM_K = 1000
STREAM_P = 100_000_000
ORDER_N = 100_000_000
ORDER_SPEEDUP = 4.0               # over torch.sort(stable=True)
EVAL_SPEEDUP = 40.0               # fused vs separate forwards, FedRAC MLP (B = |V|, C = 50)
EVAL_CASE = "mlp_cifar10"
EVAL_B = 5000                     # |V| of CIFAR-10
EVAL_C = 50
ROUND_S = 10.0                    # a 1000-client ResNet-18 FedRAC round
ROUND_K = 1000
CPU_VS_A = 20.0                   # CPU (2 cores): the C++ back end over FedRAC's own aggregation, MLP K = 10
CPU_VS_B = 1.0                    # ... and faster than plain torch (b), same case

T_COPY = f"dense aggregation ≥ {DENSE_COPY_FRAC:.0%} of the copy bandwidth of the same run"
T_MLP = f"FedRAC MLP K=10 aggregation ≤ {MLP_LATENCY_S * 1e6:g} µs"
T_A = f"≥ {VS_A:g}× over FedRAC's own aggregation (a)"
T_B = f"≥ {VS_B:g}× over plain torch, stacked (b)"
T_BC = f"≥ {VS_B:g}× over torch.compile of (b), (b')"
T_BITS = "ours bitwise equal to the torch oracle"
T_STREAM = f"streamed K=1000 aggregation ≤ {STREAM_RATIO:g}× the H2D copy time"
T_ORDER = f"stable order of 1e8 keys ≥ {ORDER_SPEEDUP:g}× torch.sort(stable=True)"
T_EVAL = f"fused evaluation ≥ {EVAL_SPEEDUP:g}× separate forwards (MLP, C=50)"
T_ROUND = f"{ROUND_K}-client ResNet-18 FedRAC round < {ROUND_S:g} s"
T_TESTS = "tests pass on the device (pytest)"
T_CPU_A = f"CPU: C++ back end ≥ {CPU_VS_A:g}× over FedRAC's own aggregation (a), MLP K=10"
T_CPU_B = "CPU: C++ back end faster than plain torch, stacked (b), MLP K=10"
GPU_TARGETS = (T_COPY, T_MLP, T_A, T_B, T_BC, T_STREAM, T_ORDER, T_EVAL, T_ROUND)
CPU_TARGETS = (T_CPU_A, T_CPU_B)
EXPECTED = (T_TESTS,) + GPU_TARGETS + CPU_TARGETS
# where a target's figure comes from: (stage of gpu_session.sh, file) -- for "not run" rows
SOURCE = {T_TESTS: ("test", "junit_*.xml"), T_COPY: ("agg", "aggregation.json"), T_MLP: ("agg", "aggregation.json"),
          T_A: ("agg", "aggregation.json"), T_B: ("agg", "aggregation.json"), T_BC: ("agg", "aggregation.json"),
          T_STREAM: ("stream", "streaming.json"), T_ORDER: ("order", "order.json"), T_EVAL: ("eval", "eval.json"),
          T_ROUND: ("scale", "bench_scale.json"), T_CPU_A: ("agg", "aggregation.json"),
          T_CPU_B: ("agg", "aggregation.json")}
TARGET_HEADER = ["target", "case", "measured", "result"]


# ---- formatting -----------------------------------------------------------------------------------
def num(x):
    """A finite float, else None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def ftime(s) -> str:
    v = num(s)
    if v is None:
        return NA
    if v >= 1:
        return f"{v:.3f} s"
    if v >= 1e-3:
        return f"{v * 1e3:.2f} ms"
    return f"{v * 1e6:.1f} µs"


def fnum(x, nd: int = 1) -> str:
    v = num(x)
    return NA if v is None else f"{v:,.{nd}f}"


def fratio(x, nd: int = 2) -> str:
    v = num(x)
    return NA if v is None else f"{v:,.{nd}f}×"


def fpct(frac) -> str:
    v = num(frac)
    return NA if v is None else f"{100 * v:.0f}%"


def fbool(b) -> str:
    return NA if b is None else ("yes" if b else "**NO**")


def cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def table(header: list, rows: list) -> list:
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(cell(c) for c in r) + " |")
    return out


def judge(value, op: str, threshold) -> str:
    v = num(value)
    if v is None:
        return NA
    ops = {">=": v >= threshold, ">": v > threshold, "<=": v <= threshold, "<": v < threshold}
    if op not in ops:
        raise ValueError(f"judge: unknown operator {op!r}")
    return "PASS" if ops[op] else "FAIL"


def is_cuda(device) -> bool:
    return str(device or "").startswith("cuda")


def gpu_gate(device, size_ok: bool = True, size_why: str = ""):
    """None where a GPU target applies to a record on ``device``, else the "n/a (why)" verdict."""
    if not is_cuda(device):
        return f"n/a (GPU target; measured on {device or 'an unknown device'})"
    if not size_ok:
        return f"n/a ({size_why})"
    return None


def verdict(value, op: str, threshold, gate=None) -> str:
    return gate if gate else judge(value, op, threshold)


def same(x, want) -> bool:
    v = num(x)
    return v is not None and v == want


def best(records: list, key: str, lowest: bool = False):
    """The record with the highest (lowest) finite ``key``, or None."""
    cand = [r for r in records if num(r.get(key)) is not None]
    if not cand:
        return None
    return (min if lowest else max)(cand, key=lambda r: num(r[key]))


# ---- loading --------------------------------------------------------------------------------------
def load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        return {"_error": f"{type(exc).__name__}: {exc}"}


def records_of(doc) -> list:
    if not isinstance(doc, dict):
        return []
    recs = doc.get("records", doc.get("rows", []))
    return [r for r in recs if isinstance(r, dict)] if isinstance(recs, list) else []


class Part:
    """One gpu_session.sh command's output folder."""

    def __init__(self, root: str):
        self.root = root
        self.env = load_json(os.path.join(root, "env.json")) if os.path.exists(os.path.join(root, "env.json")) else {}
        self.files: dict = {}
        self.steps: list = []

    def add(self, kind: str, path: str):
        self.files.setdefault(kind, []).append(path)

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)


KINDS = (("aggregation.json", "agg"), ("order.json", "order"), ("bench_scale.json", "scale"),
         ("sparsify.json", "extra"), ("bench_gram.json", "extra"), ("round.json", "round"),
         ("steps.jsonl", "steps"))
JSON_PREFIXES = (("eval", "eval"), ("streaming", "stream"), ("submodel", "extra"))


def classify(name: str):
    for fname, kind in KINDS:
        if name == fname:
            return kind
    if name.endswith(".json"):
        for prefix, kind in JSON_PREFIXES:
            if name.startswith(prefix):
                return kind
    if name.startswith("junit") and name.endswith(".xml"):
        return "junit"
    if name.endswith(".log"):
        return "log"
    return None


def discover(dirs: list) -> list:
    """Parts: every folder with an env.json under the given folders (else the folder itself)."""
    roots = []
    for d in dirs:
        found = sorted(dp for dp, _, fn in os.walk(d) if "env.json" in fn)
        roots += found or [d]
    roots = sorted(set(os.path.abspath(r) for r in roots))
    parts = [Part(r) for r in roots]
    for p in parts:
        nested = [q.root for q in parts if q.root != p.root and q.root.startswith(p.root + os.sep)]
        for dp, dn, fn in os.walk(p.root):
            dn[:] = sorted(x for x in dn if os.path.join(dp, x) not in nested)
            for name in sorted(fn):
                kind = classify(name)
                if kind:
                    p.add(kind, os.path.join(dp, name))
        for path in p.files.get("steps", []):
            try:
                with open(path) as f:
                    p.steps += [json.loads(line) for line in f if line.strip()]
            except (OSError, ValueError):
                pass
        p.steps.sort(key=lambda s: (num(s.get("end_elapsed_s")) or 0, str(s.get("end", ""))))
    return parts


# ---- header and commands --------------------------------------------------------------------------
def smi_query(env: dict) -> dict:
    text = env.get("nvidia_smi_query") or ""
    try:
        rows = list(csv.reader(io.StringIO(text)))
        if len(rows) >= 2:
            return {h.strip(): v.strip() for h, v in zip(rows[0], rows[1])}
    except csv.Error:
        pass
    return {}


def header(parts: list) -> list:
    envs = [p.env for p in parts if isinstance(p.env, dict) and p.env and "_error" not in p.env]
    e = envs[0] if envs else {}
    gpu = e.get("gpu") or ("no GPU (" + (e.get("cpu") or "CPU") + ")" if e else NA)
    dates = sorted({str(x.get("date", ""))[:10] for x in envs if x.get("date")})
    commits = sorted({str(x.get("commit")) for x in envs if x.get("commit")})
    lines = [f"## GPU session — {gpu} ({', '.join(dates) or NA})", ""]
    q = smi_query(e)
    mach = [gpu]
    if e.get("gpu_memory_gib") is not None:
        mach.append(f"{e['gpu_memory_gib']} GiB, {e.get('gpu_sm_count', NA)} SMs, L2 {e.get('gpu_l2_mib', NA)} MiB, "
                    f"compute capability {e.get('gpu_capability', NA)}")
    if q.get("driver_version"):
        mach.append(f"driver {q['driver_version']}")
    if q.get("pcie.link.gen.max"):
        mach.append(f"PCIe gen {q['pcie.link.gen.max']} x{q.get('pcie.link.width.max', '?')}")
    mach.append(f"{e.get('cpu_count', NA)} CPU cores ({e.get('cpu', NA)})")
    nvcc = [x.strip() for x in (e.get("nvcc") or NA).strip().splitlines()]
    nvcc = [x for x in nvcc if "release" in x] or nvcc
    lines.append(f"**Machine**: {'; '.join(mach)}. Python {e.get('python', NA)}, torch {e.get('torch', NA)} "
                 f"(CUDA {e.get('torch_cuda', NA)}), triton {e.get('triton', NA)}, nvcc: {nvcc[-1] if nvcc else NA}. "
                 f"Commit {', '.join(commits) or NA}. Date: {', '.join(dates) or NA}.")
    be = e.get("backends")
    if isinstance(be, dict):
        lines += ["", "Back ends: " + "; ".join(f"`{k}`: {v}" for k, v in be.items()) + "."]
    if any(x.get("quick") for x in envs) or any(x.get("device_kind") == "cpu" for x in envs):
        lines += ["", "**Dry run** (DEVICE=cpu and/or QUICK=1): tiny cases, not GPU figures."]
    lines.append("")
    return lines


def commands(parts: list) -> list:
    lines = ["### Commands", ""]
    for p in parts:
        e = p.env if isinstance(p.env, dict) else {}
        stages = " ".join(e.get("stages", [])) or "?"
        commit = e.get("commit", "unknown")
        lines.append(f"* `COMMIT={commit} bash benchmarks/gpu_session.sh {stages}` ({e.get('date', NA)}, "
                     f"output `{os.path.basename(p.root)}`)")
        out, root = e.get("out"), e.get("root")
        for s in p.steps:
            cmd = s.get("cmd", "")
            if out:
                cmd = cmd.replace(out, "$OUT")
            if root:
                cmd = cmd.replace(root + "/", "")
            took = ""
            if s.get("status") != "skipped" and s.get("seconds") is not None:
                took = f"{s['seconds']} s" + (f" of {s['budget_s']} s" if s.get("budget_s") is not None else "")
            note = f"; {s['note']}" if s.get("note") else ""
            shown = f": `{cmd}`" if cmd else ""
            rc = f"rc {s['rc']}" if s.get("rc") is not None else ""
            what = ", ".join(x for x in (rc, took) if x)
            lines.append(f"  * {s.get('stage')}/{s.get('step')}: **{s.get('status')}** ({what}{note}){shown}"
                         .replace("(; ", "(").replace(" ()", ""))
    lines.append("")
    return lines


# ---- aggregation ----------------------------------------------------------------------------------
def is_ours(r: dict) -> bool:
    return str(r.get("variant", "")).startswith("ours[") and "skipped" not in r


def wall(recs: list) -> list:
    return [r for r in recs if r.get("clock", "wall") == "wall"]


def dense_gate(case: str, r: dict):
    """The n/a verdict of the GPU targets for this record (wrong device or size), else None."""
    if case in DENSE_COPY_CASES:
        return gpu_gate(r.get("device"), same(r.get("P"), RESNET_P),
                        f"P={fnum(r.get('P'), 0)}; the target is at the full-width ResNet-18, P={RESNET_P:,}")
    return gpu_gate(r.get("device"), same(r.get("P"), MLP_P) and same(r.get("K"), MLP_K),
                    f"K={r.get('K')}, P={fnum(r.get('P'), 0)}; the target is at K={MLP_K}, P={MLP_P:,}")


def cpu_ours(r: dict) -> bool:
    """A C++ (cpu) back-end record of ours, on the CPU, at the FedRAC MLP size (the CPU targets' case)."""
    return (is_ours(r) and str(r.get("variant", "")).startswith("ours[cpu") and str(r.get("device")) == "cpu"
            and same(r.get("P"), MLP_P) and same(r.get("K"), MLP_K))


def dense_targets(case: str, r: dict) -> list:
    """[(label, PASS/FAIL/n/a)] of the targets that apply to this ours record."""
    out = []
    if not is_cuda(r.get("device")):
        if case == MLP_CASE and cpu_ours(r):
            out.append((f"CPU ≥{CPU_VS_A:g}× (a)", judge(r.get("speedup_vs_a"), ">=", CPU_VS_A)))
            out.append(("CPU faster than (b)", judge(r.get("speedup_vs_b"), ">", CPU_VS_B)))
        return out
    gate = dense_gate(case, r)
    if gate:
        return [("GPU targets", gate)] if case in DENSE_COPY_CASES + VS_A_CASES + VS_B_CASES + (MLP_CASE,) else []
    if case in DENSE_COPY_CASES:
        out.append((f"≥{DENSE_COPY_FRAC:.0%} copy", judge(r.get("frac_copy"), ">=", DENSE_COPY_FRAC)))
    if case == MLP_CASE:
        out.append((f"≤{MLP_LATENCY_S * 1e6:g} µs", judge(r.get("median_s"), "<=", MLP_LATENCY_S)))
    if case in VS_A_CASES:
        out.append((f"≥{VS_A:g}× (a)", judge(r.get("speedup_vs_a"), ">=", VS_A)))
    if case in VS_B_CASES:
        out.append((f"≥{VS_B:g}× (b)", judge(r.get("speedup_vs_b"), ">=", VS_B)))
        out.append((f"≥{VS_B:g}× (b')", judge(r.get("speedup_vs_b_compiled"), ">=", VS_B)))
    return out


def agg_section(part: Part, path: str, targets: list, stream=None) -> list:
    """Tables of one aggregation.json: its dense cases (stream False), its stream1000 case (True), or all."""
    doc = load_json(path)
    if "_error" in doc:
        return [f"`{part.rel(path)}`: unreadable ({doc['_error']})", ""]
    meta = doc.get("meta", {}) if isinstance(doc.get("meta"), dict) else {}
    recs = [r for r in wall(records_of(doc)) if stream is None or (r.get("case") == "stream1000") == stream]
    if not recs:
        return []
    lines = [f"`{part.rel(path)}` (commit {meta.get('commit') or part.env.get('commit', NA)}, "
             f"{meta.get('gpu', meta.get('device', NA))}):", ""]
    cases = []
    for r in recs:
        key = (r.get("case"), r.get("source"))
        if key not in cases:
            cases.append(key)
    for case, source in cases:
        rs = [r for r in recs if r.get("case") == case and r.get("source") == source]
        timed = [r for r in rs if "skipped" not in r]
        skipped = [r for r in rs if "skipped" in r]
        copy = next((r for r in timed if r.get("variant") == "copy"), {})
        first = timed[0] if timed else (rs[0] if rs else {})
        bm = num(first.get("bytes_model"))
        if source is None:
            lines.append(f"**{case}**: K = {first.get('K', NA)}, P = {fnum(first.get('P'), 0)}, "
                         f"{first.get('dtype', NA)} updates, dense byte model "
                         f"{fnum(bm / 1e6 if bm else None)} MB; copy ceiling {fnum(copy.get('gbps'))} GB/s "
                         f"({ftime(copy.get('median_s'))}).")
            lines.append("")
            rows = []
            for r in timed:
                chk = r.get("check") if isinstance(r.get("check"), dict) else {}
                tg = dense_targets(case, r) if is_ours(r) else []
                rows.append([r.get("variant"), ftime(r.get("median_s")), ftime(r.get("p10_s")), ftime(r.get("p90_s")),
                             fnum(r.get("gbps")), fpct(r.get("frac_copy")), fratio(r.get("speedup_vs_a"), 1),
                             fratio(r.get("speedup_vs_b")), fratio(r.get("speedup_vs_b_compiled")),
                             fbool(chk.get("bitwise_vs_oracle")) if "bitwise_vs_oracle" in chk else "",
                             ", ".join(f"{lab}: {res}" for lab, res in tg)])
            lines += table(["variant", "median", "p10", "p90", "GB/s (byte model)", "% of copy", "vs (a)", "vs (b)",
                            "vs (b')", "bitwise = oracle", "targets"], rows)
            ours = [r for r in timed if is_ours(r)]
            gate = dense_gate(case, first)
            if case in DENSE_COPY_CASES:
                b = best(ours, "frac_copy")
                targets.append([T_COPY, case, f"{fpct(b.get('frac_copy'))} ({b.get('variant')}, {fnum(b.get('gbps'))} "
                                f"of {fnum(b.get('copy_gbps'))} GB/s)" if b else NA,
                                verdict(b and b.get("frac_copy"), ">=", DENSE_COPY_FRAC, gate)])
            if case == MLP_CASE:
                b = best(ours, "median_s", lowest=True)
                targets.append([T_MLP, case, f"{ftime(b.get('median_s'))} ({b.get('variant')})" if b else NA,
                                verdict(b and b.get("median_s"), "<=", MLP_LATENCY_S, gate)])
            if case in VS_A_CASES:
                b = best(ours, "speedup_vs_a")
                why = next((r["skipped"] for r in skipped if r.get("variant") == "(a) official"), "")
                targets.append([T_A, case, f"{fratio(b.get('speedup_vs_a'), 1)} ({b.get('variant')})" if b else (why or NA),
                                verdict(b and b.get("speedup_vs_a"), ">=", VS_A, gate)])
            if case in VS_B_CASES:
                for key, lab, base in (("speedup_vs_b", T_B, "(b) stacked"),
                                       ("speedup_vs_b_compiled", T_BC, "(b') compiled")):
                    b = best(ours, key)
                    why = next((r["skipped"] for r in skipped if r.get("variant") == base), "")
                    targets.append([lab, case, f"{fratio(b.get(key))} ({b.get('variant')})" if b else (why or NA),
                                    verdict(b and b.get(key), ">=", VS_B, gate)])
            if case == MLP_CASE and str(first.get("device")) == "cpu":
                cpu = [r for r in ours if cpu_ours(r)]
                size = f"K={first.get('K')}, P={fnum(first.get('P'), 0)}"
                why = next((r["skipped"] for r in skipped if r.get("variant") == "(a) official"), "")
                b = best(cpu, "speedup_vs_a")
                targets.append([T_CPU_A, f"{case}, {size}, {first.get('threads', NA)} threads",
                                f"{fratio(b.get('speedup_vs_a'), 1)} ({b.get('variant')})" if b else (why or NA),
                                judge(b and b.get("speedup_vs_a"), ">=", CPU_VS_A) if b else
                                (NA if cpu else f"n/a (no C++ back-end record at K={MLP_K}, P={MLP_P:,})")])
                b = best(cpu, "speedup_vs_b")
                targets.append([T_CPU_B, f"{case}, {size}, {first.get('threads', NA)} threads",
                                f"{fratio(b.get('speedup_vs_b'))} ({b.get('variant')})" if b else NA,
                                judge(b and b.get("speedup_vs_b"), ">", CPU_VS_B) if b else
                                (NA if cpu else f"n/a (no C++ back-end record at K={MLP_K}, P={MLP_P:,})")])
            bad = [r.get("variant") for r in ours if isinstance(r.get("check"), dict)
                   and r["check"].get("bitwise_vs_oracle") is False]
            if bad:
                targets.append([T_BITS, case, "differ: " + ", ".join(bad), "FAIL"])
        else:
            ceiling = ("H2D copy of the same update bytes" if source == "host" and "cuda" in str(first.get("device"))
                       else "device copy of the dense byte model")
            lines.append(f"**{case}, chunks on the {source}**: K = {first.get('K', NA)} bf16 clients × "
                         f"P = {fnum(first.get('P'), 0)}, chunks of {first.get('chunk', NA)}; dense byte model "
                         f"{fnum(bm / 1e9 if bm else None, 2)} GB; ceiling: {ceiling}, {fnum(copy.get('gbps'))} GB/s "
                         f"({ftime(copy.get('median_s'))}).")
            lines.append("")
            t_copy = num(copy.get("median_s"))
            sgate = gpu_gate(first.get("device"), same(first.get("K"), STREAM_K) and same(first.get("P"), STREAM_P),
                             f"K={first.get('K')} × P={fnum(first.get('P'), 0)}: below the target's "
                             f"{STREAM_K} × {STREAM_P:.0e}")
            rows = []
            for r in timed:
                med = num(r.get("median_s"))
                over = med / t_copy if (med and t_copy and r.get("variant") != "copy") else None
                tg = ""
                if is_ours(r) and source == "host" and ceiling.startswith("H2D"):
                    tg = f"≤{STREAM_RATIO:g}× copy: {verdict(over, '<=', STREAM_RATIO, sgate)}"
                rows.append([r.get("variant"), ftime(r.get("median_s")), ftime(r.get("p10_s")), ftime(r.get("p90_s")),
                             fnum(r.get("gbps")), fpct(r.get("frac_copy")), fratio(over) if over else "",
                             fratio(r.get("speedup_vs_b")), tg])
            lines += table(["variant", "median", "p10", "p90", "GB/s (byte model)", "% of ceiling", "time / ceiling",
                            "vs (b)", "target"], rows)
            if source == "host" and ceiling.startswith("H2D"):
                ours = [dict(r, _over=num(r.get("median_s")) / t_copy) for r in timed
                        if is_ours(r) and num(r.get("median_s")) and t_copy]
                b = best(ours, "_over", lowest=True)
                targets.append([T_STREAM, f"bench_aggregation, K={first.get('K', NA)} × P={fnum(first.get('P'), 0)}, "
                                f"pageable chunk", f"{fratio(b['_over'])} ({b.get('variant')})" if b else NA,
                                verdict(b and b["_over"], "<=", STREAM_RATIO, sgate)])
        for r in skipped:
            lines.append(f"* {r.get('variant')}: {r.get('skipped')}")
        lines.append("")
    return lines


# ---- streaming ------------------------------------------------------------------------------------
def stream_section(part: Part, path: str, targets: list) -> list:
    d = load_json(path)
    if "_error" in d:
        return [f"`{part.rel(path)}`: unreadable ({d['_error']})", ""]
    meta = d.get("meta", {}) if isinstance(d.get("meta"), dict) else {}
    args = meta.get("args", {}) if isinstance(meta.get("args"), dict) else {}
    dev = meta.get("device") or ("cuda" if meta.get("gpu") else d.get("device", "cuda"))
    gate = gpu_gate(dev, same(d.get("K"), STREAM_K) and same(d.get("P"), STREAM_P) and d.get("dtype") == "bf16",
                    f"K={d.get('K')} × P={fnum(d.get('P'), 0)} {d.get('dtype')}: the target is "
                    f"{STREAM_K} × {STREAM_P:.0e} bf16")
    if gate is None and d.get("result_finite") is False:
        gate = "FAIL (result not finite)"
    res = verdict(d.get("ratio"), "<=", STREAM_RATIO, gate)
    total = num(d.get("bytes"))
    cm, sm = num(d.get("copy_median_s")), num(d.get("stream_median_s"))
    peak = num(d.get("peak_gpu_bytes"))
    rows = [[d.get("K", NA), fnum(d.get("P"), 0), d.get("dtype", NA), d.get("chunk_clients", NA),
             fnum(num(d.get("piece_bytes")) / 2**20 if num(d.get("piece_bytes")) else None, 0),
             ftime(cm), fnum(total / cm / 1e9 if total and cm else None), ftime(sm),
             fnum(total / sm / 1e9 if total and sm else None), fratio(d.get("ratio"), 3),
             res, fnum(peak / 2**30 if peak else None, 2),
             fnum(d.get("kernel_gbps"), 0), fpct(d.get("kernel_frac_copy")), fbool(d.get("result_finite"))]]
    targets.append([T_STREAM, f"bench_streaming, K={d.get('K', NA)} × P={fnum(d.get('P'), 0)} {d.get('dtype', '')}",
                    fratio(d.get("ratio"), 3), res])
    return [f"`{part.rel(path)}` (nonfinite={args.get('nonfinite', NA)}, backend={args.get('backend', NA)}; "
            f"copy: bare H2D copy of the same pinned bytes; stream: StreamingAggregator end to end; medians of "
            f"{len(d.get('stream_s') or []) or NA} reps):", ""] + table(
        ["K", "P", "dtype", "clients/chunk", "piece MiB", "copy", "copy GB/s", "stream", "stream GB/s",
         "stream / copy", f"≤ {STREAM_RATIO:g}×", "peak GPU GiB", "kernel GB/s", "kernel % of device copy",
         "finite"], rows) + [""]


# ---- ordering -------------------------------------------------------------------------------------
def order_section(part: Part, path: str, targets: list) -> list:
    doc = load_json(path)
    if "_error" in doc:
        return [f"`{part.rel(path)}`: unreadable ({doc['_error']})", ""]
    recs = records_of(doc)
    variants = []
    for r in recs:
        v = r.get("variant")
        if v != "torch.sort" and v not in variants:
            variants.append(v)
    keys = []
    for r in recs:
        k = (r.get("keys"), r.get("N"))
        if k not in keys:
            keys.append(k)
    rows = []
    for kind, N in keys:
        rs = {r.get("variant"): r for r in recs if r.get("keys") == kind and r.get("N") == N}
        srt = rs.get("torch.sort", {})
        row = [kind, fnum(N, 0), ftime(srt.get("median_s"))]
        for v in variants:
            r = rs.get(v)
            row.append(f"{ftime(r.get('median_s'))} ({fratio(r.get('speedup_vs_torch_sort'))})" if r else NA)
        eq = [r.get("equal_to_torch_sort") for r in rs.values() if r.get("variant") != "torch.sort"]
        row.append(NA if not eq else ("yes" if all(e is True for e in eq) else "**NO**"))
        rows.append(row)
    for kind in dict.fromkeys(k for k, _ in keys):
        sizes = [num(N) for k, N in keys if k == kind and num(N) is not None]
        top = max(sizes) if sizes else None
        ours = [r for r in recs if r.get("keys") == kind and top is not None and num(r.get("N")) == top
                and str(r.get("variant", "")).startswith("ours[")]
        b = best(ours, "speedup_vs_torch_sort")
        dev = (b or next(iter(ours), None) or next((r for r in recs if r.get("keys") == kind), {})).get("device")
        gate = gpu_gate(dev, top is not None and top >= ORDER_N,
                        f"largest N measured: {fnum(top, 0)}; the target is at N={ORDER_N:.0e}")
        res = verdict(b and b.get("speedup_vs_torch_sort"), ">=", ORDER_SPEEDUP, gate)
        if any(r.get("equal_to_torch_sort") is False for r in ours):
            res = "FAIL (result differs from torch.sort)"
        targets.append([T_ORDER, f"{kind} keys, N={fnum(top, 0)}",
                        f"{fratio(b.get('speedup_vs_torch_sort'))} ({b.get('variant')}, {ftime(b.get('median_s'))})"
                        if b else NA, res])
    return [f"`{part.rel(path)}`: median (speed-up over torch.sort); ours = public API, backend = the back end's "
            "stable_argsort alone:", ""] + table(["keys", "N", "torch.sort"] + variants + ["equal to torch.sort"],
                                                 rows) + [""]


# ---- evaluation -----------------------------------------------------------------------------------
def eval_verdict(d: dict, c: dict) -> str:
    gate = gpu_gate(d.get("device"), num(c.get("B")) is not None and num(c.get("B")) >= EVAL_B
                    and same(c.get("C"), EVAL_C),
                    f"B={c.get('B')}, C={c.get('C')}: the target is at B=|V|={EVAL_B}, C={EVAL_C}")
    if gate is None and c.get("counts_identical") is False:
        return "FAIL (counts differ)"
    return verdict(c.get("speedup_fused_vs_separate"), ">=", EVAL_SPEEDUP, gate)


def eval_section(part: Part, path: str, targets: list) -> list:
    d = load_json(path)
    if "_error" in d:
        return [f"`{part.rel(path)}`: unreadable ({d['_error']})", ""]
    cases = d.get("cases", {}) if isinstance(d.get("cases"), dict) else {}
    rows = []
    for name, c in cases.items():
        v = c.get("variants", {}) if isinstance(c.get("variants"), dict) else {}

        def med(k):
            return ftime(v.get(k, {}).get("median_s")) if k in v else ""
        tg = eval_verdict(d, c) if name == EVAL_CASE else ""
        rows.append([name, c.get("B", NA), c.get("C", NA), med("fused"), med("separate"), med("one_full"), med("masks"),
                     fratio(c.get("speedup_fused_vs_separate"), 1), fratio(c.get("fused_over_one_full")),
                     fbool(c.get("counts_identical")), tg])
    c = cases.get(EVAL_CASE)
    if c is None:
        targets.append([T_EVAL, "no MLP case in the file", NA, NA])
    else:
        res = eval_verdict(d, c)
        targets.append([T_EVAL, f"{EVAL_CASE}, B={c.get('B', NA)}, C={c.get('C', NA)}",
                        fratio(c.get("speedup_fused_vs_separate"), 1), res])
    return [f"`{part.rel(path)}` ({d.get('device_name', NA)}, torch {d.get('torch', NA)}; data on the device; "
            "medians):", ""] + table(["case", "B", "C", "fused", "separate", "one full", "masks", "fused vs separate",
                                      "fused / one full", "counts identical", f"≥ {EVAL_SPEEDUP:g}×"], rows) + [""]


# ---- scale ----------------------------------------------------------------------------------------
_SCALE_LINE = re.compile(r"^(mlp|resnet18)\s+(\d+)\s+(\S+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
                         r"([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s*$")


def scale_from_log(path: str) -> list:
    """Records from the table bench_scale prints per case (when it was cut before its JSON)."""
    out = []
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        m = _SCALE_LINE.match(line.strip())
        if m:
            g = m.groups()
            out.append({"model": g[0], "K": int(g[1]), "variant": g[2], "client_batch": int(g[3]), "world": int(g[4]),
                        "round_s": float(g[5]), "allocate_s": float(g[6]), "train_s": float(g[7]),
                        "aggregate_s": float(g[8]), "metrics_s": float(g[9]), "clients_per_s": float(g[10]),
                        "peak_mb": float(g[11]), "from_log": True})
        elif "FAILED" in line and re.match(r"^\s*(mlp|resnet18)\s+\d+", line):
            t = line.split()
            out.append({"model": t[0], "K": int(t[1]), "variant": t[2], "error": line.split("FAILED", 1)[1].strip(),
                        "from_log": True})
    return out


def scale_section(part: Part, paths: list, logs: list, targets: list) -> list:
    recs, srcs = [], []
    for p in paths:
        doc = load_json(p)
        if "_error" in doc:
            srcs.append(f"`{part.rel(p)}` unreadable ({doc['_error']})")
            continue
        recs += records_of(doc)
        srcs.append(f"`{part.rel(p)}`")
    have = {os.path.dirname(p) for p in paths}
    for lg in logs:
        # scale/<step>.log belongs to scale/<step>/bench_scale.json
        if os.path.splitext(lg)[0] not in have:
            got = scale_from_log(lg)
            if got:
                recs += got
                srcs.append(f"`{part.rel(lg)}` (read from the log: the step ended before writing its JSON)")
    if not recs:
        return []
    env_dev = part.env.get("device_kind") if isinstance(part.env, dict) else None
    for r in recs:
        if not r.get("device") and env_dev:
            r["device"] = env_dev          # records read from a log carry no device
    rows = []
    for r in recs:
        K = r.get("K", r.get("clients"))
        peak = r.get("cuda_peak_allocated_mb", r.get("peak_mb", r.get("round_peak_rss_mb")))
        tg = ""
        if r.get("model") == "resnet18" and num(K) == ROUND_K:
            tg = (gpu_gate(r.get("device")) or judge(r.get("round_s"), "<", ROUND_S)) if "error" not in r \
                else (gpu_gate(r.get("device")) or "FAIL (error)")
        if "error" in r:
            rows.append([r.get("model"), K, r.get("variant"), r.get("client_batch", NA), r.get("nproc", NA),
                         "FAILED: " + str(r["error"])[:160], "", "", "", "", "", "", "", tg])
            continue
        rows.append([r.get("model"), K, r.get("variant"), r.get("client_batch", NA), r.get("world", NA),
                     fnum(r.get("round_s"), 3), fnum(r.get("round_min_s"), 3), fnum(r.get("allocate_s"), 3),
                     fnum(r.get("train_s"), 3), fnum(r.get("aggregate_s"), 3), fnum(r.get("metrics_s"), 3),
                     fnum(r.get("clients_per_s")), fnum(peak, 0), tg])
    tgt = [r for r in recs if r.get("model") == "resnet18" and num(r.get("K", r.get("clients"))) == ROUND_K]
    ok = [r for r in tgt if "error" not in r]
    b = best(ok, "round_s", lowest=True)
    if b:
        meas = f"{fnum(b.get('round_s'), 2)} s ({b.get('variant')}, client_batch {b.get('client_batch', NA)})"
    elif tgt:
        meas = "error: " + str(tgt[0].get("error", ""))[:120]
    else:
        meas = NA
    if tgt or any(is_cuda(r.get("device")) for r in recs):
        gate = gpu_gate((b or (tgt[0] if tgt else recs[0])).get("device"))
        if gate:
            res = gate
        elif b:
            res = judge(b.get("round_s"), "<", ROUND_S)
        else:
            res = "FAIL (error)" if tgt else f"n/a (no ResNet-18 K={ROUND_K} case: run bench_scale --target)"
        targets.append([T_ROUND, "bench_scale --target, 1 local step", meas, res])
    else:
        largest = max((num(r.get("K", r.get("clients"))) or 0 for r in recs), default=0)
        targets.append([T_ROUND, "bench_scale", f"{NA} (CPU; largest K: {fnum(largest, 0)})",
                        gpu_gate(recs[0].get("device"))])
    return ["From " + ", ".join(srcs) + "; medians over the timed rounds (s); peak: "
            "torch.cuda.max_memory_allocated (MiB) on CUDA, else the round RSS peak:", ""] + table(
        ["model", "K", "variant", "client_batch", "procs", "round s", "min", "allocate", "train", "aggregate", "metrics",
         "clients/s", "peak MiB", f"< {ROUND_S:g} s"], rows) + [""]


# ---- round (CPU, one thread) ---------------------------------------------------------------------
def round_section(part: Part, path: str) -> list:
    d = load_json(path)
    if "_error" in d:
        return [f"`{part.rel(path)}`: unreadable ({d['_error']})", ""]
    modes = d.get("modes", {}) if isinstance(d.get("modes"), dict) else {}
    rows = [[m, r.get("rounds_timed", NA), fnum(r.get("simulator_s_per_round"), 3), fnum(r.get("official_s_per_round"), 3),
             fratio(r.get("speedup"), 1), fratio(r.get("speedup_cpu"), 1)] for m, r in modes.items()
            if isinstance(r, dict)]
    return [f"`{part.rel(path)}` ({d.get('setting', NA)}; data: {d.get('data', NA)}; {d.get('threads', NA)} CPU "
            "thread(s) of the lent machine; no GPU target):", ""] + table(
        ["logging", "rounds timed", "simulator s/round", "official s/round", "speed-up (wall)", "speed-up (CPU time)"],
        rows) + [""]


# ---- extra (generic) ------------------------------------------------------------------------------
def extra_section(part: Part, path: str) -> list:
    doc = load_json(path)
    if "_error" in doc:
        return [f"`{part.rel(path)}`: unreadable ({doc['_error']})", ""]
    recs = records_of(doc)
    if not recs:
        return [f"`{part.rel(path)}`: no records", ""]
    rows = []
    for r in recs:
        sp = next((k for k in r if k.startswith("speedup_vs")), None)
        rows.append([r.get("case", r.get("model", NA)), r.get("op", r.get("method", "")),
                     r.get("variant", r.get("form", NA)), r.get("K", NA), fnum(r.get("P"), 0),
                     ftime(r.get("median_s", r.get("time_s"))), f"{fratio(r.get(sp))} ({sp[11:]})" if sp else NA])
    return [f"`{part.rel(path)}`:", ""] + table(["case", "op", "variant", "K", "P", "median", "speed-up"], rows) + [""]


# ---- pytest ---------------------------------------------------------------------------------------
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def junit_summary(path: str) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    s = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0, "skips": Counter(), "failed": []}
    for su in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            s[k] += int(su.get(k, 0) or 0)
        s["time"] += float(su.get("time", 0) or 0)
        for tc in su.iter("testcase"):
            sk = tc.find("skipped")
            if sk is not None:
                s["skips"][sk.get("message") or (sk.text or "").strip()[:200]] += 1
            for tag in ("failure", "error"):
                el = tc.find(tag)
                if el is not None:
                    msg = (el.get("message") or (el.text or "")).strip().splitlines()
                    s["failed"].append(f"{tc.get('classname')}::{tc.get('name')} ({tag}): {msg[0][:200] if msg else ''}")
    s["passed"] = s["tests"] - s["failures"] - s["errors"] - s["skipped"]
    return s


def log_summary(path: str):
    """The counts of pytest's last summary line in a log, or None."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        found = _COUNT.findall(line)
        if found and (" in " in line):
            c = Counter()
            for n, word in found:
                c["errors" if word.startswith("error") else word] += int(n)
            return c
    return None


def tests_section(parts: list, targets: list) -> list:
    rows, skips, failed, notes = [], Counter(), [], []
    total_fail = 0
    seen = False
    for p in parts:
        junits = sorted(p.files.get("junit", []), key=lambda j: ("named" not in j, j))
        for j in junits:
            seen = True
            try:
                s = junit_summary(j)
            except (ET.ParseError, OSError, ValueError) as exc:
                notes.append(f"`{p.rel(j)}` unreadable: {exc}")
                continue
            rows.append([p.rel(j), s["passed"], s["failures"], s["errors"], s["skipped"], f"{s['time']:.0f} s"])
            skips.update(s["skips"])
            failed += s["failed"]
            total_fail += s["failures"] + s["errors"]
        # a pytest step cut by its budget writes no junit: read its log
        have = {os.path.splitext(os.path.basename(j))[0].replace("junit_", "") for j in junits}
        for lg in p.files.get("log", []):
            name = os.path.splitext(os.path.basename(lg))[0]
            if os.path.basename(os.path.dirname(lg)) != "test" or name in have:
                continue
            c = log_summary(lg)
            seen = True
            if c is None:
                notes.append(f"`{p.rel(lg)}`: no junit xml and no pytest summary line (cut by its budget?)")
                continue
            rows.append([p.rel(lg) + " (log)", c.get("passed", 0), c.get("failed", 0), c.get("errors", 0),
                         c.get("skipped", 0), NA])
            total_fail += c.get("failed", 0) + c.get("errors", 0)
    if not seen:
        return []
    lines = ["### Tests on the device (pytest)", ""] + table(["run", "passed", "failed", "errors", "skipped", "time"],
                                                             rows) + [""]
    if failed:
        lines += ["Failures:", ""] + [f"* `{f}`" for f in failed[:40]]
        if len(failed) > 40:
            lines.append(f"* … and {len(failed) - 40} more")
        lines.append("")
    if skips:
        lines += ["Skip reasons:", ""] + [f"* {n} × {msg}" for msg, n in skips.most_common()] + [""]
    lines += [f"* {n}" for n in notes] + ([""] if notes else [])
    targets.append([T_TESTS, "pytest", f"{sum(r[1] for r in rows if isinstance(r[1], int))} passed, "
                    f"{total_fail} failed or errors", "PASS" if rows and total_fail == 0 else
                    ("FAIL" if total_fail else NA)])
    return lines


# ---- the whole report -----------------------------------------------------------------------------
def guarded(fn, *a) -> list:
    try:
        return fn(*a)
    except Exception as exc:  # a malformed file must not hide the rest of the report
        return [f"_(section failed: {type(exc).__name__}: {exc})_", ""]


def run_kinds(parts: list) -> tuple:
    """(any part ran on CUDA, any part ran on the CPU), from env.json; no env.json at all: (True, False)."""
    envs = [p.env for p in parts if isinstance(p.env, dict) and p.env and "_error" not in p.env]
    if not envs:
        return True, False
    gpu = any(e.get("device_kind", "cuda") == "cuda" and e.get("cuda_available", True) for e in envs)
    cpu = any(e.get("device_kind") == "cpu" or e.get("cuda_available") is False for e in envs)
    return gpu, cpu


def build_report(dirs: list) -> tuple:
    """(markdown lines of the full report, target rows, header lines)."""
    parts = discover(dirs)
    targets: list = []
    body: list = guarded(tests_section, parts, targets)

    def each(kind, title, fn, *extra):
        lines = []
        for p in parts:
            for path in p.files.get(kind, []):
                lines += guarded(fn, p, path, *extra)
        return ([f"### {title}", ""] + lines) if lines else []

    body += each("agg", "Dense aggregation (bench_aggregation)", agg_section, targets, False)
    body += each("agg", "Streamed aggregation, K = 1000 (bench_aggregation stream1000)", agg_section, targets, True)
    body += each("stream", "Streaming from pinned host memory (bench_streaming)", stream_section, targets)
    body += each("order", "Stable ascending order (bench_order)", order_section, targets)
    body += each("eval", "Fused nested-candidate evaluation (bench_eval)", eval_section, targets)
    scale_lines = []
    for p in parts:
        logs = [lg for lg in p.files.get("log", []) if os.path.basename(os.path.dirname(lg)) == "scale"]
        scale_lines += guarded(scale_section, p, p.files.get("scale", []), logs, targets)
    if scale_lines:
        body += ["### Scale: round time vs K and model (bench_scale)", ""] + scale_lines
    body += each("round", "FedRAC MLP round on the host CPU (bench_round)", round_section)
    body += each("extra", "Other kernels (bench_sparsify, bench_gram, bench_submodel_methods)", extra_section)
    notes = [f"* {s['stage']}/{s['step']}: {s.get('note')}" for p in parts for s in p.steps
             if s.get("status") == "skipped" and s.get("note")]
    if notes:
        body += ["### Not measured", ""] + notes + [""]
    done = {t[0] for t in targets}
    gpu_run, cpu_run = run_kinds(parts)
    for t in EXPECTED:
        if t in done:
            continue
        if t in CPU_TARGETS and not cpu_run:
            continue                       # a GPU session: the CPU targets are RESULTS.md's CPU runs
        stage, fname = SOURCE[t]
        have = any(p.files.get(classify(fname)) for p in parts)
        measured = f"not run (no case for it in {fname})" if have else f"not run (no {fname}: stage `{stage}`)"
        res = NA if (gpu_run or t not in GPU_TARGETS) else "n/a (GPU target; CPU run)"
        targets.append([t, "", measured, res])
    order = {t: i for i, t in enumerate(EXPECTED + (T_BITS,))}
    targets.sort(key=lambda t: order.get(t[0], len(order)))
    head = guarded(header, parts)
    tgt = ["### Targets", ""] + table(TARGET_HEADER, targets) + [""]
    return head + guarded(commands, parts) + tgt + body, targets, head


def is_archive(path: str) -> bool:
    return os.path.isfile(path) and path.endswith((".tar.gz", ".tgz", ".tar"))


def unpack(path: str, into: str) -> str:
    """Extract one gpu_session.sh archive (PACK=1) into a folder named after it under ``into``."""
    name = os.path.basename(path)
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    dest = os.path.join(into, name)
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(path) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tf.extractall(dest)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="gpu_session.sh outputs: folders ($OUT of each command, or their "
                    "parent) and/or the gs_*.tar.gz archives of PACK=1 runs")
    ap.add_argument("--targets-only", action="store_true", help="print only the header and the target table")
    args = ap.parse_args(argv)
    missing = [d for d in args.dirs if not os.path.isdir(d) and not is_archive(d)]
    if missing:
        print(f"gpu_report.py: not a folder or a .tar.gz archive: {', '.join(missing)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_report.") as tmp:
        dirs = []
        for d in args.dirs:
            if is_archive(d):
                try:
                    dirs.append(unpack(d, tmp))
                except (OSError, tarfile.TarError) as exc:
                    print(f"gpu_report.py: cannot unpack {d}: {exc}", file=sys.stderr)
                    return 2
            else:
                dirs.append(d)
        lines, targets, head = build_report(dirs)
        if args.targets_only:
            lines = head[:1] + [""] + table(TARGET_HEADER, targets)
        print("\n".join(lines).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
