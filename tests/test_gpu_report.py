"""benchmarks/gpu_report.py (target verdicts from the benchmarks' JSON) and benchmarks/gpu_session.sh.

The report is fed synthetic output folders laid out as gpu_session.sh writes them; every target is
checked on both sides of its threshold, on the wrong device / size (n/a), and missing (not run).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "gpu_report.py"
SESSION = ROOT / "benchmarks" / "gpu_session.sh"


def _load_report():
    # benchmarks/ is not a package: import the file by path
    spec = importlib.util.spec_from_file_location("gpu_report_under_test", REPORT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gr = _load_report()

RESNET_P = 11_181_642
MLP_P = 656_810


# ---- synthetic outputs ----------------------------------------------------------------------------
def write(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def env(out: Path, device_kind="cuda", cuda=True, quick=False):
    doc = {"date": "2026-11-21T12:00:00+00:00", "out": str(out), "root": str(ROOT), "commit": "abc1234",
           "stages": ["agg", "order"], "device_kind": device_kind, "quick": quick, "cuda_available": cuda,
           "cpu": "Test CPU", "cpu_count": 16, "python": "3.11.7", "torch": "2.13.0"}
    if cuda:
        doc.update(gpu="NVIDIA H100 80GB HBM3", gpu_memory_gib=79.1, gpu_sm_count=132, gpu_capability="9.0")
    write(out / "env.json", doc)


def dense_recs(case, K, P, device, ours, base=None):
    """Records of one dense case: ``ours`` = the ours[...] record's measured fields."""
    base = base or {}
    common = {"case": case, "K": K, "P": P, "dtype": "fp32", "device": device, "clock": "wall", "threads": 2}
    recs = [dict(common, variant="ours[cuda,assume_finite]" if device != "cpu" else "ours[cpu,raise]",
                 check={"bitwise_vs_oracle": True}, **ours)]
    recs.append(dict(common, variant="(b) stacked", median_s=1e-3, speedup_vs_b=1.0))
    recs.append(dict(common, variant="(a) official", median_s=1e-1, speedup_vs_a=1.0))
    recs.append(dict(common, variant="copy", median_s=base.get("copy_s", 1e-4), frac_copy=1.0, gbps=3000.0))
    return recs


def agg_json(out: Path, device="cuda:0", *, frac=0.90, mlp_s=10e-6, vs_a=250.0, vs_b=4.0, vs_bc=3.5,
             resnet_p=RESNET_P, mlp_p=MLP_P, cpu_vs_a=None, cpu_vs_b=None):
    recs = []
    recs += dense_recs("mlp10", 10, mlp_p, device,
                       {"median_s": mlp_s, "speedup_vs_a": cpu_vs_a if cpu_vs_a is not None else vs_a,
                        "speedup_vs_b": cpu_vs_b if cpu_vs_b is not None else vs_b,
                        "speedup_vs_b_compiled": vs_bc, "frac_copy": 0.5})
    recs += dense_recs("resnet10", 10, resnet_p, device,
                       {"median_s": 2e-4, "frac_copy": frac, "gbps": 2700.0, "copy_gbps": 3000.0,
                        "speedup_vs_a": 500.0, "speedup_vs_b": 5.0, "speedup_vs_b_compiled": 4.0})
    recs += dense_recs("resnet100", 100, resnet_p, device,
                       {"median_s": 2e-3, "frac_copy": frac, "gbps": 2600.0, "copy_gbps": 3000.0,
                        "speedup_vs_a": 900.0, "speedup_vs_b": vs_b, "speedup_vs_b_compiled": vs_bc})
    write(out / "agg" / "dense" / "aggregation.json", {"meta": {"device": device, "commit": "abc1234"},
                                                      "records": recs})


def stream_json(out: Path, ratio=1.10, K=1000, P=100_000_000, dtype="bf16", finite=True, device="cuda:0"):
    write(out / "stream" / "streaming.json",
          {"meta": {"device": device, "gpu": "H100", "args": {"nonfinite": "assume_finite", "backend": "cuda"}},
           "K": K, "P": P, "dtype": dtype, "chunk_clients": 8, "piece_bytes": 2**28, "bytes": K * P * 2,
           "copy_median_s": 3.0, "stream_median_s": 3.0 * ratio, "ratio": ratio, "peak_gpu_bytes": 2**31,
           "kernel_gbps": 3000.0, "kernel_frac_copy": 0.9, "result_finite": finite, "stream_s": [3.3, 3.3]})


