"""fedrac_kernels.interop: state_dict aggregation for HeteroFL / FedRolex / FjORD / FedAvg / FedRAC.

Every method's result is checked against a direct dense re-computation of its rule written here
(independent of the kernels), plus full-size vs sub-model equality, the entry policies, errors and
input immutability. Sizes are tiny; the whole file runs in a few seconds.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from fedrac_kernels import interop as fki

# A 4-6-5-3 MLP with a conv-like 4-D tensor gated on both dims, a GroupNorm-like 1-D pair, an
# ungated classifier bias and an integer buffer.
SITES = {"h1": 6, "h2": 5}
GATES = {
    "fc1.weight": ("h1", None),
    "fc1.bias": ("h1", None),
    "conv.weight": ("h2", "h1"),      # [5, 6, 3, 2]: inner dims follow
    "gn.weight": ("h2", None),
    "gn.bias": ("h2", None),
    "fc3.weight": (None, "h2"),
}
SHAPES = {
    "fc1.weight": (6, 4), "fc1.bias": (6,), "conv.weight": (5, 6, 3, 2), "gn.weight": (5,),
    "gn.bias": (5,), "fc3.weight": (3, 5), "fc3.bias": (3,),
}
RATES = [1.0, 0.5, 0.25, 0.5, 0.125]


def make_global(gen, dtype=torch.float32):
    sd = {k: torch.randn(s, generator=gen).to(dtype) for k, s in SHAPES.items()}
    sd["gn.num_batches_tracked"] = torch.tensor(7)
    return sd


def sub_clients(global_sd, sets, gen, gates=GATES):
    """Sub-model client states: the client's slice plus noise (what local training returns)."""
    out = []
    for s in sets:
        st = fki.slice_state_dict(global_sd, s, gates)
        out.append({k: (v + torch.randn(v.shape, generator=gen).to(v.dtype)) if v.is_floating_point()
                    else v + 1 for k, v in st.items()})
    return out


def index_of(gate, ns, shape):
    """(rows, cols) global index tensors of a client's slice of a tensor (ungated = all)."""
    o, i = gate if gate is not None else (None, None)
    rows = torch.as_tensor(ns[o]) if (ns is not None and o is not None and o in ns) else torch.arange(shape[0])
    cols = None
    if len(shape) >= 2:
        cols = torch.as_tensor(ns[i]) if (ns is not None and i is not None and i in ns) else torch.arange(shape[1])
    return rows, cols


def scatter_full(local, rows, cols, shape, fill=0.0):
    """A full-size tensor with ``local`` at (rows, cols) and ``fill`` elsewhere, plus the holder mask."""
    dense = torch.full(shape, fill, dtype=torch.float64)
    held = torch.zeros(shape, dtype=torch.bool)
    if cols is None:
        dense[rows] = local.to(torch.float64)
        held[rows] = True
    else:
        dense[rows[:, None], cols[None, :]] = local.to(torch.float64)
        held[rows[:, None], cols[None, :]] = True
    return dense, held


def reference_mean(global_sd, clients, sets, weights=None, gates=GATES):
    """Dense rule: sum_k w_k * scattered slice / sum_k w_k over holders; old value where nobody holds."""
    out = {}
    for key, g in global_sd.items():
        if not g.is_floating_point():
            out[key] = g.clone()
            continue
        num = torch.zeros(g.shape, dtype=torch.float64)
        den = torch.zeros(g.shape, dtype=torch.float64)
        for k, st in enumerate(clients):
            if key not in st:
                continue
            w = 1.0 if weights is None else float(weights[k])
            rows, cols = index_of(gates.get(key), sets[k] if sets else None, g.shape)
            dense, held = scatter_full(st[key], rows, cols, g.shape)
            num += w * dense * held
            den += w * held
        res = torch.where(den > 0, num / den.clamp(min=1e-300), g.to(torch.float64))
        out[key] = res.to(g.dtype)
    return out


def assert_sd_close(a, b, **kw):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}", **kw)


