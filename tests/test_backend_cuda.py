"""The CUDA back end against the pure-torch oracle, bit for bit (needs a CUDA GPU).

Inputs are generated on the CPU from a seeded generator; the oracle (torch_ref) runs on the CPU
copies and the CUDA back end on device copies, and the results are compared exactly: float
results by bit pattern (NaN positions must match, payloads are not compared), integer results with
torch.equal. Inputs plant exact zeros and -0.0, NaN/Inf, zero-weight clients holding NaN (never
read), odd and prime sizes, K = 1 and K = 300, every update dtype, rows that are views at odd
element offsets (every alignment class of the vector loads), conv segments (inner > 1), 1-D,
ungated, in-only gated and empty segments. Frequency updates, argsort (heavy ties, signed zeros,
every planning path up to N = 10^7) and nested masks cover both the small one-launch paths and the
large multi-kernel ones. The case generators are plain functions of CPU tensors;
tests/test_cuda_build.py reuses them for its host-emulation run of the kernels (no GPU).
"""
from __future__ import annotations

import pytest
import torch

from fedrac_kernels.backends import Accum, torch_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FREQ_DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64]


# =================================================================================================
# case generators (CPU tensors; no GPU needed -- shared with tests/test_cuda_build.py)
# =================================================================================================

def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of float32 tensors: same NaN positions, identical bits elsewhere."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    return torch.equal(a.masked_fill(na, 0).view(torch.int32), b.masked_fill(nb, 0).view(torch.int32))


def gen_rows(gen, K, P, dtype, zero_frac=0.2, nonfinite=()):
    """K rows [P]: N(0, 1) values, planted exact zeros and -0.0, NaN/+Inf/-Inf in clients `nonfinite`."""
    rows = []
    for k in range(K):
        v = torch.randn(P, generator=gen) * (1.0 + 0.1 * k)
        v[torch.rand(P, generator=gen) < zero_frac] = 0.0
        v[torch.rand(P, generator=gen) < 0.02] = -0.0
        if k in nonfinite and P > 0:
            idx = torch.randint(0, P, (3,), generator=gen)
            v[idx[0]] = float("nan")
            v[idx[1]] = float("inf")
            v[idx[2]] = -float("inf")
        rows.append(v.to(dtype))
    return rows


def gen_weights(gen, K, zero=()):
    w = torch.rand(K, generator=gen) * 2.5 + 0.25
    for k in zero:
        if k < K:
            w[k] = 0.0
    return w


def poison_zero_weight(rows, weights):
    """A zero-weight client is skipped and never read: fill its row with NaN to prove it."""
    for k, r in enumerate(rows):
        if float(weights[k]) == 0.0:
            r.fill_(float("nan"))


def gen_acc(gen, rows, weights, P, mode="final", init=False, alias=False):
    """An Accum on the CPU. mode 'final': out (= g when alias) ; 'acc': acc_num/acc_den (= init_*
    when alias). init: random starting num/den (den >= 0 with zeros)."""
    K = len(rows)
    acc = Accum(rows=list(rows), weights=weights, flags=torch.zeros(K, dtype=torch.int32), P=P)
    if init:
        acc.init_num = torch.randn(P, generator=gen)
        den = torch.rand(P, generator=gen) * 3
        den[torch.rand(P, generator=gen) < 0.3] = 0.0
        acc.init_den = den
    if mode == "final":
        acc.g = torch.randn(P, generator=gen)
        acc.out = acc.g if alias else torch.full((P,), 7.0)
    else:
        if alias and init:
            acc.acc_num, acc.acc_den = acc.init_num, acc.init_den
        else:
            acc.acc_num, acc.acc_den = torch.full((P,), 7.0), torch.full((P,), 7.0)
    return acc


def _place(t: torch.Tensor, device, offset: int) -> torch.Tensor:
    """A copy of 1-D `t` on `device` as a view starting `offset` elements into a larger buffer."""
    if offset == 0:
        return t.clone() if device is None or torch.device(device).type == "cpu" else t.to(device)
    buf = torch.zeros(t.numel() + offset + 8, dtype=t.dtype, device=device)
    v = buf[offset:offset + t.numel()]
    v.copy_(t)
    return v


