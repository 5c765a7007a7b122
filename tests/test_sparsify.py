"""fedrac_kernels.sparsify: layer-wise top-q (K9), global top-k / random-k (K10) and cosine to an
aggregate (K8) - hand-checked cases, every back end against the reference (bit for bit for the
selections), argument validation before any write."""
import math

import pytest
import torch

import fedrac_kernels as fk
from fedrac_kernels import sparsify as sp

HAS_CUDA = torch.cuda.is_available()
CPU_BACKENDS = sp.sparsify_backends(torch.device("cpu"))
NON_REF = [b for b in CPU_BACKENDS if b != "torch"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def random_case(gen, P=2600, K=5):
    u = torch.randn(P, generator=gen)
    u[10:30] = 0.25                      # ties inside segment 0
    u[40:45] = 0.0                       # zeros
    u[1200:1210] = -0.75                 # ties inside segment 1
    segments = [(0, 1000), (1000, 700), (1700, 1), (1701, 0), (1800, 800)]   # a gap at [1701, 1800)
    q = [0.0, 0.013, 0.5, 0.999, 1.0][:K]
    T = torch.randn(K, P, generator=gen)
    T[:, 5] = -0.0                       # signed zeros stay untouched where nothing is added
    return u, segments, q, T


# --------------------------------------------------------------------------------- hand-checked

def test_layerwise_topq_hand_example():
    u = torch.tensor([0.1, -0.5, 0.3, 0.3, 0.2, 1.0, -2.0, 0.5])
    segs = [(0, 5), (5, 3)]
    out = fk.layerwise_topq(u, segs, [0.0, 0.4, 1.0], backend="torch")
    # q = 0 keeps nothing
    assert torch.equal(out[0], torch.zeros(8))
    # q = 0.4: segment 0 rank ceil(2.0) = 2 -> threshold 0.3, the tie at 0.3 is kept (3 entries);
    # segment 1 rank ceil(1.2) = 2 -> threshold 1.0
    assert torch.equal(out[1], torch.tensor([0.0, -0.5, 0.3, 0.3, 0.0, 1.0, -2.0, 0.0]))
    # q = 1: rank capped at n - 1 -> the smallest entry of every segment is dropped
    assert torch.equal(out[2], torch.tensor([0.0, -0.5, 0.3, 0.3, 0.2, 1.0, -2.0, 0.0]))
    for be in NON_REF:
        assert torch.equal(fk.layerwise_topq(u, segs, [0.0, 0.4, 1.0], backend=be), out)


def test_topq_counts_rule():
    c = fk.topq_counts([0.0, 0.1, 0.4, 1.0], [1, 5, 200, 10])
    assert c.tolist() == [[0, 0, 0, 0], [0, 1, 20, 1], [0, 2, 80, 4], [0, 4, 199, 9]]
    assert c.dtype == torch.int64


def test_thresholds_hand_example():
    u = torch.tensor([0.1, -0.5, 0.3, 0.3, 0.2, 1.0, -2.0, 0.5])
    thr = fk.topk_thresholds(u, [(0, 5), (5, 3)], [[0, 1], [2, 3], [5, 2]])
    assert thr[0, 0] == math.inf and thr[0, 1] == 2.0
    assert thr[1].tolist() == [pytest.approx(0.3), 0.5]
    assert thr[2].tolist() == [pytest.approx(0.1), 1.0]


def test_global_topk_hand_example():
    u = torch.tensor([0.1, -0.5, 0.3, 0.3, 0.2])
    for be in CPU_BACKENDS:
        out = fk.global_topk(u, [0, 1, 2, 5], backend=be)
        assert torch.equal(out[0], torch.zeros(5))
        assert torch.equal(out[1], torch.tensor([0.0, -0.5, 0.0, 0.0, 0.0]))
        assert torch.equal(out[2], torch.tensor([0.0, -0.5, 0.3, 0.3, 0.0]))   # tie at rank 2 kept
        assert torch.equal(out[3], u)                                        # count = P: no cap


def test_randomk_uses_one_permutation_from_the_generator():
    u = torch.arange(1, 11, dtype=torch.float32)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(7))
    for be in CPU_BACKENDS:
        T = torch.zeros(3, 10)
        fk.randomk_add_(T, u, [0, 3, 10], generator=torch.Generator().manual_seed(7), backend=be)
        assert torch.equal(T[0], torch.zeros(10))
        expect = torch.zeros(10)
        expect[perm[:3]] = u[perm[:3]]
        assert torch.equal(T[1], expect)
        assert torch.equal(T[2], u)


def test_cosine_hand_example():
    u = torch.tensor([1.0, 0.0, 0.0])
    U = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    for be in CPU_BACKENDS:
        cos, norms, un = fk.cosine_to_aggregate(U, u, return_norms=True, backend=be)
        assert cos.dtype == torch.float64
        assert cos.tolist() == pytest.approx([1.0, 0.0, -1 / math.sqrt(2), 0.0])
        assert norms.tolist() == pytest.approx([2.0, 3.0, math.sqrt(2), 0.0])
        assert un == pytest.approx(1.0)


