"""Models: parameter counts, mask sites, masking semantics and the declared structural gates."""
import pytest
import torch

from fedrac.models import (MaskedMLP, MaskedResNet18, bind_flat_parameters_, build_model,
                           flatten_parameters, num_parameters)
from fedrac.training import local_train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,dataset,classes,shape,variant,P", [
    ("mlp", "cifar10", 10, (3, 32, 32), None, 656_810),
    ("mlp", "svhn", 10, (3, 32, 32), None, 656_810),
    ("mlp", "emnist", 62, (1, 28, 28), None, 209_662),
    ("mlp", "digits", 10, (1, 8, 8), None, 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10),
    ("resnet18", "cifar10", 10, (3, 32, 32), None, 11_181_642),
    ("resnet18", "tinyimagenet", 200, (3, 32, 32), None, 11_271_432),
    # the override: CIFAR-style stem on CIFAR-10 (3x3 stem instead of 7x7: 7,680 fewer weights)
    ("resnet18", "cifar10", 10, (3, 32, 32), "cifar_stem", 11_181_642 - 3 * 64 * (49 - 9)),
    ("resnet18", "cifar10", 200, (3, 32, 32), "tinyimagenet", 11_271_432),
])
def test_parameter_counts(name, dataset, classes, shape, variant, P):
    m = build_model(name, dataset=dataset, num_classes=classes, input_shape=shape, variant=variant)
    assert num_parameters(m) == P
    assert flatten_parameters(m).shape == (P,)


def test_resnet_variant_by_dataset():
    a = build_model("resnet18", dataset="cifar10", num_classes=10, input_shape=(3, 32, 32))
    b = build_model("resnet18", dataset="tinyimagenet", num_classes=200, input_shape=(3, 32, 32))
    assert a.variant == "imagenet_stem" and a.conv1.kernel_size == (7, 7) and a.conv1.stride == (2, 2)
    assert b.variant == "cifar_stem" and b.conv1.kernel_size == (3, 3) and b.conv1.stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in a.modules())
    assert all(isinstance(x, torch.nn.GroupNorm) and x.num_groups == 2
               for x in a.modules() if "norm" in type(x).__name__.lower())
    with pytest.raises(ValueError, match="variant"):
        build_model("resnet18", dataset="cifar10", num_classes=10, input_shape=(3, 32, 32), variant="x")
    with pytest.raises(ValueError, match="name"):
        build_model("vgg", dataset="cifar10", num_classes=10, input_shape=(3, 32, 32))


def test_mask_sites():
    m = build_model("mlp", dataset="cifar10", num_classes=10, input_shape=(3, 32, 32))
    assert m.mask_sites() == [("h1", 200), ("h2", 200)] and m.num_neurons == 400
    r = build_model("resnet18", dataset="cifar10", num_classes=10, input_shape=(3, 32, 32))
    assert r.mask_sites() == [("m0", 64), ("m1", 64), ("m2", 128), ("m3", 256), ("m4", 512)]
    assert r.num_neurons == 1024


def test_seed_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(5)
    expect = torch.rand(3)
    torch.manual_seed(5)
    a = build_model("mlp", dataset="digits", num_classes=10, input_shape=(1, 8, 8), seed=3)
    assert torch.equal(torch.rand(3), expect)
    b = build_model("mlp", dataset="digits", num_classes=10, input_shape=(1, 8, 8), seed=3)
    assert torch.equal(flatten_parameters(a), flatten_parameters(b))