def order_json(out: Path, speedup=5.0, N=100_000_000, equal=True, device="cuda:0"):
    recs = []
    for keys in ("freq", "random"):
        recs.append({"keys": keys, "N": N, "variant": "torch.sort", "device": device, "median_s": 5e-3,
                     "speedup_vs_torch_sort": 1.0})
        recs.append({"keys": keys, "N": N, "variant": "ours[cuda]", "device": device, "median_s": 5e-3 / speedup,
                     "speedup_vs_torch_sort": speedup, "equal_to_torch_sort": equal})
    write(out / "order" / "order.json", {"meta": {"device": device}, "records": recs})


def eval_json(out: Path, speedup=50.0, B=5000, C=50, identical=True, device="cuda"):
    write(out / "eval" / "eval.json",
          {"benchmark": "bench_eval", "device": device, "device_name": "H100", "torch": "2.13.0",
           "cases": {"mlp_cifar10": {"B": B, "C": C, "speedup_fused_vs_separate": speedup,
                                     "fused_over_one_full": 1.5, "counts_identical": identical,
                                     "variants": {"fused": {"median_s": 1e-3}, "separate": {"median_s": 5e-2}}}}})


def scale_json(out: Path, round_s=6.0, K=1000, device="cuda", error=None):
    rec = {"model": "resnet18", "K": K, "clients": K, "variant": "batched", "client_batch": 64, "world": 1,
           "device": device, "round_s": round_s, "round_min_s": round_s, "allocate_s": 0.1, "train_s": 4.0,
           "aggregate_s": 0.5, "metrics_s": 0.4, "clients_per_s": K / round_s, "cuda_peak_allocated_mb": 9000}
    if error:
        rec = {k: rec[k] for k in ("model", "K", "clients", "variant", "device")}
        rec["error"] = error
    write(out / "scale" / "target" / "bench_scale.json", {"meta": {"device": device}, "records": [rec]})


def junit(out: Path, failures=0, name="named"):
    cases = "".join(f'<testcase classname="tests.test_x" name="t{i}"/>' for i in range(3))
    cases += "".join(f'<testcase classname="tests.test_x" name="bad{i}"><failure message="boom {i}"/></testcase>'
                     for i in range(failures))
    write(out / "test" / f"junit_{name}.xml",
          f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{3 + failures}" '
          f'failures="{failures}" errors="0" skipped="0" time="1.0">{cases}</testsuite></testsuites>')


def full_gpu_session(out: Path, **kw):
    env(out)
    agg_json(out, **kw.get("agg", {}))
    stream_json(out, **kw.get("stream", {}))
    order_json(out, **kw.get("order", {}))
    eval_json(out, **kw.get("eval", {}))
    scale_json(out, **kw.get("scale", {}))
    junit(out, **kw.get("junit", {}))


def targets_of(*dirs) -> dict:
    """{target: [(case, measured, result), ...]} of the report on these folders."""
    _, rows, _ = gr.build_report([str(d) for d in dirs])
    got = {}
    for t, case, measured, result in rows:
        got.setdefault(t, []).append((case, measured, result))
    return got


def results(got, target) -> list:
    return [r for _, _, r in got[target]]


# ---- verdicts -------------------------------------------------------------------------------------
def test_all_targets_pass(tmp_path):
    full_gpu_session(tmp_path)
    got = targets_of(tmp_path)
    for t in gr.GPU_TARGETS + (gr.T_TESTS,):
        assert t in got, t
        assert all(r == "PASS" for r in results(got, t)), (t, got[t])
    assert len(got[gr.T_COPY]) == 2                      # resnet10 and resnet100
    assert len(got[gr.T_ORDER]) == 2                     # freq and random keys
    # a GPU session lists no CPU targets
    assert not any(t in got for t in gr.CPU_TARGETS)
    # the measured values are the ones in the files
    assert {c for c, _, _ in got[gr.T_COPY]} == {"resnet10", "resnet100"}
    assert all(m.startswith("90%") for _, m, _ in got[gr.T_COPY])
    assert got[gr.T_MLP][0][1].startswith("10.0 µs")
    assert got[gr.T_A][0][1].startswith("250.0×")
    assert got[gr.T_B][0][1].startswith("4.00×")
    assert got[gr.T_BC][0][1].startswith("3.50×")
    assert got[gr.T_STREAM][0][1] == "1.100×"
    assert got[gr.T_ORDER][0][1].startswith("5.00×")
    assert got[gr.T_EVAL][0][1] == "50.0×"
    assert got[gr.T_ROUND][0][1].startswith("6.00 s")
    assert got[gr.T_TESTS][0][1] == "3 passed, 0 failed or errors"