# -------------------------------------------------------------------- back ends vs the reference

@pytest.mark.parametrize("backend", NON_REF)
@pytest.mark.parametrize("form", ["stacked", "list"])
@pytest.mark.parametrize("alpha", [1.0, -0.37])
def test_layerwise_matches_reference_bitwise(gen, backend, form, alpha):
    u, segs, q, T = random_case(gen)
    ref = T.clone()
    fk.layerwise_topq_add_(ref, u, segs, q, alpha=alpha, backend="torch")
    out = T.clone()
    targets = out if form == "stacked" else [r.clone() for r in out]
    fk.layerwise_topq_add_(targets, u, segs, q, alpha=alpha, backend=backend)
    got = out if form == "stacked" else torch.stack(targets)
    assert torch.equal(bits(got), bits(ref))
    # the gap [1701, 1800) and the one-entry segment are never touched
    assert torch.equal(bits(got[:, 1700:1800]), bits(T[:, 1700:1800]))
    assert torch.equal(bits(got[0]), bits(T[0]))                 # q = 0: nothing written (-0.0 kept)


def test_reference_agrees_with_the_composed_definition(gen):
    """layerwise_topq_add_ (written-out oracle) == counts -> thresholds -> threshold_add_."""
    u, segs, q, T = random_case(gen)
    a = T.clone()
    fk.layerwise_topq_add_(a, u, segs, q, backend="torch")
    lens = [n for _, n in segs]
    thr = fk.topk_thresholds(u, segs, fk.topq_counts(q, lens), backend="torch")
    b = T.clone()
    fk.threshold_add_(b, u, segs, thr, backend="torch")
    assert torch.equal(bits(a), bits(b))
    # per client and segment: at least `count` entries reach the threshold, and exactly the
    # non-zero ones among them changed
    counts = fk.topq_counts(q, lens)
    for k in range(len(q)):
        for s, (o, n) in enumerate(segs):
            reach = u[o:o + n].abs() >= thr[k, s]
            assert int(reach.sum()) >= int(counts[k, s])
            changed = a[k, o:o + n] != T[k, o:o + n]
            assert torch.equal(changed, reach & (u[o:o + n] != 0))


@pytest.mark.parametrize("backend", NON_REF)
def test_thresholds_match_reference(gen, backend):
    u, segs, q, _ = random_case(gen)
    counts = fk.topq_counts(q, [n for _, n in segs])
    assert torch.equal(fk.topk_thresholds(u, segs, counts, backend=backend),
                       fk.topk_thresholds(u, segs, counts, backend="torch"))