# ---- the three methods' neuron sets -------------------------------------------------------------
def test_heterofl_sets_are_ceil_prefixes():
    sets = fki.heterofl_neuron_sets({"a": 200, "b": 10}, [1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 0.3])
    assert [len(s["a"]) for s in sets] == [200, 100, 50, 25, 13, 60]
    assert [len(s["b"]) for s in sets] == [10, 5, 3, 2, 1, 3]  # 0.3 * 10 is 3, not 4
    for s in sets:
        assert torch.equal(s["a"], torch.arange(len(s["a"])))


def test_fedrolex_sets_are_torch_roll_windows():
    for rnd in (0, 1, 4, 11, 12, 13, 257):
        sets = fki.fedrolex_neuron_sets({"h": 12, "g": 5}, [1, 0.5, 0.25], round=rnd)
        for s, r in zip(sets, [1, 0.5, 0.25]):
            for site, w in (("h", 12), ("g", 5)):
                n = math.ceil(r * w)
                want = torch.roll(torch.arange(w), rnd % w)[:n]
                assert torch.equal(s[site], want), (rnd, site)
    # the window advances one neuron per round, so every neuron is trained by small clients
    seen = set()
    for rnd in range(12):
        seen.update(fki.fedrolex_neuron_sets({"h": 12}, [0.25], round=rnd)[0]["h"].tolist())
    assert seen == set(range(12))


def test_fjord_sets_are_nested_prefixes():
    sets = fki.fjord_neuron_sets({"h": 10}, [0.2, 0.4, 1.0, 0.2])
    assert [s["h"].tolist() for s in sets] == [[0, 1], [0, 1, 2, 3], list(range(10)), [0, 1]]


@pytest.mark.parametrize("bad, exc", [([0.0], ValueError), ([1.5], ValueError), (["x"], TypeError), ([], ValueError)])
def test_set_helpers_reject_bad_rates(bad, exc):
    with pytest.raises(exc, match="rates"):
        fki.heterofl_neuron_sets(SITES, bad)
    with pytest.raises(ValueError, match="round"):
        fki.fedrolex_neuron_sets(SITES, [1], round=-1)


# ---- aggregation vs dense re-computations ------------------------------------------------------
def test_heterofl_submodels_equal_scatter_sum_over_count(gen):
    g = make_global(gen)
    sets = fki.heterofl_neuron_sets(SITES, RATES)
    clients = sub_clients(g, sets, gen)
    assert clients[2]["conv.weight"].shape == (2, 2, 3, 2)
    out = fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites=SITES)
    ref = reference_mean(g, clients, sets)
    assert_sd_close(out, ref)
    assert torch.equal(out["gn.num_batches_tracked"], g["gn.num_batches_tracked"])
    # without a full-rate client, the rows nobody holds keep their old values
    out = fki.aggregate_state_dicts(g, clients[1:], neuron_sets=sets[1:], gates=GATES, sites=SITES)
    assert torch.equal(out["fc1.weight"][3:], g["fc1.weight"][3:])
    assert torch.equal(out["conv.weight"][:, 3:], g["conv.weight"][:, 3:])
    assert not torch.equal(out["fc1.weight"][:3], g["fc1.weight"][:3])
    assert_sd_close(out, reference_mean(g, clients[1:], sets[1:]))


@pytest.mark.parametrize("rnd", [0, 3, 5, 6, 17])
def test_fedrolex_rolled_windows_equal_scatter_sum_over_count(gen, rnd):
    g = make_global(gen)
    sets = fki.fedrolex_neuron_sets(SITES, RATES, round=rnd)
    clients = sub_clients(g, sets, gen)
    out = fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites=SITES)
    assert_sd_close(out, reference_mean(g, clients, sets))
    # a rolled window wraps around: with round 3 and width 6, the half-rate client holds rows 3, 4, 5
    if rnd == 3:
        assert sets[1]["h1"].tolist() == [3, 4, 5]


