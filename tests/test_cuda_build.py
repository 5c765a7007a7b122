"""Build checks of the CUDA back end that need no GPU (they run in CI).

1. Every ``csrc/cuda/*.cu`` compiles with nvcc for sm_90 with the flags of setup.py plus
   ``-Xptxas -v``: no errors, no warnings, and no local-memory spills in any kernel (ptxas reports
   "0 bytes spill stores" for each). The per-kernel register/spill table is printed (``-s``).
2. The built module ``fedrac_kernels._cuda`` (if setup.py built it) imports without a GPU or driver,
   and the back end reports ``(False, reason)`` instead of failing.
3. Host emulation: the synchronisation-free kernels (dense, structured, compact) and the sort-key
   images are compiled with g++ through ``csrc/cuda/fk_host_emu.cuh`` and every thread of the grid
   is run one after the other on CPU tensors, then compared bit for bit with the torch oracle on
   the cases of tests/test_backend_cuda.py. This checks the kernels' index arithmetic, gating,
   alignment classes and client loop without a GPU; the GPU tests re-check everything on hardware.

Skips cleanly when nvcc (1) or g++ (3) is absent. The .cu files are compiled in parallel, one nvcc
per file, once per session.
"""
from __future__ import annotations

import ast
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fedrac_kernels.backends import torch_ref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_backend_cuda as cases  # noqa: E402  (case generators; CPU-only functions)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CU_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))


def _find_nvcc():
    cand = os.environ.get("NVCC") or shutil.which("nvcc")
    if not cand:
        for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
                return os.path.join(root, "bin", "nvcc")
    return cand


