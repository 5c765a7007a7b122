"""Ahead-of-time compile every Triton kernel for a GPU target and report its resources.

Used by ``tests/test_triton_aot.py`` (in a subprocess *without* TRITON_INTERPRET) and by hand::

    python -m fedrac_kernels.backends._triton.aot [--arch 90] [--json]

For every kernel variant in :func:`specs` (representative constexprs, the same launch options
as the launchers: ``enable_fp_fusion=False``), it compiles PTX + cubin with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, which needs no GPU, and
reads registers / stack / local memory / shared memory with the ``cuobjdump`` bundled in the
Triton wheel. It also records what the PTX says about float arithmetic: f32 FMAs, f32 adds and
multiplies without an explicit rounding mode (ptxas could contract those), and the kind of f32
division -- the bit-exactness contract needs ``fma`` = 0, ``loose`` = 0 and only ``div.rn.f32``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
import triton.language as tl

from . import aggregate, common, frequency, nested, sort

PTR16 = 16  # torch allocations (and our row tables) are at least 16-byte aligned


def _spec(name, fn, sig, consts, num_warps, *, float_kernel=False, maxnreg=common.MAXNREG):
    """sig: list of (arg name, type) in argument order; consts: constexpr values by name."""
    signature = {}
    attrs = {}
    for i, (arg, ty) in enumerate(sig):
        signature[arg] = ty
        if ty.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", PTR16]]
    for arg in consts:
        signature[arg] = "constexpr"
    missing = [a for a in fn.arg_names if a not in signature]
    if missing:
        raise ValueError(f"{name}: no type for {missing}")
    signature = {a: signature[a] for a in fn.arg_names}
    return dict(name=name, fn=fn, signature=signature, constexprs=consts, attrs=attrs,
                num_warps=num_warps, float_kernel=float_kernel, maxnreg=maxnreg)


_ACC = [("W", "*fp32"), ("FLAGS", "*i32"), ("G", "*fp32"), ("OUT", "*fp32"), ("INUM", "*fp32"),
        ("IDEN", "*fp32"), ("ANUM", "*fp32"), ("ADEN", "*fp32")]


def specs():
    out = []
    A = aggregate
    for dt, mask, fin, init, al in ((tl.float32, False, True, False, True),
                                    (tl.bfloat16, False, True, False, True),
                                    (tl.float32, True, True, False, False),
                                    (tl.float16, True, False, True, True)):
        sig = [("PTRS", "*i64"), ("MPTRS", "*i64")] + _ACC + [("P", "i32"), ("K", "i32")]
        c = dict(DT=dt, HAS_MASK=mask, HAS_INUM=init, HAS_IDEN=init, FINALIZE=fin, ALIGNED=al,
                 IDX32=True, BLOCK=A.BLOCK)
        out.append(_spec(f"dense[{dt},mask={mask},finalize={fin}]", A._dense_kernel, sig, c,
                         A.NUM_WARPS, float_kernel=True))
    for dt, nest, nz, fin in ((tl.float32, True, False, True), (tl.bfloat16, True, True, True),
                              (tl.float32, False, False, True), (tl.float16, False, True, False)):
        sig = [("PTRS", "*i64")] + _ACC + [("SEG", "*i64"), ("S", "i32"), ("NM", "*u8"),
                                           ("RANK", "*i32"), ("SIZES", "*i32"), ("N", "i32"),
                                           ("K", "i32")]
        c = dict(DT=dt, NESTED=nest, NONZERO=nz, HAS_INUM=not fin, HAS_IDEN=not fin,
                 FINALIZE=fin, IDX32=True, BLOCK=A.SEG_TILE, SEG_BLOCK=A.SEG_BLOCK)
        out.append(_spec(f"structured[{dt},nested={nest},nonzero={nz},finalize={fin}]",
                         A._structured_kernel, sig, c, A.SEG_WARPS, float_kernel=True))
    # integer arguments equal to 1 may be specialised into constexprs: must still compile
    sig = [("PTRS", "*i64")] + _ACC + [("SEG", "*i64"), ("NM", "*u8"), ("RANK", "*i32"),
                                       ("SIZES", "*i32")]
    c = dict(S=1, N=1, K=1, DT=tl.float32, NESTED=False, NONZERO=True, HAS_INUM=False,
             HAS_IDEN=False, FINALIZE=True, IDX32=True, BLOCK=A.SEG_TILE, SEG_BLOCK=A.SEG_BLOCK)
    out.append(_spec("structured[fp32,S=N=K=1,finalize=True]", A._structured_kernel, sig, c,
                     A.SEG_WARPS, float_kernel=True))
    for dt, idx32 in ((tl.float32, True), (tl.bfloat16, True), (tl.float32, False)):
        sig = [("PTRS", "*i64")] + _ACC + [("SEG", "*i64"), ("S", "i32"), ("INV", "*i32"),
                                           ("SOFF", "*i64"), ("SCOLS", "*i64"), ("N", "i32"),
                                           ("K", "i32")]
        c = dict(DT=dt, HAS_INUM=False, HAS_IDEN=False, FINALIZE=True, IDX32=idx32,
                 BLOCK=A.SEG_TILE, SEG_BLOCK=A.SEG_BLOCK)
        out.append(_spec(f"compact[{dt},idx32={idx32}]", A._compact_kernel, sig, c, A.SEG_WARPS,
                         float_kernel=True, maxnreg=common.MAXNREG if idx32 else 168))

    F = frequency
    for fdt in ("*fp32", "*fp64", "*i32", "*i64"):
        out.append(_spec(f"freq_dense[{fdt}]", F._freq_dense_kernel,
                         [("F", fdt), ("M", "*u8"), ("N", "i32"), ("K", "i32")],
                         dict(BLOCK=F.BLOCK), F.NUM_WARPS))
        out.append(_spec(f"freq_nested[{fdt}]", F._freq_nested_kernel,
                         [("F", fdt), ("RANK", "*i32"), ("LE", "*i32"), ("N", "i32"), ("K", "i32")],
                         dict(BLOCK=F.BLOCK), F.NUM_WARPS))
    out.append(_spec("size_hist", F._size_hist_kernel,
                     [("SIZES", "*i32"), ("H", "*i32"), ("K", "i32")], dict(BLOCK=F.BLOCK),
                     F.NUM_WARPS))

    C = common
    for inc in (True, False):
        out.append(_spec(f"scan_single[inclusive={inc}]", C._scan_single_kernel,
                         [("X", "*i32"), ("Y", "*i32"), ("n", "i32")],
                         dict(INCLUSIVE=inc, BLOCK=C.SCAN_BLOCK), 4))
        out.append(_spec(f"scan_add[inclusive={inc}]", C._scan_add_kernel,
                         [("X", "*i32"), ("Y", "*i32"), ("PART", "*i32"), ("n", "i32")],
                         dict(INCLUSIVE=inc, BLOCK=C.SCAN_BLOCK), 4))
    out.append(_spec("block_sum", C._block_sum_kernel,
                     [("X", "*i32"), ("PART", "*i32"), ("n", "i32")], dict(BLOCK=C.SCAN_BLOCK), 4))

    S = sort
    for kdt in ("*fp32", "*fp64", "*i32", "*i64"):
        out.append(_spec(f"rank_sort[{kdt}]", S._rank_sort_kernel,
                         [("KEYS", kdt), ("OUT", "*i64"), ("N", "i32")],
                         dict(BI=S.RANK_BI, BJ=S.RANK_BJ), S.RANK_WARPS))
    for kdt, tdt, is_float, wide in (("*fp32", "*i32", True, False), ("*fp64", "*i64", True, True),
                                     ("*i32", "*i32", False, False), ("*i64", "*i64", False, True)):
        nd = (64 if wide else 32) // S.RADIX_BITS
        out.append(_spec(f"radix_transform[{kdt}]", S._transform_kernel,
                         [("KEYS", kdt), ("T", tdt), ("DIFF", "*i32"), ("N", "i32")],
                         dict(IS_FLOAT=is_float, WIDE=wide, NDIGITS=nd, RADIX_BITS=S.RADIX_BITS,
                              BLOCK=S.BLOCK), 4))
    for tdt in ("*i32", "*i64"):
        out.append(_spec(f"radix_hist[{tdt}]", S._radix_hist_kernel,
                         [("T", tdt), ("HIST", "*i32"), ("N", "i32"), ("NT", "i32"),
                          ("shift", "i32")], dict(TILE=S.TILE, RADIX=S.RADIX), S.TILE_WARPS))
        for first, write, idt in ((True, True, "*i32"), (False, True, "*i32"),
                                  (False, False, "*i64"), (True, False, "*i64")):
            out.append(_spec(f"radix_scatter[{tdt},first={first},keys={write},{idt}]",
                             S._radix_scatter_kernel,
                             [("TIN", tdt), ("IIN", "*i32"), ("TOUT", tdt), ("IOUT", idt),
                              ("SLOT", "*i32"), ("N", "i32"), ("NT", "i32"), ("shift", "i32")],
                             dict(FIRST=first, WRITE_KEYS=write, TILE=S.TILE, RADIX=S.RADIX),
                             S.TILE_WARPS))

    Nm = nested
    out.append(_spec("inverse_perm", Nm._inverse_perm_kernel,
                     [("ORDER", "*i64"), ("RANK", "*i64"), ("N", "i32")], dict(BLOCK=Nm.BLOCK),
                     Nm.NUM_WARPS))
    out.append(_spec("prefix_mask", Nm._prefix_mask_kernel,
                     [("RANK", "*i64"), ("SIZES", "*i64"), ("OUT", "*u8"), ("N", "i32"),
                      ("S", "i32")], dict(BLOCK=Nm.BLOCK), Nm.NUM_WARPS))
    return out


def cuobjdump_path():
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return p if os.path.exists(p) else None


_RES = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def resource_usage(cubin: bytes):
    tool = cuobjdump_path()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        txt = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(path)
    res = {}
    for line in txt.splitlines():
        if "REG:" in line:
            for k, v in _RES.findall(line):
                res[k] = max(res.get(k, 0), int(v))
    return res


def ptx_float_ops(ptx: str) -> dict:
    return {
        "fma": len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx)),
        "loose": len(re.findall(r"\b(?:add|sub|mul)(?:\.ftz)?\.f32\b", ptx)),
        "div_rn": len(re.findall(r"\bdiv\.rn(?:\.ftz)?\.f32\b", ptx)),
        "div_other": len(re.findall(r"\bdiv\.(?:approx|full)(?:\.ftz)?\.f32\b", ptx)),
        "vector_loads": len(re.findall(r"\bld\.global(?:\.[a-z]+)*\.v[24]\.", ptx)),
    }


def compile_all(arch: int = 90):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    results = []
    for s in specs():
        t0 = time.perf_counter()
        src = ASTSource(fn=s["fn"], signature=s["signature"], constexprs=s["constexprs"],
                        attrs=s["attrs"])
        opts = backend.parse_options(common.launch_opts(s["num_warps"], s["maxnreg"]))
        k = triton.compile(src, target=target, options=opts.__dict__)
        ptx = k.asm["ptx"]
        results.append(dict(name=s["name"], seconds=round(time.perf_counter() - t0, 2),
                            num_warps=s["num_warps"], float_kernel=s["float_kernel"],
                            resources=resource_usage(k.asm["cubin"]),
                            shared_static=getattr(k.metadata, "shared", None),
                            ptx=ptx_float_ops(ptx)))
    return results


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to AOT-compile", file=sys.stderr)
        return 2
    res = compile_all(args.arch)
    if args.json:
        print(json.dumps({"triton": triton.__version__, "arch": args.arch, "kernels": res}))
    else:
        for r in res:
            print(f"{r['name']:52s} {r['seconds']:5.1f}s warps={r['num_warps']} {r['resources']} "
                  f"ptx={r['ptx']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