def copy_acc(acc: Accum, device=None, misalign=False) -> Accum:
    """A fresh copy of `acc` (on `device`), keeping the out-is-g / acc-is-init aliasing. misalign:
    rows (and the float buffers) become views at odd element offsets."""
    off = (lambda k: 1 + (3 * k) % 7) if misalign else (lambda k: 0)
    c = lambda t, o=0: None if t is None else _place(t, device, o)
    rows = [_place(r, device, off(k)) for k, r in enumerate(acc.rows)]
    g = c(acc.g, off(1))
    init_num, init_den = c(acc.init_num, off(2)), c(acc.init_den, off(3))
    out = None
    if acc.out is not None:
        out = g if acc.out is acc.g else c(acc.out, off(4))
    acc_num = acc_den = None
    if acc.acc_num is not None:
        if acc.acc_num is acc.init_num:
            acc_num, acc_den = init_num, init_den
        else:
            acc_num, acc_den = c(acc.acc_num, off(5)), c(acc.acc_den, off(6))
    dev = device if device is not None else "cpu"
    return Accum(rows=rows, weights=acc.weights.to(dev).clone(), flags=torch.zeros_like(acc.flags, device=dev),
                 P=acc.P, out=out, g=g, init_num=init_num, init_den=init_den, acc_num=acc_num, acc_den=acc_den)


def result_of(acc: Accum) -> tuple:
    """(flags, out) or (flags, acc_num, acc_den) as CPU tensors."""
    if acc.out is not None:
        return acc.flags.cpu(), acc.out.cpu()
    return acc.flags.cpu(), acc.acc_num.cpu(), acc.acc_den.cpu()


def same_result(r1: tuple, r2: tuple) -> bool:
    return torch.equal(r1[0], r2[0]) and all(bits_equal(a, b) for a, b in zip(r1[1:], r2[1:]))


def oracle(fn: str, acc: Accum, *args) -> tuple:
    a = copy_acc(acc)
    getattr(torch_ref, fn)(a, *args)
    return result_of(a)


def gen_layout(big=False):
    """(segments int64 [S, 6], N, P, sites). Sites: A, B, C (and D when big). Covers: linear with
    ungated input, its 1-D bias, a conv (inner = 9) gated on both dims, a 1-D norm weight, short
    rows gated on both dims, an empty segment, an ungated block, an in-only gated head and its
    ungated bias, a long gated 1-D vector."""
    A, B, C = 13, 11, 7
    D = 300 if big else 0
    sites = [(0, A), (A, B), (A + B, C)] + ([(A + B + C, D)] if big else [])
    a0, b0, c0, d0 = 0, A, A + B, A + B + C
    spec = [
        (A, 37, 1, a0, -1),       # linear, input ungated
        (A, 1, 1, a0, -1),        # bias
        (B, A, 9, b0, a0),        # conv 3x3
        (B, 1, 1, b0, -1),        # norm weight
        (C, B, 1, c0, b0),        # linear, short rows
        (0, 5, 1, -1, -1),        # empty segment
        (3, 301, 1, -1, -1),      # ungated
        (5, C, 1, -1, c0),        # head: in-only gated
        (5, 1, 1, -1, -1),        # head bias
    ]
    if big:
        spec += [(D, C, 9, d0, c0), (D, 1, 1, d0, -1), (4, D, 1, -1, d0)]
    segs, off = [], 0
    for rows, cols, inner, oo, io in spec:
        segs.append([off, rows, cols, inner, oo, io])
        off += rows * cols * inner
    N = A + B + C + D
    return torch.tensor(segs, dtype=torch.int64), N, off, sites


def gen_neuron_masks(gen, K, N):
    dens = torch.linspace(0.0, 1.0, K) if K > 1 else torch.tensor([0.6])
    m = torch.rand(K, N, generator=gen) < dens[:, None]
    if K > 2:
        m[1] = torch.arange(N) % 2 == 0
        m[K - 1] = True
    return m


def gen_nested(gen, K, N):
    rank = torch.randperm(N, generator=gen).to(torch.int32)
    sizes = torch.randint(0, N + 1, (K,), generator=gen).to(torch.int32)
    sizes[0] = N
    if K > 1:
        sizes[1] = 0
    return rank, sizes


