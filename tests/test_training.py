"""Local training (spec §1.3) against a plain torch.optim reference, and standalone epochs."""
import math

import pytest
import torch
import torch.nn.functional as F

from fedrac.evaluation import accuracy
from fedrac.models import bind_flat_parameters_, build_model, flatten_parameters
from fedrac.training import holdout_split, local_train, train_epochs


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, params, x, y, *, mask, num_steps, batch_size, lr, clip_grad, seed):
    """flgo's loop written out: DataLoader(shuffle, drop_last=False) order, CE mean,
    clip_grad_norm_ after backward, then torch.optim.SGD(momentum=0, weight_decay=0)'s update
    p <- p - lr * grad (written out: the first torch.optim step costs seconds of imports)."""
    bind_flat_parameters_(model, params.clone())
    g = torch.Generator().manual_seed(seed)
    batches = []
    while len(batches) < num_steps:
        perm = torch.randperm(x.shape[0], generator=g)
        batches += list(perm.split(batch_size))
    for idx in batches[:num_steps]:
        model.zero_grad()
        loss = F.cross_entropy(model(x[idx], mask=mask), y[idx])
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-lr)
    return flatten_parameters(model)


def _mlp():
    return build_model("mlp", dataset="digits", num_classes=10, input_shape=(1, 8, 8), seed=0)


def _data(gen, n=50, shape=(1, 8, 8), classes=10):
    return torch.randn((n,) + shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("use_autograd", [False, True])
@pytest.mark.parametrize("clip", [1.0, 1e-3, None])
def test_matches_torch_optim_reference(use_autograd, clip, gen):
    m = _mlp()
    x, y = _data(gen)
    p0 = flatten_parameters(m)
    mask = (torch.rand(400, generator=gen) < 0.7).float()
    # 50 samples, batch 16: passes of 16, 16, 16, 2 -> step 5 starts a new shuffle
    kw = dict(mask=mask, num_steps=7, batch_size=16, lr=0.05, clip_grad=clip)
    ref = _reference(_mlp(), p0, x, y, seed=3, **kw)
    out = local_train(m, p0, x, y, generator=torch.Generator().manual_seed(3),
                      use_autograd=use_autograd, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out != p0, ref != p0)


def test_resnet_matches_reference(gen):
    m = build_model("resnet18", dataset="tinyimagenet", num_classes=5, input_shape=(3, 8, 8), seed=0)
    x, y = _data(gen, n=6, shape=(3, 8, 8), classes=5)
    p0 = flatten_parameters(m)
    mask = (torch.rand(1024, generator=gen) < 0.8).float()
    kw = dict(mask=mask, num_steps=2, batch_size=4, lr=0.03, clip_grad=1.0)
    ref = _reference(build_model("resnet18", dataset="tinyimagenet", num_classes=5,
                                 input_shape=(3, 8, 8), seed=0), p0, x, y, seed=1, **kw)
    out = local_train(m, p0, x, y, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)


def test_input_untouched_zero_steps_and_determinism(gen):
    m = _mlp()
    x, y = _data(gen)
    p0 = flatten_parameters(m)
    keep = p0.clone()
    same = local_train(m, p0, x, y, mask=None, num_steps=0, batch_size=8, lr=0.1, clip_grad=1.0,
                       generator=None)
    assert torch.equal(same, p0) and same.data_ptr() != p0.data_ptr()
    runs = [local_train(m, p0, x, y, mask=None, num_steps=3, batch_size=8, lr=0.1, clip_grad=1.0,
                        generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(p0, keep)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert runs[0].dtype == torch.float32 and runs[0].shape == p0.shape


def test_clipping_bounds_the_step(gen):
    m = _mlp()
    x, y = _data(gen)
    p0 = flatten_parameters(m)
    out = local_train(m, p0, x, y, mask=None, num_steps=1, batch_size=50, lr=0.5, clip_grad=1e-3,
                      generator=torch.Generator().manual_seed(0))
    # ||step|| = lr * clip * ||g|| / (||g|| + 1e-6)
    assert (out - p0).norm().item() == pytest.approx(0.5e-3, rel=1e-3)


def test_partial_last_batch_and_fresh_shuffle_per_call(gen):
    """drop_last=False: with 5 samples and batch 4 the second step sees the 5th sample alone."""
    m = _mlp()
    x, y = _data(gen, n=5)
    p0 = flatten_parameters(m)
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(7))
    two = local_train(m, p0, x, y, mask=None, num_steps=2, batch_size=4, lr=0.1, clip_grad=None,
                      generator=g)
    one = local_train(m, p0, x[perm[:4]], y[perm[:4]], mask=None, num_steps=1, batch_size=4, lr=0.1,
                      clip_grad=None, generator=torch.Generator().manual_seed(0))
    last = local_train(m, one, x[perm[4:]], y[perm[4:]], mask=None, num_steps=1, batch_size=4,
                       lr=0.1, clip_grad=None, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(two, last, rtol=1e-6, atol=1e-7)


def test_bad_arguments(gen):
    m = _mlp()
    x, y = _data(gen)
    p0 = flatten_parameters(m)
    kw = dict(num_steps=1, batch_size=8, lr=0.1, clip_grad=1.0, generator=None)
    with pytest.raises(ValueError, match="params"):
        local_train(m, p0[:-1], x, y, mask=None, **kw)
    with pytest.raises(ValueError, match="mask"):
        local_train(m, p0, x, y, mask=torch.ones(10), **kw)
    with pytest.raises(ValueError, match="x"):
        local_train(m, p0, x, y[:-1], mask=None, **kw)


def test_holdout_split():
    tr, ho = holdout_split(50, 0.1, torch.Generator().manual_seed(0))
    assert len(ho) == 5 and len(tr) == 45
    assert sorted(torch.cat([tr, ho]).tolist()) == list(range(50))
    assert len(holdout_split(1, 0.1, None)[1]) == 0


def test_train_epochs_picks_best_holdout_epoch(gen):
    m = _mlp()
    # learnable task: the label is the argmax of the first 10 pixels
    x = torch.randn(120, 1, 8, 8, generator=gen)
    y = x.view(120, -1)[:, :10].argmax(1)
    p0 = flatten_parameters(m)
    hist = []
    best, acc = train_epochs(m, p0, x, y, epochs=4, batch_size=16, lr=0.1, clip_grad=1.0,
                             generator=torch.Generator().manual_seed(0), history=hist)
    assert len(hist) == 5 and acc == max(hist[1:])
    assert acc > hist[0]
    # the returned parameters really score `acc` on the same holdout
    _, ho = holdout_split(120, 0.1, torch.Generator().manual_seed(0))
    assert accuracy(m, best, x[ho], y[ho]) == acc
    # explicit holdout data, and no holdout at all
    b2, a2 = train_epochs(m, p0, x[:100], y[:100], epochs=1, batch_size=16, lr=0.1, clip_grad=1.0,
                          generator=torch.Generator().manual_seed(0), holdout_data=(x[100:], y[100:]))
    assert a2 == accuracy(m, b2, x[100:], y[100:])
    b3, a3 = train_epochs(m, p0, x[:1], y[:1], epochs=2, batch_size=16, lr=0.1, clip_grad=1.0,
                          generator=None)
    assert math.isnan(a3) and not torch.equal(b3, p0)
