"""The C++/OpenMP back end against the pure-torch oracle, bit for bit.

Every test calls the back-end functions directly (protocol of fedrac_kernels.backends) on fresh
random inputs and compares with torch_ref using exact equality: float results by their bit
patterns (NaN positions must match; NaN payloads are not compared), int results with torch.equal.
Inputs plant exact zeros, NaN/Inf, zero-weight clients holding NaN (never read), odd (prime) sizes,
K = 1, all update dtypes, conv segments (inner > 1) and 1-D segments. The span kernels exist in up
to three instruction-set variants (base / avx2 / avx512); the aggregation tests run each one the CPU
supports, forced in-process with set_isa (so an AVX-512 machine also checks the AVX2 multi-client
kernel), and once in a subprocess capped by FEDRAC_CPU_ISA=avx2.
"""
from __future__ import annotations

import pytest
import torch

from fedrac_kernels.backends import Accum, torch_ref

cpu = pytest.importorskip("fedrac_kernels.backends.cpu")
if not cpu.available()[0]:
    pytest.skip(cpu.available()[1], allow_module_level=True)
_cpu = cpu._cpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISAS = _cpu.supported_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Every instruction-set variant of the span kernels this CPU runs: base (4-client group kernels),
    avx2 and avx512 (each with its own hand-written multi-client kernel)."""
    prev = _cpu.set_isa(request.param)
    yield request.param
    _cpu.set_isa(prev)


# ---------------------------------------------------------------------------------------- helpers

def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of float tensors: same NaN positions, identical bits elsewhere."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    ia = a.masked_fill(na, 0).view(torch.int32)
    ib = b.masked_fill(nb, 0).view(torch.int32)
    return torch.equal(ia, ib)


def rand_rows(gen, K, P, dtype, zero_frac=0.2, nonfinite_clients=(), nonfinite_at=None):
    """K rows of length P: N(0, 1) values with planted exact zeros (and -0.0), optional NaN/Inf."""
    rows = []
    for k in range(K):
        v = torch.randn(P, generator=gen)
        z = torch.rand(P, generator=gen) < zero_frac
        v[z] = 0.0
        v[torch.rand(P, generator=gen) < 0.02] = -0.0
        if k in nonfinite_clients:
            idx = nonfinite_at if nonfinite_at is not None else torch.randint(0, P, (3,), generator=gen)
            vals = torch.tensor([float("nan"), float("inf"), -float("inf")])
            v[idx] = vals[torch.arange(len(idx)) % 3]
        rows.append(v.to(dtype))
    return rows


def rand_weights(gen, K, zero=()):
    w = torch.rand(K, generator=gen) * 3 + 0.25
    w[torch.randint(0, K, (1,), generator=gen)] = 1.0
    for k in zero:
        w[k] = 0.0
    return w


def poison(rows, weights):
    """Zero-weight clients must never be read: fill them with NaN."""
    for k in range(len(rows)):
        if float(weights[k]) == 0.0:
            rows[k].fill_(float("nan"))


def make_acc(rows, weights, P, gen, mode="final", inplace=False, init=False):
    K = len(rows)
    g = torch.randn(P, generator=gen)
    acc = Accum(rows=rows, weights=weights, flags=torch.zeros(K, dtype=torch.int32), P=P)
    if init:
        acc.init_num = torch.randn(P, generator=gen)
        den = torch.rand(P, generator=gen) * 2
        den[torch.rand(P, generator=gen) < 0.3] = 0.0
        acc.init_den = den
    if mode == "final":
        acc.g = g
        acc.out = g if inplace else torch.empty(P)
    else:
        acc.acc_num = torch.empty(P)
        acc.acc_den = torch.empty(P)
    return acc


def clone_acc(acc: Accum) -> Accum:
    """A fresh copy (outputs and flags separate) so both back ends start from identical state."""
    c = lambda t: None if t is None else t.clone()
    out = None
    g = c(acc.g)
    if acc.out is not None:
        out = g if acc.out is acc.g else torch.empty_like(acc.out)
    return Accum(rows=[r.clone() for r in acc.rows], weights=acc.weights.clone(), flags=torch.zeros_like(acc.flags),
                 P=acc.P, out=out, g=g, init_num=c(acc.init_num), init_den=c(acc.init_den),
                 acc_num=None if acc.acc_num is None else torch.empty_like(acc.acc_num),
                 acc_den=None if acc.acc_den is None else torch.empty_like(acc.acc_den))


def assert_same(ref: Accum, got: Accum):
    assert torch.equal(ref.flags, got.flags), (ref.flags, got.flags)
    if ref.out is not None:
        assert bits_equal(ref.out, got.out)
    else:
        assert bits_equal(ref.acc_num, got.acc_num)
        assert bits_equal(ref.acc_den, got.acc_den)


def run_both(fn_name, acc, *args):
    ra, ca = clone_acc(acc), clone_acc(acc)
    getattr(torch_ref, fn_name)(ra, *args)
    getattr(cpu, fn_name)(ca, *args)
    assert_same(ra, ca)
    return ra, ca


# ----------------------------------------------------------------------------------------- dense

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,P", [(1, 1), (1, 257), (3, 997), (7, 4099), (17, 2053), (6, 40009)])
def test_dense_nonzero_rule(isa, gen, dtype, K, P):
    rows = rand_rows(gen, K, P, dtype)
    w = rand_weights(gen, K)
    for mode, inplace in (("final", False), ("final", True), ("acc", False)):
        run_both("dense", make_acc(rows, w, P, gen, mode, inplace), None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_explicit_masks(isa, gen, dtype):
    K, P = 6, 9973
    rows = rand_rows(gen, K, P, dtype, zero_frac=0.1)
    w = rand_weights(gen, K)
    masks = [torch.rand(P, generator=gen) < d for d in (0.0, 0.05, 0.5, 0.97, 1.0, 0.3)]
    masks[5][:640] = False  # whole dead 64-element chunks
    masks[4][128:192] = False
    run_both("dense", make_acc(rows, w, P, gen), masks)
    # uint8 masks with values other than 0/1 are active where non-zero
    m8 = [m.to(torch.uint8) * (1 + (k % 3)) for k, m in enumerate(masks)]
    run_both("dense", make_acc(rows, w, P, gen, init=True), m8)


def test_dense_zero_weight_clients_never_read(isa, gen):
    K, P = 5, 3001
    rows = rand_rows(gen, K, P, torch.float32)
    w = rand_weights(gen, K, zero=(0, 3))
    poison(rows, w)
    _, got = run_both("dense", make_acc(rows, w, P, gen), None)
    assert int(got.flags.sum()) == 0
    assert torch.isfinite(got.out).all()
    masks = [torch.ones(P, dtype=torch.bool) for _ in range(K)]
    run_both("dense", make_acc(rows, w, P, gen), masks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_nonfinite_flags(isa, gen, dtype):
    K, P = 6, 2053
    rows = rand_rows(gen, K, P, dtype, nonfinite_clients=(1, 4))
    w = rand_weights(gen, K)
    ref, _ = run_both("dense", make_acc(rows, w, P, gen), None)
    assert ref.flags.tolist() == [0, 1, 0, 0, 1, 0]
    # masked off: the non-finite values of client 4 are inactive, so it is not flagged
    masks = [torch.ones(P, dtype=torch.bool) for _ in range(K)]
    masks[4] = torch.isfinite(rows[4].float())
    ref, _ = run_both("dense", make_acc(rows, w, P, gen), masks)
    assert ref.flags.tolist() == [0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_special_values_widen_exactly(isa, dtype):
    """Subnormals, extremes, signed zeros and NaN/Inf of every dtype go through the kernels intact."""
    raw = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    if dtype == torch.float32:
        g = torch.Generator().manual_seed(5)
        vals = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 16,), generator=g, dtype=torch.int64)
        vals[:8] = torch.tensor([0, 1, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, -0x80000000, 0x7FC00000])
        v = vals.to(torch.int32).view(torch.float32)
    else:
        v = raw.view(dtype)  # every bit pattern of the 16-bit format
    P = v.numel()
    w = torch.tensor([1.0, 0.5])
    rows = [v.clone(), v.flip(0).clone()]
    acc = make_acc(rows, w, P, torch.Generator().manual_seed(1), mode="acc")
    run_both("dense", acc, None)
    run_both("dense", make_acc(rows, w, P, torch.Generator().manual_seed(1)), [torch.ones(P, dtype=torch.bool)] * 2)


def test_accumulate_then_finalize_equals_one_shot(isa, gen):
    K, P = 9, 7919
    for dtype in DTYPES:
        rows = rand_rows(gen, K, P, dtype)
        w = rand_weights(gen, K, zero=(4,))
        poison(rows, w)
        g = torch.randn(P, generator=gen)
        one = Accum(rows=rows, weights=w, flags=torch.zeros(K, dtype=torch.int32), P=P, g=g, out=torch.empty(P))
        torch_ref.dense(one, None)
        # chunked: 0..3 accumulate, 4..6 accumulate into the same buffers, 7..8 finalize
        num, den = torch.empty(P), torch.empty(P)
        flags = torch.zeros(K, dtype=torch.int32)
        cpu.dense(Accum(rows=rows[:4], weights=w[:4], flags=flags[:4], P=P, acc_num=num, acc_den=den), None)
        cpu.dense(Accum(rows=rows[4:7], weights=w[4:7], flags=flags[4:7], P=P, init_num=num, init_den=den,
                        acc_num=num, acc_den=den), None)
        out = torch.empty(P)
        cpu.dense(Accum(rows=rows[7:], weights=w[7:], flags=flags[7:], P=P, init_num=num, init_den=den,
                        g=g, out=out), None)
        assert bits_equal(out, one.out)
        assert torch.equal(flags, one.flags)


# smallest subnormal and number of subnormal steps of each update dtype
_SUBNORMAL = {torch.float32: (2.0 ** -149, 1 << 23), torch.bfloat16: (2.0 ** -133, 1 << 7),
              torch.float16: (2.0 ** -24, 1 << 10)}


def plant_subnormals(gen, row, frac=0.03):
    """Replace about frac of row (in place) by random subnormals of its dtype, both signs (exact)."""
    tiny, steps = _SUBNORMAL[row.dtype]
    P = row.numel()
    at = torch.rand(P, generator=gen) < frac
    m = torch.randint(1, steps, (P,), generator=gen, dtype=torch.int64).double() * tiny
    m = torch.where(torch.rand(P, generator=gen) < 0.5, -m, m)
    row[at] = m[at].to(row.dtype)
    return row


def _edge_case_inputs(gen, K, P, dtype, masked):
    """Rows, weights, masks (or None) and initial num/den for the multi-client kernel edge cases.

    Every active value is finite (a non-finite num would send the tile to the client-by-client
    tracking re-run, and the multi-client result would never be seen): NaN/Inf are planted only
    where the mask is off. Planted: exact zeros and -0.0 (inactive under the non-zero rule, active
    under masks), a zero-weight client full of NaN (never read), elements where no client is active
    (num/den, including -0.0, must come back unchanged), and masks whose 32- and 64-element blocks
    are all off, all on (uint8 values other than 1) or mixed, and subnormals of the update dtype
    (exact widening of f16/bf16 subnormals; w * x rounding into the float32 subnormal range).
    """
    rows = rand_rows(gen, K, P, dtype, zero_frac=0.25)
    for r in rows:
        plant_subnormals(gen, r)
    none_active = torch.zeros(P, dtype=torch.bool)
    none_active[torch.randint(0, P, (max(1, P // 17),), generator=gen)] = True
    none_active[-1] = True  # the scalar tail too
    masks = None
    if masked:
        masks = []
        for k in range(K):
            m = (torch.rand(P, generator=gen) < (0.3 + 0.6 * k / max(1, K - 1))).to(torch.uint8)
            m *= torch.randint(1, 256, (P,), generator=gen, dtype=torch.int64).to(torch.uint8).clamp(min=1)
            blk = torch.arange(P) // 32
            m[blk % 5 == (k % 5)] = 0    # whole dead 32-element blocks, a different set per client
            m[blk % 7 == 3] = 1          # whole live blocks for every client
            m[none_active] = 0
            r = rows[k].float()
            r[(m == 0) & (torch.rand(P, generator=gen) < 0.3)] = float("nan")
            r[(m == 0) & (torch.rand(P, generator=gen) < 0.1)] = float("inf")
            rows[k] = r.to(dtype)
            masks.append(m)
    else:
        for r in rows:
            r[none_active] = 0.0
    w = rand_weights(gen, K, zero=(1,) if K > 2 else ())
    poison(rows, w)
    init_num = torch.randn(P, generator=gen)
    init_num[torch.rand(P, generator=gen) < 0.2] = -0.0
    init_den = torch.rand(P, generator=gen) * 2
    init_den[torch.rand(P, generator=gen) < 0.2] = -0.0
    init_den[torch.rand(P, generator=gen) < 0.2] = 0.0
    return rows, w, masks, init_num, init_den


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_multi_client_kernel_edges(isa, gen, dtype):
    """The multi-client kernels (avx2, avx512) at their block edges: lengths around 8/32/64-element
    blocks and a tile (16384), primes, K = 1, K beyond one group of clients (10 without masks, 5
    with), both rules, weights, accumulate (num/den kept, -0.0 included) and finalize mode."""
    cases = [(1, 1), (2, 7), (3, 8), (10, 9), (1, 31), (10, 32), (7, 33), (11, 63), (5, 65), (13, 103),
             (10, 1031), (4, 16384 + 37)]
    for K, P in cases:
        for masked in (False, True):
            rows, w, masks, init_num, init_den = _edge_case_inputs(gen, K, P, dtype, masked)
            acc = make_acc(rows, w, P, gen, mode="acc")
            acc.init_num, acc.init_den = init_num, init_den
            ref, _ = run_both("dense", acc, masks)
            assert int(ref.flags.sum()) == 0
            run_both("dense", make_acc(rows, w, P, gen), masks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_levels_agree_under_flush_denormal(gen, dtype):
    """With FTZ|DAZ set in MXCSR (torch.set_flush_denormal), every level still gives the base level's
    bits: narrow floats are widened exactly (F16C's vcvtph2ps ignores DAZ; f16 subnormals are float32
    normals) and the non-zero rule is an integer test, so a float32 subnormal stays active. (The torch
    oracle is not comparable here: its float compare reads a subnormal as zero under DAZ.) K * P is
    below one thread's share, so the call runs on this thread, the one whose MXCSR is set."""
    if len(ISAS) < 2:
        pytest.skip("one instruction-set level only")
    K, P = 7, 1031
    rows = [plant_subnormals(gen, r, frac=0.5) for r in rand_rows(gen, K, P, dtype)]
    w = rand_weights(gen, K)
    masks = [(torch.rand(P, generator=gen) < 0.6).to(torch.uint8) for _ in range(K)]
    if not torch.set_flush_denormal(True):
        pytest.skip("no FTZ/DAZ on this CPU")
    results = {}
    prev = _cpu.get_isa()
    try:
        for level in ISAS:
            _cpu.set_isa(level)
            got = []
            for m in (None, masks):
                acc = make_acc(rows, w, P, torch.Generator().manual_seed(5), mode="acc")
                cpu.dense(acc, m)
                got += [acc.acc_num, acc.acc_den]
            results[level] = got
    finally:
        torch.set_flush_denormal(False)
        _cpu.set_isa(prev)
    base = results[ISAS[0]]
    for level in ISAS[1:]:
        for a, b in zip(base, results[level]):
            assert bits_equal(a, b), level