def gen_kept(gen, k, sites):
    """Client k's kept neurons per site, in local order: all / prefix / rolled window / scattered."""
    kept = []
    for start, width in sites:
        kind = k % 4
        if kind == 0:
            idx = torch.arange(width)
        elif kind == 1:
            idx = torch.arange(width // 2)
        elif kind == 2:
            r = int(torch.randint(0, max(width, 1), (1,), generator=gen))
            idx = torch.roll(torch.arange(width), -r)[: (2 * width) // 3]
        else:
            idx = torch.nonzero(torch.rand(width, generator=gen) < 0.5).flatten()
        kept.append(idx + start)
    return kept


def pack_compact(segs, N, delta, kept, sites, dtype, skip=()):
    """Client-side packing: (values, inv [N], seg_off [S], seg_cols [S]) for one client."""
    inv = torch.full((N,), -1, dtype=torch.int32)
    for idx in kept:
        inv[idx] = torch.arange(idx.numel(), dtype=torch.int32)
    starts = {s: i for i, (s, _) in enumerate(sites)}
    S = segs.shape[0]
    seg_off = torch.full((S,), -1, dtype=torch.int64)
    seg_cols = torch.zeros(S, dtype=torch.int64)
    parts, pos = [], 0
    for s, (off, rows, cols, inner, oo, io) in enumerate(segs.tolist()):
        if s in skip:
            continue
        lo = kept[starts[oo]] - oo if oo >= 0 else torch.arange(rows)
        li = kept[starts[io]] - io if io >= 0 else torch.arange(cols)
        blk = delta[off:off + rows * cols * inner].view(rows, cols, inner)[lo][:, li]
        seg_off[s] = pos
        seg_cols[s] = li.numel()
        parts.append(blk.reshape(-1))
        pos += blk.numel()
    values = torch.cat(parts) if parts else torch.zeros(0)
    return values.to(dtype), inv, seg_off, seg_cols


def gen_compact_case(gen, K, dtype, big=False, nan_client=2):
    """(values list, inv [K, N], seg_off [K, S], seg_cols [K, S], segs, N, P, dense deltas)."""
    segs, N, P, sites = gen_layout(big)
    vals, invs, offs, cols, deltas = [], [], [], [], []
    for k in range(K):
        d = torch.randn(P, generator=gen)
        d[torch.rand(P, generator=gen) < 0.1] = 0.0
        if k == nan_client:
            d[torch.randint(0, P, (4,), generator=gen)] = float("nan")
        kept = gen_kept(gen, k, sites)
        v, inv, so, sc = pack_compact(segs, N, d, kept, sites, dtype, skip=(6,) if k % 4 == 1 else ())
        vals.append(v)
        invs.append(inv)
        offs.append(so)
        cols.append(sc)
        deltas.append(d)
    return vals, torch.stack(invs), torch.stack(offs), torch.stack(cols), segs, N, P, deltas


def mlp_layout():
    """The FedRAC MLP (3072-200-200-10): P = 656,810, N = 400 (two hidden layers of 200)."""
    spec = [(200, 3072, 1, 0, -1), (200, 1, 1, 0, -1), (200, 200, 1, 200, 0), (200, 1, 1, 200, -1),
            (10, 200, 1, -1, 200), (10, 1, 1, -1, -1)]
    segs, off = [], 0
    for r, c, i, oo, io in spec:
        segs.append([off, r, c, i, oo, io])
        off += r * c * i
    return torch.tensor(segs, dtype=torch.int64), 400, off


def gen_sort_keys(gen, kind: str, N: int, dtype: torch.dtype) -> torch.Tensor:
    """Keys exercising each planning path of the CUDA sort (see csrc/cuda/argsort.cu)."""
    if kind == "equal":
        return torch.full((N,), 3, dtype=dtype)
    if kind == "ties":          # a handful of values: <= 8 significant bits
        return torch.randint(0, 6, (N,), generator=gen).to(dtype)
    if kind == "freq":          # frequency-table-like: ~10 bits (two counting passes)
        return torch.randint(0, 1000, (N,), generator=gen).to(dtype)
    if kind == "wide":          # ~20 bits: CUB on 32-bit keys
        return torch.randint(-(1 << 19), 1 << 19, (N,), generator=gen).to(dtype)
    if kind == "random":        # full range
        if dtype.is_floating_point:
            k = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype)
            k[torch.rand(N, generator=gen) < 0.1] = 0.0
            k[torch.rand(N, generator=gen) < 0.05] = -0.0
            return k
        hi = 2**31 - 1 if dtype == torch.int32 else 2**62
        k = torch.randint(-hi, hi, (N,), generator=gen, dtype=torch.int64).to(dtype)
        k[::7] = k[min(3, N - 1)]
        return k
    if kind == "zeros":         # signed zeros and extremes
        base = torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, -1.0, float("inf"), -float("inf"), 1e-45, -1e-45, -0.0],
                            dtype=torch.float64)
        return base.repeat(N // base.numel() + 1)[:N][torch.randperm(N, generator=gen)].to(dtype)
    raise ValueError(kind)


# =================================================================================================
# GPU tests
# =================================================================================================

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    from fedrac_kernels.backends import cuda as cb

    _OK, _WHY = cb.available()
else:  # pragma: no cover - CPU-only machines
    cb = None
    _OK, _WHY = False, "needs a CUDA GPU"

needs_gpu = pytest.mark.skipif(not _OK, reason=f"cuda back end unavailable: {_WHY}")
DEV = torch.device("cuda") if torch.cuda.is_available() else None


def on_gpu(fn: str, acc: Accum, *args, misalign=False) -> tuple:
    a = copy_acc(acc, DEV, misalign)
    dargs = [x.to(DEV) if isinstance(x, torch.Tensor) else x for x in args]
    getattr(cb, fn)(a, *dargs)
    return result_of(a)


def check(fn: str, acc: Accum, *args, misalign=False) -> tuple:
    ref = oracle(fn, acc, *args)
    got = on_gpu(fn, acc, *args, misalign=misalign)
    assert torch.equal(ref[0], got[0]), f"flags differ: {ref[0].tolist()} vs {got[0].tolist()}"
    for i, (a, b) in enumerate(zip(ref[1:], got[1:])):
        if not bits_equal(a, b):
            bad = (a.view(torch.int32) != b.view(torch.int32)) & ~(torch.isnan(a) & torch.isnan(b))
            idx = bad.nonzero().flatten()[:5].tolist()
            raise AssertionError(f"output {i} differs at {int(bad.sum())} element(s), first {idx}: "
                                 f"ref {a[idx].tolist()} vs cuda {b[idx].tolist()}")
    return ref


@needs_gpu
def test_available_reports_device():
    ok, why = cb.available()
    assert ok and "CUDA kernels built for" in why
    assert cb.available("cpu")[0] is False


# ------------------------------------------------------------------------------------------ dense

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,P", [(1, 1), (1, 7), (1, 257), (3, 997), (7, 4099), (6, 30011), (2, 262147)])
def test_dense_nonzero_rule(gen, dtype, K, P):
    rows = gen_rows(gen, K, P, dtype, nonfinite=(K - 1,) if K > 2 else ())
    w = gen_weights(gen, K)
    for mode, init, alias in (("final", False, False), ("final", False, True), ("final", True, False),
                              ("acc", False, False), ("acc", True, True)):
        check("dense", gen_acc(gen, rows, w, P, mode, init, alias), None)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_masks(gen, dtype):
    K, P = 6, 9973
    rows = gen_rows(gen, K, P, dtype, zero_frac=0.1)
    w = gen_weights(gen, K)
    masks = [torch.rand(P, generator=gen) < d for d in (0.0, 0.05, 0.5, 0.97, 1.0, 0.3)]
    masks[5][:640] = False
    masks[4][128:192] = False
    check("dense", gen_acc(gen, rows, w, P), masks)
    check("dense", gen_acc(gen, rows, w, P, "acc", init=True), masks)
    m8 = [m.to(torch.uint8) * (1 + (k % 3)) for k, m in enumerate(masks)]  # non-zero = active
    check("dense", gen_acc(gen, rows, w, P), m8)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_misaligned_views(gen, dtype):
    """Rows, g, out and init/acc buffers at odd element offsets: every alignment class."""
    for K, P in ((5, 10007), (3, 13), (9, 65537)):
        rows = gen_rows(gen, K, P, dtype)
        w = gen_weights(gen, K)
        masks = [torch.rand(P, generator=gen) < 0.7 for _ in range(K)]
        for mode, init in (("final", False), ("acc", True)):
            check("dense", gen_acc(gen, rows, w, P, mode, init), None, misalign=True)
            acc = gen_acc(gen, rows, w, P, mode, init)
            ref = oracle("dense", acc, masks)
            a = copy_acc(acc, DEV, misalign=True)
            ms = [_place(m, DEV, 1 + k % 5) for k, m in enumerate(masks)]  # masks at odd offsets too
            cb.dense(a, ms)
            assert same_result(ref, result_of(a))


@needs_gpu
def test_dense_zero_weight_clients_never_read(gen):
    K, P = 5, 3001
    rows = gen_rows(gen, K, P, torch.float32)
    w = gen_weights(gen, K, zero=(0, 3))
    poison_zero_weight(rows, w)
    ref = check("dense", gen_acc(gen, rows, w, P), None)
    assert int(ref[0].sum()) == 0 and torch.isfinite(ref[1]).all()
    check("dense", gen_acc(gen, rows, w, P), [torch.ones(P, dtype=torch.bool)] * K)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_nonfinite_flags(gen, dtype):
    K, P = 6, 2053
    rows = gen_rows(gen, K, P, dtype, nonfinite=(1, 4))
    w = gen_weights(gen, K)
    ref = check("dense", gen_acc(gen, rows, w, P), None)
    assert ref[0].tolist() == [0, 1, 0, 0, 1, 0]
    masks = [torch.ones(P, dtype=torch.bool) for _ in range(K)]
    masks[4] = torch.isfinite(rows[4].float())  # client 4's non-finite values inactive: not flagged
    ref = check("dense", gen_acc(gen, rows, w, P), masks)
    assert ref[0].tolist() == [0, 1, 0, 0, 0, 0]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_every_bit_pattern_widens_exactly(dtype):
    if dtype == torch.float32:
        g = torch.Generator().manual_seed(5)
        v = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 16,), generator=g, dtype=torch.int64)
        v[:8] = torch.tensor([0, 1, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, -0x80000000, 0x7FC00000])
        v = v.to(torch.int32).view(torch.float32)
    else:
        v = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    P = v.numel()
    gen = torch.Generator().manual_seed(1)
    rows, w = [v.clone(), v.flip(0).clone()], torch.tensor([1.0, 0.5])
    check("dense", gen_acc(gen, rows, w, P, "acc"), None)
    check("dense", gen_acc(gen, rows, w, P), [torch.ones(P, dtype=torch.bool)] * 2)