def test_all_targets_fail(tmp_path):
    full_gpu_session(tmp_path, agg=dict(frac=0.80, mlp_s=20e-6, vs_a=150.0, vs_b=2.0, vs_bc=2.5),
                     stream=dict(ratio=1.30), order=dict(speedup=3.0), eval=dict(speedup=30.0),
                     scale=dict(round_s=12.0), junit=dict(failures=2))
    got = targets_of(tmp_path)
    for t in gr.GPU_TARGETS + (gr.T_TESTS,):
        assert all(r == "FAIL" for r in results(got, t)), (t, got[t])
    assert got[gr.T_MLP][0][1].startswith("20.0 µs")
    assert got[gr.T_TESTS][0][1] == "3 passed, 2 failed or errors"
    md = "\n".join(gr.build_report([str(tmp_path)])[0])
    assert "tests.test_x::bad0 (failure): boom 0" in md


@pytest.mark.parametrize("target, kw, expect", [
    # thresholds: >= 85 %, <= 15 µs, >= 200x, >= 3x, <= 1.15x, >= 4x, >= 40x, < 10 s (strict)
    ("T_COPY", dict(agg=dict(frac=0.85)), "PASS"),
    ("T_COPY", dict(agg=dict(frac=0.849)), "FAIL"),
    ("T_MLP", dict(agg=dict(mlp_s=15e-6)), "PASS"),
    ("T_MLP", dict(agg=dict(mlp_s=15.1e-6)), "FAIL"),
    ("T_A", dict(agg=dict(vs_a=200.0)), "PASS"),
    ("T_A", dict(agg=dict(vs_a=199.9)), "FAIL"),
    ("T_BC", dict(agg=dict(vs_bc=2.99)), "FAIL"),
    ("T_STREAM", dict(stream=dict(ratio=1.15)), "PASS"),
    ("T_STREAM", dict(stream=dict(ratio=1.151)), "FAIL"),
    ("T_ORDER", dict(order=dict(speedup=4.0)), "PASS"),
    ("T_ORDER", dict(order=dict(speedup=3.99)), "FAIL"),
    ("T_EVAL", dict(eval=dict(speedup=40.0)), "PASS"),
    ("T_EVAL", dict(eval=dict(speedup=39.9)), "FAIL"),
    ("T_ROUND", dict(scale=dict(round_s=9.99)), "PASS"),
    ("T_ROUND", dict(scale=dict(round_s=10.0)), "FAIL"),
])
def test_thresholds(tmp_path, target, kw, expect):
    full_gpu_session(tmp_path, **kw)
    got = targets_of(tmp_path)
    assert set(results(got, getattr(gr, target))) == {expect}, got[getattr(gr, target)]


@pytest.mark.parametrize("kw, target, why", [
    (dict(stream=dict(finite=False)), "T_STREAM", "FAIL (result not finite)"),
    (dict(order=dict(equal=False)), "T_ORDER", "FAIL (result differs from torch.sort)"),
    (dict(eval=dict(identical=False)), "T_EVAL", "FAIL (counts differ)"),
    (dict(scale=dict(error="exit 1: CUDA out of memory")), "T_ROUND", "FAIL (error)"),
])
def test_wrong_results_fail_even_when_fast(tmp_path, kw, target, why):
    full_gpu_session(tmp_path, **kw)
    assert set(results(targets_of(tmp_path), getattr(gr, target))) == {why}


@pytest.mark.parametrize("kw, target", [
    (dict(agg=dict(resnet_p=29_642)), "T_COPY"),                 # --resnet-width 0.05
    (dict(agg=dict(mlp_p=1000)), "T_MLP"),
    (dict(stream=dict(P=20_000_000)), "T_STREAM"),
    (dict(stream=dict(dtype="fp32")), "T_STREAM"),
    (dict(order=dict(N=10_000)), "T_ORDER"),
    (dict(eval=dict(B=200)), "T_EVAL"),
])
def test_gpu_targets_not_applicable_off_the_target_size(tmp_path, kw, target):
    # fast enough to pass, but not at the target's size: no verdict
    full_gpu_session(tmp_path, **kw)
    res = results(targets_of(tmp_path), getattr(gr, target))
    assert res and all(r.startswith("n/a (") for r in res), res


