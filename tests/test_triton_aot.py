"""Every Triton kernel compiles ahead of time for sm_90 -- no GPU needed -- within its resources.

A subprocess *without* TRITON_INTERPRET (conftest sets it for this process, which turns every
kernel into an interpreted function) runs ``python -m fedrac_kernels.backends._triton.aot --json``:
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` for every kernel variant
with representative constexprs, then the ``cuobjdump`` bundled in the Triton wheel for registers,
stack and local memory. Skips cleanly when triton, its NVIDIA back end or these APIs are missing.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = 90

# Register budgets per kernel family (sm_90: 64 K registers per SM; the aggregation kernels are
# memory-bound and need occupancy, the sort/scan kernels are launched with few programs).
REG_BUDGET = {"dense": 96, "structured": 128, "compact": 168}
REG_DEFAULT = 168


def _skip_reason():
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # triton missing, or an API this test relies on moved
        return f"triton AOT APIs unavailable: {type(exc).__name__}: {exc}"
    if not hasattr(triton, "compile") or not hasattr(triton.compiler, "make_backend"):
        return "this triton lacks triton.compile / triton.compiler.make_backend"
    try:
        from triton.backends import backends
    except Exception as exc:
        return f"cannot list triton back ends: {exc}"
    if "nvidia" not in backends:
        return "this triton build has no NVIDIA back end"
    return None


@pytest.fixture(scope="module")
def report():
    why = _skip_reason()
    if why:
        pytest.skip(why)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "fedrac_kernels.backends._triton.aot", "--json",
         "--arch", str(ARCH)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"AOT compile failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _family(name):
    return name.split("[", 1)[0]


def test_every_kernel_compiles(report):
    names = [k["name"] for k in report["kernels"]]
    families = {_family(n) for n in names}
    for fam in ("dense", "structured", "compact", "freq_dense", "freq_nested", "size_hist",
                "scan_single", "scan_add", "block_sum", "rank_sort", "radix_transform",
                "radix_hist", "radix_scatter", "inverse_perm", "prefix_mask"):
        assert fam in families, fam
    assert len(names) == len(set(names))


def test_no_local_memory_and_registers_within_budget(report):
    measured = [k for k in report["kernels"] if k["resources"]]
    if not measured:
        pytest.skip("no cuobjdump in this triton wheel: resource usage not measurable")
    over = []
    for k in measured:
        res = k["resources"]
        budget = REG_BUDGET.get(_family(k["name"]), REG_DEFAULT)
        if res.get("LOCAL", 0) or res.get("STACK", 0) or res["REG"] > budget:
            over.append(f"{k['name']}: {res} (register budget {budget})")
    assert not over, "\n".join(over)


def test_float_arithmetic_is_bit_exact(report):
    """No f32 FMA, no f32 add/mul that ptxas may contract, IEEE division only."""
    for k in report["kernels"]:
        if not k["float_kernel"]:
            continue
        ptx = k["ptx"]
        assert ptx["fma"] == 0 and ptx["loose"] == 0, (k["name"], ptx)
        assert ptx["div_other"] == 0, (k["name"], ptx)
        if "finalize=True" in k["name"] or _family(k["name"]) == "compact":
            assert ptx["div_rn"] > 0, (k["name"], ptx)


def test_dense_aligned_rows_use_vector_loads(report):
    dense = {k["name"]: k for k in report["kernels"] if _family(k["name"]) == "dense"}
    assert dense["dense[fp32,mask=False,finalize=True]"]["ptx"]["vector_loads"] > 0
    assert dense["dense[bf16,mask=False,finalize=True]"]["ptx"]["vector_loads"] > 0