@needs_gpu
def test_dense_many_clients(gen):
    """K = 300 (many unrolled client groups, a partial last group), P not a multiple of any width."""
    K, P = 300, 5003
    for dtype in (torch.float32, torch.bfloat16):
        rows = gen_rows(gen, K, P, dtype, zero_frac=0.5, nonfinite=(17, 299))
        w = gen_weights(gen, K, zero=(0, 150, 298))
        poison_zero_weight(rows, w)
        check("dense", gen_acc(gen, rows, w, P), None, misalign=True)
        masks = [torch.rand(P, generator=gen) < 0.5 for _ in range(K)]
        check("dense", gen_acc(gen, rows, w, P, "acc", init=True), masks)


@needs_gpu
def test_accumulate_then_finalize_equals_one_shot(gen):
    K, P = 9, 7919
    for dtype in DTYPES:
        rows = gen_rows(gen, K, P, dtype)
        w = gen_weights(gen, K, zero=(4,))
        poison_zero_weight(rows, w)
        g = torch.randn(P, generator=gen)
        one = Accum(rows=rows, weights=w, flags=torch.zeros(K, dtype=torch.int32), P=P, g=g, out=torch.empty(P))
        torch_ref.dense(one, None)
        d = lambda t: t.to(DEV)
        drows, dw = [d(r) for r in rows], d(w)
        flags = torch.zeros(K, dtype=torch.int32, device=DEV)
        num, den = torch.empty(P, device=DEV), torch.empty(P, device=DEV)
        cb.dense(Accum(rows=drows[:4], weights=dw[:4], flags=flags[:4], P=P, acc_num=num, acc_den=den), None)
        cb.dense(Accum(rows=drows[4:7], weights=dw[4:7], flags=flags[4:7], P=P, init_num=num, init_den=den,
                       acc_num=num, acc_den=den), None)
        out = torch.empty(P, device=DEV)
        cb.dense(Accum(rows=drows[7:], weights=dw[7:], flags=flags[7:], P=P, init_num=num, init_den=den,
                       g=d(g), out=out), None)
        assert bits_equal(out, one.out)
        assert torch.equal(flags.cpu(), one.flags)