def test_missing_files_are_not_run(tmp_path):
    env(tmp_path)
    order_json(tmp_path)
    got = targets_of(tmp_path)
    assert results(got, gr.T_ORDER) == ["PASS", "PASS"]
    for t, fname in ((gr.T_COPY, "aggregation.json"), (gr.T_STREAM, "streaming.json"), (gr.T_EVAL, "eval.json"),
                     (gr.T_ROUND, "bench_scale.json"), (gr.T_TESTS, "junit")):
        (case, measured, result), = got[t]
        assert measured.startswith("not run (no " + fname), (t, measured)
        assert result == "n/a"
    # an empty folder (no env.json either): every GPU target reads "not run"
    empty = tmp_path / "empty"
    empty.mkdir()
    got = targets_of(empty)
    assert all(got[t][0][1].startswith("not run") for t in gr.GPU_TARGETS + (gr.T_TESTS,))


def test_cli_writes_markdown_and_targets_only(tmp_path, capsys):
    full_gpu_session(tmp_path, agg=dict(vs_a=100.0))
    assert gr.main([str(tmp_path)]) == 0
    md = capsys.readouterr().out
    assert md.startswith("## GPU session — NVIDIA H100 80GB HBM3 (2026-11-21)")
    assert "Commit abc1234" in md
    assert "### Targets" in md and "### Dense aggregation (bench_aggregation)" in md
    line = next(x for x in md.splitlines() if x.startswith(f"| {gr.T_A} |"))
    assert line.endswith("| 100.0× (ours[cuda,assume_finite]) | FAIL |")
    assert gr.main(["--targets-only", str(tmp_path)]) == 0
    short = capsys.readouterr().out
    assert "### Dense" not in short and f"| {gr.T_A} |" in short
    assert gr.main([str(tmp_path / "nope")]) == 2


def test_cli_reads_pack_archives(tmp_path, capsys):
    # PACK=1 (the lent machine): each command returns gs_<time>_<stages>.tar.gz of its whole tree
    import tarfile
    tree = tmp_path / "tree"
    full_gpu_session(tree, scale=dict(round_s=12.0))
    arc = tmp_path / "gs_20261121T120000Z_agg-scale.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(tree, arcname=".")
    assert gr.main([str(arc)]) == 0
    md = capsys.readouterr().out
    assert "output `gs_20261121T120000Z_agg-scale`" in md
    row = next(x for x in md.splitlines() if x.startswith(f"| {gr.T_ROUND} |"))
    assert row.endswith("| FAIL |")
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"not a tar")
    assert gr.main([str(bad)]) == 2


def test_unreadable_file_does_not_hide_the_rest(tmp_path):
    full_gpu_session(tmp_path)
    write(tmp_path / "eval" / "eval.json", "{not json")
    lines, rows, _ = gr.build_report([str(tmp_path)])
    md = "\n".join(lines)
    assert "unreadable" in md
    got = targets_of(tmp_path)
    assert results(got, gr.T_ORDER) == ["PASS", "PASS"]


# ---- CPU runs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("vs_a, vs_b, expect_a, expect_b", [
    (25.0, 3.0, "PASS", "PASS"),
    (20.0, 1.01, "PASS", "PASS"),
    (19.0, 3.0, "FAIL", "PASS"),
    (25.0, 0.9, "PASS", "FAIL"),
    (25.0, 1.0, "PASS", "FAIL"),                       # "faster than plain torch": strictly
])
def test_cpu_run_judges_cpu_targets_and_not_gpu_ones(tmp_path, vs_a, vs_b, expect_a, expect_b):
    env(tmp_path, device_kind="cpu", cuda=False, quick=True)
    agg_json(tmp_path, device="cpu", cpu_vs_a=vs_a, cpu_vs_b=vs_b, resnet_p=29_642)
    order_json(tmp_path, N=10_000, device="cpu")
    eval_json(tmp_path, B=200, device="cpu")
    got = targets_of(tmp_path)
    assert results(got, gr.T_CPU_A) == [expect_a]
    assert results(got, gr.T_CPU_B) == [expect_b]
    assert got[gr.T_CPU_A][0][1].startswith(f"{vs_a:.1f}× (ours[cpu,raise])")
    for t in gr.GPU_TARGETS:
        assert all(r.startswith("n/a (GPU target") for r in results(got, t)), (t, got[t])
    md = "\n".join(gr.build_report([str(tmp_path)])[0])
    assert "**Dry run**" in md


