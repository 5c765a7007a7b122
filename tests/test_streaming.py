"""StreamingAggregator equals the batched ops bit for bit, however the clients are chunked.

Also: the non-finite policies (a failed add leaves the state untouched), checkpoints, the piece
pipeline that overlaps host->device copies with accumulation (its piece logic runs on the CPU
here; the CUDA stream path has a GPU test).
"""
from __future__ import annotations

import pytest
import torch

import fedrac_kernels as fk
from fedrac_kernels.layout import NestedMasks, NeuronLayout
from fedrac_kernels.streaming import _HostToDevice

HAS_CUDA = torch.cuda.is_available()
BACKENDS = fk.available_backends()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def dev_of(backend):
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


def small(backend):
    return backend == "triton" and not HAS_CUDA


def conv_layout():
    return NeuronLayout([("c1", 6), ("c2", 4)], [
        ("conv1.weight", (6, 3, 3, 3), "c1", None), ("conv1.bias", (6,), "c1", None),
        ("gn.weight", (6,), "c1", None), ("gn.bias", (6,), "c1", None),
        ("conv2.weight", (4, 6, 3, 3), "c2", "c1"), ("conv2.bias", (4,), "c2", None),
        ("fc.weight", (5, 4), None, "c2"), ("fc.bias", (5,), None, None)])


def rand_deltas(gen, K, P, dtype=torch.float32, zero_frac=0.25):
    d = torch.randn(K, P, generator=gen)
    d[torch.rand(K, P, generator=gen) < zero_frac] = 0.0
    return d.to(dtype)


def rand_weights(gen, K):
    w = torch.rand(K, generator=gen) + 0.1
    if K > 2:
        w[1] = 0.0
    return w


def feed(agg, method, chunks, *args_per_chunk):
    for (a, b), extra in zip(chunks, zip(*args_per_chunk)):
        getattr(agg, method)(*extra)


CHUNKINGS = {
    "one_by_one": lambda K: [(k, k + 1) for k in range(K)],
    "all": lambda K: [(0, K)],
    "mixed": lambda K: [(0, 1), (1, min(K, 4)), (min(K, 4), K)] if K > 4 else [(0, K)],
}


# ------------------------------------------------------------------------------------------ dense
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("with_masks", [False, True])
def test_dense_streaming_equals_batched(backend, dtype, chunking, with_masks, gen):
    if small(backend) and (dtype != torch.bfloat16 or chunking == "all"):
        pytest.skip("reduced matrix under the Triton interpreter")
    dev = dev_of(backend)
    K, P = (6, 211) if small(backend) else (9, 2053)
    d = rand_deltas(gen, K, P, dtype).to(dev)
    w = rand_weights(gen, K)
    m = (torch.rand(K, P, generator=gen) < 0.7).to(dev) if with_masks else None
    g0 = torch.randn(P, generator=gen).to(dev)
    want = fk.masked_mean_update_(g0.clone(), d, weights=w, masks=m, backend=backend)
    agg = fk.StreamingAggregator(g0, backend=backend)
    for a, b in CHUNKINGS[chunking](K):
        if b - a == 1 and a % 2 == 0:  # single client: 1-D delta, float weight, 1-D mask
            agg.add(d[a], float(w[a]), None if m is None else m[a])
        elif a % 2:                   # a list chunk with a weight tensor
            agg.add(list(d[a:b].unbind(0)), w[a:b], None if m is None else list(m[a:b].unbind(0)))
        else:
            agg.add(d[a:b], w[a:b].tolist(), None if m is None else m[a:b])
    assert agg.clients == K
    got = agg.apply_(g0.clone())
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if dev_of(b).type == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_piece_pipeline_equals_batched(backend, dtype, gen):
    """Chunks split into pieces (as for host->device streaming) chain init -> acc exactly."""
    K, P = (5, 97) if small(backend) else (11, 1031)
    d = rand_deltas(gen, K, P, dtype)
    w = rand_weights(gen, K)
    m = torch.rand(K, P, generator=gen) < 0.6
    g0 = torch.randn(P, generator=gen)
    for masks in (None, m):
        want = fk.masked_mean_update_(g0.clone(), d, weights=w, masks=masks, backend=backend)
        row_bytes = P * d.element_size() + (P if masks is not None else 0)
        for budget in (1, 2 * row_bytes + 5, 10**9):
            agg = fk.StreamingAggregator(P, backend=backend, transfer_bytes=budget)
            agg._force_pipeline = True
            agg.add(d[:4], w[:4], None if masks is None else masks[:4])
            agg.add(d[4:], w[4:], None if masks is None else masks[4:])
            assert torch.equal(agg.apply_(g0.clone()), want), (budget, masks is None)