@needs_gpu
def test_deterministic_and_stream_ordered(gen):
    """Two runs give identical bits, also on a side stream (the kernels use the current stream)."""
    K, P = 12, 1_000_003
    rows = [r.to(DEV) for r in gen_rows(gen, K, P, torch.bfloat16)]
    w = gen_weights(gen, K).to(DEV)
    g = torch.randn(P, generator=gen).to(DEV)
    outs = []
    side = torch.cuda.Stream()
    for use_side in (False, False, True):
        out = torch.empty(P, device=DEV)
        acc = Accum(rows=rows, weights=w, flags=torch.zeros(K, dtype=torch.int32, device=DEV), P=P, g=g, out=out)
        if use_side:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                cb.dense(acc, None)
            torch.cuda.current_stream().wait_stream(side)
        else:
            cb.dense(acc, None)
        outs.append(out.cpu())
    assert bits_equal(outs[0], outs[1]) and bits_equal(outs[0], outs[2])


# ------------------------------------------------------------------------------------- structured

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 6])
def test_structured_neuron_masks(gen, dtype, K):
    segs, N, P, _ = gen_layout(big=True)
    rows = gen_rows(gen, K, P, dtype, nonfinite=(K - 1,))
    w = gen_weights(gen, K, zero=(2,) if K > 2 else ())
    poison_zero_weight(rows, w)
    nm = gen_neuron_masks(gen, K, N)
    for nonzero in (False, True):
        for mode in ("final", "acc"):
            check("structured", gen_acc(gen, rows, w, P, mode, init=mode == "acc"), segs, N, nm, None, None,
                  nonzero)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_structured_nested(gen, dtype):
    segs, N, P, _ = gen_layout(big=True)
    K = 7
    rows = gen_rows(gen, K, P, dtype, nonfinite=(3,))
    w = gen_weights(gen, K, zero=(5,))
    poison_zero_weight(rows, w)
    rank, sizes = gen_nested(gen, K, N)
    for nonzero in (False, True):
        for mode, init, alias in (("final", False, True), ("acc", True, False)):
            check("structured", gen_acc(gen, rows, w, P, mode, init, alias), segs, N, None, rank, sizes, nonzero)
    # the nested form equals the dense neuron masks it describes
    nm = rank.to(torch.int64)[None, :] < sizes.to(torch.int64)[:, None]
    acc = gen_acc(gen, rows, w, P)
    assert same_result(on_gpu("structured", acc, segs, N, None, rank, sizes, False),
                       on_gpu("structured", acc, segs, N, nm, None, None, False))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_structured_misaligned_views(gen, dtype):
    segs, N, P, _ = gen_layout(big=True)
    K = 5
    rows = gen_rows(gen, K, P, dtype)
    w = gen_weights(gen, K)
    rank, sizes = gen_nested(gen, K, N)
    nm = gen_neuron_masks(gen, K, N)
    check("structured", gen_acc(gen, rows, w, P), segs, N, None, rank, sizes, False, misalign=True)
    check("structured", gen_acc(gen, rows, w, P, "acc", True), segs, N, nm, None, None, True, misalign=True)