def test_cpu_targets_need_the_mlp_size(tmp_path):
    env(tmp_path, device_kind="cpu", cuda=False)
    agg_json(tmp_path, device="cpu", cpu_vs_a=50.0, cpu_vs_b=2.0, mlp_p=1000)
    got = targets_of(tmp_path)
    assert all(r.startswith("n/a (no C++ back-end record") for r in results(got, gr.T_CPU_A))


def test_gpu_record_on_cpu_session_is_not_judged_as_cpu(tmp_path):
    # CUDA records never feed the CPU targets, and a GPU session does not list them
    full_gpu_session(tmp_path)
    assert gr.CPU_TARGETS[0] not in targets_of(tmp_path)


def test_several_parts_are_merged(tmp_path):
    a, b = tmp_path / "part1", tmp_path / "part2"
    env(a)
    agg_json(a)
    env(b)
    scale_json(b, round_s=11.0)
    got = targets_of(tmp_path)                          # the parent folder: both parts
    assert results(got, gr.T_COPY) == ["PASS", "PASS"]
    assert results(got, gr.T_ROUND) == ["FAIL"]
    assert got[gr.T_ORDER][0][1].startswith("not run")


# ---- gpu_session.sh -------------------------------------------------------------------------------
def test_session_script_parses_and_rejects_unknown_stages():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    assert subprocess.run([bash, "-n", str(SESSION)], capture_output=True).returncode == 0
    p = subprocess.run([bash, str(SESSION), "nonsense"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "unknown stage" in p.stderr
    p = subprocess.run([bash, str(SESSION), "plan"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and "gpu_session.sh build test" in p.stdout


def test_session_dry_run_of_one_cheap_stage(tmp_path):
    """DEVICE=cpu QUICK=1 `order` (about 10 s), packed as on the lent machine (PACK=1): $OUT holds
    three files (the machine returns at most 8), the archive holds the JSON, the step record and
    the report, and gpu_report.py reads the archive."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    try:
        import fedrac_kernels._cpu  # noqa: F401  (the built C++ module; the dry run does not build)
    except ImportError as exc:
        pytest.skip(f"C++ extension not built: {exc}")
    import tarfile
    out = tmp_path / "gs"
    e = dict(os.environ, OUT=str(out), DEVICE="cpu", QUICK="1", BUILD_MODE="skip", PACK="1",
             PYTHON=sys.executable, TMPDIR=str(tmp_path))
    p = subprocess.run([bash, str(SESSION), "order"], capture_output=True, text=True, cwd=ROOT, env=e, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(f.name for f in out.iterdir())
    assert len(files) == 3, files
    arc = next(out / f for f in files if f.endswith(".tar.gz"))
    assert any(f.endswith("_report.md") for f in files) and any(f.endswith("_session.log") for f in files)
    tree = tmp_path / "tree"
    with tarfile.open(arc) as tf:
        tf.extractall(tree, filter="data")
    doc = json.loads((tree / "order" / "order.json").read_text())
    assert {r["variant"] for r in doc["records"]} >= {"torch.sort", "ours[cpu]"}
    steps = [json.loads(x) for x in (tree / "order" / "steps.jsonl").read_text().splitlines()]
    assert [(s["step"], s["status"], s["rc"]) for s in steps] == [("order", "ok", 0)]
    assert json.loads((tree / "env.json").read_text())["device_kind"] == "cpu"
    md = (tree / "report.md").read_text()
    assert "### Targets" in md and "### Stable ascending order (bench_order)" in md
    row = next(x for x in md.splitlines() if x.startswith(f"| {gr.T_ORDER} |"))
    assert "n/a (GPU target" in row
    # the archive as gpu_report.py's input gives the same target table
    _, rows, _ = gr.build_report([str(tree)])
    assert [r[0] for r in rows].count(gr.T_ORDER) == 2
