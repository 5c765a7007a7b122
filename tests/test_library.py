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
    want = {"masked_mean_update_": ["global_params"], "structured_mean_update_": ["global_params"],
            "compact_mean_update_": ["global_params"], "frequency_update_": ["freq"],
            "compact_pack": [], "lowest_frequency_order": [], "nested_masks": [],
            # sparsify
            "topq_counts": [], "topk_thresholds": [], "threshold_add_": ["targets"],
            "layerwise_topq_add_": ["targets"], "layerwise_topq": [], "global_topk_add_": ["targets"],
            "global_topk": [], "randomk_add_": ["targets"], "cosine_to_aggregate": [],
            # gram
            "gram_matrix": [], "gram_add_": ["acc", "buf"], "bottomk_magnitude_mask": [],
            "column_normalized_std": [], "smallest_indices": []}
    assert set(library.OPS) == set(want)
    for name, mutated in want.items():
        schema = getattr(torch.ops.fedrac, name).default._schema
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert written == mutated, name


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


def _sparsify_gram_cases(gen):
    """Random inputs with odd sizes, ties, zeros, a gap between segments, K = 3 clients."""
    K, P = 3, 53
    u = torch.randn(P, generator=gen)
    u[5:9] = 0.5
    u[30:33] = 0.0
    segs = torch.tensor([[0, 20], [20, 1], [25, 28]])          # entries 21..24 in no segment
    q = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    counts = torch.tensor([[0, 1, 5], [3, 0, 28], [20, 1, 1]])
    thr = fk.topk_thresholds(u, segs, counts)
    T = torch.randn(K, P, generator=gen)
    rows = [torch.randn(P, generator=gen) for _ in range(K)]
    gcounts = torch.tensor([0, 7, P])
    perm = torch.randperm(P, generator=gen)
    acc = torch.randn(K, K, dtype=torch.float64, generator=gen)
    buf = torch.randn(K, 16, dtype=torch.float64, generator=gen)   # 5 open columns
    W = torch.randn(K, 29, generator=gen)
    return [
        ("topq_counts", (q, [20, 1, 28])),
        ("topk_thresholds", (u, segs, counts, "")),
        ("threshold_add_", ([T.clone()], u, segs, thr, 1.0, "")),
        ("threshold_add_", ([r.clone() for r in rows], u, segs, thr, -0.5, "torch")),
        ("layerwise_topq_add_", ([T.clone()], u, segs, q, 0.7, "")),
        ("layerwise_topq", (u, segs, q, "")),
        ("global_topk_add_", ([r.clone() for r in rows], u, gcounts, 1.0, "")),
        ("global_topk", (u, gcounts, "")),
        ("randomk_add_", ([T.clone()], u, gcounts, perm, 2.0, "")),
        ("cosine_to_aggregate", ([T], u, 1e-10, "")),
        ("cosine_to_aggregate", (rows, u, 1e-10, "torch")),
        ("gram_matrix", ([T], False, torch.float64, 16, None, "raise")),
        ("gram_matrix", (rows, True, torch.float32, 7, None, "propagate")),
        ("gram_matrix", ([T[:, :20], T[:, 20:]], False, torch.float64, 13, None, "raise")),
        ("gram_add_", (acc, buf, T[:, :37], 5)),
        ("bottomk_magnitude_mask", (W, torch.tensor([2, 3, 29]), 4)),  # no 0: its NaN mean != NaN
        ("column_normalized_std", (W, 1e-12)),
        ("smallest_indices", (W[0], 9)),
    ]


@pytest.mark.parametrize("backend", [""])  # automatic choice: the cpu back end when built, else torch
def test_opcheck_every_op(backend, gen):
    seen = set()
    for name, args in _op_cases(backend, gen) + _sparsify_gram_cases(gen):
        seen.add(name)
        torch.library.opcheck(getattr(torch.ops.fedrac, name).default, args)
    assert seen == set(library.OPS)


