"""Build checks of the CUDA back end that need no GPU (they run in CI).

1. Every ``csrc/cuda/*.cu`` compiles with nvcc for sm_90 with the flags of setup.py plus
   ``-Xptxas -v``: no errors, no warnings, and no local-memory spills in any kernel (ptxas reports
   "0 bytes spill stores" for each). The per-kernel register/spill table is printed (``-s``).
2. The built module ``fedrac_kernels._cuda`` (if setup.py built it) imports without a GPU or driver,
   and the back end reports ``(False, reason)`` instead of failing.
3. Host emulation: every .cu file is compiled with g++ -DFK_HOST_EMU through
   ``csrc/cuda/fk_host_emu.cuh`` (one host thread per CUDA thread, barriers for __syncthreads and
   the warp intrinsics, simple stand-ins for the CUB primitives), and the real ``fk_cuda_*`` entry
   points run on CPU tensors, compared bit for bit with the torch oracle on the cases of
   tests/test_backend_cuda.py: aggregation (every form, dtype, mode and alignment class),
   frequency updates, every planning path of the sort, nested masks. This checks the kernels'
   index arithmetic, gating, block-level logic and the host orchestration without a GPU; the GPU
   tests re-check everything on hardware (real CUB, real memory model, real timings).

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

# Besides the .cu files (the real entry points), the emulated library gets this small unit: the
# plan/key-image functions of the sort, exported for a direct check, and a switch that makes the
# emulated streams report a CUDA graph capture (the sort then skips its key-range read).
_HARNESS = r"""
#include "fk_cuda_common.cuh"
#include "fk_keys.cuh"