def _setup_nvcc_flags() -> list:
    """NVCC_FLAGS as written in setup.py (read, not imported: importing setup.py runs setup())."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no NVCC_FLAGS list")


GENCODE = ["-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90"]
NVCC = _find_nvcc()

_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _parse_ptxas(text: str) -> list:
    """[(function, regs, stack, spill_stores, spill_loads)] from -Xptxas -v output."""
    out, cur = [], None
    rec = {}
    for line in text.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            cur = m.group(1)
            rec[cur] = [cur, None, 0, 0, 0]
            out.append(rec[cur])
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            rec[cur][2:5] = [int(m.group(1)), int(m.group(2)), int(m.group(3))]
        m = _PTXAS_REGS.search(line)
        if m:
            rec[cur][1] = int(m.group(1))
    return out


def _short(name: str) -> str:
    """A readable kernel name from a mangled one."""
    keys = ("dense_kernel", "structured_kernel", "compact_kernel", "small_sort_kernel", "tile_scatter_kernel",
            "tile_hist_kernel", "range_kernel", "transform_kernel", "widen_kernel", "arange_kernel",
            "freq_masks_kernel", "freq_nested_small_kernel", "freq_nested_apply_kernel", "size_hist_kernel",
            "nested_masks_small_kernel", "nested_masks_large_kernel", "rank_scatter_kernel",
            "scan_chunk_sums_kernel", "scan_sums_kernel", "scan_chunks_kernel", "probe_kernel")
    for key in sorted(keys, key=len, reverse=True):
        i = name.find(key)
        if i >= 0:
            tail = name[i + len(key):]
            m = re.match(r"I(.*?)EEv", tail)
            return key + (f"<{m.group(1)}>" if m else "")
    m = re.search(r"cub\w*?(Device\w+Kernel)", name)
    return "cub::" + m.group(1) if m else name[:60]


@pytest.fixture(scope="session")
def nvcc_results(tmp_path_factory):
    if not NVCC or not os.path.exists(NVCC):
        pytest.skip("nvcc not found (set NVCC or CUDA_HOME)")
    if not CU_FILES:
        pytest.skip("no csrc/cuda/*.cu files")
    flags = _setup_nvcc_flags()
    outdir = tmp_path_factory.mktemp("cuda_objs")

    def compile_one(src):
        obj = os.path.join(str(outdir), os.path.basename(src) + ".o")
        cmd = [NVCC, "-c", src, "-o", obj, "-I" + os.path.join(ROOT, "csrc", "include")] + flags + GENCODE + \
              ["-Xptxas", "-v"]
        t0 = time.time()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        return src, p.returncode, p.stdout + p.stderr, time.time() - t0

    jobs = max(1, min(len(CU_FILES), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        res = {os.path.basename(s): r for s, *r in pool.map(compile_one, CU_FILES)}
    # human-readable report (pytest -s)
    print("\n# nvcc sm_90 compile of csrc/cuda/*.cu")
    for name, (rc, text, secs) in sorted(res.items()):
        print(f"{name}: rc={rc}, {secs:.1f} s")
        for fn, regs, stack, st, ld in _parse_ptxas(text):
            print(f"    {_short(fn):<48} regs={regs:<4} stack={stack:<4} spill_st={st} spill_ld={ld}")
    return res


@pytest.mark.parametrize("name", [os.path.basename(f) for f in CU_FILES])
def test_cu_compiles_without_warnings(nvcc_results, name):
    rc, text, _ = nvcc_results[name]
    assert rc == 0, f"nvcc failed for {name}:\n{text[-4000:]}"
    warnings = [ln for ln in text.splitlines() if re.search(r"\bwarning\b", ln, re.I)]
    assert not warnings, f"{name}: compiler warnings:\n" + "\n".join(warnings[:20])


@pytest.mark.parametrize("name", [os.path.basename(f) for f in CU_FILES])
def test_cu_kernels_do_not_spill(nvcc_results, name):
    rc, text, _ = nvcc_results[name]
    assert rc == 0
    funcs = _parse_ptxas(text)
    if "__global__" in open(os.path.join(CUDA_DIR, name)).read():
        assert funcs, f"{name}: no ptxas report (is -Xptxas -v passed?)"
    spilling = [(f, st, ld) for f, _, _, st, ld in funcs if st or ld]
    assert not spilling, f"{name}: local-memory spills: {spilling}"
    assert all(r is not None and r <= 255 for _, r, *_ in funcs)


# ------------------------------------------------------------------------------------ the module

def _built_module():
    return glob.glob(os.path.join(ROOT, "fedrac_kernels", "_cuda*.so")) + \
        glob.glob(os.path.join(ROOT, "fedrac_kernels", "_cuda*.pyd"))


def test_module_imports_and_reports_cleanly():
    if not _built_module():
        try:
            import fedrac_kernels._cuda  # noqa: F401  (installed elsewhere)
        except ImportError:
            pytest.skip("fedrac_kernels._cuda is not built (setup.py builds it where nvcc is found)")
    import fedrac_kernels._cuda as m

    assert "90" in m.built_archs()
    from fedrac_kernels.backends import cuda as cb

    ok, why = cb.available()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if not torch.cuda.is_available():
        assert ok is False
        with pytest.raises(RuntimeError):  # no driver / no device: an exception, never a crash
            m.runtime_info()
    assert cb.available("cpu")[0] is False


# ------------------------------------------------------------------------------- host emulation

_HARNESS = r"""
#define FK_HOST_EMU 1
#include <stdarg.h>
#include <stdio.h>
#include <string>
#include "fedrac_kernels.h"
#include "fk_cuda_common.cuh"

thread_local fk_emu_dim3 blockIdx, threadIdx, blockDim, gridDim;

namespace fk {
static std::string g_err;
int fail(int code, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  g_err = buf;
  return code;
}
}  // namespace fk

#include "aggregate_common.cu"
#include "dense.cu"
#include "structured.cu"
#include "compact.cu"
#include "fk_keys.cuh"

using namespace fk;

template <class F>
static void grid_run(int64_t grid, unsigned block, F&& f) {
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  blockDim = {block, 1, 1};
  for (int64_t b = 0; b < grid; ++b) {
    blockIdx = {static_cast<unsigned>(b), 0, 0};
    for (unsigned t = 0; t < block; ++t) {
      threadIdx = {t, 0, 0};
      f();
    }
  }
}

template <int DT>
static void dense_t(const AggArgs& a, const uint8_t* const* masks) {
  const int64_t grid = ceil_div(ceil_div(a.P, Vec<DT>::V), kAggThreads);
  if (masks) grid_run(grid, kAggThreads, [&] { dense_kernel<DT, true>(a, masks); });
  else grid_run(grid, kAggThreads, [&] { dense_kernel<DT, false>(a, masks); });
}