def test_fjord_full_size_uploads_equal_nested_per_width_average(gen):
    g = make_global(gen)
    p_max = [1.0, 0.5, 0.25, 0.5, 0.25, 1.0]
    n_ex = [30, 5, 12, 7, 1, 50]
    sets = fki.fjord_neuron_sets(SITES, p_max)
    # FjORD clients send full-size arrays; values outside their prefix are arbitrary (not trained)
    clients = [{k: torch.randn(v.shape, generator=gen) for k, v in g.items() if v.is_floating_point()}
               for _ in p_max]
    out = fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites=SITES, weights=n_ex)

    # FjORD's rule, written directly: for p from large to small, the p-prefix is the example-weighted
    # mean of the clients with p_max >= p; the prefix of a smaller p overwrites.
    ps = sorted(set(p_max), reverse=True)
    for key, gv in g.items():
        if not gv.is_floating_point():
            assert torch.equal(out[key], gv)
            continue
        want = gv.clone().to(torch.float64)
        o_site, i_site = GATES.get(key, (None, None))
        for p in ps:
            sel = [k for k in range(len(p_max)) if p_max[k] >= p]
            r = math.ceil(p * SITES[o_site]) if o_site else gv.shape[0]
            region = (slice(0, r),)
            if gv.dim() >= 2:
                c = math.ceil(p * SITES[i_site]) if i_site else gv.shape[1]
                region = (slice(0, r), slice(0, c))
            tot = sum(n_ex[k] for k in sel)
            want[region] = sum(n_ex[k] * clients[k][key].to(torch.float64)[region] for k in sel) / tot
        torch.testing.assert_close(out[key], want.to(torch.float32), msg=key)


def test_full_size_and_sub_model_inputs_give_identical_results(gen):
    g = make_global(gen)
    sets = fki.fedrolex_neuron_sets(SITES, RATES, round=4)
    subs = sub_clients(g, sets, gen)
    fulls = []
    for s, st in zip(sets, subs):
        full = {}
        for key, v in st.items():
            if not v.is_floating_point():
                continue
            gv = g[key]
            rows, cols = index_of(GATES.get(key), s, gv.shape)
            dense, held = scatter_full(v, rows, cols, gv.shape, fill=float("nan"))
            junk = torch.randn(gv.shape, generator=gen, dtype=torch.float64)
            full[key] = torch.where(held, dense, junk).to(torch.float32)  # outside the slice: junk
        fulls.append(full)
    a = fki.aggregate_state_dicts(g, subs, neuron_sets=sets, gates=GATES, sites=SITES)
    b = fki.aggregate_state_dicts(g, fulls, neuron_sets=sets, gates=GATES, sites=SITES, client_format="full")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # "auto" reads a state that fits both shapes (client 0 holds every neuron, in rolled order) as a
    # sub-model; the other clients' formats are unambiguous, and formats may differ across clients
    mixed = [subs[0], fulls[1], subs[2], fulls[3], subs[4]]
    d = fki.aggregate_state_dicts(g, mixed, neuron_sets=sets, gates=GATES, sites=SITES)
    for k in a:
        assert torch.equal(a[k], d[k]), k