def test_dense_isa_cap_from_environment(tmp_path):
    """FEDRAC_CPU_ISA=avx2 selects the AVX2 level (and its multi-client kernel) at start-up."""
    if "avx2" not in ISAS:
        pytest.skip("the CPU has no AVX2")
    import os
    import subprocess
    import sys

    script = tmp_path / "isa_cap.py"
    script.write_text(
        "import torch\n"
        "from fedrac_kernels.backends import Accum, cpu, torch_ref\n"
        "assert cpu._cpu.get_isa() == 'avx2', cpu._cpu.get_isa()\n"
        "g = torch.Generator().manual_seed(3)\n"
        "K, P = 10, 4099\n"
        "for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    rows = [(torch.randn(P, generator=g) * (torch.rand(P, generator=g) < 0.7)).to(dt) for _ in range(K)]\n"
        "    masks = [torch.rand(P, generator=g) < 0.6 for _ in range(K)]\n"
        "    w = torch.rand(K, generator=g) + 0.5\n"
        "    gl = torch.randn(P, generator=g)\n"
        "    for m in (None, masks):\n"
        "        outs = []\n"
        "        for be in (torch_ref, cpu):\n"
        "            a = Accum(rows=rows, weights=w, flags=torch.zeros(K, dtype=torch.int32), P=P, g=gl,\n"
        "                      out=torch.empty(P))\n"
        "            be.dense(a, m)\n"
        "            outs.append(a.out)\n"
        "        assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))\n"
        "print('ok')\n")
    env = dict(os.environ, FEDRAC_CPU_ISA="avx2", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr


def test_dense_multithreaded_equals_single_thread(gen):
    K, P = 4, 200_003
    rows = rand_rows(gen, K, P, torch.bfloat16)
    w = rand_weights(gen, K)
    acc = make_acc(rows, w, P, gen)
    outs = []
    for nt in (1, 2, 3):
        a = clone_acc(acc)
        args = cpu._accum_tuple(a, [])
        _cpu.dense(args, None, nt)
        outs.append(a.out)
    ref = clone_acc(acc)
    torch_ref.dense(ref, None)
    for o in outs:
        assert bits_equal(o, ref.out)


# ------------------------------------------------------------------------------------ structured

def make_layout():
    """Segments (offset, rows, cols, inner, out_off, in_off) covering every tile path.

    Sites: A (13 neurons), B (11), C (7), D (1831). Includes a 1-D segment, an ungated segment, a conv
    segment (inner = 9), a gated segment with short rows (cols < 64), rows longer than one tile
    (ungated cols and gated conv cols whose chunks split a column), and an in-only gated one.
    """
    A, B, C, D = 0, 13, 24, 31
    N = 31 + 1831
    spec = [
        (13, 37, 1, A, -1),      # linear: out A, input ungated
        (13, 1, 1, A, -1),       # its bias (1-D)
        (11, 13, 9, B, A),       # conv 3x3: out B, in A
        (11, 1, 1, B, -1),       # GN weight (1-D)
        (7, 11, 1, C, B),        # linear gated both sides, short rows (packed gates)
        (2, 16411, 1, -1, -1),   # ungated, rows longer than a tile (16384 elements)
        (3, 1831, 9, -1, D),     # gated conv rows longer than a tile (chunks split a column)
        (7, 3, 1, C, -1),        # short ungated rows
        (7, 301, 1, C, -1),      # long rows, out gated only
        (3, 11, 1, -1, B),       # head: in B only
        (3, 1, 1, -1, -1),       # head bias, ungated
        (1831, 1, 1, D, -1),     # long 1-D gated vector
    ]
    segs, off = [], 0
    for rows, cols, inner, oo, io in spec:
        segs.append([off, rows, cols, inner, oo, io])
        off += rows * cols * inner
    return torch.tensor(segs, dtype=torch.int64), N, off


def rand_neuron_masks(gen, K, N):
    dens = torch.linspace(0.0, 1.0, K) if K > 1 else torch.tensor([0.6])
    m = torch.rand(K, N, generator=gen) < dens[:, None]
    if K > 2:
        m[K - 1] = True
        m[1, :] = torch.arange(N) % 2 == 0
    return m


def rand_nested(gen, K, N):
    rank = torch.randperm(N, generator=gen).to(torch.int32)
    sizes = torch.randint(0, N + 1, (K,), generator=gen).to(torch.int32)
    sizes[0] = N
    if K > 1:
        sizes[1] = 0
    return rank, sizes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 6, 12])  # 12: more than one group of the multi-client kernels