template <int DT>
static void structured_t(const AggArgs& a, const fk_segment* segs, int64_t S, int64_t N, const uint8_t* nm,
                         const int32_t* rank, const int32_t* sizes, int nz) {
  const int64_t grid = ceil_div(ceil_div(a.P, kStructElems), kAggThreads);
  auto go = [&](auto nested, auto nonzero) {
    grid_run(grid, kAggThreads, [&] {
      structured_kernel<DT, decltype(nested)::value, decltype(nonzero)::value>(a, segs, S, N, nm, rank, sizes);
    });
  };
  using T = std::true_type;
  using F = std::false_type;
  if (nm == nullptr) { if (nz) go(T{}, T{}); else go(T{}, F{}); }
  else { if (nz) go(F{}, T{}); else go(F{}, F{}); }
}

template <int DT>
static void compact_t(const AggArgs& a, const fk_segment* segs, int64_t S, int64_t N, const int32_t* inv,
                      const int64_t* so, const int64_t* sc) {
  const int64_t grid = ceil_div(ceil_div(a.P, kCompactElems), kAggThreads);
  if (a.P < 0x7fffffffLL) grid_run(grid, kAggThreads, [&] { compact_kernel<DT, true>(a, segs, S, N, inv, so, sc); });
  else grid_run(grid, kAggThreads, [&] { compact_kernel<DT, false>(a, segs, S, N, inv, so, sc); });
}

template <int KD>
static void keys_t(const void* keys, int64_t n, int* plan_out, unsigned long long* out) {
  using Raw = typename KeyTraits<KD>::Raw;
  const Raw* k = static_cast<const Raw*>(keys);
  constexpr unsigned long long wmask = KeyTraits<KD>::width == 64 ? ~0ull : 0xffffffffull;
  RangeAcc r{0ull, 0ull, 0u, 0u, 0u, 0u};
  for (int64_t i = 0; i < n; ++i) {  // what range_kernel / small_sort_kernel accumulate
    const unsigned long long o = ord_rep<KD>(k[i]);
    r.or_o |= o;
    r.nor_o |= ~o & wmask;
    if (KeyTraits<KD>::is_float) {
      unsigned int v;
      if (int_rep<KD>(k[i], v)) { r.or_i |= v; r.nor_i |= ~v; } else { r.nonint = 1u; }
    }
  }
  const Plan p = make_plan(r, KeyTraits<KD>::is_float, KeyTraits<KD>::width);
  plan_out[0] = p.mode;
  plan_out[1] = p.lo;
  plan_out[2] = p.nbits;
  const unsigned long long m = p.nbits >= 64 ? ~0ull : ((1ull << p.nbits) - 1ull);
  for (int64_t i = 0; i < n; ++i) out[i] = plan_key<KD>(k[i], p.mode, p.lo) & m;
}