def test_sparsify_gram_ops_match_public_functions(gen):
    """The registered ops give the eager public functions' results bit for bit."""
    from fedrac_kernels.gram import GramAccumulator, smallest_indices

    for name, args in _sparsify_gram_cases(gen):
        op = getattr(torch.ops.fedrac, name)
        if name.endswith("_"):
            a = [t.clone() for t in args[0]] if isinstance(args[0], list) else args[0].clone()
            b = [t.clone() for t in args[0]] if isinstance(args[0], list) else args[0].clone()
            if name == "gram_add_":
                a, b = (args[0].clone(), args[1].clone()), (args[0].clone(), args[1].clone())
                op(*a, *args[2:])
                acc = GramAccumulator(3, chunk_size=16)
                acc._ensure(torch.device("cpu"))
                acc._acc.copy_(b[0])
                acc._buf, acc._fill = b[1], args[3]
                acc.add(args[2])
                assert torch.equal(a[0], acc._acc) and torch.equal(a[1][:, :acc._fill], acc._buf[:, :acc._fill])
                continue
            op(a, *args[1:])
            public = getattr(fk, name, None)
            if name == "randomk_add_":
                from fedrac_kernels.sparsify import randomk_with_perm_ as public
            targets = b[0] if len(b) == 1 and b[0].dim() == 2 else b
            kw = {"alpha": args[-2], "backend": args[-1] or None}
            public(targets, *args[1:-2], **kw)
            assert all(torch.equal(x, y) for x, y in zip(a, b)), name
    u, segs, q = torch.randn(41, generator=gen), torch.tensor([[0, 30], [30, 11]]), torch.tensor([0.4, 0.9])
    assert torch.equal(torch.ops.fedrac.layerwise_topq(u, segs, q, ""), fk.layerwise_topq(u, segs, q))
    assert torch.equal(torch.ops.fedrac.smallest_indices(u, 6), smallest_indices(u, 6))


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


def test_sparsify_gram_ops_check_inputs_before_writing(gen):
    """The ops run the public checks: a bad argument raises naming it and writes nothing."""
    u = torch.randn(11, generator=gen)
    T = torch.randn(2, 11, generator=gen)
    T0 = T.clone()
    segs = torch.tensor([[0, 11]])
    bad_u = u.clone()
    bad_u[3] = float("nan")
    cases = [
        (r"^u: contains NaN", lambda: torch.ops.fedrac.layerwise_topq_add_([T], bad_u, segs, torch.tensor([0.5, 0.5]),
                                                                          1.0, "")),
        (r"^q: fractions", lambda: torch.ops.fedrac.layerwise_topq_add_([T], u, segs, torch.tensor([0.5, 2.0]), 1.0, "")),
        (r"^counts: counts must be in", lambda: torch.ops.fedrac.global_topk_add_([T], u, torch.tensor([1, 12]), 1.0, "")),
        (r"^perm: not a permutation", lambda: torch.ops.fedrac.randomk_add_([T], u, torch.tensor([1, 2]),
                                                                           torch.zeros(11, dtype=torch.int64), 1.0, "")),
        (r"^segments: entry 0", lambda: torch.ops.fedrac.threshold_add_([T], u, torch.tensor([[0, 12]]),
                                                                       torch.zeros(2, 1), 1.0, "")),
        (r"^block: expected shape", lambda: torch.ops.fedrac.gram_add_(torch.zeros(3, 3, dtype=torch.float64),
                                                                      torch.zeros(3, 4, dtype=torch.float64), T, 0)),
        (r"^n: expected an int", lambda: torch.ops.fedrac.smallest_indices(u, 12)),
    ]
    for match, call in cases:
        with pytest.raises(ValueError, match=match):
            call()
        assert torch.equal(T, T0), match
    with pytest.raises(ValueError, match=r"^u: expected a 1-D"):  # the tracing path checks shapes itself
        torch.compile(lambda T, u: fk.layerwise_topq_add_(T, u, [(0, 11)], [0.5, 0.5]), backend="aot_eager")(T, u[None])
    assert torch.equal(T, T0)
    torch._dynamo.reset()


def test_torch_compile_fullgraph_sparsify_gram(gen):
    """The sparsify and Gram public functions trace into their ops (no graph breaks) and agree."""
    from fedrac_kernels.gram import (GramAccumulator, bottomk_magnitude_mask, column_normalized_std, gram_matrix,
                                     smallest_indices)

    torch._dynamo.reset()
    K, P = 3, 37
    u = torch.randn(P, generator=gen)
    T0 = torch.randn(K, P, generator=gen)

    def step(u, T):
        fk.layerwise_topq_add_(T, u, [(0, 20), (20, 17)], [0.2, 0.5, 1.0])
        fk.threshold_add_(T, u, [(0, P)], fk.topk_thresholds(u, [(0, P)], [[1], [4], [P]]), alpha=0.5)
        top = fk.global_topk(u, [1, 5, P])
        cos = fk.cosine_to_aggregate(T, u)
        G = gram_matrix(T, chunk_size=16)
        acc = GramAccumulator(K, chunk_size=16)
        acc.add(T[:, :20])
        acc.add(T[:, 20:])
        masked, means = bottomk_magnitude_mask(T, [1, 2, 3], sample_every=2)
        return top, cos, G, acc.gram(), column_normalized_std(T), masked, means, smallest_indices(u, 4)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    T1, T2 = T0.clone(), T0.clone()
    out1 = compiled(u, T1)
    out2 = step(u, T2)
    assert torch.equal(T1, T2)
    for a, b in zip(out1, out2):
        assert torch.equal(a, b)
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
