"""The one-launch Triton walk of the fused MLP candidate evaluation (fedrac._walk_triton).

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with a GPU, compiled on CUDA tensors (where ``auto`` picks it). Its logits
match the torch walk's within float32 rounding, and the correct counts are the same as the torch
walk's and the float64 reference's (near ties are decided in float64 either way). A subprocess
without TRITON_INTERPRET compiles it ahead of time for sm_90 (no GPU needed).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import fedrac.evaluation as ev
from fedrac import _walk_triton as wt
from fedrac.evaluation import nested_candidate_accuracy
from fedrac.models import build_model, flatten_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.usefixtures("one_thread")
# every test that runs the kernel (compiled on CUDA, else in the interpreter); the AOT compile check
# needs neither and runs wherever triton has its NVIDIA back end
runs = pytest.mark.skipif(not wt.usable(DEV, 200), reason="triton unavailable (or no CUDA / interpreter)")


def _mlp(classes, shape, gen, seed=0):
    m = build_model("mlp", dataset="digits", num_classes=classes, input_shape=shape, seed=seed).to(DEV)
    p = flatten_parameters(m)
    return m, (p + 0.3 * torch.randn(p.shape, generator=gen).to(DEV))


def _walk(m, p, order, sizes):
    order, sizes = ev._check_order_sizes(m.num_neurons, order, sizes)
    ev._bind(m, p)
    slots, _slot_of, o1, o2 = ev._nested_slots(order, sizes, m.hidden)
    walk = ev._MLPWalk(m, o1, o2, max(e for _, e, _ in slots), max(k for _, _, k in slots), DEV)
    walk.plan_walk(slots)
    return walk


@runs
@pytest.mark.parametrize("classes", [10, 23])          # 23: two class tiles, the second partial
def test_logits_match_the_torch_walk(classes, gen):
    m, p = _mlp(classes, (1, 8, 8), gen)
    N = m.num_neurons
    order = torch.randperm(N, generator=gen)
    sizes = torch.tensor([0, 5, 8, 64, 64, 130, 200, N - 3, N])
    walk = _walk(m, p, order, sizes)
    w = 37                                              # not a multiple of the row block
    h1 = walk.layer1(torch.randn(w, 64, generator=gen).to(DEV))
    z2, a2, LA, _ = walk._buffers(w)
    walk._torch_logits(h1, z2, a2, LA)
    ref = LA.clone()
    LA.fill_(float("nan"))
    walk._triton_logits(h1, LA)
    live = [s for s, (_, _, k2) in enumerate(walk.slots) if k2 > 0]     # k2 = 0: decided from b3
    assert torch.isfinite(LA[live]).all()
    torch.testing.assert_close(LA[live], ref[live], rtol=2e-5, atol=2e-5)


@runs
@pytest.mark.parametrize("rows", [16, 128, 4096])
def test_counts_equal_the_torch_walk_and_float64(rows, gen, monkeypatch):
    m, p = _mlp(10, (1, 8, 8), gen, seed=1)
    N = m.num_neurons
    n = 301
    x = torch.randn(n, 1, 8, 8, generator=gen).to(DEV)
    y = torch.randint(0, 10, (n,), generator=gen).to(DEV)
    for trial in range(2):
        order = torch.randperm(N, generator=gen)
        sizes = torch.cat([torch.tensor([N, 0, 8, 8, 1]), torch.randint(0, N + 1, (12,), generator=gen)])
        monkeypatch.setattr(ev, "_WALK_BACKEND", "torch")
        a = nested_candidate_accuracy(m, p, x, y, order, sizes, batch_size=rows)
        monkeypatch.setattr(ev, "_WALK_BACKEND", "triton")
        calls = []
        real = wt.walk_logits
        monkeypatch.setattr(wt, "walk_logits", lambda *args, **kw: calls.append(1) or real(*args, **kw))
        b = nested_candidate_accuracy(m, p, x, y, order, sizes, batch_size=rows)
        assert calls, "the Triton walk did not run"
        assert torch.equal(a, b), trial
        assert 0 < float(b[sizes > 0].min()) and float(b.max()) < 1
        # every decision in float64: still the same counts
        monkeypatch.setattr(ev, "_NEAR_TIE_RTOL", 1e9)
        assert torch.equal(nested_candidate_accuracy(m, p, x, y, order, sizes, batch_size=rows), a)
        monkeypatch.setattr(ev, "_NEAR_TIE_RTOL", 1e-5)
        monkeypatch.setattr(wt, "walk_logits", real)


@runs
def test_int32_offsets_are_guarded():
    hT = torch.zeros(1, 1, device=DEV).expand(300, 8_000_000)       # E x w = 2.4e9 >= 2^31, no memory
    z = torch.zeros(300, 16, device=DEV)
    with pytest.raises(ValueError, match="int32"):
        wt.walk_logits(hT, z, z[0], torch.zeros(11, 16, device=DEV), torch.zeros(11, device=DEV),
                       torch.tensor([1], device=DEV), torch.tensor([1], device=DEV))


@runs
def test_auto_picks_triton_only_for_cuda_tensors(gen, monkeypatch):
    m, p = _mlp(10, (1, 8, 8), gen)
    monkeypatch.setattr(ev, "_WALK_BACKEND", "auto")
    walk = _walk(m, p, torch.randperm(m.num_neurons, generator=gen), torch.tensor([8, 400]))
    assert walk._use_triton() == (DEV.type == "cuda")
    monkeypatch.setattr(ev, "_WALK_BACKEND", "torch")
    assert not _walk(m, p, torch.arange(m.num_neurons), torch.tensor([8]))._use_triton()
    assert not wt.usable(DEV, 4096)                    # too wide for registers: torch walk
    monkeypatch.setattr(ev, "_WALK_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FEDRAC_EVAL_WALK"):
        _walk(m, p, torch.arange(m.num_neurons), torch.tensor([8]))._use_triton()


def test_compiles_ahead_of_time_for_sm90():
    """Compiles for sm_90 without a GPU (triton.compile on an ASTSource), within 168 registers
    and without local memory."""
    script = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fedrac import _walk_triton as wt
from fedrac_kernels.backends._triton import aot, common
target = GPUTarget("cuda", 90, 32)
backend = triton.compiler.make_backend(target)
out = []
for k2p, bw, warps in ((256, 32, 4), (512, 16, 8)):
    sig = [("HT", "*fp32"), ("W2T", "*fp32"), ("B2", "*fp32"), ("W3", "*fp32"), ("B3", "*fp32"),
           ("E_OF", "*i64"), ("K2_OF", "*i64"), ("OUT", "*fp32"), ("w", "i32"), ("K2", "i32"), ("S", "i32"),
           ("NC1", "i32")]
    s = aot._spec(f"walk[{k2p}]", wt._walk_logits_kernel, sig, dict(BW=bw, K2P=k2p, NCT_=wt.NCT), warps)
    src = ASTSource(fn=s["fn"], signature=s["signature"], constexprs=s["constexprs"], attrs=s["attrs"])
    opts = backend.parse_options(dict(num_warps=warps))
    k = triton.compile(src, target=target, options=opts.__dict__)
    out.append(dict(name=s["name"], res=aot.resource_usage(k.asm["cubin"])))
print(json.dumps(out))
"""
    pytest.importorskip("triton")
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:
        pytest.skip(f"triton AOT APIs unavailable: {exc}")
    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA back end")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["name"] for r in res] == ["walk[256]", "walk[512]"]
    for r in res:
        if r["res"]:
            assert r["res"].get("LOCAL", 0) == 0 and r["res"].get("STACK", 0) == 0, r
            assert r["res"]["REG"] <= 255, r


