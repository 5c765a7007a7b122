"""The public ops of fedrac_kernels over every available back end, against the torch oracle.

Aggregation results must equal the ``torch`` back end bit for bit (torch.equal): all back ends
follow one accumulation order without FMA. Inputs are fresh random tensors with planted exact
zeros, odd (prime) sizes, K = 1, elements no client touches, zero weights and every update dtype.
Each op also has a tiny example (3 clients, 4 parameters) computed by hand, which checks the oracle
itself.
"""
from __future__ import annotations

import doctest
import os
import warnings

import pytest
import torch

import fedrac_kernels as fk
from fedrac_kernels import _dispatch
from fedrac_kernels.layout import NestedMasks, NeuronLayout

HAS_CUDA = torch.cuda.is_available()
BACKENDS = fk.available_backends()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FREQ_DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64]


def dev_of(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


def small(backend: str) -> bool:
    """The Triton interpreter is slow: keep its cases at P*K <~ 2e4."""
    return backend == "triton" and not HAS_CUDA


def interpreter_subset(backend: str, keep: bool) -> None:
    """Run only a representative subset of a parametrized matrix under the Triton interpreter
    (the full matrix runs on GPUs, and tests/test_backend_triton.py covers the kernels)."""
    if small(backend) and not keep:
        pytest.skip("reduced matrix under the Triton interpreter")


# ------------------------------------------------------------------------------------- fixtures
def mlp_layout() -> NeuronLayout:
    """12-7-5-3 MLP, hidden sites h1 (7) and h2 (5): P = 149, N = 12."""
    return NeuronLayout([("h1", 7), ("h2", 5)], [
        ("fc1.weight", (7, 12), "h1", None), ("fc1.bias", (7,), "h1", None),
        ("fc2.weight", (5, 7), "h2", "h1"), ("fc2.bias", (5,), "h2", None),
        ("fc3.weight", (3, 5), None, "h2"), ("fc3.bias", (3,), None, None)])


def conv_layout() -> NeuronLayout:
    """conv(3->6, 3x3) + GroupNorm(6) + conv(6->4, 3x3) + fc(4->5); sites c1 (6), c2 (4): P = 425."""
    return NeuronLayout([("c1", 6), ("c2", 4)], [
        ("conv1.weight", (6, 3, 3, 3), "c1", None), ("conv1.bias", (6,), "c1", None),
        ("gn.weight", (6,), "c1", None), ("gn.bias", (6,), "c1", None),
        ("conv2.weight", (4, 6, 3, 3), "c2", "c1"), ("conv2.bias", (4,), "c2", None),
        ("fc.weight", (5, 4), None, "c2"), ("fc.bias", (5,), None, None)])


LAYOUTS = {"mlp": mlp_layout, "conv": conv_layout}


def rand_deltas(gen, K, P, dtype=torch.float32, zero_frac=0.25, dead_cols=()):
    """[K, P] N(0, 1) with planted exact zeros (and -0.0); columns in dead_cols zero for all k."""
    d = torch.randn(K, P, generator=gen)
    d[torch.rand(K, P, generator=gen) < zero_frac] = 0.0
    d[torch.rand(K, P, generator=gen) < 0.02] = -0.0
    if len(dead_cols):
        d[:, list(dead_cols)] = 0.0
    return d.to(dtype)


def rand_weights(gen, K, zeros=True):
    w = torch.rand(K, generator=gen) * 2 + 0.1
    if zeros and K > 1:
        w[torch.randperm(K, generator=gen)[: K // 3]] = 0.0
    return w


def rand_neuron_masks(gen, K, N, dead=1):
    m = torch.rand(K, N, generator=gen) < 0.6
    if dead:
        m[:, torch.randperm(N, generator=gen)[:dead]] = False
    return m


def rand_nested(gen, K, N):
    order = torch.randperm(N, generator=gen)
    sizes = torch.randint(0, N + 1, (K,), generator=gen)
    return NestedMasks(order, sizes)


def rolled_kept(gen, layout, K):
    """FedRolex-like kept lists: per site a window of a random width starting at a rolled offset."""
    kept = []
    for _ in range(K):
        idx = []
        for s in layout.sites:
            n = int(torch.randint(0, s.width + 1, (1,), generator=gen))
            r = int(torch.randint(0, s.width, (1,), generator=gen))
            idx.append((r + torch.arange(n)) % s.width + s.offset)
        kept.append(torch.cat(idx).to(torch.int64))
    return kept


def kept_to_bool(kept, N):
    m = torch.zeros(len(kept), N, dtype=torch.bool)
    for k, idx in enumerate(kept):
        m[k, idx] = True
    return m


def oracle_dense(g, deltas, weights, masks):
    """Masked mean in the torch back end (the definition), on CPU."""
    out = g.detach().cpu().clone()
    fk.masked_mean_update_(out, deltas.cpu(), weights=None if weights is None else weights.cpu(),
                           masks=None if masks is None else masks.cpu(), backend="torch")
    return out


def rows_on(d, dev):
    return [r.contiguous() for r in d.to(dev).unbind(0)]


# ------------------------------------------------------------------------- hand-computed examples
D3 = torch.tensor([[1.0, 0.0, 2.0, 0.0],
                   [3.0, 0.0, 0.0, 0.0],
                   [2.0, 4.0, 0.0, 0.0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_dense_nonzero_rule(backend):
    dev = dev_of(backend)
    g = torch.tensor([10.0, 20.0, 30.0, 40.0], device=dev)
    fk.masked_mean_update_(g, D3.to(dev), backend=backend)
    # p0: (1+3+2)/3 = 2; p1: 4/1; p2: 2/1; p3: no client changed it
    assert torch.equal(g.cpu(), torch.tensor([12.0, 24.0, 32.0, 40.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_dense_weights_and_masks(backend):
    dev = dev_of(backend)
    g = torch.zeros(4, device=dev)
    masks = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool, device=dev)
    fk.masked_mean_update_(g, D3.to(dev), weights=[1.0, 3.0, 2.0], masks=masks, backend=backend)
    # p0: (1*1 + 3*3)/(1+3) = 2.5; p1: (1*0 + 2*4)/(1+2) = 8/3; p2: (2*0)/2 = 0 (active, zero); p3: none
    assert torch.equal(g.cpu(), torch.tensor([2.5, 8.0 / 3.0, 0.0, 0.0], dtype=torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_structured(backend):
    dev = dev_of(backend)
    # 1-2-1 MLP without biases: W1 [2, 1] rows gated by h, W2 [1, 2] columns gated by h; P = 4
    lay = NeuronLayout([("h", 2)], [("W1", (2, 1), "h", None), ("W2", (1, 2), None, "h")])
    d = torch.tensor([[1.0, 5.0, 1.0, 5.0],
                      [3.0, 0.0, 3.0, 2.0],
                      [0.0, 4.0, 0.0, 4.0]], device=dev)
    on = torch.tensor([[True, False], [True, True], [False, True]], device=dev)
    g = torch.zeros(4, device=dev)
    fk.structured_mean_update_(g, d, lay, on, backend=backend)
    # structural: p0 = (1+3)/2, p1 = (0+4)/2 (client 1's zero counts), p2 = (1+3)/2, p3 = (2+4)/2
    assert torch.equal(g.cpu(), torch.tensor([2.0, 2.0, 2.0, 3.0]))
    g = torch.zeros(4, device=dev)
    fk.structured_mean_update_(g, d, lay, on, rule="nonzero", backend=backend)
    # non-zero: p1 = 4/1 (client 1's zero does not count)
    assert torch.equal(g.cpu(), torch.tensor([2.0, 4.0, 2.0, 3.0]))
    g = torch.zeros(4, device=dev)
    fk.structured_mean_update_(g, d, lay, NestedMasks([0, 1], [1, 2, 0]), backend=backend)
    # nested: client 0 holds {0}, client 1 both, client 2 none: p0 = 2, p1 = 0/1, p2 = 2, p3 = 2/1
    assert torch.equal(g.cpu(), torch.tensor([2.0, 0.0, 2.0, 2.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_compact(backend):
    dev = dev_of(backend)
    lay = NeuronLayout([("h", 2)], [("W1", (2, 1), "h", None), ("W2", (1, 2), None, "h")])
    ups = [torch.tensor([1.0, 1.0], device=dev), torch.tensor([3.0, 2.0, 3.0, 2.0], device=dev),
           torch.tensor([4.0, 0.0], device=dev)]
    g = torch.zeros(4, device=dev)
    fk.compact_mean_update_(g, ups, lay, [[0], [0, 1], [1]], weights=[1.0, 1.0, 2.0], backend=backend)
    # p0 = (1+3)/2, p1 = (2 + 2*4)/3, p2 = (1+3)/2, p3 = (2 + 2*0)/3 (a sent zero counts)
    assert torch.equal(g.cpu(), torch.tensor([2.0, 10.0 / 3.0, 2.0, 2.0 / 3.0], dtype=torch.float32))
    # compact_pack produces exactly these uploads from dense rows
    dense = torch.tensor([[1.0, 9.0, 1.0, 9.0], [3.0, 2.0, 3.0, 2.0], [9.0, 4.0, 9.0, 0.0]], device=dev)
    packed = fk.compact_pack(dense, lay, [[0], [0, 1], [1]])
    for p, u in zip(packed, ups):
        assert torch.equal(p, u)
    # rolled order: keeping [1, 0] sends W1 rows (1, 0) and W2 columns (1, 0)
    assert fk.compact_pack(dense[1], lay, [1, 0]).tolist() == [2.0, 3.0, 2.0, 3.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_frequency_order_nested(backend):
    dev = dev_of(backend)
    f = torch.zeros(4, dtype=torch.int64, device=dev)
    m = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool, device=dev)
    fk.frequency_update_(f, m, backend=backend)
    assert f.tolist() == [3, 1, 1, 0]
    fk.frequency_update_(f, order=torch.tensor([3, 1, 0, 2], device=dev), sizes=[2, 1, 0], backend=backend)
    assert f.tolist() == [3, 2, 1, 2]  # clients hold {3, 1}, {3}, {}
    assert fk.lowest_frequency_order(f, backend=backend).tolist() == [2, 1, 3, 0]
    assert fk.lowest_frequency_order(torch.tensor([2.0, 0.0, 1.0, -0.0], device=dev), backend=backend).tolist() == [1, 3, 2, 0]
    nm = fk.nested_masks(torch.tensor([2, 0, 1, 3], device=dev), torch.tensor([0, 1, 4], device=dev), backend=backend)
    assert nm.cpu().tolist() == [[False] * 4, [False, False, True, False], [True] * 4]


def test_docstring_examples():
    import fedrac_kernels.api as api
    import fedrac_kernels.layout as layout
    import fedrac_kernels.streaming as streaming

    glb = {"torch": torch, **{n: getattr(fk, n) for n in fk.__all__}}
    for mod in (api, layout, streaming):
        res = doctest.testmod(mod, extraglobs=glb, verbose=False)
        assert res.failed == 0, f"{mod.__name__}: {res.failed} docstring example(s) failed"


def test_oracle_matches_float64_formula(gen):
    K, P = 5, 997
    d = rand_deltas(gen, K, P)
    w = rand_weights(gen, K)
    m = torch.rand(K, P, generator=gen) < 0.7
    for masks in (None, m):
        a = (d != 0) if masks is None else masks
        num = (w[:, None].double() * a.double() * d.double()).sum(0)
        den = (w[:, None].double() * a.double()).sum(0)
        g0 = torch.randn(P, generator=gen)
        want = torch.where(den > 0, g0.double() + num / den.clamp_min(1e-300), g0.double())
        got = oracle_dense(g0, d, w, masks)
        err = (got.double() - want).abs()
        assert bool((err <= 1e-5 * (1 + want.abs())).all()), float(err.max())


# ----------------------------------------------------------------------- dense, every back end
def _dense_cases(backend):
    if small(backend):
        return [(3, 257)]
    return [(1, 97), (2, 1), (4, 1021), (7, 4099), (13, 2053)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_masks", [False, True])
def test_dense_equals_oracle(backend, dtype, with_masks, gen):
    dev = dev_of(backend)
    for K, P in _dense_cases(backend):
        dead = list(range(0, P, 17))
        d = rand_deltas(gen, K, P, dtype, dead_cols=dead)
        w = rand_weights(gen, K)
        m = None
        if with_masks:
            m = torch.rand(K, P, generator=gen) < 0.6
            m[:, dead] = False
        g0 = torch.randn(P, generator=gen)
        want = oracle_dense(g0, d, w, m)
        g = g0.to(dev, copy=True)
        fk.masked_mean_update_(g, d.to(dev), weights=w.to(dev), masks=None if m is None else m.to(dev), backend=backend)
        assert torch.equal(g.cpu(), want), (backend, dtype, K, P)
        assert torch.equal(g.cpu()[dead], g0[dead])  # nobody active: unchanged
        # list input, sequence weights, list masks: the same bits
        g = g0.to(dev, copy=True)
        fk.masked_mean_update_(g, rows_on(d, dev), weights=w.tolist(),
                               masks=None if m is None else rows_on(m, dev), backend=backend)
        assert torch.equal(g.cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_default_weights_and_policies_agree(backend, gen):
    dev = dev_of(backend)
    K, P = (3, 211) if small(backend) else (6, 3001)
    d = rand_deltas(gen, K, P)
    g0 = torch.randn(P, generator=gen)
    want = oracle_dense(g0, d, None, None)
    for policy in ("raise", "drop", "assume_finite"):
        g = g0.to(dev, copy=True)
        fk.masked_mean_update_(g, d.to(dev), backend=backend, nonfinite=policy)
        assert torch.equal(g.cpu(), want), policy


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_deterministic(backend, gen):
    dev = dev_of(backend)
    K, P = (4, 509) if small(backend) else ((9, 10007) if backend == "torch" else (9, 50021))
    d = rand_deltas(gen, K, P, torch.bfloat16).to(dev)
    w = rand_weights(gen, K).to(dev)
    g0 = torch.randn(P, generator=gen).to(dev)
    a, b = g0.clone(), g0.clone()
    fk.masked_mean_update_(a, d, weights=w, backend=backend)
    fk.masked_mean_update_(b, d, weights=w, backend=backend)
    assert torch.equal(a, b)


def test_normalisation_makes_views_not_copies(gen):
    from fedrac_kernels.api import masks_of, rows_of

    d = rand_deltas(gen, 4, 64, torch.bfloat16)
    rows = rows_of(d, "deltas", 64, d.device)
    assert [r.data_ptr() for r in rows] == [d[k].data_ptr() for k in range(4)]
    wide = rand_deltas(gen, 4, 100)[:, :64]  # rows strided by 100: still contiguous 1-D views
    assert [r.data_ptr() for r in rows_of(wide, "deltas", 64, wide.device)] == [wide[k].data_ptr() for k in range(4)]
    m = torch.rand(4, 64, generator=gen) < 0.5
    assert [r.data_ptr() for r in masks_of(m, 4, 64, m.device)] == [m[k].data_ptr() for k in range(4)]
    lst = list(d.unbind(0))
    assert rows_of(lst, "deltas", 64, d.device) == lst


def test_noncontiguous_2d_deltas_are_copied(gen):
    d = rand_deltas(gen, 5, 3, torch.float32)
    g0 = torch.randn(5, generator=gen)
    want = oracle_dense(g0, d.t().contiguous(), None, None)
    g = g0.clone()
    fk.masked_mean_update_(g, d.t())  # [3, 5] view with stride (1, 3)
    assert torch.equal(g, want)


# ------------------------------------------------------------------ structured, every back end
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout_name", ["mlp", "conv"])
@pytest.mark.parametrize("rule", ["structural", "nonzero"])
@pytest.mark.parametrize("form", ["dense", "nested"])
def test_structured_equals_dense_with_expanded_masks(backend, layout_name, rule, form, gen):
    interpreter_subset(backend, (layout_name, rule, form) in {("conv", "structural", "nested"),
                                                              ("mlp", "nonzero", "dense")})
    lay = LAYOUTS[layout_name]()
    dev = dev_of(backend)
    dtypes = [torch.bfloat16] if small(backend) else DTYPES
    for K in ((3,) if small(backend) else (1, 3, 11)):
        for dtype in dtypes:
            d = rand_deltas(gen, K, lay.P, dtype)
            w = rand_weights(gen, K)
            nm = rand_neuron_masks(gen, K, lay.N) if form == "dense" else rand_nested(gen, K, lay.N)
            masks = lay.expand(nm)
            if rule == "nonzero":
                masks = masks & (d != 0)
            g0 = torch.randn(lay.P, generator=gen)
            want = oracle_dense(g0, d, w, masks)
            g = g0.to(dev, copy=True)
            nm_dev = nm.to(dev)
            fk.structured_mean_update_(g, d.to(dev), lay, nm_dev, weights=w, rule=rule, backend=backend)
            assert torch.equal(g.cpu(), want), (backend, layout_name, rule, form, K, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_structured_never_reads_gated_off_values(backend, gen):
    """NaN outside a client's gates (structural rule) is never active, so nothing is flagged."""
    lay = conv_layout()
    dev = dev_of(backend)
    K = 3
    d = rand_deltas(gen, K, lay.P)
    nm = rand_neuron_masks(gen, K, lay.N, dead=2)
    outside = ~lay.expand(nm)
    d_nan = d.clone()
    d_nan[outside] = float("nan")
    g0 = torch.randn(lay.P, generator=gen)
    want = oracle_dense(g0, d, None, lay.expand(nm))
    g = g0.to(dev, copy=True)
    fk.structured_mean_update_(g, d_nan.to(dev), lay, nm.to(dev), backend=backend)
    assert torch.equal(g.cpu(), want)


# --------------------------------------------------------------------- compact, every back end
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout_name", ["mlp", "conv"])
@pytest.mark.parametrize("form", ["bool", "nested", "rolled"])
def test_compact_equals_structured(backend, layout_name, form, gen):
    interpreter_subset(backend, (layout_name, form) in {("conv", "rolled"), ("mlp", "nested")})
    lay = LAYOUTS[layout_name]()
    dev = dev_of(backend)
    dtypes = [torch.float32] if small(backend) else DTYPES
    for K in ((3,) if small(backend) else (1, 3, 9)):
        for dtype in dtypes:
            if form == "bool":
                kept = rand_neuron_masks(gen, K, lay.N)
                kept_bool = kept
            elif form == "nested":
                kept = rand_nested(gen, K, lay.N)
                kept_bool = kept.dense()
            else:
                kept = rolled_kept(gen, lay, K)
                kept_bool = kept_to_bool(kept, lay.N)
            d = rand_deltas(gen, K, lay.P, dtype)
            w = rand_weights(gen, K)
            ups = fk.compact_pack(d.to(dev), lay, kept)
            assert [u.numel() for u in ups] == list(lay.compact_tables(kept).lengths)
            g0 = torch.randn(lay.P, generator=gen)
            want = oracle_dense(g0, d, w, lay.expand(kept_bool))
            g = g0.to(dev, copy=True)
            fk.compact_mean_update_(g, ups, lay, kept, weights=w, backend=backend)
            assert torch.equal(g.cpu(), want), (backend, layout_name, form, K, dtype)
            g = g0.to(dev, copy=True)
            fk.structured_mean_update_(g, d.to(dev), lay, kept_bool.to(dev), weights=w, backend=backend)
            assert torch.equal(g.cpu(), want)


def test_compact_pack_matches_submodel_slicing(gen):
    """compact_pack of a rolled window equals slicing each parameter like a FedRolex submodel."""
    lay = mlp_layout()
    delta = torch.randn(lay.P, generator=gen)
    idx1 = (torch.arange(4) + 5) % 7          # h1 neurons 5, 6, 0, 1
    idx2 = (torch.arange(3) + 3) % 5 + 7      # h2 neurons 3, 4, 0 (flat 10, 11, 7)
    kept = torch.cat([idx1, idx2])
    got = fk.compact_pack(delta, lay, kept)
    parts, off = [], 0
    l1, l2 = idx1, idx2 - 7
    for seg in lay.segments:
        t = delta[off:off + seg.numel].view(seg.shape)
        off += seg.numel
        sel = {"h1": l1, "h2": l2}
        if seg.out_site:
            t = t[sel[seg.out_site]]
        if seg.in_site:
            t = t[:, sel[seg.in_site]]
        parts.append(t.reshape(-1))
    assert torch.equal(got, torch.cat(parts))


# ------------------------------------------------------------------ frequency, order, nested masks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FREQ_DTYPES)
def test_frequency_update_forms(backend, dtype, gen):
    dev = dev_of(backend)
    for K, N in (((3, 37),) if small(backend) else ((1, 7), (5, 400), (13, 1031))):
        f0 = torch.randint(0, 50, (N,), generator=gen).to(dtype)
        m = rand_neuron_masks(gen, K, N)
        want = f0 + m.sum(0).to(dtype)
        f = f0.to(dev, copy=True)
        assert fk.frequency_update_(f, m.to(dev), backend=backend) is f
        assert torch.equal(f.cpu(), want)
        nm = rand_nested(gen, K, N)
        want = f0 + nm.dense().sum(0).to(dtype)
        for call in ("nested", "order_sizes"):
            f = f0.to(dev, copy=True)
            if call == "nested":
                fk.frequency_update_(f, nm, backend=backend)
            else:
                fk.frequency_update_(f, order=nm.order.to(dev), sizes=nm.sizes.tolist(), backend=backend)
            assert torch.equal(f.cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FREQ_DTYPES)
def test_lowest_frequency_order_stable_ties(backend, dtype, gen):
    dev = dev_of(backend)
    for N in ((1, 2, 33) if small(backend) else (1, 2, 400, 1024, 4099)):
        f = torch.randint(0, 4, (N,), generator=gen).to(dtype)  # heavy ties
        want = torch.sort(f, stable=True).indices
        got = fk.lowest_frequency_order(f.to(dev), backend=backend)
        assert got.dtype == torch.int64
        assert torch.equal(got.cpu(), want), (backend, dtype, N)
    N = 40 if small(backend) else 400
    f = torch.zeros(N, dtype=dtype)  # FedRAC round 2: all zero -> the identity
    assert torch.equal(fk.lowest_frequency_order(f.to(dev), backend=backend).cpu(), torch.arange(N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lowest_frequency_order_signed_zero_and_inf(backend):
    dev = dev_of(backend)
    f = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 0.0, -0.0, 1.0], device=dev)
    assert fk.lowest_frequency_order(f, backend=backend).tolist() == [3, 0, 1, 4, 5, 6, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_masks(backend, gen):
    dev = dev_of(backend)
    for N, S in (((1, 1), (7, 3), (40, 5)) if small(backend) else ((1, 1), (7, 3), (400, 51), (1031, 9))):
        order = torch.randperm(N, generator=gen)
        sizes = torch.randint(0, N + 1, (S,), generator=gen)
        sizes[0] = 0
        if S > 1:
            sizes[1] = N
        want = torch.zeros(S, N, dtype=torch.bool)
        for s in range(S):
            want[s, order[: sizes[s]]] = True
        got = fk.nested_masks(order.to(dev), sizes.to(dev), backend=backend)
        assert got.dtype == torch.bool and torch.equal(got.cpu(), want)
        assert torch.equal(NestedMasks(order, sizes).dense(), want)
    assert fk.nested_masks([1, 0], [], backend=backend).shape == (0, 2)


# ------------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raise_leaves_global_untouched(backend, bad_value, gen):
    dev = dev_of(backend)
    K, P = 4, 101
    d = rand_deltas(gen, K, P)
    d[2, 5] = bad_value
    d[0, 7] = bad_value
    g0 = torch.randn(P, generator=gen)
    g = g0.to(dev, copy=True)
    with pytest.raises(ValueError, match=r"^deltas: .*client\(s\) \[0, 2\]"):
        fk.masked_mean_update_(g, d.to(dev), backend=backend)
    assert torch.equal(g.cpu(), g0)
    # inactive (masked-off) and zero-weight clients are never checked
    m = torch.ones(K, P, dtype=torch.bool)
    m[2, 5] = m[0, 7] = False
    g = g0.to(dev, copy=True)
    fk.masked_mean_update_(g, d.to(dev), masks=m.to(dev), backend=backend)
    assert torch.equal(g.cpu(), oracle_dense(g0, d, None, m))
    w = torch.tensor([0.0, 1.0, 0.0, 2.0])
    g = g0.to(dev, copy=True)
    fk.masked_mean_update_(g, d.to(dev), weights=w, backend=backend)
    assert torch.equal(g.cpu(), oracle_dense(g0, d.nan_to_num(0.0, 0.0, 0.0), w, d != 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_drop(backend, gen):
    dev = dev_of(backend)
    K, P = 5, 97
    d = rand_deltas(gen, K, P)
    d[1, 3] = float("nan")
    d[4, 0] = float("inf")
    w = rand_weights(gen, K, zeros=False)
    g0 = torch.randn(P, generator=gen)
    w_drop = w.clone()
    w_drop[[1, 4]] = 0.0
    want = oracle_dense(g0, d, w_drop, None)
    g = g0.to(dev, copy=True)
    report = {}
    with pytest.warns(RuntimeWarning, match=r"dropped client\(s\) \[1, 4\]"):
        fk.masked_mean_update_(g, d.to(dev), weights=w, backend=backend, nonfinite="drop", report=report)
    assert report["dropped_clients"] == [1, 4]
    assert torch.equal(g.cpu(), want)
    # structured and compact follow the same policy
    lay = mlp_layout()
    ds = rand_deltas(gen, 3, lay.P)
    ds[0, 0] = float("nan")  # fc1.weight[0, 0]: gated by h1 neuron 0
    nm = torch.ones(3, lay.N, dtype=torch.bool)
    g = torch.zeros(lay.P, device=dev)
    rep = {}
    with pytest.warns(RuntimeWarning):
        fk.structured_mean_update_(g, ds.to(dev), lay, nm.to(dev), backend=backend, nonfinite="drop", report=rep)
    assert rep["dropped_clients"] == [0]
    assert torch.equal(g.cpu(), oracle_dense(torch.zeros(lay.P), ds, torch.tensor([0.0, 1, 1]), lay.expand(nm)))
    ups = fk.compact_pack(ds, lay, nm)
    g = torch.zeros(lay.P, device=dev)
    with pytest.raises(ValueError, match=r"^uploads: .*\[0\]"):
        fk.compact_mean_update_(g, [u.to(dev) for u in ups], lay, nm, backend=backend)
    assert not g.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_drop_all_raises_and_assume_finite_propagates(backend, gen):
    dev = dev_of(backend)
    d = rand_deltas(gen, 2, 11)
    d[:, 4] = float("nan")
    g0 = torch.randn(11, generator=gen)
    g = g0.to(dev, copy=True)
    with pytest.raises(ValueError, match=r"^deltas: every client"):
        fk.masked_mean_update_(g, d.to(dev), backend=backend, nonfinite="drop")
    assert torch.equal(g.cpu(), g0)
    fk.masked_mean_update_(g, d.to(dev), backend=backend, nonfinite="assume_finite")
    assert bool(torch.isnan(g.cpu()[4]))
    assert not bool(torch.isnan(g.cpu()[torch.arange(11) != 4]).any())


def test_report_filled_without_drops(gen):
    rep = {"dropped_clients": ["stale"]}
    fk.masked_mean_update_(torch.zeros(5), rand_deltas(gen, 2, 5), report=rep)
    assert rep["dropped_clients"] == []


# ------------------------------------------------------------------------------------- dispatch
def test_backend_report_and_available():
    rep = fk.backend_report()
    assert set(rep) == {"torch", "cpu", "cuda", "triton"}
    assert rep["torch"].startswith("ok: ")
    for name in fk.available_backends():
        assert rep[name].startswith("ok: ")
    for name in set(rep) - set(fk.available_backends()):
        assert rep[name].startswith("unavailable: ")


def test_dispatch_defaults_and_env(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    cpu_default = "cpu" if "cpu" in BACKENDS else "torch"
    assert _dispatch.resolve(None, torch.device("cpu")) is _dispatch.get_backend(cpu_default)
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert _dispatch.resolve(None, torch.device("cpu")) is _dispatch.get_backend("torch")
    # an explicit argument beats the environment
    assert _dispatch.resolve(cpu_default, torch.device("cpu")) is _dispatch.get_backend(cpu_default)
    monkeypatch.setenv(_dispatch.ENV_VAR, "no-such")
    with pytest.raises(ValueError, match=r"^backend: FEDRAC_KERNELS_BACKEND='no-such'"):
        fk.lowest_frequency_order(torch.zeros(3))
    # a preference for a GPU back end does not break CPU calls
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    g = torch.zeros(3)
    fk.masked_mean_update_(g, torch.ones(1, 3))
    assert g.tolist() == [1.0, 1.0, 1.0]


def test_dispatch_env_gpu_preference_falls_back_on_cpu_tensors(monkeypatch):
    if "cuda" not in BACKENDS:
        pytest.skip("needs the cuda back end")
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    cpu_default = "cpu" if "cpu" in BACKENDS else "torch"
    assert _dispatch.resolve(None, torch.device("cpu")) is _dispatch.get_backend(cpu_default)


def test_requested_backend_errors():
    g = torch.zeros(3)
    with pytest.raises(ValueError, match=r"^backend: unknown back end 'nope'"):
        fk.masked_mean_update_(g, torch.ones(1, 3), backend="nope")
    with pytest.raises(TypeError, match=r"^backend: "):
        fk.masked_mean_update_(g, torch.ones(1, 3), backend=3)
    with pytest.raises(ValueError, match=r"^backend: 'cuda' (is unavailable|cannot run on cpu)"):
        fk.masked_mean_update_(g, torch.ones(1, 3), backend="cuda")
    assert g.tolist() == [0.0, 0.0, 0.0]
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match=r"^backend: 'triton'"):
            fk.masked_mean_update_(g, torch.ones(1, 3), backend="triton")


def test_triton_on_cpu_only_when_requested(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    chosen = _dispatch.resolve(None, torch.device("cpu"))
    assert chosen.__name__.rsplit(".", 1)[-1] in ("cpu", "torch_ref")  # never triton by default
    if "triton" in BACKENDS and not HAS_CUDA:
        assert _dispatch.resolve("triton", torch.device("cpu")) is _dispatch.get_backend("triton")


def test_bind_flat_then_update_moves_module(gen):
    """The simulator's pattern: module parameters are views of the flat buffer being updated."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    flat = fk.flatten_parameters(net)
    fk.bind_flat_parameters_(net, flat)
    d = rand_deltas(gen, 3, flat.numel())
    want = oracle_dense(flat, d, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fk.masked_mean_update_(flat, d)
    assert torch.equal(flat, want)
    assert torch.equal(net[0].weight.detach().reshape(-1), want[:12])


# ------------------------------------------------------------ per-call caches and device reads
def bits(t: torch.Tensor) -> torch.Tensor:
    """float32 values as their int32 bit patterns (torch.equal on these also tells -0.0 from 0.0)."""
    return t.detach().cpu().contiguous().view(torch.int32)


@pytest.fixture
def scratch_always(monkeypatch):
    """Every checked aggregation takes its scratch buffer from the cache (not only P >= 256K on the
    CPU); the cache starts and ends empty."""
    monkeypatch.setattr(_dispatch, "_SCRATCH_MIN_CPU_BYTES", 0)
    _dispatch._SCRATCH.clear()
    yield _dispatch._SCRATCH
    _dispatch._SCRATCH.clear()


def poison(cache) -> None:
    """Fill every kept scratch buffer with NaN: a result may only come from its own call's writes."""
    for buf in cache.values():
        buf.fill_(float("nan"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scratch_cache_never_leaks_between_calls(backend, gen, scratch_always):
    """Interleaved sizes and dtypes, a NaN call before each clean one, the dense, structured and
    compact ops sharing one buffer: every result equals the scratch-free assume_finite result bit for
    bit, every failed call leaves global_params as it was."""
    dev = dev_of(backend)
    lay = mlp_layout()
    K = 3
    sizes = (61, 127) if small(backend) else (1009, lay.P, 4099)  # the interpreter: dense only
    cases = []
    for P, dtype in zip(sizes + sizes[::-1], DTYPES * 2):
        d = rand_deltas(gen, K, P, dtype, dead_cols=range(0, P, 7)).to(dev)  # den = 0 there: out = g
        w = rand_weights(gen, K, zeros=False).to(dev)
        g0 = torch.randn(P, generator=gen).to(dev)
        want = g0.clone()
        fk.masked_mean_update_(want, d, weights=w, backend=backend, nonfinite="assume_finite")
        cases.append(("dense", g0, d, w, want))
        if P == lay.P:  # structured and compact on the same buffer size as the dense call
            nm = rand_neuron_masks(gen, K, lay.N).to(dev)
            want_s = g0.clone()
            fk.structured_mean_update_(want_s, d, lay, nm, weights=w, backend=backend, nonfinite="assume_finite")
            cases.append(("structured", g0, (d, lay, nm), w, want_s))
            ups = fk.compact_pack(d, lay, nm)
            want_c = g0.clone()
            fk.compact_mean_update_(want_c, ups, lay, nm, weights=w, backend=backend, nonfinite="assume_finite")
            cases.append(("compact", g0, (ups, lay, nm), w, want_c))

    def run(kind, g, args, w, nonfinite="raise"):
        if kind == "dense":
            fk.masked_mean_update_(g, args, weights=w, backend=backend, nonfinite=nonfinite)
        elif kind == "structured":
            fk.structured_mean_update_(g, *args, weights=w, backend=backend, nonfinite=nonfinite)
        else:
            fk.compact_mean_update_(g, *args, weights=w, backend=backend, nonfinite=nonfinite)

    def with_nan(kind, args):
        if kind == "compact":
            ups = [u.clone() for u in args[0]]
            ups[1][0] = float("nan")
            return (ups,) + args[1:]
        d = (args if kind == "dense" else args[0]).clone()
        d[1] = float("nan")  # every element: active under any mask that leaves client 1 something
        return d if kind == "dense" else (d,) + args[1:]

    for _ in range(1 if small(backend) else 2):
        for kind, g0, args, w, want in cases:
            poison(scratch_always)
            g = g0.clone()
            with pytest.raises(ValueError, match=r"^(deltas|uploads): non-finite values"):
                run(kind, g, with_nan(kind, args), w)
            assert torch.equal(bits(g), bits(g0)), kind
            poison(scratch_always)
            run(kind, g, args, w)
            assert torch.equal(bits(g), bits(want)), kind
            g = g0.clone()
            poison(scratch_always)
            with pytest.warns(RuntimeWarning, match=r"dropped client\(s\) \[1\]"):
                run(kind, g, with_nan(kind, args), w, nonfinite="drop")
            w1 = w.clone()
            w1[1] = 0
            want1 = g0.clone()
            run(kind, want1, args, w1, nonfinite="assume_finite")
            assert torch.equal(bits(g), bits(want1)), kind
    assert 0 < len(scratch_always) <= _dispatch._SCRATCH_MAX


def test_scratch_cache_is_bounded_and_never_hands_out_a_buffer_twice(scratch_always):
    g = torch.zeros(10)
    a, ka = _dispatch.take_scratch(g)
    b, kb = _dispatch.take_scratch(g)  # a second call while the first still holds its buffer
    assert ka == kb and a.data_ptr() != b.data_ptr()
    _dispatch.give_back_scratch(a, ka)
    c, _ = _dispatch.take_scratch(g)
    assert c is a and len(scratch_always) == 0  # taken out again: nobody else can get it now
    _dispatch.give_back_scratch(c, ka)
    for P in range(1, 3 * _dispatch._SCRATCH_MAX):
        _dispatch.give_back_scratch(*_dispatch.take_scratch(torch.zeros(P)))
    assert len(scratch_always) == _dispatch._SCRATCH_MAX
    big = torch.zeros(1)
    big_buf = torch.empty((_dispatch._SCRATCH_MAX_BYTES // 4) + 1)
    _dispatch.give_back_scratch(big_buf, ("cpu", big.dtype, big_buf.numel()))
    assert all(t is not big_buf for t in scratch_always.values())  # over the byte budget: not kept


def test_scratch_cache_threads(gen, scratch_always):
    """Concurrent calls of one size (the cpu back end releases the GIL) each get their own buffer."""
    import threading

    P, K = 65537, 4
    jobs = []
    for _ in range(4):
        d = rand_deltas(gen, K, P)
        g0 = torch.randn(P, generator=gen)
        want = g0.clone()
        fk.masked_mean_update_(want, d, nonfinite="assume_finite")
        jobs.append((g0, d, want))
    errors = []

    def work(g0, d, want):
        for _ in range(25):
            g = g0.clone()
            fk.masked_mean_update_(g, d)
            if not torch.equal(bits(g), bits(want)):
                errors.append("wrong result")

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_stacked_rows_alias_and_addresses(gen):
    from fedrac_kernels.api import rows_of
    from fedrac_kernels.backends import StackedRows

    P = 33
    big = torch.randn(4, P, generator=gen)
    rows = rows_of(big, "deltas", P, big.device)
    assert isinstance(rows, StackedRows) and len(rows) == 4
    assert rows.row_addresses() == [big[k].data_ptr() for k in range(4)] == [r.data_ptr() for r in rows]
    g0 = big[1].clone()
    with pytest.raises(ValueError, match=r"^deltas: entry 1 overlaps global_params"):
        fk.masked_mean_update_(big[1], big)
    assert torch.equal(big[1], g0)
    # same storage, disjoint memory: allowed, and equal to the call on a separate buffer
    want = big[3].clone()
    fk.masked_mean_update_(want, big[:3].clone())
    fk.masked_mean_update_(big[3], big[:3])
    assert torch.equal(big[3], want)


@pytest.fixture
def device_reads(monkeypatch):
    """Send the value checks down their accelerator path (one batched read) on CPU tensors, and
    count every device -> host read a call makes (``tolist``, ``item``, ``bool``/``int``/``float``
    of a tensor, ``nonzero``, ``cpu``): on a GPU each is a synchronisation."""
    from fedrac_kernels import layout as layout_mod

    monkeypatch.setattr(layout_mod, "one_transfer", lambda device: True)
    count = [0]
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **kw):
            count[0] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


@pytest.mark.skipif("cpu" not in BACKENDS, reason="counts the wrapper's reads around the cpu back end")
def test_one_device_read_per_call(gen, device_reads):
    K, P = 4, 149
    lay = mlp_layout()
    d = rand_deltas(gen, K, P)
    w = rand_weights(gen, K, zeros=False)
    nest = rand_nested(gen, K, lay.N)
    calls = {
        "masked, tensor weights": lambda: fk.masked_mean_update_(torch.zeros(P), d, weights=w),
        "masked, no weights": lambda: fk.masked_mean_update_(torch.zeros(P), d),
        "masked, assume_finite": lambda: fk.masked_mean_update_(torch.zeros(P), d, weights=w,
                                                                nonfinite="assume_finite"),
        "masked, drop": lambda: fk.masked_mean_update_(torch.zeros(P), d, weights=w, nonfinite="drop"),
        "structured, nested": lambda: fk.structured_mean_update_(torch.zeros(P), d, lay, nest, weights=w),
        "frequency, order+sizes": lambda: fk.frequency_update_(torch.zeros(lay.N), order=nest.order,
                                                               sizes=nest.sizes),
        "frequency, masks": lambda: fk.frequency_update_(torch.zeros(lay.N), nest.dense()),
        "frequency, int": lambda: fk.frequency_update_(torch.zeros(lay.N, dtype=torch.int64), order=nest.order,
                                                       sizes=nest.sizes),
        "order": lambda: fk.lowest_frequency_order(torch.randn(lay.N, generator=gen)),
        "nested_masks": lambda: fk.nested_masks(nest.order, nest.sizes),
    }
    for name, fn in calls.items():
        fn()  # warm: back-end choice, tables
        device_reads[0] = 0
        fn()
        assert device_reads[0] <= 1, (name, device_reads[0])
    # the drop path: flags, weight check and "anyone left" in the same single read
    bad = d.clone()
    bad[2, 0] = float("nan")
    device_reads[0] = 0
    with pytest.warns(RuntimeWarning, match=r"\[2\]"):
        fk.masked_mean_update_(torch.zeros(P), bad, weights=w, nonfinite="drop")
    assert device_reads[0] == 1


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("nonfinite", ["raise", "drop", "assume_finite"])
def test_weight_tensor_errors_leave_global_params(gen, monkeypatch, backend, batched, nonfinite):
    """Bad weight tensors raise with global_params untouched on both read paths (the batched one
    computes into the scratch buffer before it reads the weight check; the cpu back end checks
    weights itself, and its error is replaced by the API's)."""
    from fedrac_kernels import layout as layout_mod

    dev = dev_of(backend)
    if batched:
        monkeypatch.setattr(layout_mod, "one_transfer", lambda device: True)
    K, P = 3, 50
    d = rand_deltas(gen, K, P).to(dev)
    d[0, 1] = float("nan")  # a non-finite client too: the weight error is reported first
    g0 = torch.randn(P, generator=gen).to(dev)
    for w, match in ((torch.tensor([1.0, float("nan"), 1.0]), r"^weights: non-finite weight\(s\) at client\(s\) \[1\]"),
                     (torch.tensor([1.0, -2.0, 1.0]), r"^weights: negative weight\(s\) at client\(s\) \[1\]"),
                     (torch.zeros(3), r"^weights: all weights are zero"),
                     (torch.tensor([1.0, float("inf"), 1.0]), r"^weights: non-finite")):
        g = g0.clone()
        with pytest.raises(ValueError, match=match):
            fk.masked_mean_update_(g, d, weights=w.to(dev), backend=backend, nonfinite=nonfinite)
        assert torch.equal(bits(g), bits(g0))


@pytest.mark.parametrize("batched", [False, True])
def test_index_and_nan_checks_on_both_read_paths(monkeypatch, batched):
    from fedrac_kernels import layout as layout_mod

    if batched:
        monkeypatch.setattr(layout_mod, "one_transfer", lambda device: True)
    f0 = torch.tensor([1.0, 0.0, 2.0, 0.0])
    for kw, match in ((dict(order=[0, 1, 1, 3], sizes=[1]), r"^order: not a permutation of 0..3: value\(s\) \[1\]"),
                      (dict(order=[0, 1, 2, 4], sizes=[1]), r"^order: not a permutation .* found 4"),
                      (dict(order=[0, -1, 2, 3], sizes=[1]), r"^order: not a permutation .* found -1"),
                      (dict(order=[3, 2, 1, 0], sizes=[5, 1]), r"^sizes: every size must lie in \[0, N=4\]; .*\[0\]"),
                      (dict(order=[3, 2, 1, 0], sizes=[-1]), r"^sizes: every size")):
        f = f0.clone()
        with pytest.raises(ValueError, match=match):
            fk.frequency_update_(f, **kw)
        assert torch.equal(f, f0)
    f = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(ValueError, match=r"^freq: contains NaN \(first at index \[1\]\)"):
        fk.frequency_update_(f, order=[3, 2, 1, 0], sizes=[2])
    assert torch.equal(f[[0, 2, 3]], torch.tensor([1.0, 0.0, 0.0]))
    f = torch.tensor([float("inf"), -float("inf"), 0.0])  # a NaN sum without a NaN
    fk.frequency_update_(f, order=[2, 1, 0], sizes=[1])
    assert f.tolist() == [float("inf"), -float("inf"), 1.0]
    assert fk.lowest_frequency_order(f).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match=r"^freq: contains NaN"):
        fk.lowest_frequency_order(torch.tensor([0.0, float("nan")]))
    assert fk.nested_masks([2, 0, 1], [0, 3, 1]).tolist() == [[False] * 3, [True] * 3, [False, False, True]]
    for order, sizes, match in (([0, 0, 1], [1], r"^order: not a permutation"), ([0, 1, 2], [4], r"^sizes: every size")):
        with pytest.raises(ValueError, match=match):
            fk.nested_masks(order, sizes)
    assert torch.equal(NestedMasks([2, 0, 1], [1, 3]).rank, torch.tensor([1, 2, 0], dtype=torch.int32))