def test_arbitrary_neuron_sets_and_flat_buffers(gen):
    """Unordered, non-nested neuron sets (no client holds everything): coverage is a union of boxes."""
    g = make_global(gen)
    sets = []
    for k in range(4):
        sets.append({site: torch.randperm(w, generator=gen)[:max(1, w // 2 - k % 2)] for site, w in SITES.items()})
    sets.append({"h1": torch.tensor([], dtype=torch.int64)})          # holds no h1 neuron, all of h2
    clients = sub_clients(g, sets, gen)
    assert clients[4]["fc1.weight"].shape == (0, 4)
    w = [1.0, 2.5, 0.5, 3.0, 1.0]
    out = fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites=SITES, weights=w)
    assert_sd_close(out, reference_mean(g, clients, sets, weights=w))
    # clients whose tensors are views of one flat buffer (e.g. bound with bind_flat_parameters_)
    # are read without a copy and give the same bits
    flat_clients = []
    for st in clients:
        keys = [k for k in st if st[k].is_floating_point()]
        buf = torch.cat([st[k].reshape(-1) for k in keys])
        views, off = {}, 0
        for k in keys:
            n = st[k].numel()
            views[k] = buf[off:off + n].view(st[k].shape)
            off += n
        flat_clients.append(views)
    out2 = fki.aggregate_state_dicts(g, flat_clients, neuron_sets=sets, gates=GATES, sites=SITES, weights=w)
    for k in out:
        assert torch.equal(out[k], out2[k]), k


def test_packing_does_not_change_the_bits(gen, monkeypatch):
    """One kernel call per tensor, or one for all of them: the same bits (results are per element)."""
    g = make_global(gen)
    sets = fki.fedrolex_neuron_sets(SITES, RATES * 3, round=2)
    clients = sub_clients(g, sets, gen)
    w = [float(i % 4) for i in range(len(sets))]
    kw = dict(neuron_sets=sets, gates=GATES, sites=SITES, weights=w)
    whole = fki.aggregate_state_dicts(g, clients, **kw)
    monkeypatch.setattr(fki, "_PACK_ELEMS", 1)          # every tensor its own call
    assert len(fki._packs(list(SHAPES), g)) == len(SHAPES)
    part = fki.aggregate_state_dicts(g, clients, **kw)
    for k in whole:
        assert torch.equal(whole[k], part[k]), k
    monkeypatch.setattr(fki, "_PACK_ELEMS", 100)        # mixed
    part = fki.aggregate_state_dicts(g, clients, **kw)
    for k in whole:
        assert torch.equal(whole[k], part[k]), k
    # and the batched kernel call over the same compact uploads gives the same bits
    import fedrac_kernels as fk

    keys = [k for k in SHAPES]
    lay = fk.NeuronLayout(list(SITES.items()), [(k, SHAPES[k]) + GATES.get(k, (None, None)) for k in keys])
    offs = {s.name: s.offset for s in lay.sites}
    ups = [torch.cat([c[k].reshape(-1) for k in keys]) for c in clients]
    kept = [torch.cat([s["h1"] + offs["h1"], s["h2"] + offs["h2"]]) for s in sets]
    acc = torch.zeros(lay.P)
    fk.compact_mean_update_(acc, ups, lay, kept, weights=w)
    flat_whole = torch.cat([whole[k].reshape(-1) for k in keys])
    assert torch.equal(acc, flat_whole)      # every element is held by a weighted client here


def test_dense_fedavg_is_weighted_mean(gen):
    g = make_global(gen)
    clients = [{k: torch.randn(v.shape, generator=gen) for k, v in g.items() if v.is_floating_point()}
               for _ in range(4)]
    clients[1]["fc1.bias"][2] = 0.0  # an exact zero still counts under the structural rule
    w = [3, 1, 0, 6]
    out = fki.aggregate_state_dicts(g, clients, weights=w)
    for key in clients[0]:
        want = sum(w[k] * clients[k][key].double() for k in range(4)) / sum(w)
        torch.testing.assert_close(out[key], want.float())
    assert torch.equal(out["gn.num_batches_tracked"], g["gn.num_batches_tracked"])


def test_nonzero_rule_averages_updates_of_changed_elements(gen):
    g = make_global(gen)
    sets = fki.heterofl_neuron_sets(SITES, [1.0, 0.5, 0.5])
    clients = []
    for k in range(3):
        st = {}
        for key, v in g.items():
            if not v.is_floating_point():
                continue
            d = torch.randn(v.shape, generator=gen)
            d[torch.rand(v.shape, generator=gen) < 0.3] = 0.0       # untouched elements
            st[key] = v + d
        clients.append(st)
    w = [1.0, 2.0, 3.0]
    for use_sets in (False, True):
        out = fki.aggregate_state_dicts(g, clients, neuron_sets=sets if use_sets else None,
                                        gates=GATES, sites=SITES, weights=w, rule="nonzero")
        for key, gv in g.items():
            if not gv.is_floating_point():
                continue
            num = torch.zeros(gv.shape, dtype=torch.float64)
            den = torch.zeros(gv.shape, dtype=torch.float64)
            for k in range(3):
                d = clients[k][key] - gv                                   # float32, as the kernels
                act = d != 0
                if use_sets:
                    rows, cols = index_of(GATES.get(key), sets[k], gv.shape)
                    act &= scatter_full(torch.zeros(len(rows), *(() if cols is None else (len(cols),)),
                                                    *gv.shape[2:]), rows, cols, gv.shape)[1]
                num += w[k] * d.double() * act
                den += w[k] * act
            want = gv.double() + torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
            torch.testing.assert_close(out[key], want.float(), msg=key)


def test_handwritten_baselines_agree(gen):
    """The benchmark's hand-written forms compute the same thing (so the benchmark compares like with like)."""
    np = pytest.importorskip("numpy")
    from benchmarks.handwritten_submodel import (fjord_average_numpy, fjord_layer_dims, heterofl_combine,
                                                 heterofl_param_idx)

    g = make_global(gen)
    sets = fki.fedrolex_neuron_sets(SITES, RATES, round=2)
    clients = sub_clients(g, sets, gen)
    idx = [heterofl_param_idx(SHAPES, GATES, s) for s in sets]
    hand = heterofl_combine(g, clients, idx)
    ours = fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites=SITES)
    assert_sd_close(hand, ours)

    p_max, n_ex = [1.0, 0.5, 0.25], [4, 9, 2]
    fulls = [{k: torch.randn(v.shape, generator=gen) for k, v in g.items() if v.is_floating_point()}
             for _ in p_max]
    keys = list(SHAPES)
    dims = {p: [fjord_layer_dims(SHAPES, GATES, SITES, p)[k] for k in keys] for p in set(p_max)}
    hand = fjord_average_numpy([g[k].numpy() for k in keys], [[c[k].numpy() for k in keys] for c in fulls],
                               n_ex, p_max, dims)
    ours = fki.aggregate_state_dicts(g, fulls, neuron_sets=fki.fjord_neuron_sets(SITES, p_max), gates=GATES,
                                     sites=SITES, weights=n_ex)
    for k, h in zip(keys, hand):
        torch.testing.assert_close(ours[k], torch.from_numpy(h), msg=k)


# ---- entry policies -----------------------------------------------------------------------------
def test_keys_sent_by_some_clients_and_non_float_entries(gen):
    g = make_global(gen)
    clients = [{k: torch.randn(v.shape, generator=gen) for k, v in g.items() if v.is_floating_point()}
               for _ in range(3)]
    del clients[0]["gn.bias"], clients[2]["gn.bias"]           # only client 1 sent it
    for c in clients:
        del c["fc3.bias"]                                     # nobody sent it
    clients[2]["gn.num_batches_tracked"] = torch.tensor(99)  # ignored: non-float entries come from global
    out = fki.aggregate_state_dicts(g, clients, weights=[1, 2, 3])
    assert torch.equal(out["gn.bias"], clients[1]["gn.bias"])
    assert torch.equal(out["fc3.bias"], g["fc3.bias"])
    assert torch.equal(out["gn.num_batches_tracked"], g["gn.num_batches_tracked"])
    torch.testing.assert_close(out["gn.weight"], (clients[0]["gn.weight"] + 2 * clients[1]["gn.weight"]
                                                  + 3 * clients[2]["gn.weight"]) / 6)
    # a key whose only senders have weight 0 keeps its value
    out = fki.aggregate_state_dicts(g, clients, weights=[1, 0, 3])
    assert torch.equal(out["gn.bias"], g["gn.bias"])


def test_inputs_not_modified_unless_inplace(gen):
    g = make_global(gen)
    sets = fki.heterofl_neuron_sets(SITES, RATES)
    clients = sub_clients(g, sets, gen)
    g0 = {k: v.clone() for k, v in g.items()}
    c0 = [{k: v.clone() for k, v in c.items()} for c in clients]
    s0 = [{k: v.clone() for k, v in s.items()} for s in sets]
    out = fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites=SITES)
    for k in g:
        assert torch.equal(g[k], g0[k])
        assert out[k].data_ptr() != g[k].data_ptr()
    for c, cc in zip(clients, c0):
        assert all(torch.equal(c[k], cc[k]) for k in c)
    for s, ss in zip(sets, s0):
        assert all(torch.equal(s[k], ss[k]) for k in s)
    res = fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites=SITES, inplace=True)
    assert res is g
    for k in g:
        assert torch.equal(g[k], out[k])


