"""``fedrac compare`` and ``fedrac reproduce``: many methods x seeds on one partition, the paper's tables.

``fedrac compare --dataset D --partition P [--seeds 0,1,2] [--methods a,b,...] [--rounds R] [--out DIR]``

* runs every chosen method (default: every registered algorithm, minus registered names that are
  the very same method under another name) for every seed on the same data, partition (the
  partition seed is the run seed, so a seed varies partition and training, spec §1.4) and the
  same standalone accuracies: they are computed once per seed (by the first run of that seed,
  through the runner's cache) and given to every other run explicitly (``standalone/seed<s>.json``);
* prints and saves the paper's three tables - Table 1 fairness (last round), Table 2 maximum test
  accuracy in % (best round, §3.4 [R]), Table 3 rate (last round) - as mean +/- sample std over the
  seeds (ddof = 1; one seed: no +/-), plus a secondary table (best-round fairness, last-round
  maximum accuracy, in-bound fraction, violations), as ``tables.md``, ``tables.csv`` (long form),
  ``results.json`` and ``rewards_vs_contribution.png`` (reward theta_k vs standalone s_k per method);
* resumes: a run whose ``summary.json`` says complete is not run again; a run with a checkpoint is
  continued from it (``runner.prepare_resume``); a run directory without a checkpoint (it died in
  its first round) is started again. ``log.jsonl`` records every action (ran / resumed / skipped).

Layout of the output directory (default ``runs/compare-<dataset>-<partition>``)::

    compare.json              what the directory holds (data set, partition, clients, rounds, --set)
    standalone/seed<s>.json   the shared standalone accuracies of seed s
    runs/<method>/seed<s>/    the runner's run directories
    tables.md tables.csv results.json rewards_vs_contribution.png log.jsonl

``fedrac reproduce [--datasets cifar10,svhn,emnist] [--partitions pow,cla,dir:3.0,dir:7.0]
[--seeds 0,1,2] [--rounds R] [--methods ...] [--ablations] [--out DIR]``: the paper's settings
(10 clients, MLP, the round budgets of §1.4 unless ``--rounds``) from the data directory (no
download unless ``--download``), one ``compare`` study per (data set, partition) under
``<out>/<dataset>-<partition>/``, then our numbers next to the paper's (§6, :mod:`fedrac.paper`)
with the difference, in ``reproduce.md`` / ``.csv`` / ``.json``. Any subset works. Every data set
is loaded before anything runs, so missing data is the loader's one-line error and exit status 2.

Bad input (unknown method, data set, partition or key, malformed seeds, an output directory
holding another comparison) is one line on stderr and exit status 2 before anything is written.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import io as fio
from . import paper
from .config import CORE, RESUME_MUTABLE, ConfigError, parse_assignments, unknown_key_error

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: --set keys that compare sets itself, with the flag to use instead.
_FLAG_ONLY = {"algorithm": "--methods", "dataset": "--dataset / --datasets", "partition": "--partition / --partitions",
              "seed": "--seeds", "rounds": "--rounds", "clients": "--clients", "out": "--out", "name": "--out",
              "data_dir": "--data-dir", "device": "--device"}
#: Keys a comparison directory does not pin (they may change between invocations).
_UNPINNED = set(RESUME_MUTABLE) | {"progress", "plots", "threads"}

TABLES = ("fairness", "max_accuracy", "rate")
SECONDARY = ("fairness_best", "max_accuracy_last", "in_bound_fraction", "violations", "mean_accuracy")
LABELS = {
    "fairness": "fairness (last round)",
    "max_accuracy": "max test acc % (best round)",
    "rate": "rate (last round)",
    "fairness_best": "fairness (best round)",
    "max_accuracy_last": "max test acc % (last round)",
    "in_bound_fraction": "in-bound fraction (last)",
    "violations": "violations (last)",
    "mean_accuracy": "mean test acc % (last)",
    "rate_best": "rate (best round)",
}
WHEN = {"fairness": "last round", "max_accuracy": "best round", "rate": "last round"}
DIGITS = {"fairness": 2, "max_accuracy": 2, "rate": 2, "fairness_best": 2, "max_accuracy_last": 2,
          "in_bound_fraction": 2, "violations": 1, "mean_accuracy": 2, "rate_best": 2}


class CompareError(ConfigError):
    """Bad input of compare / reproduce (one line)."""


# ------------------------------------------------------------------------------------ parsing

def parse_seeds(text) -> list[int]:
    """``"0,1,2"`` or ``"0-2"`` -> [0, 1, 2] (distinct, in the given order)."""
    if isinstance(text, (list, tuple)):
        text = ",".join(str(t) for t in text)
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                vals = list(range(lo, hi + 1))
            else:
                vals = [int(part)]
        except ValueError:
            raise CompareError(f"--seeds {text!r}: expected integers like 0,1,2 or 0-2") from None
        for v in vals:
            if v < 0:
                raise CompareError(f"--seeds {text!r}: seeds must be >= 0")
            if v in out:
                raise CompareError(f"--seeds {text!r}: seed {v} given twice")
            out.append(v)
    if not out:
        raise CompareError(f"--seeds {text!r}: no seed given")
    return out


def _algorithms():
    from . import algorithms

    return algorithms


def parse_methods(text: Optional[str]) -> list[str]:
    """Registered names (aliases resolved, duplicates removed); None/'all' = every distinct method."""
    algos = _algorithms()
    if text is None or str(text).strip().lower() in ("", "all"):
        return default_methods()
    out: list[str] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            name = algos.get(part).name
        except ConfigError as e:
            raise CompareError(f"--methods: {e}") from None
        if name not in out:
            out.append(name)
    if not out:
        raise CompareError(f"--methods {text!r}: no method given")
    return out


_OPTION_ONLY_KEYS = {"options", "__doc__", "__module__", "__qualname__", "name", "ablation",
                     "__firstlineno__", "__static_attributes__"}


def _behaviour(cls) -> tuple:
    """What a registered class runs: its first base that defines code, plus its option defaults.
    Two names with the same behaviour are the same method (e.g. an ablation registered twice)."""
    impl = next((k for k in cls.__mro__ if set(vars(k)) - _OPTION_ONLY_KEYS), cls)
    opts = _algorithms().options_of(cls)
    return impl, tuple(sorted((k, repr(o.default)) for k, o in opts.items()))


def distinct_methods(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(names without behavioural duplicates, {dropped: the name kept}); the paper's names win."""
    algos = _algorithms()
    preferred = list(paper.TABLE_METHODS) + list(paper.ABLATION_METHODS)
    ranked = sorted(names, key=lambda n: (0, preferred.index(n)) if n in preferred else (1, names.index(n)))
    seen: dict = {}
    dropped: dict[str, str] = {}
    for n in ranked:
        key = _behaviour(algos.get(n))
        if key in seen:
            dropped[n] = seen[key]
        else:
            seen[key] = n
    return [n for n in names if n not in dropped], dropped