def test_structured_neuron_masks(isa, gen, dtype, K):
    segs, N, P = make_layout()
    rows = rand_rows(gen, K, P, dtype, nonfinite_clients=(K - 1,))
    w = rand_weights(gen, K, zero=(2,) if K > 2 else ())
    poison(rows, w)
    nm = rand_neuron_masks(gen, K, N)
    for nonzero in (False, True):
        for mode in ("final", "acc"):
            run_both("structured", make_acc(rows, w, P, gen, mode, init=mode == "acc"), segs, N, nm, None, None, nonzero)


@pytest.mark.parametrize("dtype", DTYPES)
def test_structured_nested_form(isa, gen, dtype):
    segs, N, P = make_layout()
    K = 5
    rows = rand_rows(gen, K, P, dtype)
    w = rand_weights(gen, K)
    rank, sizes = rand_nested(gen, K, N)
    for nonzero in (False, True):
        ref, got = run_both("structured", make_acc(rows, w, P, gen), segs, N, None, rank, sizes, nonzero)
    # the nested form equals the dense neuron masks it describes
    nm = rank.to(torch.int64)[None, :] < sizes.to(torch.int64)[:, None]
    d = make_acc(rows, w, P, gen)
    a1, a2 = clone_acc(d), clone_acc(d)
    cpu.structured(a1, segs, N, None, rank, sizes, False)
    cpu.structured(a2, segs, N, nm, None, None, False)
    assert bits_equal(a1.out, a2.out)