def test_dtypes_and_backends(gen):
    g = make_global(gen, torch.float64)
    sets = fki.heterofl_neuron_sets(SITES, RATES)
    clients = sub_clients(g, sets, gen)
    out = fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites=SITES)
    assert out["conv.weight"].dtype == torch.float64
    ref = reference_mean(g, clients, sets)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-6, atol=1e-5)
    # bfloat16 sub-models go to the kernels as they are
    gb = make_global(gen)
    cb = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in c.items()}
          for c in sub_clients(gb, sets, gen)]
    out = fki.aggregate_state_dicts(gb, cb, neuron_sets=sets, gates=GATES, sites=SITES)
    assert_sd_close(out, reference_mean(gb, cb, sets))
    # every available back end gives the same bits
    import fedrac_kernels.api as api

    gf = make_global(gen)
    cf = sub_clients(gf, sets, gen)
    results = [fki.aggregate_state_dicts(gf, cf, neuron_sets=sets, gates=GATES, sites=SITES, backend=b)
               for b in api.available_backends() if b in ("torch", "cpu")]
    for r in results[1:]:
        for k in r:
            assert torch.equal(r[k], results[0][k]), k


def test_nonfinite_client_is_dropped_or_raises(gen):
    g = make_global(gen)
    sets = fki.heterofl_neuron_sets(SITES, [1.0, 0.25, 0.5])
    clients = sub_clients(g, sets, gen)
    clients[0]["fc1.weight"][5, 0] = float("nan")   # row 5 is held by client 0 only
    g0 = {k: v.clone() for k, v in g.items()}
    with pytest.raises(ValueError, match=r"^client_states: non-finite values .* client\(s\) \[0\]"):
        fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites=SITES, inplace=True)
    assert all(torch.equal(g[k], g0[k]) for k in g)       # nothing written
    rep = {}
    with pytest.warns(RuntimeWarning):
        out = fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites=SITES,
                                        nonfinite="drop", report=rep)
    assert rep["dropped_clients"] == [0]
    ref = reference_mean(g, clients[1:], sets[1:])
    assert_sd_close(out, ref)           # rows only client 0 held keep their old values
    assert torch.isfinite(out["fc1.weight"]).all()