@needs_gpu
def test_structured_many_clients(gen):
    segs, N, P, _ = gen_layout(big=True)
    K = 300
    rows = gen_rows(gen, K, P, torch.bfloat16, zero_frac=0.3, nonfinite=(7, 299))
    w = gen_weights(gen, K, zero=(0, 123))
    poison_zero_weight(rows, w)
    rank, sizes = gen_nested(gen, K, N)
    nm = gen_neuron_masks(gen, K, N)
    check("structured", gen_acc(gen, rows, w, P), segs, N, None, rank, sizes, True, misalign=True)
    check("structured", gen_acc(gen, rows, w, P, "acc", True), segs, N, nm, None, None, False)


@needs_gpu
def test_structured_equals_dense_with_expanded_masks(gen):
    segs, N, P, _ = gen_layout(big=True)
    K = 4
    rows = gen_rows(gen, K, P, torch.bfloat16)
    w = gen_weights(gen, K)
    nm = gen_neuron_masks(gen, K, N)
    dense_masks = [torch_ref.gate_row(P, segs, nm[k]) for k in range(K)]
    acc = gen_acc(gen, rows, w, P)
    assert same_result(on_gpu("structured", acc, segs, N, nm, None, None, False), on_gpu("dense", acc, dense_masks))


@needs_gpu
def test_structured_fedrac_mlp(gen):
    """The FedRAC MLP at K = 10 with nested masks and in-mask updates (zeros outside)."""
    segs, N, P = mlp_layout()
    K = 10
    rank = torch.randperm(N, generator=gen).to(torch.int32)
    sizes = (torch.arange(1, K + 1) * 40).to(torch.int32)
    on = rank.to(torch.int64)[None, :] < sizes.to(torch.int64)[:, None]
    rows = [torch.randn(P, generator=gen) * torch_ref.gate_row(P, segs, on[k]) for k in range(K)]
    w = torch.ones(K)
    check("structured", gen_acc(gen, rows, w, P), segs, N, None, rank, sizes, True)
    check("structured", gen_acc(gen, rows, w, P), segs, N, on, None, None, False)
    check("dense", gen_acc(gen, rows, w, P), None)


