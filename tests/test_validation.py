"""Bad input raises TypeError (types, dtypes) or ValueError (everything else) whose message starts
with the argument's name, and nothing is written: global_params, freq and the streaming state are
unchanged afterwards."""
from __future__ import annotations

import types

import pytest
import torch

import fedrac_kernels as fk
from fedrac_kernels.layout import NestedMasks, NeuronLayout

K, P = 3, 20


def layout():
    # P = 12 + 4 + 4 = 20, N = 4 + 2 = 6
    return NeuronLayout([("a", 4), ("b", 2)], [("W1", (4, 3), "a", None), ("b1", (4,), "a", None),
                                               ("W2", (2, 2), "b", None)])


@pytest.fixture
def ctx(gen):
    c = types.SimpleNamespace()
    c.g = torch.randn(P, generator=gen)
    c.d = torch.randn(K, P, generator=gen)
    c.lay = layout()
    c.nm = torch.ones(K, c.lay.N, dtype=torch.bool)
    c.kept = [torch.tensor([0, 1]), torch.tensor([4]), torch.tensor([2, 3, 5])]
    c.ups = fk.compact_pack(c.d, c.lay, c.kept)
    c.freq = torch.zeros(c.lay.N)
    return c


def _nan(shape, at):
    t = torch.zeros(shape)
    t.view(-1)[at] = float("nan")
    return t


MM = fk.masked_mean_update_
SM = fk.structured_mean_update_
CM = fk.compact_mean_update_

