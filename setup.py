"""Build of fedrac_kernels' native back ends.

* ``fedrac_kernels._cpu``  : C++17/OpenMP sources (csrc/cpu) + pybind11 binding, always built.
* ``fedrac_kernels._cuda`` : CUDA sources (csrc/cuda, compiled by nvcc) + pybind11 binding, built
  wherever nvcc is found (set FEDRAC_BUILD_CUDA=0 to skip, =1 to require it).

Neither needs torch at build time: the native code is torch-free (raw pointers, sizes and a
stream), so one build serves every supported torch version and a rebuild takes seconds.
Environment: FEDRAC_CUDA_ARCH (default "90": sm_90 SASS + compute_90 PTX; e.g. "90;100"),
NVCC (path of nvcc), FEDRAC_NATIVE_ARCH=1 to add -march=native to the CPU build.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _pybind_include():
    import pybind11

    return pybind11.get_include()


def _find_nvcc():
    if os.environ.get("FEDRAC_BUILD_CUDA", "") == "0":
        return None
    cand = os.environ.get("NVCC") or shutil.which("nvcc")
    if not cand:
        for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
                cand = os.path.join(root, "bin", "nvcc")
                break
    if not cand and os.environ.get("FEDRAC_BUILD_CUDA", "") == "1":
        raise RuntimeError("FEDRAC_BUILD_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
    return cand


def _cuda_root(nvcc):
    """The CUDA toolkit root (include/, lib64/) of ``nvcc``, which may be a wrapper script."""
    def ok(root):
        return bool(root) and os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))

    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if ok(root):
            return root
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if ok(guess):
        return guess
    try:  # ask nvcc itself: a dry run prints "#$ TOP=<root>/bin/.."
        p = subprocess.run([nvcc, "--dryrun", "-c", "fedrac_probe.cu", "-o", os.devnull], capture_output=True,
                           text=True, timeout=120)
        for line in (p.stdout + p.stderr).splitlines():
            if line.startswith("#$ TOP="):
                top = os.path.realpath(line.split("=", 1)[1].strip())
                if ok(top):
                    return top
    except (OSError, subprocess.SubprocessError):
        pass
    for root in ("/usr/local/cuda", "/opt/cuda"):
        if ok(root):
            return root
    return guess


def _gencode():
    archs = [a.strip() for a in os.environ.get("FEDRAC_CUDA_ARCH", "90").replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


# -ffp-contract=off: no FMA contraction (bit-identical to the torch oracle). -fno-trapping-math only
# drops the assumption that FP operations may trap, which lets GCC if-convert (vectorise) the masked
# accumulation loops; it changes no value (no reassociation, no contraction, signed zeros and NaNs kept).
# -g0 overrides the -g of Python's own build flags (a smaller module, a faster build).
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fvisibility=hidden", "-g0"]
if os.environ.get("FEDRAC_NATIVE_ARCH") == "1":
    CXX_FLAGS.append("-march=native")
NVCC_FLAGS = ["-O3", "-std=c++17", "-fmad=false", "-Xcompiler", "-fPIC,-fvisibility=hidden",
              "--expt-relaxed-constexpr", "-lineinfo"]


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc into objects linked into the _cuda extension.

    The .cu files are compiled in parallel (FEDRAC_NVCC_JOBS, default: the CPU count), one nvcc
    process each; they are independent translation units (no -rdc).
    """

    def build_extension(self, ext):
        cu = getattr(ext, "cu_sources", [])
        if cu:
            from concurrent.futures import ThreadPoolExecutor

            nvcc = ext.nvcc
            objdir = os.path.join(self.build_temp, "cuda_objs")
            os.makedirs(objdir, exist_ok=True)
            cmds, objs = [], []
            for src in cu:
                obj = os.path.join(objdir, os.path.basename(src) + ".o")
                cmds.append([nvcc, "-c", src, "-o", obj, "-Icsrc/include"] + NVCC_FLAGS + _gencode())
                objs.append(obj)

            def compile_one(cmd):
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd, cwd=HERE)

            jobs = int(os.environ.get("FEDRAC_NVCC_JOBS", "0") or 0) or os.cpu_count() or 1
            with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(cmds)))) as pool:
                for fut in [pool.submit(compile_one, c) for c in cmds]:
                    fut.result()
            ext.extra_objects = objs + list(ext.extra_objects or [])
        self._parallel_host_compile()
        super().build_extension(ext)

    def _parallel_host_compile(self):
        """Compile an extension's C++ sources in parallel (FEDRAC_CXX_JOBS, default: CPU count).

        Wraps the compiler's ``compile`` with the distutils steps it is made of (set-up, then one
        ``_compile`` per object); if those internals are missing, the serial ``compile`` stays.
        """
        cc = self.compiler
        if getattr(cc, "_fedrac_parallel", False) or not all(
                hasattr(cc, n) for n in ("_setup_compile", "_get_cc_args", "_compile")):
            return
        jobs = int(os.environ.get("FEDRAC_CXX_JOBS", "0") or 0) or os.cpu_count() or 1
        serial = cc.compile

        def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                    extra_postargs=None, depends=None):
            if jobs <= 1 or len(sources) <= 1:
                return serial(sources, output_dir, macros, include_dirs, debug, extra_preargs, extra_postargs,
                              depends)
            from concurrent.futures import ThreadPoolExecutor

            macros, objects, extra_postargs, pp_opts, build = cc._setup_compile(
                output_dir, macros, include_dirs, sources, depends, extra_postargs)
            cc_args = cc._get_cc_args(pp_opts, debug, extra_preargs)

            def one(obj):
                if obj in build:
                    src, ext = build[obj]
                    cc._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

            with ThreadPoolExecutor(max_workers=min(jobs, len(objects))) as pool:
                for fut in [pool.submit(one, o) for o in objects]:
                    fut.result()
            return objects

        cc.compile = compile
        cc._fedrac_parallel = True


def extensions():
    inc = [os.path.join("csrc", "include"), _pybind_include()]
    exts = [
        Extension(
            "fedrac_kernels._cpu",
            sources=sorted(glob.glob("csrc/bind/cpu_module.cpp") + glob.glob("csrc/cpu/*.cpp")),
            depends=sorted(glob.glob("csrc/cpu/*.h")) + ["csrc/include/fedrac_kernels.h"],
            include_dirs=inc,
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
            language="c++",
        )
    ]
    nvcc = _find_nvcc()
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if nvcc and cu_sources and os.path.exists("csrc/bind/cuda_module.cpp"):
        root = _cuda_root(nvcc)
        ext = Extension(
            "fedrac_kernels._cuda",
            sources=["csrc/bind/cuda_module.cpp"],
            include_dirs=inc + [os.path.join(root, "include")],
            library_dirs=[os.path.join(root, "lib64"), os.path.join(root, "lib")],
            libraries=["cudart_static", "rt", "dl", "pthread"],
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
            depends=cu_sources + sorted(glob.glob("csrc/cuda/*.cuh")) + ["csrc/include/fedrac_kernels.h"],
            language="c++",
        )
        ext.cu_sources = cu_sources
        ext.nvcc = nvcc
        exts.append(ext)
    elif not nvcc:
        print("fedrac_kernels: nvcc not found, building the CPU back end only", file=sys.stderr)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