# ---------------------------------------------------------------------------------------- compact

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact(gen, dtype):
    K = 6
    vals, inv, seg_off, seg_cols, segs, N, P, _ = gen_compact_case(gen, K, dtype, big=True)
    w = gen_weights(gen, K, zero=(3,))
    poison_zero_weight(vals, w)
    for mode, init in (("final", False), ("acc", True)):
        ref = check("compact", gen_acc(gen, vals, w, P, mode, init), segs, N, inv, seg_off, seg_cols)
        assert int(ref[0][2]) == 1
    check("compact", gen_acc(gen, vals, w, P), segs, N, inv, seg_off, seg_cols, misalign=True)


@needs_gpu
def test_compact_many_clients(gen):
    K = 300
    vals, inv, seg_off, seg_cols, segs, N, P, _ = gen_compact_case(gen, K, torch.float16, big=True, nan_client=11)
    w = gen_weights(gen, K, zero=(3, 200))
    poison_zero_weight(vals, w)
    ref = check("compact", gen_acc(gen, vals, w, P, "acc", True), segs, N, inv, seg_off, seg_cols, misalign=True)
    assert int(ref[0][11]) == 1


@needs_gpu
def test_compact_equals_structured(gen):
    segs, N, P, sites = gen_layout(big=True)
    K = 4
    nm = gen_neuron_masks(gen, K, N)
    vals, invs, offs, cols, dense_rows = [], [], [], [], []
    for k in range(K):
        d = torch.randn(P, generator=gen) * torch_ref.gate_row(P, segs, nm[k])
        kept = [torch.nonzero(nm[k, s:s + wd]).flatten() + s for s, wd in sites]
        v, iv, so, sc = pack_compact(segs, N, d, kept, sites, torch.float32)
        vals.append(v)
        invs.append(iv)
        offs.append(so)
        cols.append(sc)
        dense_rows.append(d)
    w = gen_weights(gen, K)
    acc_c = gen_acc(gen, vals, w, P)
    acc_s = gen_acc(gen, dense_rows, w, P)
    acc_s.g = acc_c.g
    got_c = on_gpu("compact", acc_c, segs, N, torch.stack(invs), torch.stack(offs), torch.stack(cols))
    got_s = on_gpu("structured", acc_s, segs, N, nm, None, None, False)
    assert same_result(got_c, got_s)


# ------------------------------------------------------------------------ frequency / sort / masks

@needs_gpu
@pytest.mark.parametrize("fdtype", FREQ_DTYPES)
def test_frequency_update(gen, fdtype):
    for K, N in ((1, 1), (10, 400), (37, 1031), (0, 50), (3, 11_999), (5, 12_000), (3, 70_001), (100, 200_003)):
        base = torch.randint(0, 1 << 20, (N,), generator=gen).to(fdtype)
        if fdtype == torch.float32:
            base = base * 33.3 + 16_777_216.0  # counts land on rounded sums
        if fdtype.is_floating_point and N > 2:
            base[1] = -0.0
        masks = torch.rand(K, N, generator=gen) < 0.4
        f_ref, f_gpu = base.clone(), base.to(DEV)
        torch_ref.frequency_update(f_ref, masks, None, None)
        cb.frequency_update(f_gpu, masks.to(DEV), None, None)
        assert bits_equal_any(f_ref, f_gpu.cpu()), (K, N)
        rank = torch.randperm(N, generator=gen).to(torch.int32)
        sizes = torch.randint(0, N + 1, (K,), generator=gen).to(torch.int32)
        f_ref, f_gpu = base.clone(), base.to(DEV)
        torch_ref.frequency_update(f_ref, None, rank, sizes)
        cb.frequency_update(f_gpu, None, rank.to(DEV), sizes.to(DEV))
        assert bits_equal_any(f_ref, f_gpu.cpu()), (K, N)


