"""Evaluation: plain accuracy, multi-mask, fused nested candidates (spec K5) and per-client metrics."""
import math

import pytest
import torch
import torch.nn.functional as F

import fedrac.evaluation as ev
from fedrac.evaluation import (accuracy, client_metrics, evaluate, masks_accuracy,
                               nested_candidate_accuracy, nested_masks)
from fedrac.models import bind_flat_parameters_, build_model, flatten_parameters


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(classes=10, shape=(1, 8, 8), seed=0):
    m = build_model("mlp", dataset="digits", num_classes=classes, input_shape=shape, seed=seed)
    return m, flatten_parameters(m)


def _resnet(classes=6):
    m = build_model("resnet18", dataset="tinyimagenet", num_classes=classes, input_shape=(3, 8, 8),
                    seed=0)
    return m, flatten_parameters(m)


def _naive_counts(model, params, x, y, masks):
    """One separate float32 forward per mask."""
    return torch.tensor([round(accuracy(model, params, x, y, mask=mk) * x.shape[0]) for mk in masks])


def _float64_counts(model, params, x, y, masks):
    """Per-candidate MLP forward with layer 2 and the head in float64 (the robust reference)."""
    bind_flat_parameters_(model, params)
    H = model.hidden
    with torch.no_grad():
        h1 = model.forward_shared(x).double()
        W2, b2 = model.fc2.weight.double(), model.fc2.bias.double()
        W3, b3 = model.fc3.weight.double(), model.fc3.bias.double()
        out = []
        for mk in masks.double():
            z = F.relu((h1 * mk[:H]) @ W2.t() + b2) * mk[H:]
            out.append(int(((z @ W3.t() + b3).argmax(1) == y).sum()))
    return torch.tensor(out)