def test_structured_without_gate_table(gen):
    """Over the gate-table budget the gates are built per tile: same result."""
    segs, N, P = make_layout()
    K = 4
    rows = rand_rows(gen, K, P, torch.float32)
    w = rand_weights(gen, K)
    nm = rand_neuron_masks(gen, K, N)
    rank, sizes = rand_nested(gen, K, N)
    prev = _cpu.set_gate_table_limit(0)
    try:
        for nonzero in (False, True):
            run_both("structured", make_acc(rows, w, P, gen), segs, N, nm, None, None, nonzero)
            run_both("structured", make_acc(rows, w, P, gen), segs, N, None, rank, sizes, nonzero)
    finally:
        _cpu.set_gate_table_limit(prev)


def test_structured_equals_dense_with_expanded_masks(gen):
    segs, N, P = make_layout()
    K = 4
    rows = rand_rows(gen, K, P, torch.bfloat16)
    w = rand_weights(gen, K)
    nm = rand_neuron_masks(gen, K, N)
    dense_masks = [torch_ref.gate_row(P, segs, nm[k]) for k in range(K)]
    acc = make_acc(rows, w, P, gen)
    a1, a2 = clone_acc(acc), clone_acc(acc)
    cpu.structured(a1, segs, N, nm, None, None, False)
    cpu.dense(a2, dense_masks)
    assert bits_equal(a1.out, a2.out)