def _small_resnet(seed=0):
    return build_model("resnet18", dataset="tinyimagenet", num_classes=7, input_shape=(3, 8, 8), seed=seed)


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_mask_forms_agree(kind, gen):
    m = (build_model("mlp", dataset="digits", num_classes=10, input_shape=(1, 8, 8), seed=0)
         if kind == "mlp" else _small_resnet())
    shape = (1, 8, 8) if kind == "mlp" else (3, 8, 8)
    x = torch.randn((5,) + shape, generator=gen)
    N = m.num_neurons
    with torch.no_grad():
        full = m(x)
        assert torch.equal(full, m(x, mask=torch.ones(N)))
        mask = torch.rand(N, generator=gen) < 0.5
        a = m(x, mask=mask)
        assert torch.equal(a, m(x, mask=mask.float()))
        torch.testing.assert_close(a, m(x, mask=mask.expand(5, N)), rtol=1e-5, atol=1e-6)
        rows = torch.rand(5, N, generator=gen) < 0.5
        per = m(x, mask=rows)
        for i in range(5):
            torch.testing.assert_close(per[i], m(x[i:i + 1], mask=rows[i])[0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a, full)
        with pytest.raises(ValueError, match="mask"):
            m(x, mask=torch.ones(N + 1))
        with pytest.raises(ValueError, match="mask"):
            m(x, mask=torch.ones(4, N))


def test_empty_last_site_gives_output_bias(gen):
    m = build_model("mlp", dataset="digits", num_classes=10, input_shape=(1, 8, 8), seed=1)
    mask = torch.ones(400)
    mask[200:] = 0
    x = torch.randn(6, 1, 8, 8, generator=gen)
    with torch.no_grad():
        assert torch.equal(m(x, mask=mask), m.fc3.bias.expand(6, 10))
    r = _small_resnet()
    rmask = torch.ones(1024)
    rmask[512:] = 0
    with torch.no_grad():
        assert torch.equal(r(torch.randn(2, 3, 8, 8, generator=gen), mask=rmask), r.fc.bias.expand(2, 7))


def test_bind_flat_parameters_views():
    m = build_model("mlp", dataset="digits", num_classes=10, input_shape=(1, 8, 8), seed=0)
    flat = flatten_parameters(m).clone()
    bind_flat_parameters_(m, flat)
    flat[0] = 7.0
    assert m.fc1.weight[0, 0].item() == 7.0
    assert torch.equal(flatten_parameters(m), flat)
    with pytest.raises(ValueError, match="flat"):
        bind_flat_parameters_(m, flat[:-1])


def _gated_off(model, mask):
    """Flat bool [P]: True where the declared gates say the client lacks the element."""
    offs = model.site_offsets
    on = {name: mask[o:o + w].bool() for name, (o, w) in offs.items()}
    gates = model.parameter_gates()
    parts = []
    for name, p in model.named_parameters():
        keep = torch.ones(p.shape, dtype=torch.bool)
        out_site, in_site = gates.get(name, (None, None))
        if out_site is not None:
            keep &= on[out_site].view((-1,) + (1,) * (p.dim() - 1))
        if in_site is not None:
            keep &= on[in_site].view((1, -1) + (1,) * (p.dim() - 2))
        parts.append(~keep.reshape(-1))
    return torch.cat(parts)


def _random_site_mask(model, gen, p_on=0.6):
    mask = (torch.rand(model.num_neurons, generator=gen) < p_on).float()
    for _, (o, w) in model.site_offsets.items():
        mask[o] = 1.0  # every site keeps at least one unit
    return mask


@pytest.mark.parametrize("use_autograd", [False, True])
def test_mlp_gates_are_structurally_zero(use_autograd, gen):
    m = build_model("mlp", dataset="digits", num_classes=10, input_shape=(1, 8, 8), seed=0)
    p0 = flatten_parameters(m)
    x, y = torch.randn(40, 1, 8, 8, generator=gen), torch.randint(0, 10, (40,), generator=gen)
    mask = _random_site_mask(m, gen)
    p1 = local_train(m, p0, x, y, mask=mask, num_steps=3, batch_size=16, lr=0.1, clip_grad=1.0,
                     generator=torch.Generator().manual_seed(0), use_autograd=use_autograd)
    off = _gated_off(m, mask)
    assert off.any()
    assert torch.equal(p1[off], p0[off])
    changed = p1 != p0
    # everything else that the client holds can move (output bias always trains)
    assert changed[~off].float().mean() > 0.5
    assert changed[-10:].all()


def test_resnet_gates_are_structurally_zero_and_only_partial(gen):
    m = _small_resnet()
    p0 = flatten_parameters(m)
    x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 7, (6,), generator=gen)
    mask = _random_site_mask(m, gen, 0.5)
    p1 = local_train(m, p0, x, y, mask=mask, num_steps=1, batch_size=6, lr=0.1, clip_grad=1.0,
                     generator=torch.Generator().manual_seed(0))
    off = _gated_off(m, mask)
    assert torch.equal(p1[off], p0[off])
    # partial structure: the conv producing a masked stage-1 channel still moves (GroupNorm)
    names = [n for n, _ in m.named_parameters()]
    sizes = [p.numel() for _, p in m.named_parameters()]
    i = names.index("layer1.1.conv2.weight")
    start = sum(sizes[:i])
    w0 = p0[start:start + sizes[i]].view(64, 64, 3, 3)
    w1 = p1[start:start + sizes[i]].view(64, 64, 3, 3)
    masked_m1 = (mask[64:128] == 0).nonzero().squeeze(1)
    assert (w1[masked_m1] != w0[masked_m1]).any()


def test_layout_from_module():
    fk = pytest.importorskip("fedrac_kernels")
    if not hasattr(fk, "NeuronLayout"):
        pytest.skip("fedrac_kernels.NeuronLayout not available yet")
    for m in (build_model("mlp", dataset="cifar10", num_classes=10, input_shape=(3, 32, 32)),
              _small_resnet()):
        layout = fk.NeuronLayout.from_module(m)
        assert layout.N == m.num_neurons and layout.P == num_parameters(m)
        mask = _random_site_mask(m, torch.Generator().manual_seed(2)).bool()
        assert torch.equal(~layout.expand(mask[None])[0], _gated_off(m, mask))


def test_gate_names_and_shapes():
    for m in (MaskedMLP(64, 10), MaskedResNet18(10, variant="imagenet_stem")):
        params = dict(m.named_parameters())
        widths = dict(m.mask_sites())
        for name, (out_site, in_site) in m.parameter_gates().items():
            assert name in params
            if out_site is not None:
                assert params[name].shape[0] == widths[out_site]
            if in_site is not None:
                assert params[name].shape[1] == widths[in_site]
