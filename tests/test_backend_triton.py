"""Triton back end vs the torch_ref oracle, bit for bit.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); with a GPU they run compiled on CUDA tensors.
Sizes are kept small (P*K <~ 2e4 per call) because the interpreter is slow.
"""
import os
import subprocess
import sys

import pytest
import torch

from fedrac_kernels.backends import Accum
from fedrac_kernels.backends import torch_ref as ref
from fedrac_kernels.backends import triton_backend as tb

OK, WHY = tb.available("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not OK, reason=f"triton back end unavailable: {WHY}")

if OK:
    from fedrac_kernels.backends._triton import aggregate as agg

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
UPDATE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def bits(x: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float32 tensor (torch.equal treats NaN != NaN; bits compare exactly)."""
    return x.contiguous().view(torch.int32)


def make_rows(gen, K, P, dtype, *, zero_frac=0.25, plant_nonfinite=True):
    """K update rows with planted exact zeros and (optionally) NaN / +-Inf in a few clients."""
    rows = []
    for k in range(K):
        v = torch.randn(P, generator=gen) * (0.5 + k)
        v[torch.rand(P, generator=gen) < zero_frac] = 0.0
        if plant_nonfinite and K > 1 and k in (1, 3):
            idx = torch.randint(0, P, (3,), generator=gen)
            v[idx[0]] = float("nan")
            v[idx[1]] = float("inf")
            v[idx[2]] = -float("inf")
        rows.append(v.to(dtype).to(DEV))
    return rows


def make_weights(gen, K, *, zero_client=None):
    w = torch.rand(K, generator=gen) + 0.1
    if zero_client is not None:
        w[zero_client] = 0.0
    return w.to(DEV)


class Case:
    """Builds fresh, identical Accum objects for the oracle and the Triton back end."""

    def __init__(self, gen, rows, weights, P, *, finalize=True, init=False, alias_out=False):
        self.rows, self.weights, self.P = rows, weights, P
        self.finalize, self.alias_out = finalize, alias_out
        self.g = (torch.randn(P, generator=gen)).to(DEV)
        self.init = None
        if init:
            num = torch.randn(P, generator=gen)
            den = (torch.rand(P, generator=gen) < 0.5).float() * torch.rand(P, generator=gen)
            self.init = (num.to(DEV), den.to(DEV))

    def accum(self):
        P, K = self.P, len(self.rows)
        a = Accum(rows=self.rows, weights=self.weights,
                  flags=torch.zeros(K, dtype=torch.int32, device=DEV), P=P)
        if self.finalize:
            a.g = self.g.clone()
            a.out = a.g if self.alias_out else torch.empty(P, device=DEV)
        else:
            a.acc_num = torch.empty(P, device=DEV)
            a.acc_den = torch.empty(P, device=DEV)
        if self.init is not None:
            a.init_num, a.init_den = self.init[0].clone(), self.init[1].clone()
            if not self.finalize:  # accumulate in place, as the streaming aggregator does
                a.acc_num, a.acc_den = a.init_num, a.init_den
        return a

    def check(self, got: Accum, want: Accum):
        assert torch.equal(got.flags, want.flags), (got.flags.tolist(), want.flags.tolist())
        if self.finalize:
            assert torch.equal(bits(got.out), bits(want.out))
        else:
            assert torch.equal(bits(got.acc_num), bits(want.acc_num))
            assert torch.equal(bits(got.acc_den), bits(want.acc_den))


def run_both(case, op, *args, **kw):
    want, got = case.accum(), case.accum()
    getattr(ref, op)(want, *args)
    fn = kw.pop("fn", None) or getattr(tb, op)
    fn(got, *args, **kw)
    case.check(got, want)
    return got, want


# A small "model": conv-like segment (inner > 1), 1-D bias segments, a linear layer gated on both
# dims and an output layer gated on its input only. Neuron sites: A (conv channels, 0..5),
# B (hidden units, 6..13). Segment rows: (offset, rows, cols, inner, out_off, in_off).
SITES = {"A": (0, 6), "B": (6, 8)}
N_NEURONS = 14
_SHAPES = [  # (rows, cols, inner, out_off, in_off)
    (6, 3, 9, 0, -1),     # conv weight [6, 3, 3, 3]: out channels gated by A, input ungated
    (6, 1, 1, 0, -1),     # conv bias
    (8, 6, 5, 6, 0),      # "conv -> hidden" weight viewed [8, 6, 5]: out B, in A
    (8, 1, 1, 6, -1),     # hidden bias
    (7, 8, 1, -1, 6),     # output weight [7, 8]: rows ungated, in B
    (7, 1, 1, -1, -1),    # output bias: ungated
]


def segment_table(scale_inner=1):
    segs, off = [], 0
    for rows, cols, inner, oo, io in _SHAPES:
        inner = inner * scale_inner if inner > 1 else inner
        segs.append((off, rows, cols, inner, oo, io))
        off += rows * cols * inner
    return torch.tensor(segs, dtype=torch.int64, device=DEV), off


def group_of(n):
    for start, width in SITES.values():
        if start <= n < start + width:
            return start, width
    raise AssertionError(n)


def random_neuron_masks(gen, K):
    m = torch.rand(K, N_NEURONS, generator=gen) < 0.6
    m[0] = True  # one full client
    if K > 2:
        m[2, 6:] = False  # a client holding no hidden unit: skipped rows on B-gated segments
    return m.to(DEV)


def nested_form(gen, K):
    """(rank int32 [N], sizes int32 [K], dense bool [K, N]): nested masks over a joint order."""
    order = torch.randperm(N_NEURONS, generator=gen)
    rank = torch.empty(N_NEURONS, dtype=torch.int64)
    rank[order] = torch.arange(N_NEURONS)
    sizes = torch.randint(0, N_NEURONS + 1, (K,), generator=gen)
    sizes[0] = N_NEURONS
    if K > 1:
        sizes[1] = 0
    dense = rank[None, :] < sizes[:, None]
    return rank.to(torch.int32).to(DEV), sizes.to(torch.int32).to(DEV), dense.to(DEV)


# --------------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------------

def test_available_reports_mode():
    ok, why = tb.available()
    assert ok and "triton" in why
    if tb.interpreted():
        ok, why = tb.available("cuda")
        assert not ok and "CPU tensors" in why


def test_import_without_triton_reports_instead_of_raising():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from fedrac_kernels.backends import triton_backend as tb, backend_status\n"
            "ok, why = tb.available(); assert not ok and 'triton is not importable' in why, why\n"
            "assert backend_status('triton') == (ok, why)\n"
            "try:\n    tb.stable_argsort(None)\n"
            "except RuntimeError as e:\n    print('raised', e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised triton back end unavailable" in proc.stdout


# --------------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", UPDATE_DTYPES)
@pytest.mark.parametrize("with_masks", [False, True])
def test_dense_matches_oracle(gen, dtype, with_masks):
    K, P = 6, 2053  # prime P: not a multiple of BLOCK
    rows = make_rows(gen, K, P, dtype)
    rows[4] = torch.full((P,), float("nan"), dtype=dtype, device=DEV)  # dropped client: never read
    w = make_weights(gen, K, zero_client=4)
    masks = [(torch.rand(P, generator=gen) < 0.7).to(DEV) for _ in range(K)] if with_masks else None
    if with_masks:
        masks[2][:] = False  # a client active nowhere
    case = Case(gen, rows, w, P)
    got, _ = run_both(case, "dense", masks)
    assert got.flags[4] == 0 and got.flags[1] == 1 and got.flags[3] == 1


@pytest.mark.parametrize("finalize,init,alias", [(True, False, True), (True, True, False),
                                                  (False, False, False), (False, True, False)])
def test_dense_modes(gen, finalize, init, alias):
    K, P = 3, 1031
    rows = make_rows(gen, K, P, torch.float32, plant_nonfinite=False)
    case = Case(gen, rows, make_weights(gen, K), P, finalize=finalize, init=init, alias_out=alias)
    run_both(case, "dense", None)


def test_dense_single_client_and_small_block(gen):
    P = 257
    rows = make_rows(gen, 1, P, torch.bfloat16)
    case = Case(gen, rows, make_weights(gen, 1), P)
    run_both(case, "dense", None)
    rows = make_rows(gen, 4, P, torch.float16)
    case = Case(gen, rows, make_weights(gen, 4), P)
    run_both(case, "dense", None, fn=lambda a, m: agg.dense(a, m, block=64, num_warps=2))


def test_accumulate_then_finalize_equals_one_shot(gen):
    K, P = 5, 1499
    rows = make_rows(gen, K, P, torch.bfloat16)
    w = make_weights(gen, K, zero_client=2)
    g = torch.randn(P, generator=gen).to(DEV)
    one = Accum(rows=rows, weights=w, flags=torch.zeros(K, dtype=torch.int32, device=DEV), P=P,
                out=torch.empty(P, device=DEV), g=g)
    tb.dense(one, None)
    num = torch.zeros(P, device=DEV)
    den = torch.zeros(P, device=DEV)
    flags = []
    for lo, hi in ((0, 2), (2, 3)):
        a = Accum(rows=rows[lo:hi], weights=w[lo:hi].contiguous(),
                  flags=torch.zeros(hi - lo, dtype=torch.int32, device=DEV), P=P,
                  init_num=num, init_den=den, acc_num=num, acc_den=den)
        tb.dense(a, None)
        flags.append(a.flags)
    fin = Accum(rows=rows[3:], weights=w[3:].contiguous(),
                flags=torch.zeros(K - 3, dtype=torch.int32, device=DEV), P=P,
                out=torch.empty(P, device=DEV), g=g, init_num=num, init_den=den)
    tb.dense(fin, None)
    flags.append(fin.flags)
    assert torch.equal(bits(fin.out), bits(one.out))
    assert torch.equal(torch.cat(flags), one.flags)


def test_dense_rows_as_views_of_one_buffer(gen):
    K, P = 4, 701
    buf = torch.randn(K, P, generator=gen).to(DEV)
    buf[buf.abs() < 0.3] = 0
    case = Case(gen, list(buf.unbind(0)), make_weights(gen, K), P)
    run_both(case, "dense", None)


# --------------------------------------------------------------------------------------------
# structured
# --------------------------------------------------------------------------------------------

STRUCTURED_CASES = [  # (dtype, form, rule, also with small tiles)
    (torch.float32, "masks", "structural", True),
    (torch.float32, "masks", "nonzero", False),
    (torch.float32, "nested", "structural", False),
    (torch.float32, "nested", "nonzero", True),
    (torch.bfloat16, "nested", "nonzero", False),
    (torch.float16, "masks", "structural", False),
]


@pytest.mark.parametrize("dtype,form,rule,small_tiles", STRUCTURED_CASES)
def test_structured_matches_oracle(gen, dtype, form, rule, small_tiles):
    segs, P = segment_table()
    K = 5
    rows = make_rows(gen, K, P, dtype)
    rows[3] = torch.full((P,), float("nan"), dtype=dtype, device=DEV)
    w = make_weights(gen, K, zero_client=3)
    if form == "masks":
        nm, rank, sizes = random_neuron_masks(gen, K), None, None
    else:
        nm, (rank, sizes, _) = None, nested_form(gen, K)
    case = Case(gen, rows, w, P)
    args = (segs, N_NEURONS, nm, rank, sizes, rule == "nonzero")
    got, _ = run_both(case, "structured", *args)
    assert got.flags[3] == 0
    if small_tiles:  # several tiles per segment, tiles ending inside rows, surplus programs
        run_both(case, "structured", *args,
                 fn=lambda a, *x: agg.structured(a, *x, block=64, num_warps=2))


def test_structured_nested_equals_dense_masks_and_modes(gen):
    segs, P = segment_table(scale_inner=3)
    K = 4
    rows = make_rows(gen, K, P, torch.float32)
    rank, sizes, dense = nested_form(gen, K)
    w = make_weights(gen, K)
    for finalize, init in ((True, True), (False, False)):
        case = Case(gen, rows, w, P, finalize=finalize, init=init)
        a, b = case.accum(), case.accum()
        tb.structured(a, segs, N_NEURONS, None, rank, sizes, False)
        tb.structured(b, segs, N_NEURONS, dense, None, None, False)
        case.check(a, b)
        run_both(case, "structured", segs, N_NEURONS, None, rank, sizes, True)


# --------------------------------------------------------------------------------------------
# compact
# --------------------------------------------------------------------------------------------

def compact_inputs(gen, K, dtype, *, rotate):
    """Kept lists per client and site (sorted, or rolled windows as FedRolex), the inv/seg_off/
    seg_cols tables and each client's compact values."""
    segs, P = segment_table()
    inv = torch.full((K, N_NEURONS), -1, dtype=torch.int32)
    for k in range(K):
        for start, width in SITES.values():
            n_keep = width if k == 0 else int(torch.randint(0, width + 1, (1,), generator=gen))
            if rotate:
                shift = int(torch.randint(0, width, (1,), generator=gen))
                kept = [(shift + j) % width for j in range(n_keep)]  # rolled window, local order
            else:
                kept = sorted(torch.randperm(width, generator=gen)[:n_keep].tolist())
            for pos, n in enumerate(kept):
                inv[k, start + n] = pos
    seg_off = torch.full((K, len(_SHAPES)), -1, dtype=torch.int64)
    seg_cols = torch.zeros((K, len(_SHAPES)), dtype=torch.int64)
    values = []
    for k in range(K):
        total = 0
        for s, (off, rows, cols, inner, oo, io) in enumerate(segs.tolist()):
            nr = int((inv[k, oo:oo + rows] >= 0).sum()) if oo >= 0 else rows
            nc = int((inv[k, io:io + cols] >= 0).sum()) if io >= 0 else cols
            seg_cols[k, s] = nc
            if nr * nc == 0 and k % 2 == 0:
                continue  # sends nothing for this segment
            seg_off[k, s] = total
            total += nr * nc * inner
        v = torch.randn(total, generator=gen)
        v[torch.rand(total, generator=gen) < 0.2] = 0.0  # structural rule: zeros still count
        if k == 1 and total:
            v[torch.randint(0, total, (1,), generator=gen)] = float("nan")
        values.append(v.to(dtype).to(DEV))
    return segs, P, values, inv.to(DEV), seg_off.to(DEV), seg_cols.to(DEV)


COMPACT_CASES = [  # (dtype, rotated kept lists, also with small tiles and accumulate mode)
    (torch.float32, False, False),
    (torch.float32, True, True),
    (torch.bfloat16, True, False),
    (torch.float16, False, False),
]


@pytest.mark.parametrize("dtype,rotate,extra", COMPACT_CASES)
def test_compact_matches_oracle(gen, dtype, rotate, extra):
    K = 5
    segs, P, values, inv, seg_off, seg_cols = compact_inputs(gen, K, dtype, rotate=rotate)
    values[3] = torch.full_like(values[3], float("nan"))
    w = make_weights(gen, K, zero_client=3)
    case = Case(gen, values, w, P)
    args = (segs, N_NEURONS, inv, seg_off, seg_cols)
    got, _ = run_both(case, "compact", *args)
    assert got.flags[3] == 0
    if extra:
        run_both(case, "compact", *args,
                 fn=lambda a, *x: agg.compact(a, *x, block=64, num_warps=2))
        run_both(Case(gen, values, w, P, finalize=False, init=True), "compact", *args)


def test_compact_equals_dense_on_scattered_deltas(gen):
    """Compact gather == dense masked mean over the scattered values (the compact contract)."""
    K = 4
    segs, P, values, inv, seg_off, seg_cols = compact_inputs(gen, K, torch.float32, rotate=True)
    scattered = [ref.compact_to_dense(P, segs, values[k], inv[k], seg_off[k], seg_cols[k])
                 for k in range(K)]
    w = make_weights(gen, K)
    case = Case(gen, values, w, P)
    a = case.accum()
    tb.compact(a, segs, N_NEURONS, inv, seg_off, seg_cols)
    b = Accum(rows=[v for v, _ in scattered], weights=w,
              flags=torch.zeros(K, dtype=torch.int32, device=DEV), P=P,
              out=torch.empty(P, device=DEV), g=case.g.clone())
    tb.dense(b, [m for _, m in scattered])
    assert torch.equal(bits(a.out), bits(b.out))
    assert torch.equal(a.flags, b.flags)


# --------------------------------------------------------------------------------------------
# frequency update
# --------------------------------------------------------------------------------------------

FREQ_DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64]


@pytest.mark.parametrize("dtype", FREQ_DTYPES)
def test_frequency_update(gen, dtype):
    K, N = 7, 1297
    base = torch.randint(0, 50, (N,), generator=gen)
    masks = (torch.rand(K, N, generator=gen) < 0.4).to(DEV)
    order = torch.randperm(N, generator=gen)
    rank = torch.empty(N, dtype=torch.int64)
    rank[order] = torch.arange(N)
    sizes = torch.randint(0, N + 1, (K,), generator=gen)
    sizes[0], sizes[1] = 0, N
    rank, sizes = rank.to(torch.int32).to(DEV), sizes.to(torch.int32).to(DEV)
    for m, r, s in ((masks, None, None), (None, rank, sizes)):
        want = base.to(dtype).to(DEV) + (0.5 if dtype.is_floating_point else 0)
        got = want.clone()
        ref.frequency_update(want, m, r, s)
        tb.frequency_update(got, m, r, s)
        assert torch.equal(got, want)


def test_frequency_nested_large_scan(gen):
    """N + 1 > 4 scan blocks: exercises the three-phase scan."""
    K, N = 300, 9001
    order = torch.randperm(N, generator=gen)
    rank = torch.empty(N, dtype=torch.int64)
    rank[order] = torch.arange(N)
    sizes = torch.randint(0, N + 1, (K,), generator=gen)
    rank, sizes = rank.to(torch.int32).to(DEV), sizes.to(torch.int32).to(DEV)
    want = torch.zeros(N, dtype=torch.int64, device=DEV)
    got = want.clone()
    ref.frequency_update(want, None, rank, sizes)
    tb.frequency_update(got, None, rank, sizes)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# stable argsort
# --------------------------------------------------------------------------------------------

def tie_heavy_keys(gen, N, dtype):
    if dtype.is_floating_point:
        k = torch.randint(-6, 7, (N,), generator=gen).to(dtype) * 0.25
        k[torch.rand(N, generator=gen) < 0.1] = -0.0  # -0.0 ties with +0.0
        k[torch.rand(N, generator=gen) < 0.02] = float("inf")
        k[torch.rand(N, generator=gen) < 0.02] = -float("inf")
        if dtype == torch.float64:  # keys differing only in the low 32 bits of the pattern
            k[::7] = 1.0 + torch.randint(0, 3, (len(k[::7]),), generator=gen).double() * 2.0**-50
    else:
        info = torch.iinfo(dtype)
        k = torch.randint(-5, 6, (N,), generator=gen).to(dtype)
        k[::11] = info.max
        k[::13] = info.min
        if dtype == torch.int64:
            k[::5] = torch.randint(-3, 3, (len(k[::5]),), generator=gen) * 2**40 + 7
    return k.to(DEV)


def python_stable_order(keys):
    vals = keys.cpu().tolist()
    return sorted(range(len(vals)), key=lambda i: (vals[i], i))


@pytest.mark.parametrize("dtype", FREQ_DTYPES)
def test_argsort_small(gen, dtype):
    for N in (1, 2, 17, 400, 1100):
        keys = tie_heavy_keys(gen, N, dtype)
        got = tb.stable_argsort(keys)
        assert got.dtype == torch.int64
        assert torch.equal(got, ref.stable_argsort(keys))
        assert got.tolist() == python_stable_order(keys)


@pytest.mark.parametrize("dtype", FREQ_DTYPES)
def test_argsort_radix_multipass(gen, dtype):
    N = 1499  # 6 tiles of 256, the last one partial
    keys = tie_heavy_keys(gen, N, dtype)
    got = tb.stable_argsort(keys, small_n=0, tile=256)
    assert torch.equal(got, ref.stable_argsort(keys))
    assert got.tolist() == python_stable_order(keys)


def test_argsort_radix_all_equal_and_frequency_like(gen):
    keys = torch.zeros(3000, dtype=torch.float32, device=DEV)  # no digit differs: no pass
    assert torch.equal(tb.stable_argsort(keys, small_n=0, tile=512), torch.arange(3000, device=DEV))
    keys = torch.randint(0, 4, (1500,), generator=gen).to(torch.int64).to(DEV)  # one digit pass
    assert torch.equal(tb.stable_argsort(keys, small_n=0, tile=256), ref.stable_argsort(keys))
    keys = torch.randint(0, 60, (1500,), generator=gen).float().to(DEV)  # frequency-like
    assert torch.equal(tb.stable_argsort(keys, small_n=0, tile=256), ref.stable_argsort(keys))


# --------------------------------------------------------------------------------------------
# nested masks
# --------------------------------------------------------------------------------------------

def test_nested_masks(gen):
    N, S = 1037, 9
    order = torch.randperm(N, generator=gen).to(DEV)
    sizes = torch.randint(0, N + 1, (S,), generator=gen)
    sizes[0], sizes[1] = 0, N
    sizes = sizes.to(DEV)
    got = tb.nested_masks(order, sizes)
    assert got.dtype == torch.bool and got.shape == (S, N)
    assert torch.equal(got, ref.nested_masks(order, sizes))