AGG_CASES = [
    # global_params
    ("g-type", lambda c: MM(c.g.tolist(), c.d), TypeError, r"^global_params: expected a float32 tensor"),
    ("g-dtype", lambda c: MM(c.g.double(), c.d), TypeError, r"^global_params: expected dtype float32"),
    ("g-2d", lambda c: MM(c.g.view(4, 5), c.d), ValueError, r"^global_params: expected a 1-D"),
    ("g-noncontig", lambda c: MM(torch.zeros(2 * P)[::2], c.d), ValueError, r"^global_params: must be contiguous"),
    # deltas
    ("d-1d", lambda c: MM(c.g, c.d[0]), ValueError, r"^deltas: expected a 2-D tensor"),
    ("d-K0", lambda c: MM(c.g, c.d[:0]), ValueError, r"^deltas: no clients \(K = 0\)"),
    ("d-empty-list", lambda c: MM(c.g, []), ValueError, r"^deltas: no clients \(K = 0\)"),
    ("d-P", lambda c: MM(c.g, c.d[:, :-1]), ValueError, r"^deltas: expected shape \[K, P=20\]"),
    ("d-int", lambda c: MM(c.g, c.d.int()), TypeError, r"^deltas: dtype torch.int32 is not supported"),
    ("d-f64", lambda c: MM(c.g, c.d.double()), TypeError, r"^deltas: dtype torch.float64"),
    ("d-mixed", lambda c: MM(c.g, [c.d[0], c.d[1].half()]), TypeError, r"^deltas: entry 1 has dtype torch.float16 but"),
    ("d-noncontig", lambda c: MM(c.g, [torch.zeros(2 * P)[::2]]), ValueError, r"^deltas: entry 0 is not contiguous"),
    ("d-entry-type", lambda c: MM(c.g, [c.d[0], c.d[1].tolist()]), TypeError, r"^deltas: entry 1 is a list"),
    ("d-entry-2d", lambda c: MM(c.g, [c.d[:2]]), ValueError, r"^deltas: entry 0 has shape"),
    ("d-entry-P", lambda c: MM(c.g, [c.d[0], c.d[1, :5]]), ValueError, r"^deltas: entry 1 has 5 elements, expected P=20"),
    ("d-type", lambda c: MM(c.g, "deltas"), TypeError, r"^deltas: expected a 2-D tensor"),
    ("d-device", lambda c: MM(c.g, c.d.to("meta")), ValueError, r"^deltas: on meta"),
    ("d-alias", lambda c: MM(c.g, [c.g[:P]]), ValueError, r"^deltas: entry 0 overlaps global_params"),
    # weights
    ("w-len", lambda c: MM(c.g, c.d, weights=[1.0, 2.0]), ValueError, r"^weights: expected K=3 values, got 2"),
    ("w-shape", lambda c: MM(c.g, c.d, weights=torch.ones(1, 3)), ValueError, r"^weights: expected K=3 values"),
    ("w-neg", lambda c: MM(c.g, c.d, weights=[1.0, -1.0, 1.0]), ValueError, r"^weights: negative weight\(s\) at client\(s\) \[1\]"),
    ("w-nan", lambda c: MM(c.g, c.d, weights=torch.tensor([1.0, float("nan"), 1.0])), ValueError,
     r"^weights: non-finite weight\(s\) at client\(s\) \[1\]"),
    ("w-inf", lambda c: MM(c.g, c.d, weights=[float("inf"), 1.0, 1.0]), ValueError, r"^weights: non-finite"),
    ("w-overflow", lambda c: MM(c.g, c.d, weights=[1e39, 1.0, 1.0]), ValueError, r"^weights: non-finite"),
    ("w-zero", lambda c: MM(c.g, c.d, weights=[0, 0, 0]), ValueError,
     r"^weights: all weights are zero; at least one client needs a positive weight"),
    ("w-bool", lambda c: MM(c.g, c.d, weights=torch.ones(3, dtype=torch.bool)), TypeError, r"^weights: expected real numbers"),
    ("w-str", lambda c: MM(c.g, c.d, weights=["a", "b", "c"]), TypeError, r"^weights: expected numbers"),
    ("w-scalar", lambda c: MM(c.g, c.d, weights=2.0), TypeError, r"^weights: expected a tensor or a sequence"),
    # masks
    ("m-shape", lambda c: MM(c.g, c.d, masks=torch.ones(K, P - 1, dtype=torch.bool)), ValueError,
     r"^masks: expected shape \[K=3, P=20\]"),
    ("m-K", lambda c: MM(c.g, c.d, masks=torch.ones(K + 1, P, dtype=torch.bool)), ValueError, r"^masks: expected shape"),
    ("m-dtype", lambda c: MM(c.g, c.d, masks=torch.ones(K, P)), TypeError, r"^masks: expected dtype torch.bool"),
    ("m-list-len", lambda c: MM(c.g, c.d, masks=[torch.ones(P, dtype=torch.bool)]), ValueError, r"^masks: expected K=3 masks"),
    ("m-list-size", lambda c: MM(c.g, c.d, masks=[torch.ones(P, dtype=torch.bool)] * 2 + [torch.ones(3, dtype=torch.bool)]),
     ValueError, r"^masks: entry 2 has shape"),
    ("m-type", lambda c: MM(c.g, c.d, masks="all"), TypeError, r"^masks: expected None"),
    ("m-device", lambda c: MM(c.g, c.d, masks=torch.ones(K, P, dtype=torch.bool, device="meta")), ValueError, r"^masks: on meta"),
    # options
    ("nonfinite", lambda c: MM(c.g, c.d, nonfinite="ignore"), ValueError, r"^nonfinite: expected one of"),
    ("backend", lambda c: MM(c.g, c.d, backend="fast"), ValueError, r"^backend: unknown back end 'fast'"),
    ("report", lambda c: MM(c.g, c.d, report=[]), TypeError, r"^report: expected a dict"),
    ("nonfinite-raise", lambda c: MM(c.g, c.d + _nan((K, P), 7)), ValueError, r"^deltas: non-finite values .*\[0\]"),
    # structured
    ("s-layout-type", lambda c: SM(c.g, c.d, "layout", c.nm), TypeError, r"^layout: expected a NeuronLayout"),
    ("s-layout-P", lambda c: SM(torch.zeros(P + 1), torch.zeros(K, P + 1), c.lay, c.nm), ValueError,
     r"^layout: describes P=20 parameters, but global_params has 21"),
    ("s-nm-N", lambda c: SM(c.g, c.d, c.lay, c.nm[:, :-1]), ValueError, r"^neuron_masks: expected shape \[K=3, N=6\]"),
    ("s-nm-K", lambda c: SM(c.g, c.d, c.lay, c.nm[:2]), ValueError, r"^neuron_masks: expected shape"),
    ("s-nm-dtype", lambda c: SM(c.g, c.d, c.lay, c.nm.int()), TypeError, r"^neuron_masks: expected dtype torch.bool"),
    ("s-nested-N", lambda c: SM(c.g, c.d, c.lay, NestedMasks(range(5), [1, 2, 3])), ValueError,
     r"^neuron_masks: NestedMasks has N=5"),
    ("s-nested-K", lambda c: SM(c.g, c.d, c.lay, NestedMasks(range(6), [1, 2])), ValueError,
     r"^neuron_masks: NestedMasks has K=2 clients, expected 3"),
    ("s-rule", lambda c: SM(c.g, c.d, c.lay, c.nm, rule="any"), ValueError, r"^rule: expected one of"),
    ("s-nonfinite", lambda c: SM(c.g, c.d + _nan((K, P), 2 * P), c.lay, c.nm), ValueError, r"^deltas: non-finite .*\[2\]"),
    # compact
    ("c-len", lambda c: CM(c.g, [c.ups[0], c.ups[1][:-1], c.ups[2]], c.lay, c.kept), ValueError,
     r"^uploads: entry 1 has \d+ elements, expected \d+ values for its kept neurons"),
    ("c-K", lambda c: CM(c.g, c.ups[:2], c.lay, c.kept), ValueError, r"^uploads: 2 uploads, but kept describes 3"),
    ("c-type", lambda c: CM(c.g, torch.zeros(3, 4), c.lay, c.kept), ValueError, r"^uploads: a \[K, L\] tensor"),
    ("c-kept-range", lambda c: CM(c.g, c.ups, c.lay, [[0], [9], [1]]), ValueError, r"^kept: client 1: neuron index 9"),
    ("c-kept-dup", lambda c: CM(c.g, c.ups, c.lay, [[0, 0], [1], [1]]), ValueError, r"^kept: client 0: repeated"),
    ("c-kept-type", lambda c: CM(c.g, c.ups, c.lay, "kept"), TypeError, r"^kept: "),
    ("c-dtype", lambda c: CM(c.g, [u.double() for u in c.ups], c.lay, c.kept), TypeError, r"^uploads: entry 0 has dtype"),
    ("c-layout", lambda c: CM(c.g, c.ups, NeuronLayout([], [("x", (3,), None, None)]), c.kept), ValueError, r"^layout: "),
    ("c-nonfinite", lambda c: CM(c.g, [c.ups[0], c.ups[1] + float("inf"), c.ups[2]], c.lay, c.kept), ValueError,
     r"^uploads: non-finite .*\[1\]"),
]


