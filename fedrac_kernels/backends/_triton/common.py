"""Shared pieces of the Triton kernels: dtype maps, execution mode, row-pointer tables, scans.

Row pointers. Clients arrive as a list of K separate 1-D tensors. Rather than stacking them (an
extra K*P copy), the launcher builds an int64 tensor of their addresses and the kernels cast a
loaded address to a typed pointer (``tl.load(PTRS + k).to(tl.pointer_type(DT))``). This works
compiled and in the interpreter of every supported Triton (3.6-3.9): under ``TRITON_INTERPRET=1``
the tensors are CPU tensors and the addresses are ordinary host addresses, which the interpreter
dereferences directly. (Interpreted kernels therefore require CPU tensors: a CUDA tensor's device
address cannot be read by the host-side interpreter, see :func:`check_device`.)

Interpreter notes kept in mind by every kernel here:
* a ``for k in range(K)`` loop variable is a Python int in the interpreter, so it never gets
  ``.to(...)``; it is only combined with tensors (``N64 * k``);
* masks mixing a block and a scalar condition are broadcast explicitly (``(o * 0 + off) >= 0``);
* Triton 3.6's interpreter fails on runtime-bounded loops with numpy >= 2.4 (fixed in 3.7).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: torch update dtype -> Triton element type of the row pointers
ROW_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

INF: tl.constexpr = tl.constexpr(float("inf"))
INT32_MAX: tl.constexpr = tl.constexpr(2147483647)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated while TRITON_INTERPRET was set (runs on the host)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel, t: torch.Tensor) -> None:
    """Refuse tensors the kernel's execution mode cannot address, with a clear reason."""
    if is_interpreted(kernel):
        if t.device.type != "cpu":
            raise RuntimeError(
                "triton back end: the kernels were imported with TRITON_INTERPRET=1 (interpreter), "
                f"which reads host memory; got tensors on {t.device}. Use CPU tensors, or import "
                "fedrac_kernels without TRITON_INTERPRET to run compiled on the GPU.")
    elif t.device.type != "cuda":
        raise RuntimeError(
            "triton back end: compiled Triton kernels need CUDA tensors; got tensors on "
            f"{t.device}. Set TRITON_INTERPRET=1 before importing fedrac_kernels to run the "
            "kernels in the interpreter on CPU tensors.")


def row_table(tensors, device) -> torch.Tensor:
    """int64 [K] tensor holding the addresses of ``tensors`` (kept alive by the caller)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


MAXNREG = 128


def launch_opts(num_warps: int, maxnreg: int = MAXNREG) -> dict:
    """Launch options shared by every kernel.

    ``enable_fp_fusion=False``: no FMA contraction (bit-exact with torch_ref; Triton then also
    passes ``--fmad=false`` to ptxas). ``maxnreg``: an explicit register cap. Without one, the
    ptxas of several Triton releases (3.6-3.9) trades a few bytes of spills for occupancy on some
    of these kernels; with a cap above their need they compile spill-free (``_triton/aot.py``).
    """
    return {"num_warps": num_warps, "enable_fp_fusion": False, "maxnreg": maxnreg}


@triton.jit
def as_int64(n):
    """A scalar argument widened to int64. (Not ``n.to(...)``: an integer argument may arrive
    as a constexpr, e.g. when a Triton version specialises the value 1, and constexprs have no
    ``.to``.)"""
    return tl.program_id(0).to(tl.int64) * 0 + n


@triton.jit
def nonfinite(x):
    """Elementwise: x is NaN or +-Inf."""
    return (x != x) | (tl.abs(x) == INF)


# --------------------------------------------------------------------------------------------
# int32 prefix scan (used by the radix sort and the nested frequency update)
# --------------------------------------------------------------------------------------------

@triton.jit
def _scan_single_kernel(X, Y, n, INCLUSIVE: tl.constexpr, BLOCK: tl.constexpr):
    """One program scans all of X (chunk by chunk, carrying the running total). Y may be X."""
    carry = tl.program_id(0) * 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + offs, mask=m, other=0)
        c = tl.cumsum(x, 0)
        if INCLUSIVE:
            y = c + carry
        else:
            y = c - x + carry
        tl.store(Y + offs, y, mask=m)
        carry += tl.sum(x, 0)


@triton.jit
def _block_sum_kernel(X, PART, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0)
    tl.store(PART + tl.program_id(0), tl.sum(x, 0))


@triton.jit
def _scan_add_kernel(X, Y, PART, n, INCLUSIVE: tl.constexpr, BLOCK: tl.constexpr):
    """Local scan of one block plus the exclusive prefix of the preceding blocks' sums."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m, other=0)
    c = tl.cumsum(x, 0)
    if not INCLUSIVE:
        c = c - x
    tl.store(Y + offs, c + tl.load(PART + pid), mask=m)


SCAN_BLOCK = 1024


def scan_(x: torch.Tensor, y: torch.Tensor, inclusive: bool,
          block: int = SCAN_BLOCK) -> torch.Tensor:
    """``y`` = inclusive / exclusive prefix sum of the int32 vector ``x`` (``y`` may be ``x``).

    Deterministic (integer arithmetic, fixed order). Up to 4 blocks: one program; otherwise
    reduce (block sums) -> scan of the sums in one program -> local scan + offset.
    """
    n = x.numel()
    if n == 0:
        return y
    if n <= 4 * block:
        _scan_single_kernel[(1,)](x, y, n, INCLUSIVE=inclusive, BLOCK=block,
                                  **launch_opts(4))
        return y
    nb = triton.cdiv(n, block)
    part = torch.empty(nb, dtype=torch.int32, device=x.device)
    _block_sum_kernel[(nb,)](x, part, n, BLOCK=block, **launch_opts(4))
    _scan_single_kernel[(1,)](part, part, nb, INCLUSIVE=False, BLOCK=block,
                              **launch_opts(4))
    _scan_add_kernel[(nb,)](x, y, part, n, INCLUSIVE=inclusive, BLOCK=block,
                            **launch_opts(4))
    return y
