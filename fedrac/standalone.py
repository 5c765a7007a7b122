"""Standalone accuracies ``s`` (ALGORITHMS.md §3.1): computed and cached, given, or the paper's.

``s_k`` is the test accuracy of a model trained by client k alone. FedRAC turns it into its
contribution weights, and every algorithm's fairness and rate are measured against it, so one vector
serves both (§4.12 quirk 7), unless ``metrics_standalone_acc`` says otherwise.

Computed protocol ([R] of §3.1): the federated run's initial model and client optimizer (SGD
``lr``, ``batch_size``, ``clip_grad``), ``standalone_epochs`` epochs over the client's own data
minus a ``standalone_holdout`` share, the best epoch chosen on that holdout, accuracy on the server
test set T. The result is cached as JSON under ``<data_dir>/standalone/``, keyed by a hash of
everything it depends on: the data (fingerprint), the client partition (its index lists), the
initial parameters, the training budget and hyper-parameters, and the protocol version.

``PAPER_STANDALONE`` holds the vectors hard-coded in the official code (Appendix B): ``alloc``
(used by the official allocation) and ``logger`` (used by the official fairness/rate logger).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import ConfigError

PROTOCOL = "standalone-v1"

_C10_POW_ALLOC = [0.2819, 0.3426, 0.3600, 0.3544, 0.3791, 0.3897, 0.3975, 0.4010, 0.4050, 0.4068]
_C10_POW_LOGGER = [0.2784, 0.3415, 0.3587, 0.3521, 0.3780, 0.3829, 0.3936, 0.3897, 0.4063, 0.4030]

#: (model, dataset, partition) -> {"alloc": [...], "logger": [...]} (ALGORITHMS.md Appendix B).
#: EMNIST and Tiny-ImageNet entries of the official code are placeholders and are left out.
PAPER_STANDALONE: dict[tuple[str, str, str], dict[str, list[float]]] = {
    ("mlp", "cifar10", "pow"): {"alloc": _C10_POW_ALLOC, "logger": _C10_POW_LOGGER},
    ("mlp", "cifar10", "cla"): {
        "alloc": [0.1000, 0.1716, 0.2230, 0.2569, 0.2767, 0.2897, 0.3071, 0.3319, 0.3565, 0.3690],
        "logger": [0.1000, 0.1702, 0.2221, 0.2563, 0.2770, 0.2879, 0.3019, 0.3274, 0.3557, 0.3665]},
    ("mlp", "cifar10", "dir:3.0"): {
        "alloc": [0.3076, 0.2543, 0.2832, 0.2830, 0.2856, 0.2798, 0.2459, 0.2905, 0.3213, 0.3079],
        "logger": [0.3063, 0.2513, 0.2791, 0.2781, 0.2861, 0.2775, 0.2453, 0.2865, 0.3148, 0.3064]},
    ("mlp", "cifar10", "dir:7.0"): {
        "alloc": [0.3751, 0.3889, 0.3213, 0.3907, 0.3362, 0.3597, 0.3508, 0.3797, 0.3676, 0.3840],
        "logger": [0.3720, 0.3781, 0.3167, 0.3868, 0.3331, 0.3518, 0.3458, 0.3759, 0.3640, 0.3783]},
    ("mlp", "svhn", "pow"): {
        "alloc": [0.3195, 0.4602, 0.5132, 0.5774, 0.6203, 0.6272, 0.6334, 0.6531, 0.6661, 0.6833],
        "logger": [0.3197, 0.4601, 0.5149, 0.5739, 0.6220, 0.6273, 0.6342, 0.6539, 0.6653, 0.6835]},
    ("mlp", "svhn", "cla"): {
        "alloc": [0.0669, 0.2397, 0.3542, 0.4127, 0.4703, 0.5101, 0.5460, 0.5710, 0.5898, 0.5913]},
    ("mlp", "svhn", "dir:3.0"): {
        "alloc": [0.6143, 0.4030, 0.6120, 0.6125, 0.5492, 0.4491, 0.4834, 0.5001, 0.4413, 0.4927]},
    ("mlp", "svhn", "dir:7.0"): {
        "alloc": [0.5768, 0.5282, 0.5873, 0.6341, 0.5697, 0.4377, 0.6298, 0.6244, 0.4722, 0.6112]},
    ("resnet18", "cifar10", "pow"): {
        "alloc": [0.2692, 0.3426, 0.3741, 0.3901, 0.4156, 0.4340, 0.4257, 0.4548, 0.4535, 0.4693]},
    ("resnet18", "cifar10", "cla"): {
        "alloc": [0.1000, 0.1781, 0.2401, 0.2819, 0.2947, 0.3092, 0.3404, 0.3760, 0.4004, 0.4218]},
    ("resnet18", "cifar10", "dir:3.0"): {
        "alloc": [0.3185, 0.2626, 0.3145, 0.3075, 0.3027, 0.2931, 0.2580, 0.3279, 0.3371, 0.3364]},
}


def partition_key(kind: str, alpha: Optional[float]) -> str:
    return f"dir:{float(alpha):.1f}" if kind == "dir" else kind


def paper_vector(model: str, dataset: str, partition: str, which: str, clients: int) -> list[float]:
    """Appendix B vector ``which`` ("alloc" | "logger"; logger falls back to alloc) or ConfigError."""
    entry = PAPER_STANDALONE.get((model, dataset, partition))
    if entry is None:
        have = ", ".join(f"{m}/{d}/{p}" for m, d, p in PAPER_STANDALONE)
        raise ConfigError(f"no paper standalone vector for {model}/{dataset}/{partition} (Appendix B has "
                          f"{have}); use standalone_acc=auto or give K values")
    vec = entry.get(which) or entry["alloc"]
    if clients != len(vec):
        raise ConfigError(f"the paper standalone vector has {len(vec)} clients but clients={clients}; "
                          f"use --clients {len(vec)} or standalone_acc=auto")
    return list(vec)


# ----------------------------------------------------------------------------------- computing

def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(*, dataset: str, data_fingerprint: str, parts: Sequence[torch.Tensor], init_params: torch.Tensor,
              model: str, epochs: int, lr: float, batch_size: int, clip_grad: float, holdout: float,
              seed: int) -> dict:
    return {
        "protocol": PROTOCOL,
        "dataset": dataset,
        "data": data_fingerprint,
        "partition": _digest(*[torch.as_tensor(p, dtype=torch.int64) for p in parts]),
        "init_params": _digest(init_params),
        "model": model,
        "epochs": int(epochs),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "clip_grad": float(clip_grad),
        "holdout": float(holdout),
        "seed": int(seed),
    }


def cache_path(data_dir: Path, key: dict, clients: int) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data_dir) / "standalone" / f"{key['dataset']}-K{clients}-{h}.json"


def load_cached(path: Path, key: dict, clients: int) -> Optional[list[float]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    vals = data.get("standalone_acc") if isinstance(data, dict) else None
    if data.get("key") != key or not isinstance(vals, list) or len(vals) != clients:
        return None
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
        return None
    return [float(v) for v in vals]


def compute(model, init_params: torch.Tensor, clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
            test: tuple[torch.Tensor, torch.Tensor], *, epochs: int, lr: float, batch_size: int,
            clip_grad: float, holdout: float, generators: Sequence[torch.Generator],
            eval_batch_size: Optional[int] = None, progress: bool = True) -> tuple[list[float], list[float]]:
    """Train every client alone (§3.1 [R]); returns (test accuracies s, best holdout accuracies)."""
    from .evaluation import accuracy
    from .training import train_epochs

    s, hold = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(clients), desc="standalone", unit="client", file=sys.stderr, leave=False)
    try:
        for k, (x, y) in enumerate(clients):
            best, best_hold = train_epochs(model, init_params, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                                           clip_grad=clip_grad, generator=generators[k], holdout=holdout,
                                           eval_batch_size=eval_batch_size or 1024)
            s.append(float(accuracy(model, best, test[0], test[1], batch_size=eval_batch_size)))
            hold.append(float(best_hold))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(acc=f"{s[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
    return s, hold


def save_cached(path: Path, key: dict, values: Sequence[float], holdout_acc: Sequence[float]) -> bool:
    from .io import atomic_write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "standalone_acc": list(values), "holdout_acc": list(holdout_acc)})
        return True
    except OSError as e:
        print(f"fedrac: warning: cannot cache standalone accuracies at {path} ({e})", file=sys.stderr)
        return False