@pytest.mark.parametrize("name, call, err, match", AGG_CASES, ids=[c[0] for c in AGG_CASES])
def test_aggregation_bad_input_leaves_global_params(ctx, name, call, err, match):
    g0 = ctx.g.clone()
    with pytest.raises(err, match=match):
        call(ctx)
    assert torch.equal(ctx.g, g0)


def test_compact_pack_bad_input(ctx):
    with pytest.raises(TypeError, match=r"^delta: dtype torch.int64"):
        fk.compact_pack(torch.zeros(P, dtype=torch.int64), ctx.lay, [0])
    with pytest.raises(ValueError, match=r"^layout: describes P=20 parameters, but delta has 19"):
        fk.compact_pack(torch.zeros(P - 1), ctx.lay, [0])
    with pytest.raises(ValueError, match=r"^kept: NestedMasks for one client must have K=1"):
        fk.compact_pack(torch.zeros(P), ctx.lay, NestedMasks(range(6), [1, 2]))
    with pytest.raises(ValueError, match=r"^kept: describes 3 clients, delta has 2"):
        fk.compact_pack(torch.zeros(2, P), ctx.lay, ctx.kept)
    with pytest.raises(TypeError, match=r"^delta: "):
        fk.compact_pack([0.0] * P, ctx.lay, [0])