def bits_equal_any(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality for any dtype (signed zeros distinguished)."""
    if a.dtype.is_floating_point:
        it = {4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(it), b.view(it))
    return torch.equal(a, b)


@needs_gpu
def test_frequency_misaligned_masks(gen):
    K, N = 9, 1003
    base = torch.zeros(N, dtype=torch.int64)
    big = torch.rand(K * N + 3, generator=gen) < 0.5
    masks = big[3:].view(K, N)  # 3 bytes in: no 4-byte words
    f_ref, f_gpu = base.clone(), base.to(DEV)
    torch_ref.frequency_update(f_ref, masks, None, None)
    cb.frequency_update(f_gpu, big.to(DEV)[3:].view(K, N), None, None)
    assert torch.equal(f_ref, f_gpu.cpu())


def _check_sort(keys: torch.Tensor):
    got = cb.stable_argsort(keys.to(DEV)).cpu()
    ref = torch_ref.stable_argsort(keys)
    assert got.dtype == torch.int64
    if not torch.equal(got, ref):
        bad = (got != ref).nonzero().flatten()[:5].tolist()
        raise AssertionError(f"order differs at {bad}: cuda {got[bad].tolist()} vs ref {ref[bad].tolist()}")


@needs_gpu
@pytest.mark.parametrize("kdtype", FREQ_DTYPES)
def test_stable_argsort_small(gen, kdtype):
    for N in (1, 2, 3, 400, 1024, 4095, 4096):
        for kind in ("equal", "ties", "freq", "random"):
            _check_sort(gen_sort_keys(gen, kind, N, kdtype))
    if kdtype.is_floating_point:
        _check_sort(gen_sort_keys(gen, "zeros", 3300, kdtype))


@needs_gpu
@pytest.mark.parametrize("kdtype", FREQ_DTYPES)
@pytest.mark.parametrize("N", [4097, 100_003, 1_000_000])
def test_stable_argsort_large(gen, kdtype, N):
    for kind in ("equal", "ties", "freq", "wide", "random"):
        _check_sort(gen_sort_keys(gen, kind, N, kdtype))
    if kdtype.is_floating_point:
        _check_sort(gen_sort_keys(gen, "zeros", N, kdtype))
        _check_sort(torch.randint(0, 300, (N,), generator=gen).to(kdtype) + 0.5)  # not integers: IEEE image


@needs_gpu
def test_stable_argsort_extremes(gen):
    i64 = torch.tensor([2**63 - 1, -(2**63), 0, -1, 1, 2**63 - 1, -(2**63)], dtype=torch.int64)
    i32 = torch.tensor([2**31 - 1, -(2**31), 0, -1, 1, -(2**31)], dtype=torch.int32)
    for k in (i64, i32):
        _check_sort(k)
        big = k.repeat(3000)[torch.randperm(k.numel() * 3000, generator=gen)]
        _check_sort(big)
    f = torch.tensor([2.0**31, -(2.0**31), 2.0**31 - 128, 3.0, -3.0, 1e30, -1e30], dtype=torch.float32)
    _check_sort(f.repeat(1000))  # integers at the edge of the int32 image, and beyond it
    _check_sort(torch.tensor([1e300, -1e300, 0.0, 2.0**40, -(2.0**40)], dtype=torch.float64).repeat(2000))
    _check_sort(torch.tensor([7, -5, 3], dtype=torch.int16).repeat(5000))  # widened to int64
    _check_sort(torch.tensor([0.5, -0.0, 0.0, 2.0], dtype=torch.float16).repeat(5000))  # widened to float64


@needs_gpu
@pytest.mark.parametrize("kind", ["ties", "freq", "wide"])
def test_stable_argsort_ten_million(gen, kind):
    _check_sort(gen_sort_keys(gen, kind, 10_000_000, torch.float32))


@needs_gpu
def test_stable_argsort_under_graph_capture(gen):
    """While a CUDA graph is captured the sort does not read the key range (no host sync): the
    full-width path must give the same order."""
    for N in (3000, 200_000):
        keys = gen_sort_keys(gen, "freq", N, torch.float32).to(DEV)
        cb.stable_argsort(keys)  # warm up (workspace sizes, CUB attributes)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            order = cb.stable_argsort(keys)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(order.cpu(), torch_ref.stable_argsort(keys.cpu()))


@needs_gpu
def test_nested_masks(gen):
    for S, N in ((1, 1), (50, 400), (128, 1024), (7, 1031), (3, 12_000), (3, 12_001), (4, 40_009)):
        order = torch.randperm(N, generator=gen)
        sizes = torch.randint(0, N + 1, (S,), generator=gen)
        sizes[0] = 0
        sizes[-1] = N
        got = cb.nested_masks(order.to(DEV), sizes.to(DEV))
        assert got.dtype == torch.bool and got.shape == (S, N)
        assert torch.equal(got.cpu(), torch_ref.nested_masks(order, sizes))


@needs_gpu
def test_native_errors_are_exceptions():
    import fedrac_kernels._cuda as m

    keys = torch.zeros(10, device=DEV)
    order = torch.empty(10, dtype=torch.int64, device=DEV)
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="key dtype"):
        m.argsort_workspace(torch.cuda.current_device(), stream, keys.data_ptr(), 9, order.data_ptr(), 10)
    with pytest.raises(ValueError, match="too small|needed"):
        m.stable_argsort(torch.cuda.current_device(), stream, keys.data_ptr(), 0, order.data_ptr(), 10,
                         order.data_ptr(), 1)
