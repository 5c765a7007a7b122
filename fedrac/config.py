"""Run configuration: every key, its default, parsing, presets and validation.

A run is described by one flat set of ``key = value`` pairs:

* the *core* keys below (:data:`CORE`), shared by every algorithm, and
* the *options* of the selected algorithm, declared by the algorithm class itself
  (``Algorithm.options``; see :mod:`fedrac.algorithms.base`), so adding an algorithm never touches
  this file.

Sources, later ones win: defaults < ``--preset`` < ``--config FILE`` < dedicated CLI flags
(``--dataset`` ...) < ``--set key=value``. Values given as text are parsed by the key's type; the
special value ``auto`` (where a key allows it) is resolved from the dataset, model and partition
before the run starts, and the run directory's ``config.json`` stores the resolved values only.

Unknown keys are rejected with the nearest valid names; every error is a :class:`ConfigError`
whose message is one line saying what is wrong and how to fix it.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence


class ConfigError(ValueError):
    """Invalid configuration (one line: what is wrong and how to fix it)."""


# ------------------------------------------------------------------------------------- key types

def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_floats(text: str) -> list[float]:
    t = text.strip()
    if t.startswith("["):
        vals = json.loads(t)
    else:
        vals = [v for v in t.replace(";", ",").split(",") if v.strip()]
    out = [float(v) for v in vals]
    if not out:
        raise ValueError("expected a comma-separated list of numbers")
    return out


def parse_phases(text: str) -> list[tuple[float, float, int]]:
    """``"100:0.2:8,inf:0.8:8"`` -> ``[(100, 0.2, 8), (inf, 0.8, 8)]`` (until_round, A, pack)."""
    phases = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        bits = part.split(":")
        if len(bits) != 3:
            raise ValueError(f"phase {part!r} is not until_round:A:pack")
        until = math.inf if bits[0].strip().lower() in ("inf", "end", "") else float(int(bits[0]))
        phases.append((until, float(bits[1]), int(bits[2])))
    if not phases:
        raise ValueError("no phases given")
    return phases


def format_phases(phases: Sequence[Sequence[float]]) -> str:
    return ",".join(f"{'inf' if math.isinf(u) else int(u)}:{a:g}:{int(p)}" for u, a, p in phases)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": lambda t: int(t.strip()),
    "float": lambda t: float(t.strip()),
    "bool": _parse_bool,
    "str": lambda t: t.strip(),
    "floats": _parse_floats,
    "phases": lambda t: format_phases(parse_phases(t)),
}


@dataclass(frozen=True)
class Option:
    """One configuration key.

    kind: int | float | bool | str | floats | phases. ``auto=True`` also accepts the text ``auto``
    (resolved before the run); ``alt`` lists other accepted words (``paper``, ``same`` ...);
    ``choices`` restricts a str key.
    """

    default: Any
    kind: str
    help: str
    choices: Optional[tuple] = None
    auto: bool = False
    alt: tuple = ()

    def parse(self, key: str, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if self.auto and text.lower() == "auto":
                return "auto"
            if text.lower() in self.alt:
                return text.lower()
            if self.kind == "str" and self.choices is None and text == "":
                return ""
            try:
                value = _PARSERS[self.kind](text)
            except (ValueError, TypeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{key}={text!r} is not a valid {self._what()} ({e}); "
                                  f"e.g. {key}={self._example()}") from None
        else:
            value = self._coerce(key, value)
        if self.choices is not None and value not in self.choices and value != "auto":
            near = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, self.choices))}; {hint}"
                              f"set it with --set {key}=<value>")
        return value

    def _coerce(self, key: str, value: Any) -> Any:
        """Values coming from JSON (config.json) or Python callers."""
        if value == "auto" and self.auto or (isinstance(value, str) and value in self.alt):
            return value
        try:
            if self.kind == "int" and not isinstance(value, bool) and float(value) == int(value):
                return int(value)
            if self.kind == "float" and not isinstance(value, bool):
                return float(value)
            if self.kind == "bool" and isinstance(value, bool):
                return value
            if self.kind == "str" and isinstance(value, str):
                return value
            if self.kind == "floats" and isinstance(value, (list, tuple)):
                return [float(v) for v in value]
            if self.kind == "phases":
                if isinstance(value, (list, tuple)):
                    return format_phases([(math.inf if u is None or u == "inf" else float(u), float(a), int(p))
                                          for u, a, p in value])
        except (TypeError, ValueError):
            pass
        raise ConfigError(f"{key}={value!r} is not a valid {self._what()}; e.g. {key}={self._example()}")

    def _what(self) -> str:
        return {"int": "integer", "float": "number", "bool": "boolean (true/false)", "str": "string",
                "floats": "list of numbers", "phases": "phase list"}[self.kind]

    def _example(self) -> str:
        return {"int": "10", "float": "0.5", "bool": "true", "str": "name", "floats": "0.3,0.4,0.5",
                "phases": "100:0.2:8,inf:0.8:8"}[self.kind]

    def render(self, value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list):
            return ",".join(f"{v:g}" for v in value)
        return str(value)


# -------------------------------------------------------------------------------------- core keys

#: Round budgets of ALGORITHMS.md §1.4 [R] (and local steps of §1.3) per partition kind.
ROUND_BUDGET = {"pow": 2000, "cla": 1000, "dir_low": 500, "dir_high": 1000, "iid": 2000}
LOCAL_STEPS = {"pow": 1, "cla": 5, "dir_low": 10, "dir_high": 5, "iid": 1}

#: The embedded demo data set: budgets that finish in well under two minutes on 2 CPU cores.
DEMO_DATASET = "digits"
DEMO_ROUNDS = 500
DEMO_STANDALONE_EPOCHS = 100

CORE: dict[str, Option] = {
    # what to run
    "algorithm": Option("fedrac", "str", "algorithm name (fedrac keys lists them)"),
    "dataset": Option("digits", "str", "data set: digits (embedded), cifar10, svhn, emnist, tinyimagenet"),
    "partition": Option("pow", "str", "client partition: pow, cla, iid, dir:<alpha> (e.g. dir:3.0)"),
    "clients": Option(10, "int", "number of clients K (all take part every round)"),
    "rounds": Option("auto", "int", "number of rounds; auto = ALGORITHMS.md 1.4 budget "
                     f"(POW 2000, CLA 1000, DIR(<5) 500, DIR(>=5) 1000; {DEMO_DATASET}: {DEMO_ROUNDS})", auto=True),
    "seed": Option(0, "int", "training seed (model init, client shuffles, server split)"),
    "partition_seed": Option("auto", "int", "seed of the client partition and server split; auto = seed",
                             auto=True),
    "model": Option("auto", "str", "model: mlp or resnet18; auto = mlp", auto=True,
                    choices=("mlp", "resnet18")),
    # client protocol (ALGORITHMS.md 1.3)
    "local_steps": Option("auto", "int", "SGD steps per client per round; auto = POW 1, CLA 5, "
                          "DIR(<5) 10, DIR(>=5) 5, IID 1", auto=True),
    "batch_size": Option(32, "int", "client minibatch size"),
    "lr": Option(0.03, "float", "client SGD learning rate (momentum 0, weight decay 0)"),
    "clip_grad": Option(1.0, "float", "global L2 gradient clipping norm (0 = off)"),
    "samples_per_client": Option("auto", "int", "POW/CLA samples per client (paper: 2000); auto = the "
                                 "partitioner's default for the data set", auto=True),
    "val_holdout": Option(0.1, "float", "fraction of the official training set held out as the "
                          "server validation set V"),
    # contributions
    "standalone_acc": Option("auto", "floats", "standalone accuracies s: auto = train per ALGORITHMS.md "
                             "3.1 and cache under the data dir; paper = Appendix B vector; or K numbers",
                             auto=True, alt=("paper",)),
    "metrics_standalone_acc": Option("same", "floats", "s used by fairness/rate: same = standalone_acc; "
                                     "paper = the official logger's Appendix B vector; or K numbers",
                                     alt=("same", "paper")),
    "standalone_epochs": Option("auto", "int", "epochs of the standalone training (3.1); auto = 100 "
                                f"({DEMO_DATASET}: {DEMO_STANDALONE_EPOCHS})", auto=True),
    "standalone_holdout": Option(0.1, "float", "fraction of each client's data used to pick the best "
                                 "standalone epoch"),
    "standalone_cache": Option(True, "bool", "cache computed standalone accuracies under <data_dir>/standalone"),
    # metrics
    "bcf_alpha": Option(0.5, "float", "alpha of the alpha-BCF rate (3.5)"),
    "client_metrics": Option(False, "bool", "also log every client's reward model on its own data and on a "
                             "10% holdout (the official logger's train/valid loss; one extra pass over all "
                             "client data per round)"),
    # execution
    "device": Option("auto", "str", "cpu, cuda, cuda:N; auto = cuda when available"),
    "threads": Option("auto", "int", f"torch CPU threads (0 = torch default); auto = 1 for {DEMO_DATASET} "
                      "(tiny ops: threads only add contention), else the torch default", auto=True),
    "eval_batch_size": Option("auto", "int", "rows per evaluation chunk (0 = evaluation module default); "
                              "auto = 16384 for the mlp (whole evaluation sets in one fused chunk: fewer, "
                              "larger GEMMs); for the resnet the module default (256) on CPU, 4096 on CUDA "
                              "(1024 for tinyimagenet)", auto=True),
    "client_batch": Option("auto", "int", "clients trained together as one batched computation (fedrac.batched; "
                           "0 or 1 = one after another); auto = mlp: 32 (cpu) / 256 (cuda), resnet18: 1 (cpu) / "
                           "16 (cuda)", auto=True),
    "stream_aggregation": Option("auto", "bool", "stream the client updates through fedrac_kernels."
                                 "StreamingAggregator (O(P + client_batch x P) memory instead of K x P; the same "
                                 "result bit for bit); auto = when the K updates would exceed 256 MiB, and always "
                                 "in distributed runs", auto=True),
    "data_dir": Option("", "str", "data directory (empty = $FEDRAC_DATA_DIR or ~/.cache/fedrac)"),
    "archive": Option("", "str", "explicit data source read in place (e.g. a cifar-10-python.tar.gz "
                      "anywhere); data_dir then only receives the decoded cache"),
    "download": Option(True, "bool", "download missing data set files"),
    "verify": Option(True, "bool", "verify archive checksums (false accepts rebuilt archives)"),
    # outputs
    "out": Option("", "str", "run directory (empty = ./runs/<name>)"),
    "name": Option("", "str", "run name under ./runs (empty = <timestamp>-<algorithm>-<dataset>-<partition>)"),
    "checkpoint_every": Option(1, "int", "save a checkpoint every N rounds (0 = only at the end)"),
    "stop_after": Option(0, "int", "stop after this round as if interrupted, keeping the checkpoint "
                         "(0 = run to the end); continue with --resume"),
    "progress": Option(True, "bool", "show a progress bar"),
    "plots": Option(True, "bool", "write PNG plots at the end"),
    "tensorboard": Option(False, "bool", "also write TensorBoard logs to <run>/tensorboard"),
    "preset": Option("", "str", "preset applied first (recorded): paper", choices=("", "paper")),
}

#: Keys that may change when a run is resumed (everything else must match the original run).
RESUME_MUTABLE = ("rounds", "checkpoint_every", "stop_after", "progress", "plots", "tensorboard",
                  "threads", "data_dir", "archive", "download", "verify", "stream_aggregation")

PRESETS: dict[str, dict[str, str]] = {
    # Reproduction of the official code path: the authors' standalone vectors (Appendix B) for the
    # allocation and the logger's vector for fairness/rate, and every 4.12 quirk at its official
    # behaviour (these are also the defaults, so the preset pins them against --config files).
    "paper": {
        "standalone_acc": "paper",
        "metrics_standalone_acc": "paper",
        "model": "mlp",
        "batch_size": "32",
        "lr": "0.03",
        "clip_grad": "1",
        "local_steps": "auto",
        "val_holdout": "0.1",
        "assign_offset": "paper",
        "strict_increase": "true",
        "ordering": "frequency",
        "reputation": "dynamic",
        "aggregation": "nonzero_mean",
        "allocation_start_round": "2",
    },
}


# ------------------------------------------------------------------------------------- the config

class Config(dict):
    """A flat mapping key -> value with attribute access (``cfg.lr``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def copy(self) -> "Config":
        return Config(self)


def parse_assignments(items: Iterable[str], source: str) -> dict[str, str]:
    """``["lr=0.1", ...]`` -> ``{"lr": "0.1"}`` (key normalised: lower case, ``-`` -> ``_``)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{source}: {item!r} is not key=value; write e.g. lr=0.05")
        key, value = item.split("=", 1)
        key = key.strip().lower().replace("-", "_")
        if not key:
            raise ConfigError(f"{source}: {item!r} has an empty key; write e.g. lr=0.05")
        out[key] = value.strip()
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A ``key = value`` file (``#`` comments, blank lines) or a JSON object (e.g. a run's config.json)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the path given to --config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read ({e})") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of key: value")
        return {str(k).lower(): v for k, v in data.items()}
    items = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise ConfigError(f"{path}:{lineno}: {raw.strip()!r} is not key=value")
        items.append(line)
    return parse_assignments(items, str(path))


def unknown_key_error(key: str, valid: Iterable[str], foreign: Mapping[str, str] | None = None) -> ConfigError:
    if foreign and key in foreign:
        return ConfigError(f"config key {key!r} is an option of algorithm {foreign[key]!r}, not of the "
                           f"selected one; remove it or set algorithm={foreign[key]}")
    near = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
    return ConfigError(f"unknown config key {key!r}; {hint}run `fedrac keys` to list every key")


def build_config(*, layers: Sequence[tuple[str, Mapping[str, Any]]], algorithm_options: Callable[[str], dict],
                 foreign_options: Callable[[str], dict] | None = None) -> Config:
    """Merge ``layers`` (name, {key: value}) over the defaults into a parsed (unresolved) Config.

    ``algorithm_options(name)`` returns the option declarations of algorithm ``name`` (raising
    ConfigError for an unknown name); ``foreign_options(name)`` maps keys of *other* algorithms to
    their owner, for a helpful message.
    """
    merged: dict[str, tuple[str, Any]] = {}
    preset = ""
    for source, layer in layers:
        for k, v in layer.items():
            merged[k] = (source, v)
            if k == "preset":
                preset = str(v).strip()
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        base = {k: ("preset", v) for k, v in PRESETS[preset].items()}
        base.update(merged)
        merged = base
    algo_name = str(merged.get("algorithm", ("", CORE["algorithm"].default))[1]).strip().lower()
    algo_opts = algorithm_options(algo_name)
    schema = {**CORE, **algo_opts}
    cfg = Config({k: o.default for k, o in schema.items()})
    foreign = foreign_options(algo_name) if foreign_options else {}
    for key, (source, value) in merged.items():
        if key not in schema:
            if source == "preset":
                continue          # a preset key of an algorithm not selected
            raise unknown_key_error(key, schema, foreign)
        cfg[key] = schema[key].parse(key, value)
    cfg["algorithm"] = algo_name
    return cfg


def schema_for(cfg: Mapping[str, Any], algorithm_options: Callable[[str], dict]) -> dict[str, Option]:
    return {**CORE, **algorithm_options(cfg["algorithm"])}


# --------------------------------------------------------------------------------------- resolve

def partition_class(kind: str, alpha: Optional[float]) -> str:
    if kind == "dir":
        return "dir_low" if (alpha or 0.0) < 5.0 else "dir_high"
    return kind if kind in ROUND_BUDGET else "pow"


def resolve_core(cfg: Config, *, partition_kind: str, partition_alpha: Optional[float]) -> Config:
    """Resolve the ``auto`` core values that depend only on the names (no data needed)."""
    cfg = cfg.copy()
    pc = partition_class(partition_kind, partition_alpha)
    demo = cfg["dataset"] == DEMO_DATASET
    if cfg["model"] == "auto":
        cfg["model"] = "mlp"
    if cfg["partition_seed"] == "auto":
        cfg["partition_seed"] = cfg["seed"]
    if cfg["local_steps"] == "auto":
        cfg["local_steps"] = LOCAL_STEPS[pc]
    if cfg["rounds"] == "auto":
        cfg["rounds"] = DEMO_ROUNDS if demo else ROUND_BUDGET[pc]
    if cfg["standalone_epochs"] == "auto":
        cfg["standalone_epochs"] = DEMO_STANDALONE_EPOCHS if demo else 100
    if cfg["device"] == "auto":
        import torch

        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg["client_batch"] == "auto":
        from .batched import resolve_client_batch

        cfg["client_batch"] = resolve_client_batch(cfg["model"], cfg["device"])
    if cfg["eval_batch_size"] == "auto":
        cfg["eval_batch_size"] = auto_eval_batch_size(cfg["model"], cfg["dataset"], cfg["device"])
    if cfg["threads"] == "auto":
        cfg["threads"] = 1 if demo and cfg["device"] == "cpu" else 0
    check_core(cfg)
    return cfg


def auto_eval_batch_size(model: str, dataset: str, device: str) -> int:
    """``eval_batch_size=auto``: the MLP evaluates whole sets in one fused chunk (16384 rows:
    fewer, larger GEMMs). The ResNet uses the evaluation module's default (0: 256 rows, candidates
    x data rows stacked per forward) on CPU; on CUDA, 4096 rows at 32x32 and smaller (1024 at
    64x64: the same activation bytes): with 256 the C = 50 candidate sweep on V is ~1000
    forwards of 250 rows, launch-bound on an H100, with 4096 ~60 forwards of ~4050 rows."""
    if model == "mlp":
        return 16384
    if str(device).startswith("cuda"):
        return 1024 if dataset == "tinyimagenet" else 4096
    return 0


def check_core(cfg: Config) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg["clients"] >= 2, f"clients={cfg['clients']}: need at least 2 clients")
    need(cfg["rounds"] >= 1, f"rounds={cfg['rounds']}: need at least 1 round")
    need(cfg["local_steps"] >= 1, f"local_steps={cfg['local_steps']}: need at least 1 step")
    need(cfg["batch_size"] >= 1, f"batch_size={cfg['batch_size']}: must be >= 1")
    need(cfg["lr"] > 0 and math.isfinite(cfg["lr"]), f"lr={cfg['lr']}: must be a positive number")
    need(cfg["clip_grad"] >= 0, f"clip_grad={cfg['clip_grad']}: must be >= 0 (0 = off)")
    need(0 < cfg["val_holdout"] < 1, f"val_holdout={cfg['val_holdout']}: must be in (0, 1)")
    need(0 <= cfg["standalone_holdout"] < 1, f"standalone_holdout={cfg['standalone_holdout']}: must be in [0, 1)")
    need(cfg["standalone_epochs"] >= 1, f"standalone_epochs={cfg['standalone_epochs']}: must be >= 1")
    need(0 <= cfg["bcf_alpha"] <= 1, f"bcf_alpha={cfg['bcf_alpha']}: must be in [0, 1]")
    need(cfg["checkpoint_every"] >= 0, "checkpoint_every must be >= 0")
    need(cfg["stop_after"] >= 0, "stop_after must be >= 0")
    need(cfg["threads"] >= 0, "threads must be >= 0")
    need(cfg["eval_batch_size"] >= 0, "eval_batch_size must be >= 0")
    need(cfg["client_batch"] >= 0, "client_batch must be >= 0 (0 or 1 = clients one after another)")
    if cfg["samples_per_client"] != "auto":
        need(cfg["samples_per_client"] >= 1, "samples_per_client must be >= 1")
    dev = str(cfg["device"])
    need(dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()),
         f"device={dev!r}: use cpu, cuda or cuda:N")
    if dev.startswith("cuda"):
        import torch

        need(torch.cuda.is_available(), f"device={dev}: no CUDA device is available here; use --device cpu")
    if cfg["tensorboard"]:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or pip install 'fedrac[tensorboard]')") from None
    for key in ("standalone_acc", "metrics_standalone_acc"):
        v = cfg[key]
        if isinstance(v, list):
            need(len(v) == cfg["clients"], f"{key} has {len(v)} values but clients={cfg['clients']}; "
                 f"give one accuracy per client")
            need(all(math.isfinite(x) and 0 <= x <= 1 for x in v),
                 f"{key}: accuracies must be fractions in [0, 1]")


def describe_keys(algorithm_options: Mapping[str, Mapping[str, Option]]) -> str:
    """Human-readable list of every key (for ``fedrac keys``)."""
    lines = ["core keys (every algorithm):"]
    for k, o in CORE.items():
        lines.append(f"  {k:<24} = {o.render(o.default):<14} {o.help}")
    for name, opts in algorithm_options.items():
        if not opts:
            continue
        lines.append(f"options of algorithm {name}:")
        for k, o in opts.items():
            choice = f" [{'|'.join(map(str, o.choices))}]" if o.choices else ""
            lines.append(f"  {k:<24} = {o.render(o.default):<14} {o.help}{choice}")
    return "\n".join(lines)