def test_structured_mlp_shapes(gen):
    """The paper MLP (3072-200-200-10) with FedRAC-like nested masks (several threads)."""
    spec = [(200, 3072, 1, 0, -1), (200, 1, 1, 0, -1), (200, 200, 1, 200, 0), (200, 1, 1, 200, -1),
            (10, 200, 1, -1, 200), (10, 1, 1, -1, -1)]
    segs, off = [], 0
    for r, c, i, oo, io in spec:
        segs.append([off, r, c, i, oo, io])
        off += r * c * i
    segs = torch.tensor(segs)
    P, N, K = off, 400, 4
    assert P == 656_810
    rank = torch.randperm(N, generator=gen).to(torch.int32)
    sizes = torch.tensor([96, 200, 304, 400], dtype=torch.int32)
    on = rank.to(torch.int64)[None, :] < sizes.to(torch.int64)[:, None]
    rows = []
    for k in range(K):
        gate = torch_ref.gate_row(P, segs, on[k])
        rows.append(torch.randn(P, generator=gen) * gate)
    w = torch.ones(K)
    run_both("structured", make_acc(rows, w, P, gen), segs, N, None, rank, sizes, True)
    run_both("structured", make_acc(rows, w, P, gen), segs, N, on, None, None, False)


# --------------------------------------------------------------------------------------- compact