FREQ_CASES = [
    ("f-dtype", lambda c, f: fk.frequency_update_(f.half(), c.nm), TypeError, r"^freq: dtype torch.float16"),
    ("f-2d", lambda c, f: fk.frequency_update_(f.view(2, 3), c.nm), ValueError, r"^freq: expected a 1-D"),
    ("f-noncontig", lambda c, f: fk.frequency_update_(torch.zeros(12)[::2], c.nm), ValueError, r"^freq: must be contiguous"),
    ("f-nan", lambda c, f: fk.frequency_update_(f.index_fill_(0, torch.tensor([3]), float("nan")), c.nm), ValueError,
     r"^freq: contains NaN"),
    ("f-masks-N", lambda c, f: fk.frequency_update_(f, c.nm[:, :5]), ValueError, r"^masks: expected shape \[K, N=6\]"),
    ("f-masks-K0", lambda c, f: fk.frequency_update_(f, c.nm[:0]), ValueError, r"^masks: no clients"),
    ("f-masks-dtype", lambda c, f: fk.frequency_update_(f, c.nm.float()), TypeError, r"^masks: expected dtype torch.bool"),
    ("f-both", lambda c, f: fk.frequency_update_(f, c.nm, order=range(6), sizes=[1]), ValueError, r"^masks: give either"),
    ("f-neither", lambda c, f: fk.frequency_update_(f), ValueError, r"^masks: give masks"),
    ("f-order", lambda c, f: fk.frequency_update_(f, order=[0, 1, 2, 3, 4, 4], sizes=[1]), ValueError, r"^order: not a permutation"),
    ("f-order-N", lambda c, f: fk.frequency_update_(f, order=range(5), sizes=[1]), ValueError, r"^order: has N=5"),
    ("f-sizes", lambda c, f: fk.frequency_update_(f, order=range(6), sizes=[7]), ValueError, r"^sizes: every size must lie in \[0, N=6\]"),
    ("f-sizes-K0", lambda c, f: fk.frequency_update_(f, order=range(6), sizes=[]), ValueError, r"^sizes: no clients"),
    ("f-nested-N", lambda c, f: fk.frequency_update_(f, NestedMasks(range(5), [1])), ValueError, r"^masks: NestedMasks has N=5"),
    ("f-backend", lambda c, f: fk.frequency_update_(f, c.nm, backend="gpu"), ValueError, r"^backend: unknown"),
    ("o-nan", lambda c, f: fk.lowest_frequency_order(f.index_fill_(0, torch.tensor([0]), float("nan"))), ValueError,
     r"^freq: contains NaN"),
    ("o-dtype", lambda c, f: fk.lowest_frequency_order(f.bool()), TypeError, r"^freq: dtype torch.bool"),
    ("o-2d", lambda c, f: fk.lowest_frequency_order(f.view(3, 2)), ValueError, r"^freq: expected a 1-D"),
    ("n-order", lambda c, f: fk.nested_masks([0, 2], [1]), ValueError, r"^order: not a permutation"),
    ("n-sizes", lambda c, f: fk.nested_masks([1, 0], [3]), ValueError, r"^sizes: every size must lie in \[0, N=2\]"),
    ("n-float", lambda c, f: fk.nested_masks(torch.tensor([1.0, 0.0]), [1]), TypeError, r"^order: expected an integer tensor"),
    ("n-sizes-type", lambda c, f: fk.nested_masks([1, 0], "1"), TypeError, r"^sizes: expected integers"),
]


@pytest.mark.parametrize("name, call, err, match", FREQ_CASES, ids=[c[0] for c in FREQ_CASES])
def test_frequency_bad_input_leaves_freq(ctx, name, call, err, match):
    f = ctx.freq
    f.copy_(torch.arange(f.numel(), dtype=f.dtype))
    with pytest.raises(err, match=match):
        call(ctx, f)
    if not name.endswith("nan"):  # the NaN cases plant their NaN themselves
        assert torch.equal(f, torch.arange(f.numel(), dtype=f.dtype))