def test_accuracy_and_evaluate(gen):
    m, p = _mlp()
    x, y = torch.randn(37, 1, 8, 8, generator=gen), torch.randint(0, 10, (37,), generator=gen)
    bind_flat_parameters_(m, p)
    with torch.no_grad():
        logits = m(x)
    expect = (logits.argmax(1) == y).float().mean().item()
    assert accuracy(m, p, x, y, batch_size=5) == pytest.approx(expect)
    r = evaluate(m, p, x, y, batch_size=8)
    assert r["correct"] == round(expect * 37) and r["n"] == 37
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_masks_accuracy_equals_separate_forwards(kind, gen):
    m, p = _mlp() if kind == "mlp" else _resnet()
    n = 40 if kind == "mlp" else 9
    shape = (1, 8, 8) if kind == "mlp" else (3, 8, 8)
    classes = 10 if kind == "mlp" else 6
    x, y = torch.randn((n,) + shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    masks = torch.rand(5, m.num_neurons, generator=gen) < 0.6
    masks[3] = masks[1]                       # duplicates are evaluated once, reported twice
    masks[4] = True
    acc, loss = masks_accuracy(m, p, x, y, masks, batch_size=16, return_loss=True)
    counts = (acc * n).round().long()
    assert torch.equal(counts, _naive_counts(m, p, x, y, masks))
    ref_loss = torch.tensor([evaluate(m, p, x, y, mask=mk)["loss"] for mk in masks], dtype=torch.float64)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert acc[4] == accuracy(m, p, x, y)
    with pytest.raises(ValueError, match="masks"):
        masks_accuracy(m, p, x, y, masks[:, 1:])


def _orders(N, gen):
    return {"identity": torch.arange(N),               # round 2: all ties, layer 1 first
            "layer2_first": torch.cat([torch.arange(200, 400), torch.arange(200)]),
            "random": torch.randperm(N, generator=gen)}


@pytest.mark.parametrize("order_kind", ["identity", "layer2_first", "random"])
def test_nested_mlp_equals_naive_and_float64(order_kind, gen):
    m, p = _mlp()
    n = 300
    x, y = torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    order = _orders(400, gen)[order_kind]
    # unsorted, repeated, empty (0), layer-1-only candidates (<= 200 in identity order), full
    sizes = torch.tensor([400, 8, 0, 16, 16, 200, 208, 96, 392, 3, 301, 399, 1])
    acc, loss = nested_candidate_accuracy(m, p, x, y, order, sizes, batch_size=128, return_loss=True)
    masks = nested_masks(order, sizes)
    counts = (acc * n).round().long()
    assert torch.equal(counts, _naive_counts(m, p, x, y, masks))
    assert torch.equal(counts, _float64_counts(m, p, x, y, masks))
    ref_loss = torch.tensor([evaluate(m, p, x, y, mask=mk)["loss"] for mk in masks], dtype=torch.float64)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    # an empty layer gives logits = output bias: the accuracy of always predicting argmax(b3)
    top = int(m.fc3.bias.argmax())
    assert counts[2] == int((y == top).sum())
    if order_kind == "identity":
        assert (counts[[1, 3, 4, 5, 7, 9, 12]] == int((y == top).sum())).all()


def test_nested_mlp_pack8_fifty_candidates_62_classes(gen):
    """The FedRAC shape (C = 50 prefixes of 8) with a 62-way head (padded head width 64)."""
    m, p = _mlp(classes=62, shape=(1, 6, 6), seed=3)
    n = 400
    x, y = torch.randn(n, 1, 6, 6, generator=gen), torch.randint(0, 62, (n,), generator=gen)
    order = torch.randperm(400, generator=gen)
    sizes = torch.arange(1, 51) * 8
    acc = nested_candidate_accuracy(m, p, x, y, order, sizes)
    masks = nested_masks(order, sizes)
    assert torch.equal((acc * n).round().long(), _naive_counts(m, p, x, y, masks))
    assert torch.equal((acc * n).round().long(), _float64_counts(m, p, x, y, masks))


def test_nested_mlp_exact_ties_and_forced_recheck(gen, monkeypatch):
    m, p = _mlp(seed=4)
    bind_flat_parameters_(m, p)
    with torch.no_grad():                   # classes 2 and 7 identical: every sample ties
        m.fc3.weight[7] = m.fc3.weight[2]
        m.fc3.bias[7] = m.fc3.bias[2] = m.fc3.bias.max() + 5.0
    p = flatten_parameters(m)
    n = 64
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    y[:20] = 7                              # never correct: argmax takes the first of a tie
    y[20:40] = 2
    order = torch.randperm(400, generator=gen)
    sizes = torch.tensor([0, 40, 200, 232, 400])
    masks = nested_masks(order, sizes)
    acc = nested_candidate_accuracy(m, p, x, y, order, sizes)
    counts = (acc * n).round().long()
    assert torch.equal(counts, _naive_counts(m, p, x, y, masks))
    assert torch.equal(counts, _float64_counts(m, p, x, y, masks))
    # every decision recomputed in float64 must give the same counts
    monkeypatch.setattr(ev, "_NEAR_TIE_RTOL", 1e9)
    assert torch.equal(nested_candidate_accuracy(m, p, x, y, order, sizes), acc)


def test_nested_resnet_equals_masks(gen):
    m, p = _resnet()
    n = 5
    x, y = torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 6, (n,), generator=gen)
    order = torch.randperm(1024, generator=gen)
    sizes = torch.tensor([1024, 64, 512, 0])
    acc, loss = nested_candidate_accuracy(m, p, x, y, order, sizes, batch_size=8, return_loss=True)
    masks = nested_masks(order, sizes)
    assert torch.equal((acc * n).round().long(), _naive_counts(m, p, x, y, masks))
    ref_loss = torch.tensor([evaluate(m, p, x, y, mask=mk)["loss"] for mk in masks], dtype=torch.float64)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_nested_counts_shards_sum_to_the_one_process_counts(kind, gen):
    """The distributed candidate sweep: W ranks each count 1/W of the rows (whole evaluation
    blocks, round robin) and the counts add up exactly to the one-process counts."""
    from fedrac.evaluation import nested_candidate_counts, shard_rows

    if kind == "mlp":
        m, p = _mlp()
        p = p + 0.3 * torch.randn(p.shape, generator=gen)
        n, bs = 101, 8                      # 13 blocks of 8 rows, the last one of 5
        x, y = torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
        order, sizes = torch.randperm(m.num_neurons, generator=gen), torch.tensor([400, 8, 200, 64, 0, 200])
    else:
        m, p = _resnet()
        n, bs = 11, 8                       # 4 distinct candidates: blocks of 2 rows
        x, y = torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 6, (n,), generator=gen)
        order, sizes = torch.randperm(1024, generator=gen), torch.tensor([1024, 64, 512, 0])
    acc = nested_candidate_accuracy(m, p, x, y, order, sizes, batch_size=bs)
    full = nested_candidate_counts(m, p, x, y, order, sizes, batch_size=bs)
    assert full.dtype == torch.int64 and torch.equal(full.double() / n, acc)
    assert full.sum() > 0 and full.max() < n    # not a degenerate all-wrong / all-right case
    unit = 8 if kind == "mlp" else 2
    for W in (1, 2, 3, 5, 20):
        parts = [shard_rows(m, n, sizes, (i, W), bs) for i in range(W)]
        rows = torch.cat(parts)
        assert torch.equal(torch.sort(rows).values, torch.arange(n))      # a partition of the rows
        for i, idx in enumerate(parts):                                 # whole blocks b = i mod W
            assert all(int(r) // unit % W == i for r in idx)
        counts = [nested_candidate_counts(m, p, x, y, order, sizes, batch_size=bs, shard=(i, W)) for i in range(W)]
        assert torch.equal(torch.stack(counts).sum(0), full), W
        for i in range(W):
            assert torch.equal(counts[i], nested_candidate_counts(m, p, x[parts[i]], y[parts[i]], order, sizes,
                                                                  batch_size=bs))
    with pytest.raises(ValueError, match="shard"):
        nested_candidate_counts(m, p, x, y, order, sizes, shard=(2, 2))


def test_nested_masks_and_bad_arguments():
    nm = nested_masks(torch.tensor([2, 0, 1]), torch.tensor([0, 1, 3, 2]))
    assert nm.tolist() == [[False, False, False], [False, False, True], [True, True, True],
                           [True, False, True]]
    m, p = _mlp()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="order"):
        nested_candidate_accuracy(m, p, x, y, torch.zeros(400, dtype=torch.long), [8])
    with pytest.raises(ValueError, match="sizes"):
        nested_candidate_accuracy(m, p, x, y, torch.arange(400), [401])
    with pytest.raises(ValueError, match="params"):
        nested_candidate_accuracy(m, p[:-1], x, y, torch.arange(400), [8])


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_client_metrics(kind, gen):
    m, p = _mlp() if kind == "mlp" else _resnet()
    shape = (1, 8, 8) if kind == "mlp" else (3, 8, 8)
    classes = 10 if kind == "mlp" else 6
    sizes = [7, 0, 12, 3] if kind == "mlp" else [3, 0, 4, 2]
    data = [(torch.randn((k,) + shape, generator=gen), torch.randint(0, classes, (k,), generator=gen))
            for k in sizes]
    masks = torch.rand(4, m.num_neurons, generator=gen) < 0.7
    masks[2] = masks[0]                        # clients 0 and 2 share a submodel
    r = client_metrics(m, p, data, masks, batch_size=5)
    for k, (xk, yk) in enumerate(data):
        if xk.shape[0] == 0:
            assert math.isnan(r["accuracy"][k]) and math.isnan(r["loss"][k])
            continue
        e = evaluate(m, p, xk, yk, mask=masks[k])
        assert r["correct"][k] == e["correct"]
        assert r["loss"][k].item() == pytest.approx(e["loss"], rel=1e-5)
    assert r["num_samples"].tolist() == sizes
    assert r["weighted_accuracy"] == pytest.approx(r["correct"].sum().item() / sum(sizes))
    full = client_metrics(m, p, data, None)
    assert full["correct"][0] == evaluate(m, p, *data[0])["correct"]
    with pytest.raises(ValueError, match="masks"):
        client_metrics(m, p, data, masks[:3])