def pack_compact(segs, N, delta, kept_lists, sites, dtype, skip_segments=()):
    """Client-side packing for one client. kept_lists: per site, the kept neuron indices in local
    order. Returns (values, inv [N], seg_off [S], seg_cols [S])."""
    inv = torch.full((N,), -1, dtype=torch.int32)
    for (start, width), kept in zip(sites, kept_lists):
        inv[kept] = torch.arange(len(kept), dtype=torch.int32)
    S = segs.shape[0]
    seg_off = torch.full((S,), -1, dtype=torch.int64)
    seg_cols = torch.zeros(S, dtype=torch.int64)
    parts, pos = [], 0
    for s, (off, rows, cols, inner, oo, io) in enumerate(segs.tolist()):
        if s in skip_segments:
            continue

        def kept_of(o, n):
            if o < 0:
                return torch.arange(n)
            # the kept list of the site containing neurons [o, o + n), in local order
            for (start, width), kept in zip(sites, kept_lists):
                if start == o:
                    return kept - start
            raise AssertionError

        po, pi = kept_of(oo, rows), kept_of(io, cols)
        blk = delta[off:off + rows * cols * inner].view(rows, cols, inner)[po][:, pi]
        seg_off[s] = pos
        seg_cols[s] = len(pi)
        parts.append(blk.reshape(-1))
        pos += blk.numel()
    values = torch.cat(parts) if parts else torch.zeros(0)
    return values.to(dtype), inv, seg_off, seg_cols


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact(isa, gen, dtype):
    segs, N, P = make_layout()
    sites = [(0, 13), (13, 11), (24, 7), (31, 1831)]
    K = 5
    vals, invs, offs, cols = [], [], [], []
    w = rand_weights(gen, K, zero=(3,))
    for k in range(K):
        delta = torch.randn(P, generator=gen)
        delta[torch.rand(P, generator=gen) < 0.1] = 0.0
        if k == 2:
            delta[torch.randint(0, P, (5,), generator=gen)] = float("nan")
        kept = []
        for start, width in sites:
            if k == 0:
                idx = torch.arange(width)                               # everything
            elif k == 1:
                idx = torch.arange(width // 2)                          # HeteroFL prefix
            elif k == 4:
                r = int(torch.randint(0, width, (1,), generator=gen))   # FedRolex rolled window
                idx = torch.roll(torch.arange(width), -r)[: (2 * width) // 3]
            else:
                idx = torch.nonzero(torch.rand(width, generator=gen) < 0.5).flatten()  # scattered, sorted
            kept.append(idx + start)
        v, inv, so, sc = pack_compact(segs, N, delta, kept, sites, dtype, skip_segments=(6,) if k == 1 else ())
        vals.append(v)
        invs.append(inv)
        offs.append(so)
        cols.append(sc)
    poison(vals, w)
    inv, seg_off, seg_cols = torch.stack(invs), torch.stack(offs), torch.stack(cols)
    for mode in ("final", "acc"):
        acc = make_acc(vals, w, P, gen, mode, init=mode == "acc")
        ref, _ = run_both("compact", acc, segs, N, inv, seg_off, seg_cols)
    assert int(ref.flags[2]) == 1


def test_compact_equals_structured(gen):
    segs, N, P = make_layout()
    sites = [(0, 13), (13, 11), (24, 7), (31, 1831)]
    K = 4
    nm = rand_neuron_masks(gen, K, N)
    vals, invs, offs, cols, dense_rows = [], [], [], [], []
    for k in range(K):
        gate = torch_ref.gate_row(P, segs, nm[k])
        delta = torch.randn(P, generator=gen) * gate
        kept = [torch.nonzero(nm[k, s:s + wd]).flatten() + s for s, wd in sites]
        v, inv, so, sc = pack_compact(segs, N, delta, kept, sites, torch.float32)
        vals.append(v)
        invs.append(inv)
        offs.append(so)
        cols.append(sc)
        dense_rows.append(delta)
    w = rand_weights(gen, K)
    acc_c = make_acc(vals, w, P, gen)
    acc_s = clone_acc(acc_c)
    acc_s.rows = dense_rows
    cpu.compact(acc_c, segs, N, torch.stack(invs), torch.stack(offs), torch.stack(cols))
    cpu.structured(acc_s, segs, N, nm, None, None, False)
    assert bits_equal(acc_c.out, acc_s.out)


# ------------------------------------------------------------------------- frequency / sort / masks

FREQ_DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64]


@pytest.mark.parametrize("fdtype", FREQ_DTYPES)
def test_frequency_update(gen, fdtype):
    for K, N in ((1, 1), (10, 400), (37, 1031), (3, 70_001)):
        base = torch.randint(0, 1 << 20, (N,), generator=gen).to(fdtype)
        if fdtype == torch.float32:
            base = base * 33.3 + 16_777_216.0  # counts land on rounded sums
        masks = torch.rand(K, N, generator=gen) < 0.4
        f_ref, f_cpu = base.clone(), base.clone()
        torch_ref.frequency_update(f_ref, masks, None, None)
        cpu.frequency_update(f_cpu, masks, None, None)
        assert torch.equal(f_ref, f_cpu)
        rank = torch.randperm(N, generator=gen).to(torch.int32)
        sizes = torch.randint(0, N + 1, (K,), generator=gen).to(torch.int32)
        f_ref, f_cpu = base.clone(), base.clone()
        torch_ref.frequency_update(f_ref, None, rank, sizes)
        cpu.frequency_update(f_cpu, None, rank, sizes)
        assert torch.equal(f_ref, f_cpu)


def _check_sort(keys):
    got = cpu.stable_argsort(keys)
    ref = torch_ref.stable_argsort(keys)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref)


