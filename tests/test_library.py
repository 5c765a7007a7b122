"""The torch.library ops: schemas, opcheck, and torch.compile tracing the public API."""
from __future__ import annotations

import pytest
import torch

import fedrac_kernels as fk
from fedrac_kernels import library
from fedrac_kernels.layout import NestedMasks, NeuronLayout

CPU_BACKENDS = [b for b in fk.available_backends() if b in ("torch", "cpu")]


def lay():
    return NeuronLayout([("h1", 3), ("h2", 2)], [
        ("fc1.weight", (3, 4), "h1", None), ("fc1.bias", (3,), "h1", None),
        ("fc2.weight", (2, 3), "h2", "h1"), ("conv.weight", (2, 2, 2, 2), None, "h2")])


def test_every_op_registered_with_its_schema():
    want = {"masked_mean_update_": "global_params", "structured_mean_update_": "global_params",
            "compact_mean_update_": "global_params", "frequency_update_": "freq",
            "compact_pack": None, "lowest_frequency_order": None, "nested_masks": None}
    assert set(library.OPS) == set(want)
    for name, mutated in want.items():
        schema = getattr(torch.ops.fedrac, name).default._schema
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert written == ([mutated] if mutated else []), name


def _op_cases(backend, gen):
    L = lay()
    K = 3
    d = torch.randn(K, L.P, generator=gen)
    d[d.abs() < 0.3] = 0
    w = torch.tensor([1.0, 0.0, 2.0])
    masks = list((torch.rand(K, L.P, generator=gen) < 0.5).unbind(0))
    nm = torch.rand(K, L.N, generator=gen) < 0.6
    nest = NestedMasks(torch.randperm(L.N, generator=gen), [1, L.N, 0])
    segs = L.segment_table()
    kept = [torch.tensor([2, 0, 4]), torch.tensor([1, 3, 4]), torch.tensor([0])]
    t = L.compact_tables(kept)
    ups = fk.compact_pack(d, L, kept)
    g = torch.randn(L.P, generator=gen)
    rows = list(d.unbind(0))
    return [
        ("masked_mean_update_", (g, rows, w, [], backend, "raise")),
        ("masked_mean_update_", (g, [r.to(torch.bfloat16) for r in rows], w, masks, backend, "drop")),
        ("masked_mean_update_", (g, rows, w, masks, backend, "assume_finite")),
        ("structured_mean_update_", (g, rows, w, segs, L.N, nm, None, None, False, backend, "raise")),
        ("structured_mean_update_", (g, rows, w, segs, L.N, None, nest.rank, nest.sizes, True, backend, "raise")),
        ("compact_mean_update_", (g, ups, w, segs, L.N, t.inv, t.seg_off, t.seg_cols, backend, "raise")),
        ("compact_pack", (d[0], segs, t.inv[0], t.seg_off[0], t.seg_cols[0], t.lengths[0])),
        ("frequency_update_", (torch.zeros(L.N, dtype=torch.int32), nm, None, None, backend)),
        ("frequency_update_", (torch.zeros(L.N, dtype=torch.float64), None, nest.rank, nest.sizes, backend)),
        ("lowest_frequency_order", (torch.tensor([2.0, 0.0, 1.0, 0.0, 2.0]), backend)),
        ("nested_masks", (torch.tensor([3, 1, 0, 2]), torch.tensor([0, 2, 4]), backend)),
    ]


@pytest.mark.parametrize("backend", [""])  # automatic choice: the cpu back end when built, else torch
def test_opcheck_every_op(backend, gen):
    seen = set()
    for name, args in _op_cases(backend, gen):
        seen.add(name)
        torch.library.opcheck(getattr(torch.ops.fedrac, name).default, args)
    assert seen == set(library.OPS)


def test_ops_match_public_functions(gen):
    L = lay()
    d = torch.randn(3, L.P, generator=gen)
    nm = torch.rand(3, L.N, generator=gen) < 0.6
    g0 = torch.randn(L.P, generator=gen)
    a = fk.structured_mean_update_(g0.clone(), d, L, nm, rule="nonzero")
    b = g0.clone()
    flags = torch.ops.fedrac.structured_mean_update_(b, list(d.unbind(0)), torch.ones(3), L.segment_table(), L.N,
                                                     nm, None, None, True, "", "raise")
    assert torch.equal(a, b)
    assert flags.dtype == torch.int32 and flags.shape == (3,) and not flags.any()


def test_torch_compile_fullgraph(gen):
    """A function calling the public ops compiles into one graph (no graph breaks) and agrees."""
    torch._dynamo.reset()
    P, K, N = 37, 3, 9
    d = torch.randn(K, P, generator=gen)
    d[d.abs() < 0.2] = 0
    m = torch.rand(K, P, generator=gen) < 0.7
    w = torch.tensor([1.0, 2.0, 0.5])
    fm = torch.rand(K, N, generator=gen) < 0.5

    def step(g, d, m, w, freq, fm):
        fk.masked_mean_update_(g, d, weights=w, masks=m)
        fk.frequency_update_(freq, fm)
        order = fk.lowest_frequency_order(freq)
        return g * 1.0, fk.nested_masks(order, torch.tensor([2, 5]))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    g1, f1 = torch.zeros(P), torch.zeros(N, dtype=torch.int64)
    g2, f2 = torch.zeros(P), torch.zeros(N, dtype=torch.int64)
    out1 = compiled(g1, d, m, w, f1, fm)
    out2 = step(g2, d, m, w, f2, fm)
    assert torch.equal(g1, g2) and torch.equal(f1, f2)
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    torch._dynamo.reset()


def test_use_ops_routing():
    assert not library.use_ops(torch.zeros(2), torch.nn.Parameter(torch.zeros(2)))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        t = torch.empty(3)
    assert library.use_ops(t)
    # the public function works on fake tensors through the registered fake implementation
    with mode:
        g = torch.empty(5)
        d = torch.empty(2, 5)
        out = fk.masked_mean_update_(g, d, nonfinite="assume_finite")
    assert out is g
