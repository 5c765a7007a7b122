"""PNG plots of a run (matplotlib, Agg back end; written atomically).

* ``accuracy.png``  - max / mean / min reward accuracy over rounds
* ``fairness.png``  - fairness (100 x Pearson(s, theta)) and the alpha-BCF rate over rounds
* ``rewards.png``   - last-round reward accuracy vs standalone accuracy per client
* ``frequency.png`` - variance of the neuron frequency table over rounds (submodel methods)
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from .io import atomic_write_bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _series(history: Sequence[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for rec in history:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(rec["round"])
            ys.append(v)
    return xs, ys


def plot_accuracy(history: Sequence[dict], path: Path, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, label in (("max_accuracy", "max"), ("mean_accuracy", "mean"), ("min_accuracy", "min")):
        xs, ys = _series(history, key)
        ax.plot(xs, ys, label=label, lw=1.2)
    ax.set_xlabel("round")
    ax.set_ylabel("reward test accuracy")
    ax.set_title(title or "client reward accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_fairness(history: Sequence[dict], path: Path, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs, ys = _series(history, "fairness")
    ax.plot(xs, ys, color="C0", lw=1.2, label="fairness (100 x Pearson)")
    ax.set_xlabel("round")
    ax.set_ylabel("fairness")
    ax.set_ylim(-105, 105)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    xs, ys = _series(history, "in_bound_fraction")
    ax2.plot(xs, ys, color="C1", lw=1.0, alpha=0.8, label="in-bound fraction (BCF)")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_ylabel("fraction of clients")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right")
    ax.set_title(title or "collaborative fairness")
    _save(fig, path)


def plot_rewards(client_acc: Sequence[float], standalone: Sequence[float], path: Path, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    K = len(standalone)
    xs = list(range(K))
    w = 0.4
    ax.bar([x - w / 2 for x in xs], standalone, width=w, label="standalone s_k", color="C7")
    ax.bar([x + w / 2 for x in xs], [a if a is not None else 0.0 for a in client_acc], width=w,
           label="reward theta_k (last round)", color="C0")
    ax.set_xticks(xs)
    ax.set_xlabel("client")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    ax.set_title(title or "reward vs standalone accuracy")
    _save(fig, path)


def plot_frequency(history: Sequence[dict], path: Path, title: str = "") -> bool:
    xs, ys = _series(history, "freq_var")
    if not xs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(xs, ys, lw=1.2)
    ax.set_xlabel("round")
    ax.set_ylabel("variance of neuron frequency table")
    ax.grid(alpha=0.3)
    ax.set_title(title or "neuron aggregation-frequency variance")
    _save(fig, path)
    return True


def write_all(folder: Path, history: Sequence[dict], summary: dict) -> list[Path]:
    """All plots of a run into ``folder``; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{summary.get('algorithm', '')} / {summary.get('dataset', '')} / {summary.get('partition', '')}"
    out = []
    plot_accuracy(history, folder / "accuracy.png", f"reward accuracy - {name}")
    out.append(folder / "accuracy.png")
    plot_fairness(history, folder / "fairness.png", f"fairness - {name}")
    out.append(folder / "fairness.png")
    client = summary.get("client_accuracy") or []
    stand = summary.get("standalone_accuracy") or []
    if client and stand:
        plot_rewards(client, stand, folder / "rewards.png", f"rewards - {name}")
        out.append(folder / "rewards.png")
    if plot_frequency(history, folder / "frequency.png", f"frequency variance - {name}"):
        out.append(folder / "frequency.png")
    return out