@pytest.mark.parametrize("kdtype", FREQ_DTYPES)
def test_stable_argsort_ties(gen, kdtype):
    for N in (1, 2, 400, 1024, 4099):
        _check_sort(torch.randint(0, 6, (N,), generator=gen).to(kdtype))  # heavy ties
        _check_sort(torch.zeros(N, dtype=kdtype))                          # all equal (round 2 of FedRAC)
    _check_sort(torch.randint(-50, 50, (10_007,), generator=gen).to(kdtype))


def test_stable_argsort_signed_zeros_and_extremes(gen):
    z = torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, -1.0, float("inf"), -float("inf"), 1e-45, -1e-45, -0.0])
    for dt in (torch.float32, torch.float64):
        k = z.to(dt)
        _check_sort(k)
        _check_sort(k.repeat(300)[torch.randperm(3300, generator=gen)])
    i64 = torch.tensor([2**63 - 1, -(2**63), 0, -1, 1, 2**63 - 1, -(2**63)], dtype=torch.int64)
    _check_sort(i64)
    i32 = torch.tensor([2**31 - 1, -(2**31), 0, -1, 1, -(2**31)], dtype=torch.int32)
    _check_sort(i32)


@pytest.mark.parametrize("kdtype", FREQ_DTYPES)
def test_stable_argsort_large(gen, kdtype):
    N = 100_000
    if kdtype.is_floating_point:
        keys = torch.randn(N, generator=gen, dtype=torch.float64).to(kdtype)
        keys[torch.rand(N, generator=gen) < 0.1] = 0.0
        keys[torch.rand(N, generator=gen) < 0.05] = -0.0
    else:
        hi = 2**31 - 1 if kdtype == torch.int32 else 2**62
        keys = torch.randint(-hi, hi, (N,), generator=gen, dtype=torch.int64).to(kdtype)
        keys[::7] = keys[3]
    _check_sort(keys)
    _check_sort(torch.randint(0, 3000, (N,), generator=gen).to(kdtype))  # frequency-table-like