def test_pieces_split():
    assert _HostToDevice.pieces([10, 10, 10], 25) == [(0, 2), (2, 3)]
    assert _HostToDevice.pieces([10, 30, 10], 25) == [(0, 1), (1, 2), (2, 3)]
    assert _HostToDevice.pieces([10, 10, 10], 1) == [(0, 1), (1, 2), (2, 3)]
    assert _HostToDevice.pieces([10, 10, 10], 100) == [(0, 3)]
    assert _HostToDevice.pieces([], 100) == []
    assert _HostToDevice._aligned(5, 2) == 8 and _HostToDevice._aligned(8, 4) == 8


# ---------------------------------------------------------------------------- structured, compact
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "nested"])
@pytest.mark.parametrize("rule", ["structural", "nonzero"])
def test_structured_streaming_equals_batched(backend, form, rule, gen):
    if small(backend) and (form, rule) != ("nested", "nonzero"):
        pytest.skip("reduced matrix under the Triton interpreter")
    lay = conv_layout()
    dev = dev_of(backend)
    K = 4 if small(backend) else 7
    d = rand_deltas(gen, K, lay.P, torch.bfloat16).to(dev)
    w = rand_weights(gen, K)
    if form == "dense":
        nm = (torch.rand(K, lay.N, generator=gen) < 0.6).to(dev)
        parts = [nm[0], nm[1:3], nm[3:]]
    else:
        nm = NestedMasks(torch.randperm(lay.N, generator=gen), torch.randint(0, lay.N + 1, (K,), generator=gen))
        parts = [nm.select(0), nm.select(slice(1, 3)), nm.select(slice(3, K))]
    g0 = torch.randn(lay.P, generator=gen).to(dev)
    want = fk.structured_mean_update_(g0.clone(), d, lay, nm, weights=w, rule=rule, backend=backend)
    agg = fk.StreamingAggregator(g0, layout=lay, backend=backend)
    agg.add_structured(d[0], parts[0], float(w[0]), rule=rule)
    agg.add_structured(d[1:3], parts[1], w[1:3], rule=rule)
    agg.add_structured(list(d[3:].unbind(0)), parts[2], w[3:], rule=rule)
    assert torch.equal(agg.apply_(g0.clone()), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_streaming_equals_batched(backend, gen):
    lay = conv_layout()
    dev = dev_of(backend)
    K = 4 if small(backend) else 6
    kept = []
    for k in range(K):  # rolled windows per site
        idx = []
        for s in lay.sites:
            n = int(torch.randint(0, s.width + 1, (1,), generator=gen))
            idx.append((k + torch.arange(n)) % s.width + s.offset)
        kept.append(torch.cat(idx))
    d = rand_deltas(gen, K, lay.P)
    ups = [u.to(dev) for u in fk.compact_pack(d, lay, kept)]
    w = rand_weights(gen, K)
    g0 = torch.randn(lay.P, generator=gen).to(dev)
    want = fk.compact_mean_update_(g0.clone(), ups, lay, kept, weights=w, backend=backend)
    agg = fk.StreamingAggregator(lay.P, layout=lay, device=dev, backend=backend)
    agg.add_compact(ups[0], kept[0], float(w[0]))
    agg.add_compact(ups[1:K - 1], kept[1:K - 1], w[1:K - 1])
    agg.add_compact(ups[K - 1], kept[K - 1].tolist(), float(w[K - 1]))
    assert torch.equal(agg.apply_(g0.clone()), want)


# -------------------------------------------------------------------------------- non-finite values
def test_raise_leaves_state_untouched(gen):
    K, P = 5, 53
    d = rand_deltas(gen, K, P)
    agg = fk.StreamingAggregator(P)
    agg.add(d[:2])
    before = agg.state_dict()
    bad = d[2:].clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^delta: .*client\(s\) \[1\] of this chunk; the aggregator state is unchanged"):
        agg.add(bad)
    after = agg.state_dict()
    assert torch.equal(before["num"], after["num"]) and torch.equal(before["den"], after["den"])
    assert agg.clients == 2 and agg.dropped == []
    agg.add(d[2:])  # the state still continues exactly
    g0 = torch.randn(P, generator=gen)
    assert torch.equal(agg.apply_(g0.clone()), fk.masked_mean_update_(g0.clone(), d))


def test_drop_skips_clients_and_reports_positions(gen):
    K, P = 6, 41
    d = rand_deltas(gen, K, P)
    d[1, 0] = float("inf")
    d[4, 7] = float("nan")
    agg = fk.StreamingAggregator(P, nonfinite="drop")
    with pytest.warns(RuntimeWarning, match=r"dropped client\(s\) \[1\]"):
        agg.add(d[:3])
    with pytest.warns(RuntimeWarning, match=r"dropped client\(s\) \[4\] \(chunk position\(s\) \[1\]\)"):
        agg.add(d[3:])
    assert agg.dropped == [1, 4] and agg.clients == 4
    w = torch.ones(K)
    w[[1, 4]] = 0
    g0 = torch.randn(P, generator=gen)
    assert torch.equal(agg.apply_(g0.clone()), fk.masked_mean_update_(g0.clone(), d, weights=w, nonfinite="drop"))


def test_assume_finite_accumulates_in_place(gen):
    d = rand_deltas(gen, 3, 29)
    agg = fk.StreamingAggregator(29, nonfinite="assume_finite")
    num_id = id(agg._num)
    agg.add(d)
    assert id(agg._num) == num_id
    g0 = torch.randn(29, generator=gen)
    assert torch.equal(agg.apply_(g0.clone()), fk.masked_mean_update_(g0.clone(), d))


def test_zero_weights_and_empty_apply(gen):
    agg = fk.StreamingAggregator(7)
    with pytest.raises(ValueError, match=r"^clients: no client"):
        agg.apply_(torch.zeros(7))
    agg.add(rand_deltas(gen, 2, 7), 0.0)  # allowed while streaming ...
    with pytest.raises(ValueError, match=r"^weights: every client added so far has weight 0"):
        agg.apply_(torch.zeros(7))     # ... but the mean needs one positive weight
    agg.add(torch.ones(7), 2.0)
    g = agg.apply_(torch.zeros(7))
    assert g.tolist() == [1.0] * 7
    agg.reset()
    assert agg.clients == 0 and not agg.state_dict()["num"].any()


# ------------------------------------------------------------------------------------ checkpoints
def test_state_dict_roundtrip_continues_bitwise(gen):
    K, P = 6, 101
    d = rand_deltas(gen, K, P, torch.float16)
    w = rand_weights(gen, K)
    agg = fk.StreamingAggregator(P, nonfinite="drop")
    agg.add(d[:3], w[:3])
    sd = agg.state_dict()
    sd["num"].add_(0)  # a clone: mutating the checkpoint does not touch the aggregator
    agg2 = fk.StreamingAggregator(P, nonfinite="drop")
    agg2.load_state_dict(sd)
    agg.add(d[3:], w[3:])
    agg2.add(d[3:], w[3:])
    g0 = torch.randn(P, generator=gen)
    assert torch.equal(agg.apply_(g0.clone()), agg2.apply_(g0.clone()))
    assert torch.equal(agg2.apply_(g0.clone()), fk.masked_mean_update_(g0.clone(), d, weights=w))
    assert agg2.clients == K


def test_load_state_dict_validation_leaves_state(gen):
    agg = fk.StreamingAggregator(5)
    agg.add(rand_deltas(gen, 1, 5))
    before = agg.state_dict()
    good = agg.state_dict()
    for bad, err, match in [
        ({**good, "num": torch.zeros(4)}, ValueError, r"^sd: 'num' has shape"),
        ({**good, "den": torch.zeros(5, dtype=torch.float64)}, TypeError, r"^sd: 'den' must be a float32"),
        ({**good, "P": 6}, ValueError, r"^sd: saved with P=6"),
        ({k: v for k, v in good.items() if k != "seen"}, ValueError, r"^sd: missing key"),
        ([1, 2], TypeError, r"^sd: expected a dict"),
    ]:
        with pytest.raises(err, match=match):
            agg.load_state_dict(bad)
        assert torch.equal(agg.state_dict()["num"], before["num"]) and agg.clients == 1


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("with_masks", [False, True])
def test_cuda_state_with_host_chunks_equals_batched(pinned, with_masks, gen):
    """CPU chunks streamed into a CUDA aggregator through the side-stream pipeline (many pieces)."""
    dev = torch.device("cuda")
    K, P = 12, 100_003
    d = rand_deltas(gen, K, P, torch.bfloat16)
    w = rand_weights(gen, K)
    m = torch.rand(K, P, generator=gen) < 0.7 if with_masks else None
    if pinned:
        d = d.pin_memory()
        m = m.pin_memory() if m is not None else None
    g0 = torch.randn(P, generator=gen, device="cpu").to(dev)
    want = fk.masked_mean_update_(g0.clone(), d.to(dev), weights=w, masks=None if m is None else m.to(dev))
    for budget in (P * 2 + 1, 3 * P * 3, 1 << 30):  # one row per piece, a few rows, everything
        agg = fk.StreamingAggregator(g0, transfer_bytes=budget)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())  # g0 and the zeroed state were made there
        with torch.cuda.stream(side):  # the pipeline follows the caller's current stream
            agg.add(d[:5], w[:5], None if m is None else m[:5])
            agg.add(list(d[5:].unbind(0)), w[5:], None if m is None else list(m[5:].unbind(0)))
            got = agg.apply_(g0.clone())
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        assert torch.equal(got, want), budget
        # reused buffers: a second round on the same aggregator is exact too
        agg.reset()
        agg.add(d, w, m)
        assert torch.equal(agg.apply_(g0.clone()), want)


@pytest.mark.gpu
def test_cuda_host_chunks_raise_and_drop(gen):
    dev = torch.device("cuda")
    K, P = 6, 4099
    d = rand_deltas(gen, K, P)
    d[3, 17] = float("nan")
    agg = fk.StreamingAggregator(P, device=dev, transfer_bytes=P * 4)
    with pytest.raises(ValueError, match=r"client\(s\) \[3\]"):
        agg.add(d)
    assert agg.clients == 0 and not agg.state_dict()["den"].any()
    agg = fk.StreamingAggregator(P, device=dev, transfer_bytes=P * 4, nonfinite="drop")
    with pytest.warns(RuntimeWarning):
        agg.add(d)
    w = torch.ones(K)
    w[3] = 0
    g0 = torch.zeros(P, device=dev)
    assert torch.equal(agg.apply_(g0.clone()), fk.masked_mean_update_(g0.clone(), d.to(dev), weights=w))