def test_accepts_fedrac_kernels_nested_masks(gen):
    fk = pytest.importorskip("fedrac_kernels")
    if not hasattr(fk, "NestedMasks"):
        pytest.skip("fedrac_kernels.NestedMasks not available yet")
    m, p = _mlp()
    x, y = torch.randn(20, 1, 8, 8, generator=gen), torch.randint(0, 10, (20,), generator=gen)
    order, sizes = torch.randperm(400, generator=gen), torch.tensor([8, 200, 400])
    nm = fk.NestedMasks(order, sizes)
    dense = nested_masks(order, sizes)
    assert torch.equal(masks_accuracy(m, p, x, y, nm), masks_accuracy(m, p, x, y, dense))
    data = [(x[:7], y[:7]), (x[7:12], y[7:12]), (x[12:], y[12:])]
    assert torch.equal(client_metrics(m, p, data, nm)["correct"],
                       client_metrics(m, p, data, dense)["correct"])


@pytest.mark.parametrize("kind", ["nested", "dense", "full"])
def test_client_metrics_mlp_subsets_match_separate_evaluations(kind, gen):
    """The MLP path (one layer-1 pass per client, restricted to its submodel): per-client and
    per-subset values equal separate evaluations of each client's submodel on those rows."""
    fk = pytest.importorskip("fedrac_kernels")
    m, p = _mlp()
    sizes_n = [30, 0, 45, 17, 60]
    data = [(torch.randn(k, 1, 8, 8, generator=gen), torch.randint(0, 10, (k,), generator=gen)) for k in sizes_n]
    order = torch.randperm(400, generator=gen)
    sizes = torch.tensor([8, 400, 232, 0, 392])
    dense = nested_masks(order, sizes)
    if kind == "nested":
        masks = fk.NestedMasks(order, sizes)
    elif kind == "dense":
        masks = torch.rand(5, 400, generator=gen) < 0.6
        masks[2] = masks[0]
        dense = masks
    else:
        masks, dense = None, torch.ones(5, 400, dtype=torch.bool)
    subsets = [torch.randperm(k, generator=gen)[:max(1, k // 3)] if k else torch.zeros(0, dtype=torch.long)
               for k in sizes_n]
    r = client_metrics(m, p, data, masks, batch_size=16, subsets=subsets)
    for k, (xk, yk) in enumerate(data):
        for res, rows in ((r, slice(None)), (r["subset"], subsets[k])):
            xs, ys = xk[rows], yk[rows]
            if xs.shape[0] == 0:
                assert math.isnan(res["accuracy"][k]) and math.isnan(res["loss"][k])
                continue
            e = evaluate(m, p, xs, ys, mask=dense[k])
            assert res["correct"][k] == e["correct"]
            assert res["loss"][k].item() == pytest.approx(e["loss"], rel=1e-5)
            assert res["correct"][k] == _float64_counts(m, p, xs, ys, dense[k:k + 1])[0]
    assert r["subset"]["num_samples"].tolist() == [s.numel() for s in subsets]


def test_nested_layer1_float64_recheck_and_fallback_kernel(gen, monkeypatch):
    """Every decision rechecked with layer 1 in float64, and the plain addmm kernel instead of
    oneDNN, give the same counts (and the losses agree)."""
    import fedrac._fastmath as fm

    m, p = _mlp(seed=5)
    n = 200
    x, y = torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    order = torch.randperm(400, generator=gen)
    sizes = torch.arange(0, 51) * 8
    acc, loss = nested_candidate_accuracy(m, p, x, y, order, sizes, batch_size=64, return_loss=True)
    monkeypatch.setattr(ev, "_NEAR_TIE_RTOL", 1e9)
    monkeypatch.setattr(ev, "_LAYER1_RTOL", 1e9)
    assert torch.equal(nested_candidate_accuracy(m, p, x, y, order, sizes, batch_size=64), acc)
    monkeypatch.undo()
    monkeypatch.setattr(fm, "_ONEDNN", False)
    acc2, loss2 = nested_candidate_accuracy(m, p, x, y, order, sizes, batch_size=64, return_loss=True)
    assert torch.equal(acc2, acc)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-7)
    assert torch.equal((acc * n).round().long(), _float64_counts(m, p, x, y, nested_masks(order, sizes)))


def test_linear_relu_kernels_agree(gen):
    from fedrac._fastmath import linear_relu

    x = torch.randn(37, 300, generator=gen)
    w = torch.randn(20, 300, generator=gen)
    b = torch.randn(20, generator=gen)
    ref = torch.relu(x.double() @ w.double().t() + b.double())
    with torch.no_grad():
        got = linear_relu(x, w, b)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
        assert torch.equal(linear_relu(x, w, b), got)  # deterministic for one shape
        # rows and weight-row subsets: the same values up to float32 rounding (the bits may differ:
        # torch 2.11's oneDNN and MKL round a row differently in a block of 15 rows than of 37)
        sub = linear_relu(x[5:20], w[:7].contiguous(), b[:7].contiguous())
        bound = 2 * 300 * 2.0 ** -24 * (x[5:20].abs() @ w[:7].abs().t() + b[:7].abs())  # float32 dot error
        assert ((sub - got[5:20, :7]).abs() <= bound).all()
        assert not torch.equal(sub, torch.zeros_like(sub))


def test_auto_eval_batch_size():
    """eval_batch_size=auto: one fused chunk for the MLP; the ResNet keeps the module default on CPU
    and stacks ~16x more rows per forward on CUDA (fewer launches), scaled down for 64x64 inputs."""
    from fedrac import runner
    from fedrac.config import auto_eval_batch_size

    assert auto_eval_batch_size("mlp", "digits", "cpu") == auto_eval_batch_size("mlp", "cifar10", "cuda") == 16384
    assert auto_eval_batch_size("resnet18", "cifar10", "cpu") == 0        # -> ev._DEFAULT_ROWS (256)
    assert auto_eval_batch_size("resnet18", "cifar10", "cuda") == 4096
    assert auto_eval_batch_size("resnet18", "tinyimagenet", "cuda:1") == 1024
    assert ev._DEFAULT_ROWS["MaskedResNet18"] == 256
    cfg, _ = runner.load_config([("t", {"device": "cpu"})])
    assert cfg["eval_batch_size"] == 16384
    cfg, _ = runner.load_config([("t", {"device": "cpu", "eval_batch_size": "64"})])
    assert cfg["eval_batch_size"] == 64