@runs
def test_a_failing_triton_walk_falls_back_to_the_torch_walk_in_auto_mode(gen, monkeypatch):
    """auto: a Triton failure (say, a Triton version that cannot compile the kernel) warns once and
    the torch walk gives the same counts; forced triton re-raises."""
    m, p = _mlp(10, (1, 8, 8), gen)
    x = torch.randn(50, 1, 8, 8, generator=gen).to(DEV)
    y = torch.randint(0, 10, (50,), generator=gen).to(DEV)
    order, sizes = torch.randperm(m.num_neurons, generator=gen), torch.tensor([8, 200, 400])
    monkeypatch.setattr(ev, "_WALK_BACKEND", "torch")
    ref = nested_candidate_accuracy(m, p, x, y, order, sizes)

    def broken(*a, **k):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(wt, "walk_logits", broken)
    monkeypatch.setattr(ev, "_WALK_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="cannot compile"):
        nested_candidate_accuracy(m, p, x, y, order, sizes)
    monkeypatch.setattr(ev, "_WALK_BACKEND", "auto")
    monkeypatch.setattr(wt, "usable", lambda device, K2: True)           # as on a GPU
    monkeypatch.setattr(ev._MLPWalk, "_use_triton", lambda self: self._triton is not False)
    with pytest.warns(RuntimeWarning, match="Triton candidate walk failed"):
        got = nested_candidate_accuracy(m, p, x, y, order, sizes)
    assert torch.equal(got, ref)
    assert ev._WALK_BACKEND == "torch"
