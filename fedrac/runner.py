"""The shared simulation loop: set-up, rounds, metrics, outputs, checkpoints, resume.

Two phases, so that bad input never leaves a run directory behind:

* :func:`prepare` / :func:`prepare_resume` validate the configuration, load the data, build the
  partition, the model and the standalone accuracies and construct the algorithm - everything that
  can fail on user input - without writing anything but caches;
* :func:`execute` creates the run directory and runs the rounds.

Per round ``r`` the loop calls ``algo.round(r)``, evaluates ``algo.rewards()`` on the server test
set (one fused pass over the distinct submodels for mask rewards) and logs, per client and overall,
the reward accuracies theta_k, fairness (100 x Pearson(s, theta)), max/mean/min accuracy, the
alpha-BCF rate with its in-bound fraction and violations, and the algorithm's own values (FedRAC:
neuron-frequency variance, al, a_g, submodel sizes ...), one JSON line per round.

Run directory::

    config.json     resolved configuration (every key; re-runnable with --config)
    metrics.jsonl   one line per round, per-client values included
    summary.json    last-round metrics (primary) and best-over-rounds values (secondary)
    partition.json  client index lists (+ partition.png)
    checkpoint.pt   latest checkpoint: algorithm state, RNG streams, metrics so far
    plots/          accuracy.png, fairness.png, rewards.png, frequency.png
    tensorboard/    with --tensorboard

Determinism: every random stream is a ``torch.Generator`` seeded from (seed, purpose): model
initialisation, one per client for its local data order, one for the server, one per client for
standalone training; the partition and the server split use ``partition_seed``. The checkpoint
stores the generators' states, so a resumed run continues bit for bit (CPU).
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import io as fio
from .config import (CORE, RESUME_MUTABLE, Config, ConfigError, build_config, read_config_file,
                     resolve_core)

RESERVED_KEYS = ("round", "fairness", "max_accuracy", "mean_accuracy", "min_accuracy", "rate", "in_bound_fraction",
                 "violations", "client_accuracy", "time_s")


class RunError(ValueError):
    """A problem with the run directory or its files (one line)."""


def derive_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed for the stream named ``tags`` of run seed ``seed`` (independent streams)."""
    h = hashlib.sha256(repr((int(seed),) + tags).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2 ** 63 - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ simulation

class Simulation:
    """What an algorithm sees of the world (contract in :mod:`fedrac.algorithms.base`)."""

    def __init__(self, cfg: Config, *, model, layout, init_params: torch.Tensor,
                 clients: Sequence[tuple[torch.Tensor, torch.Tensor]], val: tuple, test: tuple,
                 standalone: Sequence[float], metric_standalone: Sequence[float], num_classes: int,
                 device: torch.device):
        self.cfg = cfg
        self.device = device
        self.model = model
        self.layout = layout
        self.init_params = init_params
        self.K = len(clients)
        self.N = int(model.num_neurons)
        self.P = int(init_params.numel())
        self.num_classes = num_classes
        self._clients = list(clients)
        self._val = val
        self._test = test
        self.client_sizes = [int(x.shape[0]) for x, _ in clients]
        self.standalone = torch.tensor(list(standalone), dtype=torch.float64)
        self.metric_standalone = torch.tensor(list(metric_standalone), dtype=torch.float64)
        self.eval_batch_size = int(cfg["eval_batch_size"]) or None
        seed = int(cfg["seed"])
        self.client_generators = [_generator(derive_seed(seed, "client", k)) for k in range(self.K)]
        self.generator = _generator(derive_seed(seed, "server"))
        self._holdouts = None
        self._holdout_rows = None
        self.dist = None            # fedrac.distributed.DistContext in `--distributed` runs

    def client_holdout_indices(self) -> list:
        """Each client's logging holdout as row indices into its data: a fixed random 10% (it still
        trains on all of it, flgo's train_on_all), drawn from the partition seed."""
        if self._holdouts is None:
            out = []
            for k, (x, _y) in enumerate(self._clients):
                g = _generator(derive_seed(int(self.cfg["partition_seed"]), "holdout", k))
                perm = torch.randperm(x.shape[0], generator=g).to(x.device)
                out.append(perm[:max(1, int(0.1 * x.shape[0]))])
            self._holdouts = out
        return self._holdouts

    def client_holdouts(self):
        """Each client's logging holdout rows ``(x, y)`` (see :meth:`client_holdout_indices`),
        gathered once."""
        if self._holdout_rows is None:
            self._holdout_rows = [(x[i], y[i]) for (x, y), i in zip(self._clients, self.client_holdout_indices())]
        return self._holdout_rows

    # data ---------------------------------------------------------------------------------------
    def client_data(self, k: int):
        return self._clients[k]

    def val_data(self):
        return self._val

    def test_data(self):
        return self._test

    def _split(self, split: str):
        if split == "val":
            return self._val
        if split == "test":
            return self._test
        if split.startswith("client:"):
            return self._clients[int(split[7:])]
        raise ValueError(f"split: unknown split {split!r} (val, test, client:<k>)")

    # client work ---------------------------------------------------------------------------------
    def local_train(self, k: int, params: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                    num_steps: Optional[int] = None, lr: Optional[float] = None) -> torch.Tensor:
        from .training import local_train

        x, y = self._clients[k]
        if mask is not None:
            mask = mask.to(self.device)
        return local_train(self.model, params, x, y, mask=mask,
                           num_steps=int(self.cfg["local_steps"] if num_steps is None else num_steps),
                           batch_size=int(self.cfg["batch_size"]),
                           lr=float(self.cfg["lr"] if lr is None else lr),
                           clip_grad=float(self.cfg["clip_grad"]) or None,
                           generator=self.client_generators[k])

    def local_train_many(self, ks: Sequence[int], params: torch.Tensor, masks: Optional[torch.Tensor] = None, *,
                         num_steps: Optional[int] = None, lr: Optional[float] = None,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[len(ks), P]: clients ``ks`` (at most ``client_batch`` of them) trained from ``params`` as
        :meth:`local_train` trains them, as one batched computation (:mod:`fedrac.batched`; one after
        another when client_batch <= 1). ``masks``: None or bool [len(ks), N]. The result is a work
        buffer reused by the next call unless ``out`` is given."""
        from .batched import train_clients

        return train_clients(self, ks, params, masks, num_steps=num_steps, lr=lr, out=out)

    # evaluation ----------------------------------------------------------------------------------
    def accuracy(self, params: torch.Tensor, split: str = "test", mask: Optional[torch.Tensor] = None) -> float:
        from .evaluation import accuracy

        x, y = self._split(split)
        return float(accuracy(self.model, params, x, y, mask=mask, batch_size=self.eval_batch_size))

    def nested_accuracy(self, params: torch.Tensor, order, sizes, split: str = "val") -> torch.Tensor:
        """float64 ``[S]``. In distributed runs a ``split="val"`` or ``"test"`` evaluation is
        collective (val: made in the round, which every rank runs; test: the reward evaluation,
        which the other ranks mirror, :func:`fedrac.distributed._worker_loop`): each rank counts
        its 1/W of the rows and the counts are summed exactly
        (:meth:`fedrac.distributed.DistContext.sum_counts`)."""
        from .evaluation import _result, nested_candidate_accuracy, nested_candidate_counts

        x, y = self._split(split)
        dist = self.dist
        if dist is None or dist.world <= 1 or split not in ("val", "test"):
            return nested_candidate_accuracy(self.model, params, x, y, order, sizes, batch_size=self.eval_batch_size)
        counts = nested_candidate_counts(self.model, params, x, y, order, sizes, batch_size=self.eval_batch_size,
                                         shard=(dist.rank, dist.world))
        return _result(dist.sum_counts(counts), None, x.shape[0], False)

    def masks_accuracy(self, params: torch.Tensor, masks: torch.Tensor, split: str = "val") -> torch.Tensor:
        from .evaluation import masks_accuracy

        x, y = self._split(split)
        return masks_accuracy(self.model, params, x, y, masks, batch_size=self.eval_batch_size)

    def evaluate_rewards(self, rewards, *, collective_only: bool = False) -> Optional[torch.Tensor]:
        """theta: float64 [K], every client's reward model on the test set (shared passes).

        ``collective_only``: what the other ranks of a distributed run do while rank 0 evaluates:
        only the evaluations that are split across the ranks (nested rewards); returns None."""
        from .algorithms.base import AccuracyRewards, MaskRewards, ParamRewards

        K = self.K
        nested = isinstance(rewards, MaskRewards) and rewards.order is not None
        if nested:  # split across the ranks: every rank makes exactly this call
            sizes = torch.as_tensor(rewards.sizes, dtype=torch.int64).cpu()
            uniq, inv = torch.unique(sizes, return_inverse=True)
            acc = self.nested_accuracy(rewards.params, rewards.order, uniq, split="test")
        if collective_only:
            return None
        if nested:
            return acc.to(torch.float64)[inv]
        if isinstance(rewards, AccuracyRewards):
            acc = torch.as_tensor(rewards.accuracy, dtype=torch.float64).cpu().reshape(-1)
            if acc.numel() != K:
                raise ValueError(f"AccuracyRewards: expected {K} accuracies, got {acc.numel()}")
            return acc
        if isinstance(rewards, MaskRewards):
            if rewards.masks is not None:
                return self.masks_accuracy(rewards.params, rewards.masks, split="test").to(torch.float64)
            return torch.full((K,), self.accuracy(rewards.params, "test"), dtype=torch.float64)
        if isinstance(rewards, ParamRewards):
            if len(rewards.params) != K:
                raise ValueError(f"ParamRewards: expected {K} parameter vectors, got {len(rewards.params)}")
            masks = rewards.masks or [None] * K
            seen: dict = {}
            out = torch.empty(K, dtype=torch.float64)
            for k, (p, m) in enumerate(zip(rewards.params, masks)):
                key = (id(p), None if m is None else id(m))
                if key not in seen:
                    seen[key] = self.accuracy(p, "test", mask=m)
                out[k] = seen[key]
            return out
        raise TypeError(f"rewards(): expected MaskRewards or ParamRewards, got {type(rewards).__name__}")

    def client_reward_metrics(self, rewards) -> dict:
        """The official logger's extra per-round work: every client's reward model on its own data
        and on its holdout (data-weighted loss/accuracy, as flgo's train/valid metrics).

        One fused pass (:func:`fedrac.evaluation.client_metrics`): each client's rows are evaluated
        once, in place, and the holdout metrics are read off the same per-row results (the holdout
        is a subset of the client's rows); submodel rewards share every computation before the
        first mask site (nested masks: one gathered weight set, each client a prefix of it)."""
        from fedrac_kernels import NestedMasks

        from .algorithms.base import AccuracyRewards, MaskRewards
        from .evaluation import client_metrics, evaluate

        if isinstance(rewards, AccuracyRewards):
            return {}
        bs = self.eval_batch_size
        idx = self.client_holdout_indices()
        if isinstance(rewards, MaskRewards):
            masks = None
            if rewards.order is not None:
                masks = NestedMasks(rewards.order, torch.as_tensor(rewards.sizes, dtype=torch.int64))
            elif rewards.masks is not None:
                masks = rewards.masks
            res = client_metrics(self.model, rewards.params, self._clients, masks, batch_size=bs, subsets=idx)
            parts = (res, res["subset"])
        else:           # one model per client: evaluate each on its rows and on its holdout
            parts = []
            for data in (self._clients, self.client_holdouts()):
                acc, loss, n = [], [], []
                for k, (x, y) in enumerate(data):
                    m = rewards.masks[k] if rewards.masks is not None else None
                    e = evaluate(self.model, rewards.params[k], x, y, mask=m, batch_size=bs)
                    acc.append(e["accuracy"])
                    loss.append(e["loss"])
                    n.append(int(x.shape[0]))
                parts.append({"accuracy": torch.tensor(acc, dtype=torch.float64),
                              "loss": torch.tensor(loss, dtype=torch.float64), "num_samples": torch.tensor(n)})
        out: dict = {}
        for name, r in zip(("train", "valid"), parts):
            acc, loss, n = r["accuracy"].tolist(), r["loss"].tolist(), r["num_samples"].tolist()
            tot = sum(n)
            out[f"{name}_loss"] = sum(a * b for a, b in zip(loss, n)) / tot
            out[f"{name}_accuracy"] = sum(a * b for a, b in zip(acc, n)) / tot
            out[f"client_{name}_accuracy"] = acc
        return out

    # RNG -----------------------------------------------------------------------------------------
    def rng_state(self) -> dict:
        return {"clients": [g.get_state() for g in self.client_generators], "server": self.generator.get_state(),
                "global": fio.rng_state()}

    def load_rng_state(self, st: dict) -> None:
        for g, s in zip(self.client_generators, st["clients"]):
            g.set_state(s)
        self.generator.set_state(st["server"])
        fio.set_rng_state(st["global"])


# -------------------------------------------------------------------------------------- metrics

def round_record(r: int, theta: torch.Tensor, s_metric: torch.Tensor, bcf_alpha: float, extras: dict,
                 seconds: float) -> dict:
    from . import metrics

    th = theta.to(torch.float64)
    rate = metrics.bcf_rate(s_metric, th, alpha=bcf_alpha)
    rec = {
        "round": r,
        "fairness": float(metrics.fairness(s_metric, th)),
        "max_accuracy": float(th.max()),
        "mean_accuracy": float(th.mean()),
        "min_accuracy": float(th.min()),
        "rate": float(rate["rate"]),
        "in_bound_fraction": float(rate["in_bound_fraction"]),
        "violations": int(rate["violations"]),
        "client_accuracy": th.tolist(),
    }
    for k, v in extras.items():
        if k in RESERVED_KEYS:
            raise ValueError(f"algorithm extras may not use the reserved metric name {k!r}")
        rec[k] = v
    rec["time_s"] = seconds
    return fio.to_jsonable(rec)


def round_step(prep: "Prepared", r: int) -> dict:
    """One round of the loop without I/O: the algorithm's server round, the reward evaluation on T
    (shared passes), the per-round metrics. Returns the metrics record."""
    cfg, sim, algo = prep.cfg, prep.sim, prep.algo
    t0 = time.perf_counter()
    extras = dict(algo.round(r) or {})
    rewards = algo.rewards()
    theta = sim.evaluate_rewards(rewards)
    if cfg["client_metrics"]:
        extras.update(sim.client_reward_metrics(rewards))
    return round_record(r, theta, sim.metric_standalone, float(cfg["bcf_alpha"]), extras, time.perf_counter() - t0)


def _best(history: list, key: str) -> Optional[dict]:
    best = None
    for rec in history:
        v = rec.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        if best is None or v > best["value"]:
            best = {"value": v, "round": rec["round"]}
    return best


def summarize(history: list, cfg: Config, sim: Simulation, algo, *, complete: bool, wall_s: float) -> dict:
    last = history[-1] if history else {}
    times = [rec.get("time_s") or 0.0 for rec in history]
    s_metric = sim.metric_standalone.tolist()
    summary = {
        "algorithm": cfg["algorithm"],
        "dataset": cfg["dataset"],
        "partition": cfg["partition"],
        "clients": cfg["clients"],
        "state": "last",
        "rounds": last.get("round", 0),
        "rounds_planned": cfg["rounds"],
        "complete": complete,
        "fairness": last.get("fairness"),
        "max_accuracy": last.get("max_accuracy"),
        "mean_accuracy": last.get("mean_accuracy"),
        "min_accuracy": last.get("min_accuracy"),
        "rate": last.get("rate"),
        "in_bound_fraction": last.get("in_bound_fraction"),
        "violations": last.get("violations"),
        "client_accuracy": last.get("client_accuracy"),
        "standalone_accuracy": s_metric,
        "best": {
            "fairness": _best(history, "fairness"),
            "max_accuracy": _best(history, "max_accuracy"),
            "rate": _best(history, "rate"),
        },
        "client_columns": algo.client_columns() if history else {},
        "seconds_per_round": (sum(times) / len(times)) if times else None,
        "wall_time_s": wall_s,
        "notes": "top level = last round (primary); best = best over rounds (secondary); "
                 "fairness = 100 x Pearson(standalone_accuracy, client_accuracy)",
    }
    if sim.standalone.tolist() != s_metric:
        summary["allocation_standalone_accuracy"] = sim.standalone.tolist()
    return summary


# ------------------------------------------------------------------------------------ preparing

@dataclass
class Prepared:
    cfg: Config
    sim: Simulation
    algo: Any
    run_dir: Path
    parts: list
    labels: torch.Tensor
    num_classes: int
    val_idx: Any = None
    resume: Optional[dict] = None
    history: list = field(default_factory=list)
    history_lines: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _algorithms():
    from . import algorithms

    return algorithms


def _partition_tools():
    from . import partitions

    return partitions


def load_config(layers: Sequence[tuple[str, dict]]) -> tuple[Config, Any]:
    """Parse, merge and resolve a configuration (no data needed). Returns (cfg, partition spec)."""
    algos = _algorithms()
    cfg = build_config(layers=layers, algorithm_options=lambda name: algos.options_of(name, strict=True),
                       foreign_options=algos.foreign_options)
    from . import data as fdata

    name = str(cfg["dataset"]).strip().lower()
    if name not in fdata.DATASETS:
        import difflib

        near = difflib.get_close_matches(name, list(fdata.DATASETS), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"unknown dataset {cfg['dataset']!r}; {hint}available: {', '.join(fdata.DATASETS)}")
    cfg["dataset"] = name
    cfg["data_dir"] = str(_data_dir(cfg))
    spec = _partition_tools().parse_partition(str(cfg["partition"]))
    cfg["partition"] = _partition_text(spec)
    cfg = resolve_core(cfg, partition_kind=spec.kind, partition_alpha=spec.alpha)
    cls = algos.get(cfg["algorithm"])
    cfg.update(cls.resolve_options(cfg))
    return cfg, spec


def _partition_text(spec) -> str:
    from .standalone import partition_key

    return partition_key(spec.kind, spec.alpha)


def default_run_dir(cfg: Config) -> Path:
    if cfg["out"]:
        return Path(cfg["out"]).expanduser()
    root = Path("runs")
    if cfg["name"]:
        return root / cfg["name"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    part = str(cfg["partition"]).replace(":", "")
    base = root / f"{stamp}-{cfg['algorithm']}-{cfg['dataset']}-{part}"
    path, i = base, 2
    while path.exists():
        path = Path(f"{base}-{i}")
        i += 1
    return path


def _check_new_run_dir(path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise RunError(f"{path} exists and is not a directory; choose another --out")
        if any(path.iterdir()):
            hint = "resume it with --resume" if (path / "config.json").exists() else "choose another --out"
            raise RunError(f"run directory {path} already exists and is not empty; {hint} "
                           f"or pick another --out/--name")


def _data_dir(cfg: Config) -> Path:
    from . import data as fdata

    return Path(cfg["data_dir"]).expanduser() if cfg["data_dir"] else Path(fdata.default_data_dir())


def _load_world(cfg: Config, spec, *, parts: Optional[list] = None):
    """Data, split, partition, model (everything except the standalone accuracies)."""
    from . import data as fdata
    from .models import build_model, flatten_parameters

    import fedrac_kernels as fk

    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    bundle = fdata.load_dataset(cfg["dataset"], _data_dir(cfg), download=bool(cfg["download"]),
                                verify=bool(cfg["verify"]), archive=cfg["archive"] or None)
    train, test = bundle.train, bundle.test
    labels = train.y
    pool_idx, val_idx = fdata.server_split(len(labels), holdout=float(cfg["val_holdout"]),
                                           seed=int(cfg["partition_seed"]))
    ptools = _partition_tools()
    if parts is None:
        kwargs = {}
        if cfg["samples_per_client"] != "auto":
            kwargs["samples_per_client"] = int(cfg["samples_per_client"])
        parts = ptools.make_partition(spec, labels, pool_idx, int(cfg["clients"]), bundle.num_classes,
                                      int(cfg["partition_seed"]), **kwargs)
    parts = [torch.as_tensor(p, dtype=torch.int64) for p in parts]
    if len(parts) != cfg["clients"]:
        raise RunError(f"the partition has {len(parts)} clients but clients={cfg['clients']}")
    for k, p in enumerate(parts):
        if p.numel() == 0:
            raise ConfigError(f"partition {cfg['partition']} leaves client {k} without data; use fewer "
                              f"clients or another partition")
    clients = [(train.x[p].to(device), train.y[p].to(device)) for p in parts]
    val = (train.x[val_idx].to(device), train.y[val_idx].to(device))
    tst = (test.x.to(device), test.y.to(device))
    model = build_model(cfg["model"], dataset=cfg["dataset"], num_classes=bundle.num_classes,
                        input_shape=bundle.input_shape, seed=derive_seed(int(cfg["seed"]), "model"))
    model.to(device)
    init = flatten_parameters(model).to(device)
    layout = fk.NeuronLayout.from_module(model)
    fingerprint = _data_fingerprint(bundle)
    return bundle, parts, val_idx, clients, val, tst, model, layout, init, fingerprint


def _data_fingerprint(bundle) -> str:
    h = hashlib.sha256()
    for t in (bundle.train.y, bundle.test.y, bundle.train.x[:64], bundle.test.x[:64]):
        t = t.detach().contiguous().cpu()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    h.update(str(getattr(bundle, "canonical", None)).encode())
    return h.hexdigest()[:32]


def _resolve_standalone(cfg: Config, *, model, init, clients, tst, fingerprint, parts, notes: list) -> None:
    from . import standalone as st

    K = int(cfg["clients"])
    v = cfg["standalone_acc"]
    if v == "paper":
        cfg["standalone_acc"] = st.paper_vector(cfg["model"], cfg["dataset"], cfg["partition"], "alloc", K)
        notes.append("standalone accuracies: the official code's allocation vector (Appendix B)")
    elif v == "auto":
        key = st.cache_key(dataset=cfg["dataset"], data_fingerprint=fingerprint, parts=parts, init_params=init,
                           model=cfg["model"], epochs=cfg["standalone_epochs"], lr=cfg["lr"],
                           batch_size=cfg["batch_size"], clip_grad=cfg["clip_grad"],
                           holdout=cfg["standalone_holdout"], seed=cfg["seed"])
        path = st.cache_path(_data_dir(cfg), key, K)
        vals = st.load_cached(path, key, K) if cfg["standalone_cache"] else None
        if vals is None:
            gens = [_generator(derive_seed(int(cfg["seed"]), "standalone", k)) for k in range(K)]
            t0 = time.perf_counter()
            vals, _hold = st.compute(model, init, clients, tst, epochs=int(cfg["standalone_epochs"]), lr=cfg["lr"],
                                     batch_size=int(cfg["batch_size"]), clip_grad=float(cfg["clip_grad"]),
                                     holdout=float(cfg["standalone_holdout"]), generators=gens,
                                     eval_batch_size=int(cfg["eval_batch_size"]) or None,
                                     progress=bool(cfg["progress"]))
            notes.append(f"standalone accuracies: trained {cfg['standalone_epochs']} epochs per client "
                         f"in {time.perf_counter() - t0:.1f} s")
            if cfg["standalone_cache"] and st.save_cached(path, key, vals, _hold):
                notes.append(f"standalone accuracies cached at {path}")
        else:
            notes.append(f"standalone accuracies: cached ({path})")
        cfg["standalone_acc"] = [float(x) for x in vals]
    m = cfg["metrics_standalone_acc"]
    if m == "same":
        cfg["metrics_standalone_acc"] = list(cfg["standalone_acc"])
    elif m == "paper":
        cfg["metrics_standalone_acc"] = st.paper_vector(cfg["model"], cfg["dataset"], cfg["partition"], "logger", K)


def _build(cfg: Config, spec, *, parts=None, notes: Optional[list] = None) -> tuple:
    notes = [] if notes is None else notes
    bundle, parts, val_idx, clients, val, tst, model, layout, init, fp = _load_world(cfg, spec, parts=parts)
    _resolve_standalone(cfg, model=model, init=init, clients=clients, tst=tst, fingerprint=fp, parts=parts,
                        notes=notes)
    sim = Simulation(cfg, model=model, layout=layout, init_params=init, clients=clients, val=val, test=tst,
                     standalone=cfg["standalone_acc"], metric_standalone=cfg["metrics_standalone_acc"],
                     num_classes=bundle.num_classes, device=torch.device(cfg["device"]))
    algo = _algorithms().get(cfg["algorithm"])(sim, cfg)
    algo.setup()
    return bundle, parts, val_idx, sim, algo


def prepare(layers: Sequence[tuple[str, dict]]) -> Prepared:
    """Validate and load everything for a fresh run; nothing is written except caches."""
    cfg, spec = load_config(layers)
    run_dir = default_run_dir(cfg)
    _check_new_run_dir(run_dir)
    notes: list = []
    bundle, parts, val_idx, sim, algo = _build(cfg, spec, notes=notes)
    return Prepared(cfg=cfg, sim=sim, algo=algo, run_dir=run_dir, parts=parts, labels=bundle.train.y,
                    num_classes=bundle.num_classes, val_idx=val_idx, notes=notes)


def prepare_resume(run_dir: str | Path, overrides: dict) -> Prepared:
    """Validate and load an interrupted run for continuation (``overrides`` from --set/flags)."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise RunError(f"--resume {run_dir}: no such run directory")
    bad = sorted(k for k in overrides if k not in RESUME_MUTABLE)
    if bad:
        raise ConfigError(f"--resume: {', '.join(bad)} cannot change when resuming (only "
                          f"{', '.join(RESUME_MUTABLE)}); start a new run instead")
    try:
        saved = read_config_file(run_dir / "config.json")
    except ConfigError as e:
        raise RunError(f"--resume {run_dir}: {e}") from None
    saved = {k: v for k, v in saved.items()}
    saved["stop_after"] = 0
    saved.setdefault("client_batch", 1)     # runs from before client_batch trained clients one by one
    saved["out"] = str(run_dir)
    cfg, spec = load_config([("config.json", saved), ("overrides", overrides)])
    ckpt = fio.load_checkpoint(run_dir / "checkpoint.pt")
    ptools = _partition_tools()
    parts = ptools.load_partition(run_dir / "partition.json")
    notes: list = []
    bundle, parts, val_idx, sim, algo = _build(cfg, spec, parts=parts, notes=notes)
    history, lines = read_metrics_prefix(run_dir / "metrics.jsonl", int(ckpt.get("metrics_rounds", -1)),
                                     str(ckpt.get("metrics_digest")))
    if ckpt.get("val_digest") != _digest_indices(val_idx):
        raise RunError(f"--resume {run_dir}: the server validation split differs from the original run "
                       f"(data or code changed); start a new run")
    if int(ckpt["round"]) > int(cfg["rounds"]):
        raise ConfigError(f"--resume: the checkpoint is at round {ckpt['round']} but rounds={cfg['rounds']}")
    try:
        algo.load_state_dict(ckpt["algorithm"])
        sim.load_rng_state(ckpt["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise RunError(f"{run_dir / 'checkpoint.pt'} does not match this run ({type(e).__name__}: {e})") from None
    return Prepared(cfg=cfg, sim=sim, algo=algo, run_dir=run_dir, parts=parts, labels=bundle.train.y,
                    num_classes=bundle.num_classes, val_idx=val_idx, resume=ckpt, history=history, history_lines=lines,
                    notes=notes)


def _digest_indices(idx) -> str:
    t = torch.as_tensor(idx, dtype=torch.int64).contiguous()
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:32]


# ------------------------------------------------------------------------------------- executing

@dataclass
class Outcome:
    run_dir: Path
    summary: dict
    complete: bool
    stopped_at: Optional[int] = None


def _public_config(cfg: Config) -> dict:
    out = dict(cfg)
    out["out"] = str(cfg["out"]) if cfg["out"] else ""
    return out


def _checkpoint(prep: Prepared, r: int, metrics_digest: str, val_digest: str, elapsed: float) -> None:
    fio.save_checkpoint(prep.run_dir / "checkpoint.pt", {
        "round": r,
        "algorithm": prep.algo.state_dict(),
        "rng": prep.sim.rng_state(),
        "metrics_rounds": r,
        "metrics_digest": metrics_digest,
        "val_digest": val_digest,
        "elapsed_s": elapsed,
    })


def read_metrics_prefix(path: Path, rounds: int, digest: str) -> tuple[list, list]:
    """The first ``rounds`` records (and raw lines) of metrics.jsonl, checked against the checkpoint."""
    import json

    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise RunError(f"{path} is missing; the run cannot be resumed") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path} cannot be read ({e}); the run cannot be resumed") from None
    lines = lines[:-1]          # the text after the last newline is empty or a torn line
    if rounds < 0 or len(lines) < rounds:
        raise RunError(f"{path} holds fewer than the {rounds} rounds of the checkpoint; the run cannot be resumed")
    d = ""
    records = []
    for i in range(rounds):
        d = fio.chain_digest(d, lines[i])
        try:
            records.append(json.loads(lines[i]))
        except json.JSONDecodeError:
            raise RunError(f"{path}: line {i + 1} is corrupt; the run cannot be resumed") from None
    if d != digest:
        raise RunError(f"{path} does not match checkpoint.pt (edited or corrupt); the run cannot be resumed")
    return records, lines[:rounds]


def execute(prep: Prepared, *, log=None, hooks=None) -> Outcome:
    """Create the run directory (fresh runs) and run the remaining rounds.

    ``hooks``: optional object whose ``round_end(r, final)`` is called after each round's outputs
    and checkpoint are written (distributed runs: rank 0 tells the other ranks the round is done)."""
    from . import plots

    cfg, sim, algo = prep.cfg, prep.sim, prep.algo
    run_dir = prep.run_dir
    say = log or (lambda msg: None)
    fresh = prep.resume is None
    R = int(cfg["rounds"])
    history = prep.history
    val_digest = _digest_indices(prep.val_idx)
    if fresh:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg["out"] = str(run_dir)
        fio.atomic_write_json(run_dir / "config.json", _public_config(cfg))
        ptools = _partition_tools()
        ptools.save_partition(prep.parts, run_dir / "partition.json",
                              meta={"dataset": cfg["dataset"], "partition": cfg["partition"],
                                    "clients": cfg["clients"], "partition_seed": cfg["partition_seed"],
                                    "val_holdout": cfg["val_holdout"]})
        try:
            ptools.plot_partition(prep.parts, prep.labels, prep.num_classes, run_dir / "partition.png")
        except Exception as e:  # noqa: BLE001 - a plot never fails a run
            say(f"warning: partition plot failed ({e})")
        fio.write_jsonl(run_dir / "metrics.jsonl", [])
        start, elapsed0 = 1, 0.0
        digest = ""
    else:
        # drop the rounds after the checkpoint (a crash may have logged some)
        fio.atomic_write_text(run_dir / "metrics.jsonl", "".join(x + "\n" for x in prep.history_lines))
        digest = prep.resume["metrics_digest"]
        start, elapsed0 = int(prep.resume["round"]) + 1, float(prep.resume.get("elapsed_s", 0.0))
        fio.atomic_write_json(run_dir / "config.json", _public_config(cfg))
    for note in prep.notes:
        say(note)

    tb = _tensorboard(run_dir, start) if cfg["tensorboard"] else None
    stop_after = int(cfg["stop_after"])
    every = int(cfg["checkpoint_every"])
    bar = _progress(cfg, start, R)
    t_start = time.perf_counter()
    last_saved = start - 1
    stopped_at = None
    r = start - 1
    try:
        for r in range(start, R + 1):
            rec = round_step(prep, r)
            history.append(rec)
            stop_here = bool(stop_after and r >= stop_after and r < R)
            save = bool((every and r % every == 0) or r == R or stop_here)
            line = fio.append_jsonl(run_dir / "metrics.jsonl", rec, sync=save)
            digest = fio.chain_digest(digest, line)
            if tb is not None:
                _tb_log(tb, rec)
            if bar is not None:
                bar.set_postfix_str(_postfix(rec), refresh=False)
                bar.update(1)
            elapsed = elapsed0 + time.perf_counter() - t_start
            if save:
                _checkpoint(prep, r, digest, val_digest, elapsed)
                last_saved = r
            if hooks is not None:
                hooks.round_end(r, final=stop_here or r == R)
            if stop_here:
                stopped_at = r
                break
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
        raise Interrupted(run_dir, r, last_saved) from None
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    complete = stopped_at is None
    wall = elapsed0 + time.perf_counter() - t_start
    summary = summarize(history, cfg, sim, algo, complete=complete, wall_s=wall)
    fio.atomic_write_json(run_dir / "summary.json", summary)
    if cfg["plots"]:
        try:
            plots.write_all(run_dir / "plots", history, summary)
        except Exception as e:  # noqa: BLE001 - a plot never fails a run
            say(f"warning: plots failed ({type(e).__name__}: {e})")
    return Outcome(run_dir=run_dir, summary=summary, complete=complete, stopped_at=stopped_at)


class Interrupted(Exception):
    def __init__(self, run_dir: Path, round_: int, saved: int):
        super().__init__(f"interrupted during round {round_}; the checkpoint holds round {saved}")
        self.run_dir, self.round, self.saved = run_dir, round_, saved


def _progress(cfg: Config, start: int, R: int):
    if not cfg["progress"] or start > R:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=R, initial=start - 1, desc=f"{cfg['algorithm']} {cfg['dataset']}", unit="round",
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def _postfix(rec: dict) -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    return (f"fair={f(rec.get('fairness'), '.1f')} max={f(rec.get('max_accuracy'), '.3f')} "
            f"min={f(rec.get('min_accuracy'), '.3f')} rate={f(rec.get('rate'), '.2f')}")


def _tensorboard(run_dir: Path, start: int):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start)


def _tb_log(tb, rec: dict) -> None:
    r = rec["round"]
    for k, v in rec.items():
        if k in ("round", "time_s"):
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            tb.add_scalar(k, v, r)
        elif k == "client_accuracy" and isinstance(v, list):
            tb.add_scalars("client_accuracy", {str(i): a for i, a in enumerate(v) if a is not None}, r)
    tb.flush()