def test_stable_argsort_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        cpu.stable_argsort(torch.tensor([1.0, float("nan"), 0.0]))


def test_nested_masks(gen):
    for S, N in ((1, 1), (50, 400), (7, 1031), (3, 40_009)):
        order = torch.randperm(N, generator=gen)
        sizes = torch.randint(0, N + 1, (S,), generator=gen)
        sizes[0] = 0
        sizes[-1] = N
        got = cpu.nested_masks(order, sizes)
        assert got.dtype == torch.bool
        assert torch.equal(got, torch_ref.nested_masks(order, sizes))


def test_nested_masks_rejects_non_permutation():
    with pytest.raises(ValueError, match="permutation"):
        cpu.nested_masks(torch.tensor([0, 1, 1]), torch.tensor([2]))


# ------------------------------------------------------------------------------------ bad inputs

def test_bad_segments_raise_before_writing(gen):
    segs, N, P = make_layout()
    bad = segs.clone()
    bad[3, 0] += 1  # a gap in the tiling
    rows = rand_rows(gen, 2, P, torch.float32)
    acc = make_acc(rows, torch.ones(2), P, gen)
    before = acc.out.clone()
    with pytest.raises(ValueError, match="tile"):
        cpu.structured(acc, bad, N, torch.ones(2, N, dtype=torch.bool), None, None, False)
    assert bits_equal(acc.out, before)
    with pytest.raises(ValueError, match="exactly one"):
        cpu.structured(acc, segs, N, None, None, None, False)