# ---- errors -------------------------------------------------------------------------------------
def test_errors_name_the_argument(gen):
    g = make_global(gen)
    sets = fki.heterofl_neuron_sets(SITES, [1.0, 0.5])
    clients = sub_clients(g, sets, gen)
    kw = dict(neuron_sets=sets, gates=GATES, sites=SITES)

    bad = [dict(c) for c in clients]
    bad[1]["fc1.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"^client_states\[1\]\['fc1.weight'\]: shape \(4, 4\)"):
        fki.aggregate_state_dicts(g, bad, **kw)
    bad = [dict(c) for c in clients]
    bad[0]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"^client_states\[0\]: key 'extra'"):
        fki.aggregate_state_dicts(g, bad, **kw)
    bad = [dict(c) for c in clients]
    bad[1]["fc1.bias"] = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"^client_states\[1\]\['fc1.bias'\]"):
        fki.aggregate_state_dicts(g, bad, **kw)
    with pytest.raises(ValueError, match="^client_states: empty"):
        fki.aggregate_state_dicts(g, [], **kw)
    with pytest.raises(TypeError, match="^global_state"):
        fki.aggregate_state_dicts([1, 2], clients)
    with pytest.raises(ValueError, match="^gates: key 'nope'"):
        fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates={"nope": ("h1", None)}, sites=SITES)
    with pytest.raises(ValueError, match="^gates: key 'fc1.weight' names unknown out site 'zz'"):
        fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates={"fc1.weight": ("zz", None)}, sites=SITES)
    with pytest.raises(ValueError, match="^gates: key 'fc1.weight' has 6 entries"):
        fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES, sites={"h1": 7, "h2": 5})
    with pytest.raises(ValueError, match="^gates: required"):
        fki.aggregate_state_dicts(g, clients, neuron_sets=sets, sites=SITES)
    with pytest.raises(ValueError, match="^sites: required"):
        fki.aggregate_state_dicts(g, clients, neuron_sets=sets, gates=GATES)
    with pytest.raises(ValueError, match=r"^neuron_sets\[1\]\['h1'\]: neuron index 9 out of range"):
        fki.aggregate_state_dicts(g, clients, neuron_sets=[sets[0], {"h1": [0, 9]}], gates=GATES, sites=SITES)
    with pytest.raises(ValueError, match=r"^neuron_sets\[1\]\['h2'\]: repeated"):
        fki.aggregate_state_dicts(g, clients, neuron_sets=[sets[0], {"h2": [1, 1]}], gates=GATES, sites=SITES)
    with pytest.raises(ValueError, match=r"^neuron_sets\[0\]: unknown site 'q'"):
        fki.aggregate_state_dicts(g, clients, neuron_sets=[{"q": [0]}, None], gates=GATES, sites=SITES)
    with pytest.raises(ValueError, match="^neuron_sets: expected K=2"):
        fki.aggregate_state_dicts(g, clients, neuron_sets=sets[:1], gates=GATES, sites=SITES)
    with pytest.raises(ValueError, match="^weights: expected K=2"):
        fki.aggregate_state_dicts(g, clients, weights=[1, 2, 3], **kw)
    with pytest.raises(ValueError, match="^weights: all weights are zero"):
        fki.aggregate_state_dicts(g, clients, weights=[0, 0], **kw)
    with pytest.raises(ValueError, match="^weights: every weight"):
        fki.aggregate_state_dicts(g, clients, weights=[1, -1], **kw)
    with pytest.raises(ValueError, match="^rule"):
        fki.aggregate_state_dicts(g, clients, rule="mean", **kw)
    with pytest.raises(ValueError, match="^rule: 'nonzero'"):
        fki.aggregate_state_dicts(g, clients, rule="nonzero", **kw)
    with pytest.raises(ValueError, match="^client_format"):
        fki.aggregate_state_dicts(g, clients, client_format="x", **kw)
    with pytest.raises(ValueError, match=r"^client_states\[1\]: client_format='full'"):
        fki.aggregate_state_dicts(g, clients, client_format="full", **kw)


def test_package_never_imports_flower_and_the_flower_module_says_how_to_install():
    code = ("import sys, fedrac_kernels, fedrac_kernels.interop\n"
            "assert 'flwr' not in sys.modules, 'importing fedrac_kernels imported flwr'\n"
            "sys.modules['flwr'] = None\n"
            "try:\n    import fedrac_kernels.flower\nexcept ImportError as e:\n    print(e)\n"
            "else:\n    raise SystemExit('no ImportError without flwr')\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout
    assert "pip install fedrac[flower]" in out


def test_reuse_doc_example_runs():
    """The runnable example of docs/REUSE.md stays runnable."""
    import re

    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "REUSE.md")
    if not os.path.exists(doc):
        pytest.skip("docs/REUSE.md not present")
    blocks = re.findall(r"```python\n(.*?)```", open(doc).read(), re.S)
    example = [b for b in blocks if "load_state_dict" in b and "heterofl_neuron_sets" in b]
    assert example, "no runnable example found"
    exec(compile(example[0], "REUSE.md", "exec"), {})
