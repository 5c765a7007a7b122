"""Batched client training (fedrac.batched) against sequential local_train, and the streamed,
chunked MaskedAlgorithm round: identical minibatch draws, per-client parameters within float
tolerance, streamed aggregation bit-identical to the one-call aggregation, resume bit-identical."""
import json

import pytest
import torch

from fedrac import runner
from fedrac.batched import ClientTrainer, advance_streams, method_for, resolve_client_batch, train_batch
from fedrac.cli import main
from fedrac.config import ConfigError
from fedrac.io import load_checkpoint
from fedrac.models import build_model, flatten_parameters
from fedrac.training import local_train

S10 = ",".join(f"{0.3 + 0.04 * k:.2f}" for k in range(10))


pytestmark = pytest.mark.usefixtures("one_thread")


def _clients(gen, sizes, shape):
    return [(torch.randn((n,) + shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in sizes]


def _sequential(model, start, data, masks, seeds, **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    rows = []
    for i, (x, y) in enumerate(data):
        p = start if start.dim() == 1 else start[i]
        rows.append(local_train(model, p, x, y, mask=None if masks is None else masks[i], generator=gens[i], **kw))
    return torch.stack(rows), gens


def _rel(a, b, start):
    """Per-client relative error of the update (stricter than of the parameters)."""
    s = start if start.dim() == 2 else start.expand_as(a)
    return ((a - b).norm(dim=1) / (b - s).norm(dim=1).clamp_min(1e-30))


def _close(a, b, start, *, update_tol=1e-4):
    """Every client's parameters within 1e-5 relative of local_train's (and its update within update_tol)."""
    assert float(((a - b).norm(dim=1) / b.norm(dim=1)).max()) < 1e-5
    assert float(_rel(a, b, start).max()) < update_tol


# sizes: 37 -> passes of 16,16,5 (a short, padded batch at step 3), 20 -> 16,4, 64 -> full batches
SIZES = (37, 50, 20, 64, 45, 16)


@pytest.mark.parametrize("method", ["bmm", "vmap"])
@pytest.mark.parametrize("clip", [1.0, 1e-3, None])
@pytest.mark.parametrize("steps", [1, 5])
def test_mlp_matches_local_train(method, clip, steps, gen):
    m = build_model("mlp", dataset="digits", num_classes=10, input_shape=(1, 8, 8), seed=0)
    p0 = flatten_parameters(m)
    data = _clients(gen, SIZES, (1, 8, 8))
    masks = [None] + [(torch.rand(400, generator=gen) < f).float() for f in (0.3, 0.6, 0.9, 0.5)] + [None]
    kw = dict(num_steps=steps, batch_size=16, lr=0.1, clip_grad=clip)
    ref, ref_gens = _sequential(m, p0, data, masks, range(6), **kw)
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    out = train_batch(m, p0, data, masks, generators=gens, method=method, **kw)
    _close(out, ref, p0)
    # exact zeros stay exact zeros: the non-zero aggregation rule sees the same active sets
    assert torch.equal(out == p0, ref == p0)
    # identical minibatch draws: every client's stream ends in the same state
    for a, b in zip(gens, ref_gens):
        assert torch.equal(a.get_state(), b.get_state())


def test_per_client_start_and_trainer_reuse(gen):
    m = build_model("mlp", dataset="digits", num_classes=10, input_shape=(1, 8, 8), seed=0)
    p0 = flatten_parameters(m)
    starts = p0 + 0.01 * torch.randn(4, p0.numel(), generator=gen)
    data = _clients(gen, (30, 41, 12, 33), (1, 8, 8))
    masks = torch.rand(4, 400, generator=gen) < 0.5          # a [Kb, N] tensor of masks
    kw = dict(num_steps=3, batch_size=8, lr=0.05, clip_grad=1.0)
    ref, _ = _sequential(m, starts, data, masks.float(), range(4), **kw)
    tr = ClientTrainer(m, max_batch=4)
    keep = starts.clone()
    out = tr.train(starts, data, masks, generators=[torch.Generator().manual_seed(s) for s in range(4)], **kw)
    assert torch.equal(starts, keep)                            # the start is not modified
    _close(out, ref, starts)
    # a smaller second chunk reuses the same buffer
    out2 = tr.train(p0, data[:2], None, generators=[torch.Generator().manual_seed(s) for s in range(2)], **kw)
    ref2, _ = _sequential(m, p0, data[:2], None, range(2), **kw)
    _close(out2, ref2, p0)
    with pytest.raises(ValueError, match="max_batch"):
        tr.train(p0, data + data[:1], None, generators=[None] * 5, **kw)
    with pytest.raises(ValueError, match="start"):
        tr.train(p0.double(), data, None, generators=[None] * 4, **kw)
    with pytest.raises(ValueError, match="bmm"):
        method_for(build_model("resnet18", dataset="cifar10", num_classes=10, input_shape=(3, 8, 8)), "bmm")


def test_resnet_vmap_matches_local_train(gen):
    """The generic path (functional_call + vmap(grad)): shared first step and per-client later steps.
    Tolerance: float32 rounding may flip a ReLU at a pre-activation within rounding of 0, which moves
    a ResNet's tiny-input update by up to ~1e-2 (the sequential float32 result moves as much against
    a float64 reference); typically the error is ~1e-6."""
    m = build_model("resnet18", dataset="cifar10", num_classes=10, input_shape=(3, 16, 16), seed=0)
    p0 = flatten_parameters(m)
    data = _clients(gen, (10, 6), (3, 16, 16))                   # 10 -> 8 + a padded 2
    masks = [None, (torch.rand(m.num_neurons, generator=gen) < 0.6).float()]
    kw = dict(num_steps=2, batch_size=8, lr=0.1, clip_grad=1.0)
    ref, ref_gens = _sequential(m, p0, data, masks, range(2), **kw)
    gens = [torch.Generator().manual_seed(s) for s in range(2)]
    out = train_batch(m, p0, data, masks, generators=gens, **kw)
    assert float(_rel(out, ref, p0).max()) < 5e-2
    assert float(_rel(out, ref, p0).min()) < 1e-4
    for a, b in zip(gens, ref_gens):
        assert torch.equal(a.get_state(), b.get_state())


@pytest.mark.parametrize("n,steps,bs", [(37, 1, 16), (37, 7, 16), (5, 3, 8), (64, 4, 32), (10, 0, 4)])
def test_advance_streams_replays_the_draws(n, steps, bs, gen):
    m = build_model("mlp", dataset="digits", num_classes=10, input_shape=(1, 8, 8), seed=0)
    (x, y), = _clients(gen, (n,), (1, 8, 8))
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    local_train(m, flatten_parameters(m), x, y, mask=None, num_steps=steps, batch_size=bs, lr=0.1, clip_grad=1.0,
                generator=a)
    advance_streams([n], [b], num_steps=steps, batch_size=bs)
    assert torch.equal(a.get_state(), b.get_state())


# ------------------------------------------------------------------------------- in the simulator

def _prep(tmp_path, name, **kw):
    layers = [("t", dict({"rounds": "5", "standalone_acc": S10, "progress": "false", "plots": "false",
                          "out": str(tmp_path / name)}, **{k: str(v) for k, v in kw.items()}))]
    return runner.prepare(layers)


def _rounds(prep, R=5):
    return [runner.round_step(prep, r) for r in range(1, R + 1)]


def _strip(recs):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in recs]


def test_config_keys():
    from fedrac.config import CORE, RESUME_MUTABLE

    assert CORE["client_batch"].default == "auto" and CORE["stream_aggregation"].default == "auto"
    assert "stream_aggregation" in RESUME_MUTABLE and "client_batch" not in RESUME_MUTABLE
    assert resolve_client_batch("mlp", "cpu") > 1 and resolve_client_batch("resnet18", "cpu") == 1
    assert resolve_client_batch("mlp", "cuda") > 1 and resolve_client_batch("resnet18", "cuda:1") > 1
    cfg, _ = runner.load_config([("t", {"clients": "10"})])
    assert cfg["client_batch"] == resolve_client_batch("mlp", cfg["device"])
    with pytest.raises(ConfigError, match="client_batch"):
        runner.load_config([("t", {"client_batch": "-1"})])


@pytest.mark.parametrize("agg", ["nonzero_mean", "structural_mean"])
def test_streamed_round_is_bit_identical_to_one_call(tmp_path, agg):
    """Same client_batch: streaming the chunks into StreamingAggregator == the one-call aggregation."""
    a = _prep(tmp_path, "a", client_batch=3, stream_aggregation="false", aggregation=agg)
    b = _prep(tmp_path, "b", client_batch=3, stream_aggregation="true", aggregation=agg)
    assert not a.algo._streaming() and b.algo._streaming()
    ra, rb = _rounds(a), _rounds(b)
    assert _strip(ra) == _strip(rb)
    assert torch.equal(a.algo.w, b.algo.w) and torch.equal(a.algo.freq, b.algo.freq)


def test_batched_round_matches_sequential(tmp_path):
    seq = _prep(tmp_path, "s", client_batch=1, stream_aggregation="false")
    bat = _prep(tmp_path, "b", client_batch=4, stream_aggregation="true")   # chunks of 4, 4, 2
    rs, rb = _rounds(seq), _rounds(bat)
    assert float((seq.algo.w - bat.algo.w).abs().max()) <= 1e-5 * float(seq.algo.w.abs().max())
    for x, y in zip(rs, rb):
        assert x["submodel_size"] == y["submodel_size"]
        assert abs(x["mean_accuracy"] - y["mean_accuracy"]) <= 0.01
    for g1, g2 in zip(seq.sim.client_generators, bat.sim.client_generators):
        assert torch.equal(g1.get_state(), g2.get_state())


def test_streamed_round_names_nonfinite_clients(tmp_path):
    prep = _prep(tmp_path, "n", client_batch=4, stream_aggregation="true")
    orig = prep.sim.local_train_many

    def poisoned(ks, params, masks=None, **kw):
        out = orig(ks, params, masks, **kw)
        for i, k in enumerate(ks):
            if k == 6:
                out[i, 3] = float("nan")
        return out

    prep.sim.local_train_many = poisoned
    w = prep.algo.w.clone()
    with pytest.raises(ValueError, match=r"client\(s\) \[6\]"):
        prep.algo.round(1)
    assert torch.equal(prep.algo.w, w)


def test_memory_is_bounded_by_the_chunk(tmp_path):
    """K = 10 clients in chunks of 2: the trainer's work buffers hold 2 x P values, not K x P."""
    prep = _prep(tmp_path, "m", client_batch=2, stream_aggregation="true")
    _rounds(prep, 2)
    tr = prep.sim._client_trainer
    P = prep.sim.P
    assert tr.max_batch == 2
    assert max(b.numel() for (name, _, _), b in tr._bufs.items() if name in ("flat", "grad")) == 2 * P


def test_stop_and_resume_bit_identical_with_batches(tmp_path, capsys):
    common = ["--quiet", "--rounds", "7", "--set", f"standalone_acc={S10}", "--set", "plots=false",
              "--set", "client_batch=3", "--set", "stream_aggregation=true"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["run", "--out", str(full)] + common) == 0
    assert main(["run", "--out", str(part), "--set", "stop_after=3"] + common) == 0
    assert main(["run", "--resume", str(part), "--quiet", "--set", "stream_aggregation=false"]) == 0
    capsys.readouterr()

    def recs(run):
        return _strip([json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()])

    assert recs(full) == recs(part)
    ca, cb = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert torch.equal(ca["algorithm"]["w"], cb["algorithm"]["w"])
    assert json.loads((full / "config.json").read_text())["client_batch"] == 3


def test_old_run_without_client_batch_resumes_sequentially(tmp_path, capsys):
    run = tmp_path / "old"
    assert main(["run", "--out", str(run), "--quiet", "--rounds", "4", "--set", f"standalone_acc={S10}",
                 "--set", "plots=false", "--set", "stop_after=2", "--set", "client_batch=1"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    del cfg["client_batch"], cfg["stream_aggregation"]            # as written before these keys existed
    (run / "config.json").write_text(json.dumps(cfg))
    prep = runner.prepare_resume(run, {})
    assert prep.cfg["client_batch"] == 1
    capsys.readouterr()