STREAM_CASES = [
    ("a-P", lambda a, c: a.add(c.d[:, :-1]), ValueError, r"^delta: expected shape \[K, P=20\]"),
    ("a-1d-P", lambda a, c: a.add(c.d[0, :-1]), ValueError, r"^delta: expected shape"),
    ("a-dtype", lambda a, c: a.add(c.d.double()), TypeError, r"^delta: dtype torch.float64"),
    ("a-K0", lambda a, c: a.add(c.d[:0]), ValueError, r"^delta: no clients"),
    ("a-mask", lambda a, c: a.add(c.d, mask=torch.ones(K, P + 1, dtype=torch.bool)), ValueError, r"^mask: expected shape"),
    ("a-mask-dtype", lambda a, c: a.add(c.d[0], mask=torch.ones(P)), TypeError, r"^mask: expected dtype torch.bool"),
    ("a-w-neg", lambda a, c: a.add(c.d, weight=-1.0), ValueError, r"^weight: negative"),
    ("a-w-nan", lambda a, c: a.add(c.d, weight=[1.0, float("nan"), 1.0]), ValueError, r"^weight: non-finite"),
    ("a-w-len", lambda a, c: a.add(c.d, weight=[1.0, 2.0]), ValueError, r"^weight: expected K=3 values"),
    ("a-device", lambda a, c: a.add(c.d.to("meta")), ValueError, r"^delta: on meta"),
    ("a-nonfinite", lambda a, c: a.add(c.d + _nan((K, P), 5)), ValueError, r"^delta: non-finite .*state is unchanged"),
    ("s-no-layout", lambda a, c: fk.StreamingAggregator(P).add_structured(c.d, c.nm), ValueError,
     r"^layout: add_structured needs"),
    ("s-nm", lambda a, c: a.add_structured(c.d, c.nm[:2]), ValueError, r"^neuron_mask: expected shape \[K=3, N=6\]"),
    ("s-rule", lambda a, c: a.add_structured(c.d, c.nm, rule="x"), ValueError, r"^rule: "),
    ("c-len", lambda a, c: a.add_compact(c.ups[1][:-1], c.kept[1]), ValueError, r"^values: entry 0 has"),
    ("c-K", lambda a, c: a.add_compact(c.ups[:2], c.kept), ValueError, r"^values: 2 uploads, but kept describes 3"),
    ("c-2d", lambda a, c: a.add_compact(torch.zeros(2, 3), c.kept[0]), ValueError, r"^values: expected one client"),
    ("apply-P", lambda a, c: a.apply_(torch.zeros(P + 1)), ValueError, r"^global_params: has 21 elements"),
    ("apply-dtype", lambda a, c: a.apply_(torch.zeros(P, dtype=torch.float64)), TypeError, r"^global_params: expected dtype"),
]


@pytest.mark.parametrize("name, call, err, match", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_streaming_bad_input_leaves_state(ctx, name, call, err, match):
    agg = fk.StreamingAggregator(ctx.g, layout=ctx.lay)
    agg.add(ctx.d[:2])
    before = agg.state_dict()
    with pytest.raises(err, match=match):
        call(agg, ctx)
    after = agg.state_dict()
    assert torch.equal(after["num"], before["num"]) and torch.equal(after["den"], before["den"])
    assert after["clients"] == before["clients"] == 2 and after["dropped"] == []


@pytest.mark.parametrize("kwargs, err, match", [
    ({"global_params_or_P": -1}, ValueError, r"^global_params_or_P: P must be >= 0"),
    ({"global_params_or_P": 2.0}, TypeError, r"^global_params_or_P: "),
    ({"global_params_or_P": torch.zeros(3, dtype=torch.float16)}, TypeError, r"^global_params: expected dtype float32"),
    ({"global_params_or_P": 5, "backend": "fast"}, ValueError, r"^backend: unknown"),
    ({"global_params_or_P": 5, "nonfinite": "skip"}, ValueError, r"^nonfinite: "),
    ({"global_params_or_P": 5, "transfer_bytes": 0}, ValueError, r"^transfer_bytes: "),
    ({"global_params_or_P": 5, "layout": layout()}, ValueError, r"^layout: describes P=20 parameters, but global_params_or_P has 5"),
])
def test_streaming_constructor_validation(kwargs, err, match):
    P_or_g = kwargs.pop("global_params_or_P")
    with pytest.raises(err, match=match):
        fk.StreamingAggregator(P_or_g, **kwargs)


def test_unusable_backend_request_for_device():
    if "cuda" in fk.available_backends():
        pytest.skip("the cuda back end is usable here")
    with pytest.raises(ValueError, match=r"^backend: 'cuda' is unavailable"):
        fk.StreamingAggregator(5, backend="cuda")