extern "C" {
const char* emu_last_error() { return g_err.c_str(); }

int emu_dense(const fk_accum_args* args, const uint8_t* const* masks) {
  AggArgs a;
  const int rc = make_agg_args(args, "emu_dense", &a);
  if (rc != FK_OK || a.P == 0) return rc;
  switch (args->dtype) {
    case FK_F32: dense_t<FK_F32>(a, masks); break;
    case FK_BF16: dense_t<FK_BF16>(a, masks); break;
    default: dense_t<FK_F16>(a, masks);
  }
  return FK_OK;
}

int emu_structured(const fk_accum_args* args, const fk_segment* segs, int64_t S, int64_t N, const uint8_t* nm,
                   const int32_t* rank, const int32_t* sizes, int nz) {
  AggArgs a;
  const int rc = make_agg_args(args, "emu_structured", &a);
  if (rc != FK_OK || a.P == 0) return rc;
  switch (args->dtype) {
    case FK_F32: structured_t<FK_F32>(a, segs, S, N, nm, rank, sizes, nz); break;
    case FK_BF16: structured_t<FK_BF16>(a, segs, S, N, nm, rank, sizes, nz); break;
    default: structured_t<FK_F16>(a, segs, S, N, nm, rank, sizes, nz);
  }
  return FK_OK;
}

int emu_compact(const fk_accum_args* args, const fk_segment* segs, int64_t S, int64_t N, const int32_t* inv,
                const int64_t* so, const int64_t* sc) {
  AggArgs a;
  const int rc = make_agg_args(args, "emu_compact", &a);
  if (rc != FK_OK || a.P == 0) return rc;
  switch (args->dtype) {
    case FK_F32: compact_t<FK_F32>(a, segs, S, N, inv, so, sc); break;
    case FK_BF16: compact_t<FK_BF16>(a, segs, S, N, inv, so, sc); break;
    default: compact_t<FK_F16>(a, segs, S, N, inv, so, sc);
  }
  return FK_OK;
}

void emu_sort_keys(const void* keys, int dtype, int64_t n, int* plan, unsigned long long* out) {
  switch (dtype) {
    case FK_KEY_F32: keys_t<FK_KEY_F32>(keys, n, plan, out); break;
    case FK_KEY_F64: keys_t<FK_KEY_F64>(keys, n, plan, out); break;
    case FK_KEY_I32: keys_t<FK_KEY_I32>(keys, n, plan, out); break;
    default: keys_t<FK_KEY_I64>(keys, n, plan, out);
  }
}
}
"""


class _AccumArgs(ctypes.Structure):
    _fields_ = [("K", ctypes.c_int64), ("P", ctypes.c_int64), ("dtype", ctypes.c_int32),
                ("rows", ctypes.c_void_p), ("weights", ctypes.c_void_p), ("g", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("init_num", ctypes.c_void_p), ("init_den", ctypes.c_void_p),
                ("acc_num", ctypes.c_void_p), ("acc_den", ctypes.c_void_p), ("flags", ctypes.c_void_p)]


_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_KD = {torch.float32: 0, torch.float64: 1, torch.int32: 2, torch.int64: 3}


class _Emu:
    """ctypes front end of the host-emulated kernels, with the back-end protocol's signatures."""

    def __init__(self, lib):
        self.lib = lib
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.emu_dense.argtypes = [vp, vp]
        lib.emu_structured.argtypes = [vp, vp, i64, i64, vp, vp, vp, ctypes.c_int]
        lib.emu_compact.argtypes = [vp, vp, i64, i64, vp, vp, vp]
        lib.emu_sort_keys.argtypes = [vp, ctypes.c_int, i64, vp, vp]
        lib.emu_last_error.restype = ctypes.c_char_p

    @staticmethod
    def _p(t):
        return None if t is None else t.data_ptr()

    def _args(self, acc, keep, extra=None):
        ptrs = [r.data_ptr() for r in acc.rows] + ([m.data_ptr() for m in extra] if extra else [])
        arr = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        keep.append(arr)
        a = _AccumArgs(acc.K, acc.P, _DT[acc.rows[0].dtype], ctypes.cast(arr, ctypes.c_void_p).value,
                       acc.weights.data_ptr(), self._p(acc.g), self._p(acc.out), self._p(acc.init_num),
                       self._p(acc.init_den), self._p(acc.acc_num), self._p(acc.acc_den), acc.flags.data_ptr())
        keep.append(a)
        mptr = ctypes.addressof(arr) + 8 * acc.K if extra else None
        return ctypes.byref(a), mptr

    def _check(self, rc):
        assert rc == 0, self.lib.emu_last_error().decode()

    def dense(self, acc, masks):
        keep = []
        ms = [m.to(torch.uint8) if m.dtype == torch.bool else m for m in masks] if masks else None
        a, mptr = self._args(acc, keep, ms)
        self._check(self.lib.emu_dense(a, mptr))

    def structured(self, acc, segs, N, nm, rank, sizes, nonzero):
        keep = []
        a, _ = self._args(acc, keep)
        nm8 = None if nm is None else nm.to(torch.uint8).contiguous()
        self._check(self.lib.emu_structured(a, segs.data_ptr(), segs.shape[0], N, self._p(nm8), self._p(rank),
                                            self._p(sizes), int(nonzero)))

    def compact(self, acc, segs, N, inv, seg_off, seg_cols):
        keep = []
        a, _ = self._args(acc, keep)
        self._check(self.lib.emu_compact(a, segs.data_ptr(), segs.shape[0], N, inv.data_ptr(), seg_off.data_ptr(),
                                         seg_cols.data_ptr()))

    def sort_keys(self, keys):
        n = keys.numel()
        plan = (ctypes.c_int * 3)()
        out = torch.empty(n, dtype=torch.int64)
        self.lib.emu_sort_keys(keys.data_ptr(), _KD[keys.dtype], n, plan, out.data_ptr())
        return tuple(plan), out


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler for the host emulation")
    d = tmp_path_factory.mktemp("emu")
    src = os.path.join(str(d), "harness.cpp")
    lib = os.path.join(str(d), "libfkemu.so")
    with open(src, "w") as f:
        f.write(_HARNESS)
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing",
           "-Wno-unknown-pragmas", "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + CUDA_DIR, src, "-o", lib]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return _Emu(ctypes.CDLL(lib))


