"""NeuronLayout / NestedMasks / compact tables / flat-parameter helpers.

Two small models implement the module protocol (``mask_sites()`` and ``parameter_gates()``) the
simulator's models follow: a 12-7-5-3 MLP with two hidden mask sites, and a conv net with GroupNorm
whose second conv is gated on both dims and whose fc layer is gated on its input.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fedrac_kernels as fk
from fedrac_kernels.layout import MaskSite, NestedMasks, NeuronLayout, Segment


class MLP(nn.Module):
    """12-7-5-3, activation masks after ReLU at sites h1 (7) and h2 (5)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 7)
        self.fc2 = nn.Linear(7, 5)
        self.fc3 = nn.Linear(5, 3)

    def mask_sites(self):
        return [("h1", 7), ("h2", 5)]

    def parameter_gates(self):
        return {"fc1.weight": ("h1", None), "fc1.bias": ("h1", None),
                "fc2.weight": ("h2", "h1"), "fc2.bias": ("h2", None),
                "fc3.weight": (None, "h2")}

    def forward(self, x, mask=None):
        h = F.relu(self.fc1(x))
        if mask is not None:
            h = h * mask[:7]
        h = F.relu(self.fc2(h))
        if mask is not None:
            h = h * mask[7:]
        return self.fc3(h)