def default_methods() -> list[str]:
    return order_methods(distinct_methods(_algorithms().available())[0])


def order_methods(names: Sequence[str]) -> list[str]:
    """The paper's row order first (Tables 1-3, then the ablations), the others as given."""
    preferred = list(paper.TABLE_METHODS) + list(paper.ABLATION_METHODS)
    head = [m for m in preferred if m in names]
    return head + [m for m in names if m not in head]


def _partition_text(text: str) -> str:
    from . import partitions as ptools
    from .standalone import partition_key

    spec = ptools.parse_partition(str(text))
    return partition_key(spec.kind, spec.alpha)


def _dataset_name(text: str) -> str:
    from . import data as fdata

    name = str(text).strip().lower()
    if name not in fdata.DATASETS:
        import difflib

        near = difflib.get_close_matches(name, list(fdata.DATASETS), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise CompareError(f"unknown dataset {text!r}; {hint}available: {', '.join(fdata.DATASETS)}")
    return name


# -------------------------------------------------------------------------------------- study

@dataclass
class Study:
    """One comparison: every method x every seed on one (data set, partition)."""

    out: Path
    dataset: str
    partition: str
    seeds: list
    methods: list
    rounds: Optional[int] = None              # None = the budget of §1.4 ("auto")
    clients: Optional[int] = None             # None = the default (10)
    overrides: dict = field(default_factory=dict)   # --set key -> text (all methods that know the key)
    data_dir: Optional[str] = None
    device: Optional[str] = None
    progress: bool = False
    run_plots: bool = False

    def run_dir(self, method: str, seed: int) -> Path:
        return self.out / "runs" / method / f"seed{seed}"

    def standalone_path(self, seed: int) -> Path:
        return self.out / "standalone" / f"seed{seed}.json"


def _method_overrides(study: Study, method: str) -> dict:
    opts = _algorithms().options_of(method)
    return {k: v for k, v in study.overrides.items() if k in CORE or k in opts}


def check_overrides(overrides: dict, methods: Sequence[str]) -> None:
    """Every --set key must be a core key or an option of at least one selected method."""
    algos = _algorithms()
    for key in overrides:
        if key in _FLAG_ONLY:
            raise CompareError(f"--set {key}=...: {key} is set by compare itself; use {_FLAG_ONLY[key]}")
        if key in CORE or any(key in algos.options_of(m) for m in methods):
            continue
        owners = [n for n in algos.available() if key in algos.options_of(n)]
        if owners:
            raise CompareError(f"--set {key}: none of the selected methods ({', '.join(methods)}) has this key; "
                               f"it is an option of {', '.join(owners)}")
        valid = set(CORE)
        for m in methods:
            valid |= set(algos.options_of(m))
        raise unknown_key_error(key, valid)


def validate_study(study: "Study") -> dict:
    """Check methods, --set keys and every method's configuration (no data, nothing written);
    returns the resolved configuration of the first method."""
    from . import runner

    algos = _algorithms()
    for m in study.methods:
        algos.get(m)
    check_overrides(study.overrides, study.methods)
    resolved = None
    for m in study.methods:
        cfg, _spec = runner.load_config(run_layers(study, m, study.seeds[0], None))
        if resolved is None:
            resolved = cfg
    return resolved


def run_layers(study: Study, method: str, seed: int, standalone: Optional[list]) -> list:
    base = {"algorithm": method, "dataset": study.dataset, "partition": study.partition, "seed": str(seed),
            "out": str(study.run_dir(method, seed)), "progress": "true" if study.progress else "false",
            "plots": "true" if study.run_plots else "false"}
    if study.rounds is not None:
        base["rounds"] = str(study.rounds)
    if study.clients is not None:
        base["clients"] = str(study.clients)
    if study.data_dir:
        base["data_dir"] = study.data_dir
    if study.device:
        base["device"] = study.device
    if standalone is not None:
        base["standalone_acc"] = list(standalone)
    layers = [("compare", base)]
    sets = _method_overrides(study, method)
    if standalone is not None:
        sets.pop("standalone_acc", None)        # the shared, already resolved vector wins
    layers.append(("--set", sets))
    return layers


def _pinned(study: Study, resolved: dict) -> dict:
    return {"dataset": study.dataset, "partition": study.partition, "clients": resolved["clients"],
            "rounds": resolved["rounds"],
            "overrides": {k: v for k, v in sorted(study.overrides.items()) if k not in _UNPINNED}}


def run_state(run_dir: Path, rounds: int) -> str:
    """done | resume | stale (a directory without a checkpoint) | fresh."""
    if not run_dir.exists():
        return "fresh"
    summ = run_dir / "summary.json"
    if summ.exists():
        try:
            s = json.loads(summ.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            s = {}
        if s.get("complete") and int(s.get("rounds") or 0) >= rounds:
            return "done"
    if (run_dir / "checkpoint.pt").exists():
        return "resume"
    return "stale"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        from .runner import RunError

        raise RunError(f"{path} cannot be read ({e}); delete it or choose another --out") from None


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fio.atomic_write_json(path, obj)


def _append_log(study: Study, rec: dict) -> None:
    fio.append_jsonl(study.out / "log.jsonl", fio.to_jsonable(rec), sync=True)


def run_study(study: Study, *, log: Callable[[str], None] = lambda m: None) -> dict:
    """Run (or resume) every method x seed of ``study``, then write and return its results."""
    from . import runner

    # 1. validate every method's configuration (no data, nothing written)
    resolved = validate_study(study)
    rounds = int(resolved["rounds"])
    pinned = _pinned(study, resolved)
    # 2. the output directory must hold this comparison (or nothing)
    meta_path = study.out / "compare.json"
    if study.out.exists() and not study.out.is_dir():
        raise CompareError(f"--out {study.out} exists and is not a directory")
    old = _read_json(meta_path)
    if old is not None and old.get("pinned") != pinned:
        diff = sorted(k for k in pinned if (old.get("pinned") or {}).get(k) != pinned[k])
        was = ", ".join(f"{k}={(old.get('pinned') or {}).get(k)!r}" for k in diff)
        raise CompareError(f"--out {study.out} holds a comparison with {was}; run the same settings to "
                           f"resume it, or choose another --out")
    if old is None and study.out.exists() and any(study.out.iterdir()):
        raise CompareError(f"--out {study.out} is not empty and holds no compare.json; choose another --out")
    # 3. plan; prepare the first fresh run now, so that data / partition errors come before writing
    plan = [(s, m, run_state(study.run_dir(m, s), rounds)) for s in study.seeds for m in study.methods]
    shared: dict[int, list] = {}
    for s in study.seeds:
        vec = _read_json(study.standalone_path(s))
        if vec is not None:
            shared[s] = [float(v) for v in vec["standalone_acc"]]
    early = None
    first_fresh = next(((s, m) for s, m, st in plan if st in ("fresh", "stale")), None)
    if first_fresh is not None:
        s, m = first_fresh
        if study.run_dir(m, s).exists():
            shutil.rmtree(study.run_dir(m, s))
        early = (s, m, runner.prepare(run_layers(study, m, s, shared.get(s))))
    # 4. write the directory's description
    study.out.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "fedrac-compare", "pinned": pinned,
            "seeds": sorted(set((old or {}).get("seeds", [])) | set(study.seeds)),
            "methods": list(dict.fromkeys(list((old or {}).get("methods", [])) + list(study.methods)))}
    fio.atomic_write_json(meta_path, meta)
    # 5. run
    total = len(plan)
    for i, (s, m, state) in enumerate(plan, 1):
        tag = f"[{i}/{total}] {m} seed {s}"
        run_dir = study.run_dir(m, s)
        if state == "done":
            log(f"{tag}: finished earlier, skipped")
            _append_log(study, {"method": m, "seed": s, "action": "skipped", "time": time.time()})
            if s not in shared:
                shared[s] = _shared_from_run(study, run_dir, s)
            continue
        t0 = time.time()
        if state == "resume":
            mutable = {k: v for k, v in _method_overrides(study, m).items() if k in RESUME_MUTABLE}
            mutable["progress"] = "true" if study.progress else "false"
            prep = runner.prepare_resume(run_dir, mutable)
            action = f"resumed after round {len(prep.history)}"
        else:
            if early is not None and early[:2] == (s, m):
                prep = early[2]
                early = None
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                prep = runner.prepare(run_layers(study, m, s, shared.get(s)))
            action = "ran"
            if s not in shared:
                shared[s] = [float(v) for v in prep.cfg["standalone_acc"]]
                _write_json(study.standalone_path(s), {
                    "seed": s, "dataset": study.dataset, "partition": study.partition,
                    "standalone_acc": shared[s], "from_run": str(run_dir)})
        try:
            outcome = runner.execute(prep, log=lambda msg: log(f"{tag}: {msg}"))
        except runner.Interrupted:
            _append_log(study, {"method": m, "seed": s, "action": "interrupted", "time": time.time()})
            raise
        su = outcome.summary
        _append_log(study, {"method": m, "seed": s, "action": action.split(" ")[0], "detail": action,
                            "rounds": su.get("rounds"), "complete": outcome.complete,
                            "started": t0, "finished": time.time(), "wall_s": time.time() - t0})
        log(f"{tag}: {action}, {su.get('rounds')} rounds in {time.time() - t0:.1f} s "
            f"(fairness {_fmt(su.get('fairness'), 1)}, max acc {_fmt(su.get('max_accuracy'), 3)}, "
            f"rate {_fmt(su.get('rate'), 2)})" + ("" if outcome.complete else
                                                   f"; stopped after round {outcome.stopped_at}"))
    results = collect(study, shared)
    write_outputs(study, results)
    return results


def _shared_from_run(study: Study, run_dir: Path, seed: int) -> Optional[list]:
    cfg = _read_json(run_dir / "config.json") or {}
    vec = cfg.get("standalone_acc")
    if isinstance(vec, list):
        _write_json(study.standalone_path(seed), {
            "seed": seed, "dataset": study.dataset, "partition": study.partition,
            "standalone_acc": [float(v) for v in vec], "from_run": str(run_dir)})
        return [float(v) for v in vec]
    return None


def _fmt(v, digits: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


# ---------------------------------------------------------------------------------- results

def _num(v) -> Optional[float]:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _pct(v) -> Optional[float]:
    v = _num(v)
    return None if v is None else 100.0 * v


def run_values(summary: dict) -> dict:
    """The table values of one finished run (units of the paper's tables)."""
    best = summary.get("best") or {}

    def b(key):
        return _num((best.get(key) or {}).get("value"))

    ba = b("max_accuracy")
    return {
        "fairness": _num(summary.get("fairness")),
        "max_accuracy": None if ba is None else 100.0 * ba,
        "rate": _num(summary.get("rate")),
        "fairness_best": b("fairness"),
        "rate_best": b("rate"),
        "max_accuracy_last": _pct(summary.get("max_accuracy")),
        "in_bound_fraction": _num(summary.get("in_bound_fraction")),
        "violations": _num(summary.get("violations")),
        "mean_accuracy": _pct(summary.get("mean_accuracy")),
    }


def mean_std(values: Sequence) -> dict:
    """{'mean', 'std' (ddof = 1; None for one value), 'n', 'values'} over the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    m = sum(vals) / len(vals)
    std = math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": m, "std": std, "n": len(vals), "values": vals}


def collect(study: Study, shared: Optional[dict] = None) -> dict:
    """Results of every finished run in the study directory (missing runs are left out)."""
    algos = _algorithms()
    shared = dict(shared or {})
    methods: dict = {}
    for m in study.methods:
        per_seed: dict = {}
        for s in study.seeds:
            summ = _read_json(study.run_dir(m, s) / "summary.json")
            if not summ or not summ.get("complete"):
                continue
            vals = run_values(summ)
            per_seed[str(s)] = {**vals, "rounds": summ.get("rounds"),
                                "client_accuracy": summ.get("client_accuracy"),
                                "standalone_accuracy": summ.get("standalone_accuracy"),
                                "run_dir": str(study.run_dir(m, s))}
            if s not in shared and isinstance(summ.get("standalone_accuracy"), list):
                shared[s] = summ["standalone_accuracy"]
        cls = algos.get(m)
        stats = {k: mean_std([v[k] for v in per_seed.values()]) for k in TABLES + SECONDARY + ("rate_best",)}
        methods[m] = {"display": paper.display_name(m), "reconstructed": bool(getattr(cls, "reconstructed", False)),
                      "reconstruction_note": getattr(cls, "reconstruction_note", None),
                      "seeds": per_seed, "stats": stats}
    standalone = {str(s): v for s, v in sorted(shared.items())}
    derived = None
    if "standalone" not in methods and standalone:
        derived = mean_std([100.0 * max(v) for v in standalone.values() if v])
    return {"study": {"dataset": study.dataset, "partition": study.partition, "seeds": list(study.seeds),
                      "methods": list(study.methods), "out": str(study.out)},
            "standalone": standalone, "standalone_row": derived, "methods": methods,
            "notes": ["mean ± sample std over seeds (ddof = 1); a single seed shows no ±",
                      "fairness and rate: last round (primary, §3.6); maximum test accuracy: best round "
                      "(§3.4 [R]); fairness = 100 × Pearson(s, θ) with s the shared standalone accuracies",
                      "rate is the official logger's α-BCF rate (−10 reset when a client is not above "
                      "its standalone accuracy); the in-bound fraction and violations are in the secondary table"]}


def cell(stat: Optional[dict], digits: int) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    txt = f"{stat['mean']:.{digits}f}"
    if stat.get("std") is not None:
        txt += f" ± {stat['std']:.{digits}f}"
    return txt


def _label(m: str, info: dict) -> str:
    return info["display"] + (" †" if info.get("reconstructed") else "")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(study: Study, results: dict) -> str:
    col = paper.column_label(study.dataset, study.partition)
    methods = order_methods(list(results["methods"]))
    seeds = ", ".join(str(s) for s in study.seeds)
    out = [f"# fedrac compare: {study.dataset}, {study.partition} (seeds {seeds})", ""]
    out += [f"- {n}" for n in results["notes"]]
    if any(results["methods"][m]["reconstructed"] for m in methods):
        out.append("- † reconstruction: no official code exists (ALGORITHMS.md §5.7 FedSAC, §5.8 Aequa)")
    for key in TABLES:
        out += ["", f"## {paper.TABLE_TITLES[key]}, {WHEN[key]}", ""]
        rows = []
        if key == "max_accuracy" and results.get("standalone_row"):
            rows.append(["Standalone (max s)", cell(results["standalone_row"], DIGITS[key])])
        for m in methods:
            info = results["methods"][m]
            rows.append([_label(m, info), cell(info["stats"][key], DIGITS[key])])
        out.append(md_table(["method", col], rows))
    out += ["", "## Secondary values", ""]
    rows = []
    for m in methods:
        info = results["methods"][m]
        n = max((info["stats"][k]["n"] for k in TABLES), default=0)
        rows.append([_label(m, info)] + [cell(info["stats"][k], DIGITS[k]) for k in SECONDARY] + [str(n)])
    out.append(md_table(["method"] + [LABELS[k] for k in SECONDARY] + ["seeds"], rows))
    return "\n".join(out) + "\n"


def render_csv(study: Study, results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "method", "display", "dataset", "partition", "mean", "std", "n", "values"])
    if results.get("standalone_row"):
        st = results["standalone_row"]
        w.writerow(["max_accuracy", "standalone(max s)", "Standalone (max s)", study.dataset, study.partition,
                    st["mean"], st["std"], st["n"], ";".join(f"{v:.6g}" for v in st["values"])])
    for m in order_methods(list(results["methods"])):
        info = results["methods"][m]
        for key in TABLES + SECONDARY + ("rate_best",):
            st = info["stats"][key]
            w.writerow([key, m, info["display"], study.dataset, study.partition,
                        "" if st["mean"] is None else st["mean"], "" if st["std"] is None else st["std"],
                        st["n"], ";".join(f"{v:.6g}" for v in st["values"])])
    return buf.getvalue()


def plot_rewards(results: dict, path: Path, title: str = "") -> bool:
    """One panel per method: reward theta_k (last round) against standalone s_k, one colour per seed."""
    methods = [m for m in order_methods(list(results["methods"])) if results["methods"][m]["seeds"]]
    if not methods:
        return False
    from .plots import _plt, _save

    plt = _plt()
    n = len(methods)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.1 * rows), squeeze=False)
    lo, hi = 1.0, 0.0
    for m in methods:
        for v in results["methods"][m]["seeds"].values():
            for arr in (v.get("standalone_accuracy") or [], v.get("client_accuracy") or []):
                vals = [x for x in arr if x is not None]
                if vals:
                    lo, hi = min(lo, min(vals)), max(hi, max(vals))
    pad = 0.03
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    for i, m in enumerate(methods):
        ax = axes[i // cols][i % cols]
        info = results["methods"][m]
        for seed, v in info["seeds"].items():
            s, th = v.get("standalone_accuracy") or [], v.get("client_accuracy") or []
            pts = [(a, b) for a, b in zip(s, th) if a is not None and b is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label=f"seed {seed}")
        ax.plot([lo, hi], [lo, hi], ls="--", lw=0.8, color="grey")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(f"{_label(m, info)} (γ = {cell(info['stats']['fairness'], 1)})", fontsize=8)
        ax.set_xlabel("standalone accuracy s_k", fontsize=8)
        ax.set_ylabel("reward accuracy θ_k", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def write_outputs(study: Study, results: dict) -> None:
    fio.atomic_write_text(study.out / "tables.md", render_markdown(study, results))
    fio.atomic_write_text(study.out / "tables.csv", render_csv(study, results))
    fio.atomic_write_json(study.out / "results.json", fio.to_jsonable(results))
    try:
        plot_rewards(results, study.out / "rewards_vs_contribution.png",
                     f"reward vs contribution - {study.dataset} {study.partition}")
    except Exception as e:  # noqa: BLE001 - a plot never fails a comparison
        print(f"fedrac: warning: plot failed ({type(e).__name__}: {e})", file=sys.stderr)


# ------------------------------------------------------------------------------------ commands

def _say(quiet: bool, prefix: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if not quiet:
            print(f"fedrac: {prefix}: {msg}", file=sys.stderr, flush=True)

    return log


def _int_arg(text, flag: str, minimum: int) -> Optional[int]:
    if text is None or str(text).strip().lower() == "auto":
        return None
    try:
        v = int(str(text).strip())
    except ValueError:
        raise CompareError(f"{flag} {text!r}: expected an integer") from None
    if v < minimum:
        raise CompareError(f"{flag} {text!r}: must be >= {minimum}")
    return v


def _overrides(args) -> dict:
    return parse_assignments(getattr(args, "set", None) or [], "--set")


def cmd_compare(args) -> int:
    """``fedrac compare``: returns the exit status (errors propagate as ConfigError & co.)."""
    dataset = _dataset_name(args.dataset)
    partition = _partition_text(args.partition)
    seeds = parse_seeds(args.seeds)
    methods = parse_methods(args.methods)
    overrides = _overrides(args)
    if getattr(args, "no_verify", False):
        overrides["verify"] = "false"
    out = Path(args.out) if args.out else Path("runs") / f"compare-{dataset}-{partition.replace(':', '')}"
    study = Study(out=out.expanduser(), dataset=dataset, partition=partition, seeds=seeds, methods=methods,
                  rounds=_int_arg(args.rounds, "--rounds", 1), clients=_int_arg(args.clients, "--clients", 2),
                  overrides=overrides, data_dir=args.data_dir, device=args.device,
                  progress=bool(args.progress), run_plots=bool(args.run_plots))
    log = _say(args.quiet, "compare")
    validate_study(study)
    if args.methods is None or str(args.methods).strip().lower() == "all":
        dropped = distinct_methods(_algorithms().available())[1]
        for n, same in dropped.items():
            log(f"{n} is the same method as {same}; running it once as {same}")
    try:
        results = run_study(study, log=log)
    except _runner().Interrupted as e:
        print(f"fedrac: compare interrupted ({e}); run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(render_markdown(study, results))
    print(f"tables: {study.out / 'tables.md'} (+ tables.csv, results.json, rewards_vs_contribution.png)")
    return 0


def _runner():
    from . import runner

    return runner


def paper_methods() -> list[str]:
    avail = set(_algorithms().available())
    return [m for m in paper.TABLE_METHODS if m in avail and m != "standalone"]


def cmd_reproduce(args) -> int:
    """``fedrac reproduce``: the paper's settings; our numbers next to the paper's."""
    from . import data as fdata

    datasets = [_dataset_name(d) for d in str(args.datasets).split(",") if d.strip()]
    partitions = [_partition_text(p) for p in str(args.partitions).split(",") if p.strip()]
    if not datasets:
        raise CompareError("--datasets: no data set given")
    if not partitions:
        raise CompareError("--partitions: no partition given")
    datasets, partitions = list(dict.fromkeys(datasets)), list(dict.fromkeys(partitions))
    seeds = parse_seeds(args.seeds)
    methods = parse_methods(args.methods) if args.methods else paper_methods()
    if args.ablations:
        methods += [m for m in paper.ABLATION_METHODS if m not in methods]
    if not methods:
        raise CompareError("--methods: none of the paper's methods is registered; name some with --methods")
    overrides = {"model": "mlp", **_overrides(args)}
    if args.no_verify:
        overrides["verify"] = "false"
    overrides["download"] = "true" if args.download else "false"
    rounds = _int_arg(args.rounds, "--rounds", 1)
    out = Path(args.out or "runs/reproduce").expanduser()
    check_overrides(overrides, methods)
    # every data set first: missing data is the loader's one-line error before anything is written
    data_dir = args.data_dir or None
    for d in datasets:
        fdata.load_dataset(d, data_dir, download=bool(args.download), verify=not args.no_verify,
                           archive=overrides.get("archive") or None)
    studies = [Study(out=out / f"{d}-{p.replace(':', '')}", dataset=d, partition=p, seeds=seeds, methods=methods,
                     rounds=rounds, clients=10, overrides=dict(overrides), data_dir=data_dir, device=args.device,
                     progress=bool(args.progress), run_plots=bool(args.run_plots))
               for d in datasets for p in partitions]
    for st in studies:                       # validate all settings before running any
        validate_study(st)
    log = _say(args.quiet, "reproduce")
    results = []
    try:
        for i, st in enumerate(studies, 1):
            log(f"setting {i}/{len(studies)}: {st.dataset} {st.partition} -> {st.out}")
            results.append((st, run_study(st, log=log)))
    except _runner().Interrupted as e:
        print(f"fedrac: reproduce interrupted ({e}); run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    report = reproduce_report(results)
    out.mkdir(parents=True, exist_ok=True)
    fio.atomic_write_text(out / "reproduce.md", report["markdown"])
    fio.atomic_write_text(out / "reproduce.csv", report["csv"])
    fio.atomic_write_json(out / "reproduce.json", fio.to_jsonable(report["rows"]))
    print(report["markdown"])
    print(f"report: {out / 'reproduce.md'} (+ reproduce.csv, reproduce.json; per setting: "
          f"<out>/<dataset>-<partition>/)")
    return 0


def reproduce_report(results: Sequence[tuple]) -> dict:
    """Our numbers next to the paper's: markdown (Tables 1-3 and, where run, 4-9), csv rows, json rows."""
    rows = []
    methods: list[str] = []
    for st, res in results:
        for m in res["methods"]:
            if m not in methods:
                methods.append(m)
    methods = order_methods(methods)
    for st, res in results:
        entries = [("standalone", res.get("standalone_row"), "max_accuracy")] if res.get("standalone_row") else []
        for m in methods:
            info = res["methods"].get(m)
            if info is None:
                continue
            for key in TABLES:
                entries.append((m, info["stats"][key], key))
        for m, stat, key in entries:
            ref = paper.lookup(key, m, st.dataset, st.partition)
            ours = stat.get("mean") if stat else None
            rows.append({"table": key, "method": m, "dataset": st.dataset, "partition": st.partition,
                         "ours_mean": ours, "ours_std": stat.get("std") if stat else None,
                         "n": stat.get("n") if stat else 0,
                         "paper_mean": None if ref is None else ref[0], "paper_std": None if ref is None else ref[1],
                         "diff": None if (ref is None or ours is None) else ours - ref[0]})
    settings = [(st.dataset, st.partition) for st, _ in results]
    by = {(r["table"], r["method"], r["dataset"], r["partition"]): r for r in rows}
    md = ["# fedrac reproduce: ours vs the paper (ALGORITHMS.md §6)", "",
          "Cells: ours (mean ± sample std over seeds) / paper (mean ± std) / Δ = ours − paper. "
          "Fairness and rate: last round; maximum test accuracy (%): best round. "
          "n/a: not run or not finished; — : the paper has no number.", ""]
    recon = [m for st, res in results for m, info in res["methods"].items() if info.get("reconstructed")]
    if recon:
        md.append("† reconstruction without official code (ALGORITHMS.md §5.7/§5.8): compare with care.\n")
    for key in TABLES:
        md += [f"## {paper.TABLE_TITLES[key]}", ""]
        header = ["method"] + [paper.column_label(d, p) for d, p in settings]
        table_rows = []
        row_methods = (["standalone"] if key == "max_accuracy" else []) + methods
        for m in row_methods:
            cells = []
            any_val = False
            for d, p in settings:
                r = by.get((key, m, d, p))
                if r is None:
                    ref = paper.lookup(key, m, d, p)
                    cells.append("n/a / " + ("—" if ref is None else _ref(ref, DIGITS[key])))
                    continue
                any_val = True
                cells.append(_compare_cell(r, DIGITS[key]))
            if any_val:
                name = "Standalone (max s)" if m == "standalone" else paper.display_name(m)
                if any(m == x for x in recon):
                    name += " †"
                table_rows.append([name] + cells)
        md += [md_table(header, table_rows), ""]
    abl = [(d, key) for (d, key) in paper.ABLATION_TABLE_NUMBER
           if any(st.dataset == d for st, _ in results) and any(m in methods for m in paper.ABLATION_METHODS)]
    for d, key in abl:
        parts = [p for dd, p in settings if dd == d]
        md += [f"## Table {paper.ABLATION_TABLE_NUMBER[(d, key)]} - ablation, {d}, {LABELS[key]}", ""]
        trs = []
        for m in list(paper.ABLATION_METHODS) + ["fedrac"]:
            if m not in methods:
                continue
            trs.append([paper.display_name(m)] + [
                _compare_cell(by[(key, m, d, p)], DIGITS[key]) if (key, m, d, p) in by else "n/a" for p in parts])
        md += [md_table(["variant"] + [paper.column_label(d, p) for p in parts], trs), ""]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["table", "method", "dataset", "partition", "ours_mean", "ours_std", "n", "paper_mean", "paper_std", "diff"]
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r[c] is None else r[c] for c in cols])
    return {"markdown": "\n".join(md), "csv": buf.getvalue(), "rows": rows}