def _emu_check(emu, fn, acc, *args, misalign=False):
    ref = cases.oracle(fn, acc, *args)
    a = cases.copy_acc(acc, None, misalign)
    getattr(emu, fn)(a, *args)
    got = cases.result_of(a)
    assert torch.equal(ref[0], got[0]), (ref[0].tolist(), got[0].tolist())
    for x, y in zip(ref[1:], got[1:]):
        if not cases.bits_equal(x, y):
            bad = (x.view(torch.int32) != y.view(torch.int32)) & ~(torch.isnan(x) & torch.isnan(y))
            idx = bad.nonzero().flatten()[:5].tolist()
            raise AssertionError(f"{fn}: {int(bad.sum())} element(s) differ, first {idx}: {x[idx].tolist()} vs "
                                 f"{y[idx].tolist()}")
    return ref


@pytest.mark.parametrize("dtype", cases.DTYPES)
def test_emulated_dense(emu, gen, dtype):
    for K, P in ((1, 1), (1, 9), (3, 997), (6, 4099), (13, 2053)):
        rows = cases.gen_rows(gen, K, P, dtype, nonfinite=(K - 1,) if K > 2 else ())
        w = cases.gen_weights(gen, K, zero=(1,) if K > 2 else ())
        cases.poison_zero_weight(rows, w)
        masks = [torch.rand(P, generator=gen) < d for d in torch.linspace(0, 1, K).tolist()]
        for mode, init, alias in (("final", False, False), ("final", True, True), ("acc", True, True),
                                  ("acc", False, False)):
            for misalign in (False, True):
                _emu_check(emu, "dense", cases.gen_acc(gen, rows, w, P, mode, init, alias), None, misalign=misalign)
                _emu_check(emu, "dense", cases.gen_acc(gen, rows, w, P, mode, init, alias), masks,
                           misalign=misalign)


def test_emulated_dense_flags_and_bit_patterns(emu, gen):
    K, P = 6, 2053
    rows = cases.gen_rows(gen, K, P, torch.float32, nonfinite=(1, 4))
    ref = _emu_check(emu, "dense", cases.gen_acc(gen, rows, cases.gen_weights(gen, K), P), None)
    assert ref[0].tolist() == [0, 1, 0, 0, 1, 0]
    for dtype in (torch.bfloat16, torch.float16):
        v = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
        rows, w = [v.clone(), v.flip(0).clone()], torch.tensor([1.0, 0.5])
        _emu_check(emu, "dense", cases.gen_acc(gen, rows, w, v.numel(), "acc"), None, misalign=True)