class ConvNet(nn.Module):
    """conv(3->6) + GroupNorm(2, 6) [site c1], conv(6->4) [site c2, in-gated by c1], fc(4->5) in-gated."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.gn = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 5)

    def mask_sites(self):
        return [("c1", 6), ("c2", 4)]

    def parameter_gates(self):
        return {"conv1.weight": ("c1", None), "conv1.bias": ("c1", None),
                "gn.weight": ("c1", None), "gn.bias": ("c1", None),
                "conv2.weight": ("c2", "c1"), "fc.weight": (None, "c2")}

    def forward(self, x):
        h = F.relu(self.gn(self.conv1(x)))
        h = F.relu(self.conv2(h)).mean((2, 3))
        return self.fc(h)


def reference_expand(module, layout, on):
    """Element masks by slicing each parameter: an independent implementation of expand()."""
    sites = {s.name: on[s.offset:s.offset + s.width] for s in layout.sites}
    gates = module.parameter_gates()
    parts = []
    for name, p in module.named_parameters():
        m = torch.ones(p.shape, dtype=torch.bool)
        out_site, in_site = gates.get(name, (None, None))
        if out_site is not None:
            m &= sites[out_site].view([-1] + [1] * (p.dim() - 1))
        if in_site is not None:
            m &= sites[in_site].view([1, -1] + [1] * (p.dim() - 2))
        parts.append(m.reshape(-1))
    return torch.cat(parts)


# ------------------------------------------------------------------------------------ from_module
def test_from_module_mlp():
    net = MLP()
    lay = NeuronLayout.from_module(net)
    assert lay.N == 12 and lay.P == sum(p.numel() for p in net.parameters()) == 149
    assert lay.sites == (MaskSite("h1", 7, 0), MaskSite("h2", 5, 7))
    assert [s.name for s in lay.segments] == [n for n, _ in net.named_parameters()]
    assert lay.segments[2] == Segment("fc2.weight", 91, (5, 7), "h2", "h1")
    assert lay.segments[5] == Segment("fc3.bias", 146, (3,), None, None)
    table = lay.segment_table()
    assert table.dtype == torch.int64 and table.shape == (6, 6) and table.is_contiguous()
    assert table.tolist() == [[0, 7, 12, 1, 0, -1], [84, 7, 1, 1, 0, -1], [91, 5, 7, 1, 7, 0],
                              [126, 5, 1, 1, 7, -1], [131, 3, 5, 1, -1, 7], [146, 3, 1, 1, -1, -1]]
    assert lay.segment_table() is table  # cached per device


def test_from_module_conv_segments():
    net = ConvNet()
    lay = NeuronLayout.from_module(net)
    assert lay.N == 10 and lay.P == sum(p.numel() for p in net.parameters())
    seg = {s.name: s for s in lay.segments}
    c2 = seg["conv2.weight"]
    assert (c2.rows, c2.cols, c2.inner) == (4, 6, 9)
    assert (seg["gn.weight"].rows, seg["gn.weight"].cols, seg["gn.weight"].inner) == (6, 1, 1)
    row = lay.segment_table()[[s.name for s in lay.segments].index("conv2.weight")].tolist()
    assert row == [c2.offset, 4, 6, 9, 6, 0]


@pytest.mark.parametrize("model", [MLP, ConvNet])
def test_expand_matches_parameter_slicing(model, gen):
    net = model()
    lay = NeuronLayout.from_module(net)
    on = torch.rand(5, lay.N, generator=gen) < 0.5
    got = lay.expand(on)
    assert got.shape == (5, lay.P) and got.dtype == torch.bool
    for k in range(5):
        assert torch.equal(got[k], reference_expand(net, lay, on[k]))
    nm = NestedMasks(torch.randperm(lay.N, generator=gen), [0, 3, lay.N])
    assert torch.equal(lay.expand(nm), lay.expand(nm.dense()))
    assert not lay.expand(nm)[0][lay.segment_table()[-1, 0]:].logical_not().any()  # ungated bias always on


def test_masked_forward_only_touches_expanded_elements(gen):
    """The gates describe the model: a masked forward/backward leaves gradients only where expand is on."""
    net = MLP()
    lay = NeuronLayout.from_module(net)
    on = torch.rand(lay.N, generator=gen) < 0.5
    on[0] = True
    x = torch.randn(8, 12, generator=gen)
    net(x, on.float()).square().sum().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    allowed = lay.expand(on[None])[0]
    assert not bool(grad[~allowed].ne(0).any())


def test_gates_argument_for_module_without_protocol():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"^module: .*mask_sites"):
        NeuronLayout.from_module(net)
    lay = NeuronLayout.from_module(net, {"0.weight": ("h", None), "0.bias": ("h", None), "2.weight": (None, "h")},
                                   sites=[("h", 3)])
    assert lay.P == 23 and lay.N == 3
    assert lay.segment_table().tolist()[2] == [15, 2, 3, 1, -1, 0]


@pytest.mark.parametrize("gates, sites, err, match", [
    ({"fc1.weight": ("h9", None)}, None, ValueError, r"^gates: .*unknown out site 'h9'"),
    ({"fc1.weight": ("h2", None)}, None, ValueError, r"^gates: .*has 7 entries along dim 0 .* width 5"),
    ({"fc1.bias": (None, "h1")}, None, ValueError, r"^gates: .*no dim 1"),
    ({"fc1.weight": (None, "h1")}, None, ValueError, r"^gates: .*12 entries along dim 1"),
    ({"nope.weight": ("h1", None)}, None, ValueError, r"^gates: unknown parameter"),
    ({"fc1.weight": "h1"}, None, TypeError, r"^gates: entry"),
    ([("fc1.weight", "h1")], None, TypeError, r"^gates: expected a dict"),
    ({}, [("h1", 7), ("h1", 5)], ValueError, r"^sites: site 'h1' is listed twice"),
    ({}, [("h1", 0)], ValueError, r"^sites: .*positive integer width"),
    ({}, [("h1", 2.5)], TypeError, r"^sites: .*positive integer width"),
    ({}, ["h1"], TypeError, r"^sites: expected \(name, width\)"),
])
def test_layout_validation(gates, sites, err, match):
    with pytest.raises(err, match=match):
        NeuronLayout.from_module(MLP(), gates, sites=sites if sites is not None else MLP().mask_sites())


def test_from_module_type_errors():
    with pytest.raises(TypeError, match=r"^module: "):
        NeuronLayout.from_module("not a module")


# ------------------------------------------------------------------------------------ NestedMasks
def test_nested_masks_object():
    m = NestedMasks(torch.tensor([2, 0, 3, 1]), [0, 2, 4])
    assert (m.K, m.N) == (3, 4)
    assert m.rank.dtype == torch.int32 and m.rank.tolist() == [1, 3, 0, 2]
    assert m.sizes.dtype == torch.int32 and m.order.dtype == torch.int64
    assert m.dense().tolist() == [[False] * 4, [True, False, True, False], [True] * 4]
    assert m.select([2, 0]).sizes.tolist() == [4, 0]
    assert m.select(1).K == 1 and m.select(slice(0, 2)).K == 2
    assert m.to("cpu") is m


@pytest.mark.parametrize("order, sizes, err, match", [
    ([0, 0, 1], [1], ValueError, r"^order: not a permutation.*repeated"),
    ([0, 1, 3], [1], ValueError, r"^order: not a permutation"),
    ([-1, 0, 1], [1], ValueError, r"^order: not a permutation"),
    ([0, 1, 2], [4], ValueError, r"^sizes: .*\[0, N=3\].*client\(s\) \[0\]"),
    ([0, 1, 2], [1, -1], ValueError, r"^sizes: "),
    (torch.tensor([0.0, 1.0]), [1], TypeError, r"^order: expected an integer tensor"),
    ([0, 1], [1.5], TypeError, r"^sizes: expected integers"),
    (torch.zeros(2, 2, dtype=torch.int64), [1], ValueError, r"^order: expected a 1-D tensor"),
    (5, [1], TypeError, r"^order: "),
])
def test_nested_masks_validation(order, sizes, err, match):
    with pytest.raises(err, match=match):
        NestedMasks(order, sizes)


# --------------------------------------------------------------------------------- compact tables
def test_compact_tables_by_hand():
    lay = NeuronLayout([("h", 3)], [("W1", (3, 2), "h", None), ("b1", (3,), "h", None),
                                     ("W2", (2, 3), None, "h"), ("b2", (2,), None, None)])
    t = lay.compact_tables([[2, 0], [], [1]])
    # client 0 keeps h2 (local 0) and h0 (local 1): W1 2x2, b1 2, W2 2x2, b2 2 -> 4 + 2 + 4 + 2
    assert t.inv.dtype == torch.int32 and t.inv.tolist() == [[1, -1, 0], [-1, -1, -1], [-1, 0, -1]]
    assert t.seg_off.tolist() == [[0, 4, 6, 10], [-1, -1, -1, 0], [0, 2, 3, 5]]
    assert t.seg_cols.tolist() == [[2, 1, 2, 1], [2, 1, 0, 1], [2, 1, 1, 1]]
    assert t.lengths == (12, 2, 7)
    tb = lay.compact_tables(torch.tensor([[True, False, True]]))
    assert tb.inv.tolist() == [[0, -1, 1]]  # bool form: ascending neuron order
    delta = torch.arange(lay.P, dtype=torch.float32)
    # W1 = [[0,1],[2,3],[4,5]], b1 = [6,7,8], W2 = [[9,10,11],[12,13,14]], b2 = [15,16]
    assert fk.compact_pack(delta, lay, [2, 0]).tolist() == [4, 5, 0, 1, 8, 6, 11, 9, 14, 12, 15, 16]
    assert fk.compact_pack(delta, lay, torch.tensor([True, False, True])).tolist() == \
        [0, 1, 4, 5, 6, 8, 9, 11, 12, 14, 15, 16]
    assert fk.compact_pack(delta, lay, []).tolist() == [15, 16]


@pytest.mark.parametrize("kept, err, match", [
    ([[0, 12]], ValueError, r"^kept: client 0: neuron index 12 out of range"),
    ([[0, 1, 0]], ValueError, r"^kept: client 0: repeated"),
    ([[0.5]], TypeError, r"^kept: client 0: expected integers"),
    (torch.ones(2, 11, dtype=torch.bool), ValueError, r"^kept: expected shape \[K, N=12\]"),
    (torch.ones(2, 12, dtype=torch.int64), TypeError, r"^kept: expected a bool tensor"),
    ("abc", TypeError, r"^kept: "),
])
def test_compact_tables_validation(kept, err, match):
    lay = NeuronLayout.from_module(MLP())
    with pytest.raises(err, match=match):
        lay.compact_tables(kept)


# ------------------------------------------------------------------------------- flat parameters
def test_flatten_and_bind(gen):
    net = ConvNet()
    flat = fk.flatten_parameters(net)
    assert flat.dtype == torch.float32 and flat.shape == (NeuronLayout.from_module(net).P,)
    assert torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    params_before = [id(p) for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fk.bind_flat_parameters_(net, flat)
    assert [id(p) for p in net.parameters()] == params_before
    flat += 1.0  # the module sees updates of the flat buffer
    assert torch.equal(net.fc.bias.detach(), flat[-5:])
    x = torch.randn(2, 3, 5, 5, generator=gen)
    net(x).sum().backward()
    before = flat.clone()
    opt.step()  # and the flat buffer sees the optimiser's in-place steps
    assert not torch.equal(flat, before)
    assert torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in net.parameters()]))


def test_bind_validation():
    net = MLP()
    with pytest.raises(ValueError, match=r"^flat: expected shape \[P=149\]"):
        fk.bind_flat_parameters_(net, torch.zeros(148))
    with pytest.raises(TypeError, match=r"^flat: expected dtype torch.float32"):
        fk.bind_flat_parameters_(net, torch.zeros(149, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^flat: must be contiguous"):
        fk.bind_flat_parameters_(net, torch.zeros(298)[::2])
    with pytest.raises(TypeError, match=r"^module: "):
        fk.flatten_parameters(torch.zeros(3))