using namespace fk;

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
void emu_set_capturing(int on) { fk_emu_capturing = on; }

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
    """The fk_cuda_* entry points of the host-emulated build, with the back-end protocol's
    signatures over CPU tensors ("device pointers" are host pointers, the stream is NULL)."""

    def __init__(self, lib):
        self.lib = lib
        vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        lib.fk_cuda_dense.argtypes = [vp, vp, vp]
        lib.fk_cuda_structured.argtypes = [vp, vp, i64, i64, vp, vp, vp, ctypes.c_int, vp]
        lib.fk_cuda_compact.argtypes = [vp, vp, i64, i64, vp, vp, vp, vp]
        lib.fk_cuda_frequency_update.argtypes = [vp, i32, vp, vp, vp, i64, i64, vp]
        lib.fk_cuda_stable_argsort.argtypes = [vp, i32, vp, i64, vp, ctypes.POINTER(ctypes.c_size_t), vp]
        lib.fk_cuda_nested_masks.argtypes = [vp, vp, vp, i64, i64, vp]
        lib.fk_last_error.restype = ctypes.c_char_p
        lib.emu_sort_keys.argtypes = [vp, ctypes.c_int, i64, vp, vp]
        lib.emu_set_capturing.argtypes = [ctypes.c_int]

    @staticmethod
    def _p(t):
        return None if t is None else t.data_ptr()

    def _check(self, rc):
        assert rc == 0, f"rc={rc}: {self.lib.fk_last_error().decode()}"

    def _args(self, acc, keep, extra=None):
        ptrs = [r.data_ptr() for r in acc.rows] + ([m.data_ptr() for m in extra] if extra else [])
        arr = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        keep.append(arr)
        a = _AccumArgs(acc.K, acc.P, _DT[acc.rows[0].dtype], ctypes.addressof(arr), acc.weights.data_ptr(),
                       self._p(acc.g), self._p(acc.out), self._p(acc.init_num), self._p(acc.init_den),
                       self._p(acc.acc_num), self._p(acc.acc_den), acc.flags.data_ptr())
        keep.append(a)
        mptr = ctypes.addressof(arr) + 8 * acc.K if extra else None
        return ctypes.byref(a), mptr

    def dense(self, acc, masks):
        keep = []
        ms = [m.to(torch.uint8) if m.dtype == torch.bool else m for m in masks] if masks else None
        a, mptr = self._args(acc, keep, ms)
        self._check(self.lib.fk_cuda_dense(a, mptr, None))

    def structured(self, acc, segs, N, nm, rank, sizes, nonzero):
        keep = []
        a, _ = self._args(acc, keep)
        nm8 = None if nm is None else nm.to(torch.uint8).contiguous()
        self._check(self.lib.fk_cuda_structured(a, segs.data_ptr(), segs.shape[0], N, self._p(nm8), self._p(rank),
                                                self._p(sizes), int(nonzero), None))

    def compact(self, acc, segs, N, inv, seg_off, seg_cols):
        keep = []
        a, _ = self._args(acc, keep)
        self._check(self.lib.fk_cuda_compact(a, segs.data_ptr(), segs.shape[0], N, inv.data_ptr(),
                                             seg_off.data_ptr(), seg_cols.data_ptr(), None))

    def frequency_update(self, freq, masks, rank, sizes):
        N = freq.numel()
        if masks is not None:
            m = masks.to(torch.uint8).contiguous()
            self._check(self.lib.fk_cuda_frequency_update(freq.data_ptr(), _KD[freq.dtype], m.data_ptr(), None, None,
                                                          m.shape[0], N, None))
        else:
            self._check(self.lib.fk_cuda_frequency_update(freq.data_ptr(), _KD[freq.dtype], None, rank.data_ptr(),
                                                          sizes.data_ptr(), sizes.numel(), N, None))

    def stable_argsort(self, keys):
        n = keys.numel()
        order = torch.full((n,), -7, dtype=torch.int64)
        nbytes = ctypes.c_size_t(0)
        self._check(self.lib.fk_cuda_stable_argsort(keys.data_ptr(), _KD[keys.dtype], order.data_ptr(), n, None,
                                                    ctypes.byref(nbytes), None))
        assert nbytes.value >= 256
        ws = torch.full((nbytes.value + 3,), 0xA5, dtype=torch.uint8)[3:]  # garbage, misaligned on purpose
        self._check(self.lib.fk_cuda_stable_argsort(keys.data_ptr(), _KD[keys.dtype], order.data_ptr(), n,
                                                    ws.data_ptr(), ctypes.byref(nbytes), None))
        return order

    def nested_masks(self, order, sizes):
        out = torch.full((sizes.numel(), order.numel()), 0xA5, dtype=torch.uint8)
        self._check(self.lib.fk_cuda_nested_masks(out.data_ptr(), order.data_ptr(), sizes.data_ptr(), sizes.numel(),
                                                  order.numel(), None))
        assert int(out.max()) <= 1 if out.numel() else True  # every byte written, 0 or 1
        return out.to(torch.bool)

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
    d = str(tmp_path_factory.mktemp("emu"))
    with open(os.path.join(d, "harness.cpp"), "w") as f:
        f.write(_HARNESS)
    flags = ["-std=c++20", "-O1", "-fPIC", "-DFK_HOST_EMU", "-ffp-contract=off", "-fno-strict-aliasing",
             "-Wno-unknown-pragmas", "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + CUDA_DIR]
    srcs = CU_FILES + [os.path.join(d, "harness.cpp")]

    def compile_one(src):
        obj = os.path.join(d, os.path.basename(src) + ".o")
        p = subprocess.run([cxx, "-x", "c++", "-c", src, "-o", obj] + flags, capture_output=True, text=True)
        return obj, p.returncode, p.stdout + p.stderr

    with ThreadPoolExecutor(max_workers=max(1, min(len(srcs), os.cpu_count() or 1))) as pool:
        res = list(pool.map(compile_one, srcs))
    for obj, rc, text in res:
        assert rc == 0, f"host-emulation compile of {obj} failed:\n{text[-4000:]}"
    lib = os.path.join(d, "libfkemu.so")
    p = subprocess.run([cxx, "-shared", "-o", lib] + [r[0] for r in res] + ["-pthread"], capture_output=True,
                       text=True)
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


def test_emulated_dense_flags_bit_patterns_many_clients(emu, gen):
    K, P = 6, 2053
    rows = cases.gen_rows(gen, K, P, torch.float32, nonfinite=(1, 4))
    ref = _emu_check(emu, "dense", cases.gen_acc(gen, rows, cases.gen_weights(gen, K), P), None)
    assert ref[0].tolist() == [0, 1, 0, 0, 1, 0]
    for dtype in (torch.bfloat16, torch.float16):
        v = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
        rows, w = [v.clone(), v.flip(0).clone()], torch.tensor([1.0, 0.5])
        _emu_check(emu, "dense", cases.gen_acc(gen, rows, w, v.numel(), "acc"), None, misalign=True)
    K, P = 300, 517
    rows = cases.gen_rows(gen, K, P, torch.bfloat16, zero_frac=0.5, nonfinite=(17, 299))
    w = cases.gen_weights(gen, K, zero=(0, 150, 298))
    cases.poison_zero_weight(rows, w)
    _emu_check(emu, "dense", cases.gen_acc(gen, rows, w, P), None, misalign=True)


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


def test_emulated_many_clients(emu, gen):
    segs, N, P, _ = cases.gen_layout(big=True)
    K = 300
    rows = cases.gen_rows(gen, K, P, torch.bfloat16, zero_frac=0.3, nonfinite=(7, 299))
    w = cases.gen_weights(gen, K, zero=(0, 123))
    cases.poison_zero_weight(rows, w)
    rank, sizes = cases.gen_nested(gen, K, N)
    _emu_check(emu, "structured", cases.gen_acc(gen, rows, w, P), segs, N, None, rank, sizes, True, misalign=True)
    vals, inv, seg_off, seg_cols, segs, N, P, _ = cases.gen_compact_case(gen, 40, torch.float16, nan_client=11)
    w = cases.gen_weights(gen, 40, zero=(3,))
    cases.poison_zero_weight(vals, w)
    ref = _emu_check(emu, "compact", cases.gen_acc(gen, vals, w, P, "acc", True), segs, N, inv, seg_off, seg_cols,
                     misalign=True)
    assert int(ref[0][11]) == 1


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


@pytest.mark.parametrize("fdtype", [torch.float32, torch.float64, torch.int32, torch.int64])
def test_emulated_frequency_update(emu, gen, fdtype):
    # both nested paths: one block with the table in shared memory (N + 1 <= 12000) and the
    # histogram + scan + gather in temporary memory; the mask path with and without word loads
    for K, N in ((1, 1), (10, 400), (37, 1031), (5, 11_999), (3, 12_000), (7, 20_003), (4, 30_000)):
        base = torch.randint(0, 1 << 20, (N,), generator=gen).to(fdtype)
        if fdtype == torch.float32:
            base = base * 33.3 + 16_777_216.0
        if fdtype.is_floating_point and N > 2:
            base[1] = -0.0
        masks = torch.rand(K, N, generator=gen) < 0.4
        rank = torch.randperm(N, generator=gen).to(torch.int32)
        sizes = torch.randint(0, N + 1, (K,), generator=gen).to(torch.int32)
        for form in ("masks", "nested"):
            f_ref, f_emu = base.clone(), base.clone()
            if form == "masks":
                torch_ref.frequency_update(f_ref, masks, None, None)
                emu.frequency_update(f_emu, masks, None, None)
            else:
                torch_ref.frequency_update(f_ref, None, rank, sizes)
                emu.frequency_update(f_emu, None, rank, sizes)
            assert cases.bits_equal_any(f_ref, f_emu), (form, K, N)


@pytest.mark.parametrize("kdtype", [torch.float32, torch.float64, torch.int32, torch.int64])
def test_emulated_stable_argsort(emu, gen, kdtype):
    """Every planning path: one block (N <= 4096), arange, one and two counting passes, the
    (emulated) CUB sort on 32- and 64-bit images, and the full-width plan under graph capture."""
    for N in (1, 2, 400, 4096, 4097, 20_011):
        kinds = ("equal", "ties", "freq", "wide", "random") + (("zeros",) if kdtype.is_floating_point else ())
        for kind in kinds:
            keys = cases.gen_sort_keys(gen, kind, N, kdtype)
            got = emu.stable_argsort(keys)
            assert torch.equal(got, torch_ref.stable_argsort(keys)), (kind, N)
    keys = cases.gen_sort_keys(gen, "freq", 9000, kdtype)
    emu.lib.emu_set_capturing(1)
    try:
        got = emu.stable_argsort(keys)
    finally:
        emu.lib.emu_set_capturing(0)
    assert torch.equal(got, torch_ref.stable_argsort(keys))


def test_emulated_nested_masks(emu, gen):
    for S, N in ((1, 1), (50, 400), (7, 1031), (3, 12_000), (3, 12_001), (2, 20_011)):
        order = torch.randperm(N, generator=gen)
        sizes = torch.randint(0, N + 1, (S,), generator=gen)
        sizes[0] = 0
        sizes[-1] = N
        assert torch.equal(emu.nested_masks(order, sizes), torch_ref.nested_masks(order, sizes)), (S, N)


def _sortable(u: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint64 images (held in int64) as int64 values with the same order."""
    return u ^ (-(2**63)) if nbits == 64 else u


@pytest.mark.parametrize("kdtype", [torch.float32, torch.float64, torch.int32, torch.int64])
def test_emulated_sort_key_images(emu, gen, kdtype):
    """Sorting by the planned key image (only its significant bits) gives torch's stable order, and
    the plan compresses frequency-like keys to a few bits."""
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