@pytest.mark.parametrize("dtype", cases.DTYPES)
def test_emulated_structured(emu, gen, dtype):
    segs, N, P, _ = cases.gen_layout(big=True)
    for K in (1, 7):
        rows = cases.gen_rows(gen, K, P, dtype, nonfinite=(K - 1,))
        w = cases.gen_weights(gen, K, zero=(2,) if K > 2 else ())
        cases.poison_zero_weight(rows, w)
        nm = cases.gen_neuron_masks(gen, K, N)
        rank, sizes = cases.gen_nested(gen, K, N)
        for nonzero in (False, True):
            for mode, init in (("final", False), ("acc", True)):
                for misalign in (False, True):
                    acc = cases.gen_acc(gen, rows, w, P, mode, init)
                    _emu_check(emu, "structured", acc, segs, N, nm.to(torch.uint8), None, None, nonzero,
                               misalign=misalign)
                    _emu_check(emu, "structured", acc, segs, N, None, rank, sizes, nonzero, misalign=misalign)


def test_emulated_structured_mlp(emu, gen):
    segs, N, P = cases.mlp_layout()
    K = 3
    rank = torch.randperm(N, generator=gen).to(torch.int32)
    sizes = torch.tensor([400, 160, 40], dtype=torch.int32)
    on = rank.to(torch.int64)[None, :] < sizes.to(torch.int64)[:, None]
    rows = [torch.randn(P, generator=gen) * torch_ref.gate_row(P, segs, on[k]) for k in range(K)]
    acc = cases.gen_acc(gen, rows, torch.ones(K), P)
    _emu_check(emu, "structured", acc, segs, N, None, rank, sizes, True)
    _emu_check(emu, "structured", acc, segs, N, on.to(torch.uint8), None, None, False)


@pytest.mark.parametrize("dtype", cases.DTYPES)
def test_emulated_compact(emu, gen, dtype):
    K = 6
    vals, inv, seg_off, seg_cols, segs, N, P, _ = cases.gen_compact_case(gen, K, dtype, big=True)
    w = cases.gen_weights(gen, K, zero=(3,))
    cases.poison_zero_weight(vals, w)
    for mode, init in (("final", False), ("acc", True)):
        for misalign in (False, True):
            ref = _emu_check(emu, "compact", cases.gen_acc(gen, vals, w, P, mode, init), segs, N, inv, seg_off,
                             seg_cols, misalign=misalign)
            assert int(ref[0][2]) == 1


def _sortable(u: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint64 images (held in int64) as int64 values with the same order."""
    return u ^ (-(2**63)) if nbits == 64 else u


@pytest.mark.parametrize("kdtype", [torch.float32, torch.float64, torch.int32, torch.int64])
def test_emulated_sort_key_images(emu, gen, kdtype):
    """Sorting by the planned key image (only its significant bits) gives torch's stable order."""
    expect_bits = {"equal": 0, "ties": 3, "freq": 10}
    for kind in ("equal", "ties", "freq", "wide", "random", "zeros"):
        if kind == "zeros" and not kdtype.is_floating_point:
            continue
        keys = cases.gen_sort_keys(gen, kind, 20_011, kdtype)
        (mode, lo, nbits), img = emu.sort_keys(keys)
        assert 0 <= nbits <= (64 if kdtype in (torch.float64, torch.int64) else 32)
        if kind in expect_bits:
            assert nbits == expect_bits[kind], (kind, mode, lo, nbits)
        if kind in ("ties", "freq") and kdtype.is_floating_point:
            assert mode == 1  # integer-valued floats use the int32 image
        got = torch.sort(_sortable(img, nbits), stable=True).indices
        assert torch.equal(got, torch_ref.stable_argsort(keys)), kind
    edge = torch.tensor([2.0**31, -(2.0**31), 2.0**31 - 128, 3.0, -3.0, 1e30, -1e30, -0.0, 0.0])
    for dt in (torch.float32, torch.float64):
        k = edge.to(dt).repeat(50)
        _, img = emu.sort_keys(k)
        assert torch.equal(torch.sort(_sortable(img, 64), stable=True).indices, torch_ref.stable_argsort(k))
    for k in (torch.tensor([2**63 - 1, -(2**63), 0, -1, 1], dtype=torch.int64).repeat(9),
              torch.tensor([2**31 - 1, -(2**31), 0, -1, 1], dtype=torch.int32).repeat(9)):
        (_, _, nbits), img = emu.sort_keys(k)
        assert torch.equal(torch.sort(_sortable(img, nbits), stable=True).indices, torch_ref.stable_argsort(k))