@pytest.mark.parametrize("backend", NON_REF)
def test_global_and_random_k_match_reference(gen, backend):
    u, _, _, T = random_case(gen)
    P = u.numel()
    counts = [0, 1, 37, P // 2, P]
    for op, kw in ((fk.global_topk_add_, {}), (fk.randomk_add_, {"seed": 5})):
        outs = []
        for be in ("torch", backend):
            X = T.clone()
            extra = {"generator": torch.Generator().manual_seed(kw["seed"])} if "seed" in kw else {}
            op(X, u, counts, alpha=0.5, backend=be, **extra)
            outs.append(X)
        assert torch.equal(bits(outs[0]), bits(outs[1])), op.__name__


@pytest.mark.parametrize("backend", NON_REF)
def test_cosine_matches_float64_reference(gen, backend):
    P, K = 5000, 4
    u = torch.randn(P, generator=gen)
    U = torch.randn(K, P, generator=gen)
    U[1] = 2.0 * u                                   # cos = 1
    U[2] = -u                                        # cos = -1
    ref = fk.cosine_to_aggregate(U, u, backend="torch", return_norms=True)
    for form in (U, list(U.unbind(0))):
        got = fk.cosine_to_aggregate(form, u, backend=backend, return_norms=True)
        assert torch.allclose(got.cos, ref.cos, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got.norms, ref.norms, rtol=1e-5)
        assert got.u_norm == pytest.approx(ref.u_norm, rel=1e-5)
    assert ref.cos[1] == pytest.approx(1.0) and ref.cos[2] == pytest.approx(-1.0)


def test_layout_segments_equal_pairs(gen):
    from fedrac.models import build_model

    model = build_model("mlp", dataset="digits", num_classes=10, input_shape=(64,))
    layout = fk.NeuronLayout.from_module(model)
    pairs = [(s.offset, s.numel) for s in layout.segments]
    u = torch.randn(layout.P, generator=gen)
    q = [0.2, 0.9]
    a = fk.layerwise_topq(u, layout, q)
    b = fk.layerwise_topq(u, pairs, q)
    c = fk.layerwise_topq(u, layout.segments, q)
    d = fk.layerwise_topq(u, torch.tensor(pairs), q)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


# ---------------------------------------------------------------------------------- validation

def _bad_calls(u, T, segs):
    P = u.numel()
    nan_u = u.clone()
    nan_u[3] = math.nan
    return [
        ("u", lambda: fk.layerwise_topq_add_(T, u.double(), segs, [0.5, 0.5])),
        ("u", lambda: fk.layerwise_topq_add_(T, nan_u, segs, [0.5, 0.5])),
        ("u", lambda: fk.layerwise_topq_add_(T, u.reshape(2, -1), segs, [0.5, 0.5])),
        ("targets", lambda: fk.layerwise_topq_add_(T[:, :-1], u, segs, [0.5, 0.5])),
        ("targets", lambda: fk.layerwise_topq_add_(T.double(), u, segs, [0.5, 0.5])),
        ("targets", lambda: fk.layerwise_topq_add_([T[0], T[1][:-1]], u, segs, [0.5, 0.5])),
        ("targets", lambda: fk.layerwise_topq_add_([], u, segs, [])),
        ("targets", lambda: fk.layerwise_topq_add_([T[0], u], u, segs, [0.5, 0.5])),
        ("targets", lambda: fk.layerwise_topq_add_(T[0].expand(2, P), u, segs, [0.5, 0.5])),
        ("q", lambda: fk.layerwise_topq_add_(T, u, segs, [0.5])),
        ("q", lambda: fk.layerwise_topq_add_(T, u, segs, [0.5, 1.5])),
        ("q", lambda: fk.layerwise_topq_add_(T, u, segs, [0.5, math.nan])),
        ("segments", lambda: fk.layerwise_topq_add_(T, u, [(0, 10), (5, 10)], [0.5, 0.5])),
        ("segments", lambda: fk.layerwise_topq_add_(T, u, [(0, P + 1)], [0.5, 0.5])),
        ("segments", lambda: fk.layerwise_topq_add_(T, u, [(0.5, 3)], [0.5, 0.5])),
        ("segments", lambda: fk.layerwise_topq_add_(T, u, None, [0.5, 0.5])),
        ("alpha", lambda: fk.layerwise_topq_add_(T, u, segs, [0.5, 0.5], alpha=math.inf)),
        ("backend", lambda: fk.layerwise_topq_add_(T, u, segs, [0.5, 0.5], backend="cuda")),
        ("counts", lambda: fk.global_topk_add_(T, u, [1, P + 1])),
        ("counts", lambda: fk.global_topk_add_(T, u, [1, -1])),
        ("counts", lambda: fk.global_topk_add_(T, u, [1.0, 2.0])),
        ("counts", lambda: fk.randomk_add_(T, u, [1])),
        ("generator", lambda: fk.randomk_add_(T, u, [1, 2], generator=3)),
        ("thresholds", lambda: fk.threshold_add_(T, u, segs, torch.full((2, 2), math.nan))),
        ("thresholds", lambda: fk.threshold_add_(T, u, segs, torch.zeros(2, 3))),
        ("U", lambda: fk.cosine_to_aggregate(T[:, :-1], u)),
        ("eps", lambda: fk.cosine_to_aggregate(T, u, eps=-1.0)),
    ]


def test_bad_input_names_the_argument_and_writes_nothing(gen):
    P = 100
    u = torch.randn(P, generator=gen)
    T = torch.randn(2, P, generator=gen)
    before = T.clone()
    segs = [(0, 60), (60, 40)]
    for name, call in _bad_calls(u, T, segs):
        with pytest.raises((ValueError, TypeError)) as ei:
            call()
        assert str(ei.value).startswith(name), (name, str(ei.value))
        assert torch.equal(bits(T), bits(before)), name


# ------------------------------------------------------------------------------ triton on GPU

@pytest.mark.gpu
def test_cuda_backends_match_cpu_reference(gen):
    u, segs, q, T = random_case(gen)
    ref = T.clone()
    fk.layerwise_topq_add_(ref, u, segs, q, backend="torch")
    for be in sp.sparsify_backends(torch.device("cuda")):
        X = T.cuda()
        fk.layerwise_topq_add_(X, u.cuda(), segs, q, backend=be)
        assert torch.equal(bits(X.cpu()), bits(ref)), be


def test_finite_check_accepts_huge_finite_values():
    u = torch.full((8,), 3e38)                       # the sum overflows, every entry is finite
    out = fk.layerwise_topq(u, [(0, 8)], [0.5])
    assert torch.equal(out[0], u)                    # all tied at the threshold: all kept
    U = torch.full((2, 8), 3e38)
    assert fk.cosine_to_aggregate(U, u, backend="torch").tolist() == pytest.approx([1.0, 1.0])   # float64


def test_triton_kernels_compile_for_sm90_without_fma():
    """The GPU path compiles (Triton AOT for sm_90, no GPU needed), with no FMA contraction and no
    local memory. Runs in a subprocess: this process defined the kernels for the interpreter."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from fedrac_kernels.sparsify import aot_report; print(json.dumps(aot_report(90)))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                         timeout=300)
    if res.returncode != 0 and "make_backend" in res.stderr:
        pytest.skip(f"this triton cannot AOT-compile here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(report) == 5
    for r in report:
        assert r["fma"] == 0 and not r["local_memory"] and r["ptx_chars"] > 0, r