def _ref(ref: tuple, digits: int) -> str:
    m, s = ref
    return f"{m:.{digits}f}" + ("" if s is None else f" ± {s:.{digits}f}")


def _compare_cell(r: dict, digits: int) -> str:
    ours = cell({"mean": r["ours_mean"], "std": r["ours_std"]}, digits)
    if r["paper_mean"] is None:
        return f"{ours} / —"
    ref = _ref((r["paper_mean"], r["paper_std"]), digits)
    diff = "" if r["diff"] is None else f" / Δ {r['diff']:+.{digits}f}"
    return f"{ours} / {ref}{diff}"


# ------------------------------------------------------------------------------------------ CLI

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (or a range 0-2); default 0,1,2")
    p.add_argument("--rounds", "-r", help="rounds per run (default: the budget of ALGORITHMS.md 1.4)")
    p.add_argument("--data-dir", help="data directory (default $FEDRAC_DATA_DIR or ~/.cache/fedrac)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="configuration key for every method that has it (core keys: all); may repeat")
    p.add_argument("--no-verify", action="store_true", help="accept data archives whose checksums differ")
    p.add_argument("--progress", action="store_true", help="show a progress bar per run")
    p.add_argument("--run-plots", action="store_true", help="also write each run's own plots")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-run lines on stderr")


def add_subcommands(subparsers) -> None:
    """Add ``compare`` and ``reproduce`` to the ``fedrac`` parser's subparsers. Each parser sets
    ``handler`` (``args.handler(args)`` returns the exit status; bad input raises the CLI's
    one-line error types: ConfigError, DataError, PartitionError, RunError)."""
    c = subparsers.add_parser(
        "compare", help="run several methods x seeds on one partition; the paper's three tables",
        description="Run the chosen methods (default: every registered one) for every seed on the same "
                    "partition and standalone accuracies; print and save fairness, maximum test accuracy "
                    "and rate as mean ± std over seeds (Markdown, CSV, JSON, PNG). Re-running the same "
                    "command resumes: finished runs are not run again.")
    c.add_argument("--dataset", "-d", default="digits", help="data set (default digits)")
    c.add_argument("--partition", "-p", default="pow", help="pow, cla, iid or dir:<alpha> (default pow)")
    c.add_argument("--methods", "-m", help="comma-separated algorithms (default: all registered)")
    c.add_argument("--clients", "-k", help="number of clients (default 10)")
    c.add_argument("--out", "-o", help="output directory (default runs/compare-<dataset>-<partition>)")
    _common(c)
    c.set_defaults(handler=cmd_compare)
    r = subparsers.add_parser(
        "reproduce", help="the paper's settings (10 clients, MLP); our numbers next to the paper's",
        description="Run the paper's methods on its settings from the data directory and print our "
                    "Tables 1-3 (and 4-9 with --ablations) next to the paper's numbers with the "
                    "difference. Any subset of data sets and partitions works; re-running resumes.")
    r.add_argument("--datasets", default="cifar10,svhn,emnist", help="default cifar10,svhn,emnist")
    r.add_argument("--partitions", default="pow,cla,dir:3.0,dir:7.0", help="default pow,cla,dir:3.0,dir:7.0")
    r.add_argument("--methods", "-m", help="default: the paper's methods that are registered")
    r.add_argument("--ablations", action="store_true", help="also run FedRAC w/o reputation / w/o allocation")
    r.add_argument("--out", "-o", help="output directory (default runs/reproduce)")
    r.add_argument("--download", action="store_true", help="download missing data sets")
    _common(r)
    r.set_defaults(handler=cmd_reproduce)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fedrac.compare compare|reproduce ...`` (the same as ``fedrac compare|reproduce``)."""
    import warnings

    from .cli import _OneLineParser, _one_line_warning, _usage_errors

    warnings.showwarning = _one_line_warning
    parser = _OneLineParser(prog="fedrac", description="fedrac compare / reproduce")
    sub = parser.add_subparsers(dest="command", parser_class=_OneLineParser)
    add_subcommands(sub)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if getattr(args, "handler", None) is None:
            raise ConfigError("expected a command: compare or reproduce (see fedrac --help)")
        return args.handler(args)
    except _usage_errors() as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"fedrac: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedrac: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
