"""Client partitions of the paper (ALGORITHMS.md §2): POW, CLA, DIR(alpha), plus IID.

Every partitioner receives the official-train ``labels``, the partition pool ``pool_idx`` (official
indices, e.g. from :func:`fedrac.data.server_split`) and returns, per client, an int64 tensor of
**official-train indices** (never pool positions: the [R] fix of the DIR index bug). All randomness
comes from generators seeded by ``seed`` alone (``numpy.random.default_rng(seed)``, and for CLA's
draws ``random.Random(seed)``), so the partition seed is independent of the training seed and of any
global random state, which is neither read nor advanced.

``pow``
    Quantity skew (§2.1). ``total = samples_per_client * K`` positions of a permutation of the pool,
    cut into consecutive shards in client order with sizes ``ceil(b_k / sum(b) * total)``,
    ``b = linspace(F^-1(0.01), F^-1(0.99), K)``, ``F^-1(q) = q ** (1 / 1.65911332899)``; the last
    shard(s) are truncated so the shards cover exactly ``total``. K = 10, total 20,000 ->
    [236, 628, 1020, 1412, 1804, 2197, 2589, 2981, 3373, 3760]. Deviation for small data sets:
    ``total`` is capped at the pool size (e.g. digits' pool of 1,295 samples), so the shards keep the
    power-law proportions and stay disjoint.
``cla``
    Class-count skew (§2.2): client k holds classes ``0 .. class_sizes[k] - 1`` with
    ``class_sizes = int(linspace(1, num_classes, K))``, drawing ``samples_per_client // c`` samples of
    each class uniformly *with replacement* from the pool's class list (pool order), then topping up
    with the first missing entries of its last class's list, which are removed from that list.
    ``num_classes`` is the data set's number of classes ([R]: 62 for EMNIST byclass).
    Every client has exactly ``samples_per_client`` samples (duplicates possible).
``dir:<alpha>``
    Dirichlet label skew (§2.3, flgo's ``DirichletPartitioner`` with ``imbalance = 0`` unless given):
    the whole pool is divided, ``q_k ~ Dir(alpha * p)`` refined by the error-bar loop, each label's
    pool positions (ascending) cut into consecutive chunks per client, each client's list shuffled.
``iid``
    flgo's ``IIDPartitioner``: a permutation of the whole pool cut into K (near-)equal parts.

``imbalance > 0`` (dir and iid only, §2.4) draws the client sizes from a log-normal as flgo does.
Every client must end up with at least one sample; impossible requests raise :class:`PartitionError`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "PartitionError",
    "PartitionSpec",
    "PARTITION_FORMS",
    "parse_partition",
    "make_partition",
    "partition_counts",
    "save_partition",
    "load_partition",
    "plot_partition",
]

PathLike = Union[str, os.PathLike]

PARTITION_FORMS = "'pow', 'cla', 'iid', 'dir:<alpha>' or 'dir(<alpha>)' with alpha > 0 (e.g. 'dir:3.0')"

POW_A = 1.65911332899          # shape of SciPy's powerlaw(a) used by the official POW partitioner
DEFAULT_SAMPLES_PER_CLIENT = 2000
DIR_ERROR_BAR = 1e-6
_DIR_INTERVAL = 500            # iterations before the error bar is relaxed tenfold (flgo)


class PartitionError(ValueError):
    """A partition cannot be parsed or made; the one-line message says why and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition name: ``kind`` in {"pow", "cla", "dir", "iid"}, ``alpha`` for "dir" only."""

    kind: str
    alpha: Optional[float] = None

    def __str__(self) -> str:
        return f"dir:{self.alpha:g}" if self.kind == "dir" else self.kind

    @property
    def title(self) -> str:
        """The paper's spelling: POW, CLA, IID, DIR(3.0)."""
        return f"DIR({self.alpha:.1f})" if self.kind == "dir" else self.kind.upper()


_DIR_RE = re.compile(r"^dir\s*(?::\s*(?P<a>[^()\s:]+)|\(\s*(?P<b>[^()\s]+)\s*\))$")


def parse_partition(spec: Union[str, PartitionSpec]) -> PartitionSpec:
    """``"pow"``, ``"cla"``, ``"iid"``, ``"dir:3.0"`` or ``"dir(3.0)"`` (case and spaces ignored)."""
    if isinstance(spec, PartitionSpec):
        if spec.kind in ("pow", "cla", "iid") and spec.alpha is None:
            return spec
        if spec.kind == "dir" and spec.alpha is not None:
            return parse_partition(f"dir:{spec.alpha!r}")
        raise PartitionError(f"invalid partition {spec!r}: expected {PARTITION_FORMS}")
    if not isinstance(spec, str):
        raise PartitionError(f"invalid partition {spec!r}: expected {PARTITION_FORMS}")
    text = spec.strip().lower()
    if text in ("pow", "cla", "iid"):
        return PartitionSpec(text)
    m = _DIR_RE.match(text)
    if m:
        try:
            alpha = float(m.group("a") or m.group("b"))
        except ValueError:
            alpha = float("nan")
        if math.isfinite(alpha) and alpha > 0:
            return PartitionSpec("dir", alpha)
    raise PartitionError(f"invalid partition {spec!r}: expected {PARTITION_FORMS}")


# ------------------------------------------------------------------------------------ helpers

def _as_index_array(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise PartitionError(f"{what} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise PartitionError(f"{what} must hold integers")
    return arr.astype(np.int64, copy=False)


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PartitionError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise PartitionError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _imbalanced_sizes(num_clients: int, total: int, imbalance: float, rng: np.random.Generator) -> np.ndarray:
    """Client sizes summing to ``total`` (flgo's ``data_imbalance_generator``, §2.4)."""
    if imbalance == 0:
        sizes = np.full(num_clients, total // num_clients, dtype=np.int64)
        sizes[: total % num_clients] += 1
        return sizes
    sigma = max(0.1, imbalance)
    mu = math.log(total / num_clients) - sigma ** 2 / 2.0
    sizes = rng.lognormal(mu, sigma, num_clients).astype(np.int64)
    # flgo's repair thresholds; kept >= 1 so the loop always moves (flgo can stall when they round to 0)
    thr = max(1, int(imbalance ** 1.5 * (total - num_clients * 10)))
    delta = max(1, int(0.1 * thr))
    for _ in range(100_000):
        diff = int(sizes.sum()) - total
        if diff == 0:
            break
        if diff >= thr:
            i = int(np.argmax(sizes))
            cand = rng.lognormal(mu, sigma, 10 * num_clients)
            while cand.min() > sizes[i]:
                cand = rng.lognormal(mu, sigma, 10 * num_clients)
            sizes[i] = int(cand[np.argmin(np.abs(diff - sizes[i] + cand))])
        elif diff >= delta:
            sizes[int(np.argmax(sizes))] -= delta
        elif diff > 0:
            sizes[int(np.argmax(sizes))] -= diff
        elif -diff >= thr:
            i = int(np.argmin(sizes))
            cand = rng.lognormal(mu, sigma, 10 * num_clients)
            while cand.max() < sizes[i]:
                cand = rng.lognormal(mu, sigma, 10 * num_clients)
            sizes[i] = int(cand[np.argmin(np.abs(diff - sizes[i] + cand))])
        elif -diff >= delta:
            sizes[int(np.argmin(sizes))] += delta
        else:
            sizes[int(np.argmin(sizes))] -= diff
    if int(sizes.sum()) != total or sizes.min() < 1:
        raise PartitionError(f"imbalance={imbalance} cannot give {num_clients} clients at least one of "
                             f"{total} samples each: lower imbalance or use fewer clients")
    return sizes


def _pow_sizes(num_clients: int, total: int) -> np.ndarray:
    lo, hi = 0.01 ** (1.0 / POW_A), 0.99 ** (1.0 / POW_A)
    b = np.linspace(lo, hi, num_clients)
    return np.ceil(b / b.sum() * total).astype(np.int64)


def _pow(pool: np.ndarray, k: int, spc: int, rng: np.random.Generator) -> list[np.ndarray]:
    total = min(spc * k, pool.size)
    sizes = _pow_sizes(k, total)
    positions = rng.permutation(pool.size)[:total]
    ends = np.minimum(np.cumsum(sizes), total)
    starts = np.concatenate([[0], ends[:-1]])
    parts = [positions[s:e] for s, e in zip(starts, ends)]
    if any(p.size == 0 for p in parts):
        raise PartitionError(f"POW cannot give {k} clients at least one of {total} samples each: "
                             f"use fewer clients or a larger samples_per_client / pool")
    return [pool[p] for p in parts]


def _cla(pool: np.ndarray, pool_labels: np.ndarray, k: int, num_classes: int, spc: int, seed: int) -> list[np.ndarray]:
    rng = random.Random(seed)
    class_sizes = np.linspace(1, num_classes, k).astype(np.int64)
    lists = [pool[pool_labels == c].tolist() for c in range(num_classes)]
    parts = []
    for client, c in enumerate(class_sizes.tolist()):
        chosen: list[int] = []
        each = spc // c
        for y in range(c):
            if not lists[y]:
                raise PartitionError(f"CLA gives client {client} classes 0..{c - 1} but the pool has no sample "
                                     f"of class {y} left: pass num_classes = the number of classes present "
                                     f"(e.g. 10 for CIFAR-10, 62 for EMNIST byclass) or a larger pool")
            chosen.extend(rng.choices(lists[y], k=each))
            if y == c - 1 and len(chosen) < spc:
                extra = spc - len(chosen)
                if len(lists[y]) < extra:
                    raise PartitionError(f"CLA top-up needs {extra} more samples of class {y} but only "
                                         f"{len(lists[y])} are left: use a smaller samples_per_client")
                chosen.extend(lists[y][:extra])
                lists[y] = lists[y][extra:]
        parts.append(np.asarray(chosen, dtype=np.int64))
    return parts


def _dirichlet(rng: np.random.Generator, conc: np.ndarray, n: int) -> np.ndarray:
    for _ in range(1000):
        q = rng.dirichlet(conc, size=n)
        if not np.isnan(q).any():
            return q
    raise PartitionError("the Dirichlet draws keep failing: use a larger alpha")


def _dir(pool: np.ndarray, pool_labels: np.ndarray, k: int, alpha: float, imbalance: float,
         error_bar: float, rng: np.random.Generator) -> list[np.ndarray]:
    n = pool.size
    sizes = _imbalanced_sizes(k, n, imbalance, rng).astype(np.float64)
    uniq, first = np.unique(pool_labels, return_index=True)
    names = uniq[np.argsort(first)]                 # labels in order of first appearance (flgo's Counter)
    counts = np.array([(pool_labels == y).sum() for y in names], dtype=np.float64)
    p = counts / n
    conc = alpha * p
    props = _dirichlet(rng, conc, k)                # [K, L]
    order = np.argsort(sizes, kind="stable")        # cyclic visiting order: clients sorted by size
    max_err, loops, cursor = error_bar, 0, 0
    while True:
        if loops >= _DIR_INTERVAL:
            loops, max_err = 0, max_err * 10
        mix = sizes @ props
        err = float(((mix / mix.sum() - p) ** 2).sum())
        if err <= max_err:
            break
        ex = order[cursor]
        cursor = (cursor + 1) % k
        cand = rng.dirichlet(conc, size=k)          # K candidate replacements for client ex
        rest = mix - sizes[ex] * props[ex]
        alt = rest[None, :] + sizes[ex] * cand
        alt_err = ((alt / alt.sum(axis=1, keepdims=True) - p) ** 2).sum(axis=1)
        alt_err[np.isnan(alt_err)] = np.inf
        best = int(np.argmin(alt_err))
        if alt_err[best] < err:
            props[ex] = cand[best]
        loops += 1
    chunks: list[list[np.ndarray]] = [[] for _ in range(k)]
    for j, y in enumerate(names):
        positions = np.flatnonzero(pool_labels == y)   # ascending pool positions
        w = props[:, j] * sizes
        w = w / w.sum() if w.sum() > 0 else sizes / sizes.sum()
        cuts = (np.cumsum(w) * positions.size).astype(np.int64)[:-1]
        for client, piece in enumerate(np.split(positions, cuts)):
            chunks[client].append(piece)
    parts = []
    for client in range(k):
        pos = np.concatenate(chunks[client]) if chunks[client] else np.empty(0, np.int64)
        rng.shuffle(pos)
        if pos.size == 0:
            raise PartitionError(f"DIR(alpha={alpha:g}) left client {client} without samples: use fewer "
                                 f"clients, a larger alpha or another seed")
        parts.append(pool[pos])                     # pool positions -> official-train indices ([R] fix)
    return parts


def _iid(pool: np.ndarray, k: int, imbalance: float, rng: np.random.Generator) -> list[np.ndarray]:
    sizes = _imbalanced_sizes(k, pool.size, imbalance, rng)
    perm = rng.permutation(pool.size)
    return [pool[p] for p in np.split(perm, np.cumsum(sizes)[:-1])]


# -------------------------------------------------------------------------------- make_partition

def make_partition(spec: Union[str, PartitionSpec], labels, pool_idx, num_clients: int, num_classes: int,
                   seed: int, *, samples_per_client: Optional[int] = DEFAULT_SAMPLES_PER_CLIENT,
                   imbalance: float = 0.0, error_bar: float = DIR_ERROR_BAR) -> list[torch.Tensor]:
    """Per-client official-train indices (int64 tensors) for the partition ``spec`` (see the module doc).

    ``labels``: labels of the whole official train set (tensor/array ``[n_train]``, values in
    ``0 .. num_classes - 1``); ``pool_idx``: the pool's official indices (distinct); ``seed``: the
    partition seed. ``samples_per_client`` (POW, CLA; None = 2000): the paper's 2000; POW caps the total
    at the pool size. ``imbalance`` (DIR, IID): flgo's log-normal size skew, 0 = equal sizes.
    ``error_bar``: DIR's initial error bar (flgo: 1e-6).
    """
    ps = parse_partition(spec)
    k = _check_int(num_clients, "num_clients", 1)
    num_classes = _check_int(num_classes, "num_classes", 1)
    seed = _check_int(seed, "seed", 0)
    spc = DEFAULT_SAMPLES_PER_CLIENT if samples_per_client is None else \
        _check_int(samples_per_client, "samples_per_client", 1)
    imbalance = float(imbalance)
    if not (math.isfinite(imbalance) and imbalance >= 0):
        raise PartitionError(f"imbalance must be a finite number >= 0, got {imbalance}")
    if imbalance > 0 and ps.kind not in ("dir", "iid"):
        raise PartitionError(f"imbalance applies to dir and iid partitions only, not {ps}")
    error_bar = float(error_bar)
    if not (math.isfinite(error_bar) and error_bar > 0):
        raise PartitionError(f"error_bar must be a finite number > 0, got {error_bar}")
    labels = _as_index_array(labels, "labels")
    pool = _as_index_array(pool_idx, "pool_idx")
    if pool.size == 0:
        raise PartitionError("pool_idx is empty: pass the partition pool from fedrac.data.server_split")
    if pool.min() < 0 or pool.max() >= labels.size:
        raise PartitionError(f"pool_idx holds indices outside 0..{labels.size - 1}: it must index the official "
                             f"train set whose labels are passed")
    if np.unique(pool).size != pool.size:
        raise PartitionError("pool_idx holds duplicate indices: pass each pool sample once")
    pool_labels = labels[pool]
    if pool_labels.min() < 0 or pool_labels.max() >= num_classes:
        raise PartitionError(f"the pool holds labels outside 0..{num_classes - 1}: pass num_classes = the data "
                             f"set's number of classes (found label {int(pool_labels.max())})")
    if k > pool.size:
        raise PartitionError(f"{k} clients but only {pool.size} pool samples: use at most {pool.size} clients")
    rng = np.random.default_rng(seed)
    if ps.kind == "pow":
        parts = _pow(pool, k, spc, rng)
    elif ps.kind == "cla":
        parts = _cla(pool, pool_labels, k, num_classes, spc, seed)
    elif ps.kind == "dir":
        parts = _dir(pool, pool_labels, k, ps.alpha, imbalance, error_bar, rng)
    else:
        parts = _iid(pool, k, imbalance, rng)
    return [torch.from_numpy(np.ascontiguousarray(p, dtype=np.int64)) for p in parts]


# ------------------------------------------------------------------------------- inspection / IO

def _parts_arrays(parts) -> list[np.ndarray]:
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence):
        raise PartitionError("parts must be a list of per-client index tensors")
    return [_as_index_array(p, f"parts[{i}]") for i, p in enumerate(parts)]


def partition_counts(parts, labels, num_classes: int) -> np.ndarray:
    """``counts[k, c]`` = number of samples of class ``c`` held by client ``k`` (int64 ``[K, C]``)."""
    num_classes = _check_int(num_classes, "num_classes", 1)
    labels = _as_index_array(labels, "labels")
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for k, p in enumerate(_parts_arrays(parts)):
        if p.size:
            if p.min() < 0 or p.max() >= labels.size:
                raise PartitionError(f"parts[{k}] indexes outside the {labels.size} labels given")
            ys = labels[p]
            if ys.min() < 0 or ys.max() >= num_classes:
                raise PartitionError(f"parts[{k}] holds labels outside 0..{num_classes - 1}")
            out[k] = np.bincount(ys, minlength=num_classes)
    return out


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_partition(parts, path: PathLike, *, meta: Optional[dict] = None) -> Path:
    """Write the partition as JSON (atomically): ``{"format": "fedrac-partition", "version": 1,
    "num_clients": K, "clients": [[indices...], ...], "meta": {...}}``. Returns the path."""
    arrays = _parts_arrays(parts)
    doc = {"format": "fedrac-partition", "version": 1, "num_clients": len(arrays),
           "clients": [a.tolist() for a in arrays], "meta": dict(meta or {})}
    try:
        blob = json.dumps(doc, separators=(",", ":")).encode()
    except TypeError as e:
        raise PartitionError(f"meta must hold JSON values only ({e})") from None
    path = Path(path)
    _atomic_write(path, lambda f: f.write(blob))
    return path


def load_partition(path: PathLike, *, return_meta: bool = False):
    """Read a partition written by :func:`save_partition`: a list of int64 tensors (and its meta dict)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PartitionError(f"partition file {path} does not exist: write it with save_partition") from None
    except (OSError, ValueError) as e:
        raise PartitionError(f"{path} is not a readable partition file ({e}): write it again with save_partition") from None
    ok = (isinstance(doc, dict) and doc.get("format") == "fedrac-partition" and doc.get("version") == 1
          and isinstance(doc.get("clients"), list) and doc.get("num_clients") == len(doc["clients"]))
    if ok:
        try:
            parts = [torch.tensor(c, dtype=torch.int64) for c in doc["clients"]]
            ok = all(p.dim() == 1 for p in parts)
        except (TypeError, ValueError, RuntimeError):
            ok = False
    if not ok:
        raise PartitionError(f"{path} is not a fedrac partition file (format 1): write it again with save_partition")
    return (parts, dict(doc.get("meta") or {})) if return_meta else parts


def plot_partition(parts, labels, num_classes: int, path: PathLike, *, title: Optional[str] = None) -> Path:
    """Save a PNG of the partition: per-client stacked bars of class counts (up to 20 classes), or a
    clients x classes heat map for more classes. Uses matplotlib's Agg canvas (no display, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import matplotlib

    counts = partition_counts(parts, labels, num_classes)
    k, c = counts.shape
    fig = Figure(figsize=(min(16.0, 3.0 + 0.45 * max(k, 4)), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(k)
    if c <= 20:
        cmap = matplotlib.colormaps["tab10" if c <= 10 else "tab20"]
        bottom = np.zeros(k)
        for cls in range(c):
            ax.bar(x, counts[:, cls], bottom=bottom, color=cmap(cls % cmap.N), label=str(cls), width=0.8)
            bottom += counts[:, cls]
        ax.legend(title="class", fontsize="small", ncols=2 if c > 10 else 1, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0))
        ax.set_ylabel("samples")
    else:
        im = ax.imshow(counts.T, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        fig.colorbar(im, ax=ax, label="samples")
        ax.set_ylabel("class")
    ax.set_xlabel("client")
    if k <= 40:
        ax.set_xticks(x)
    ax.set_title(title or f"{k} clients, {int(counts.sum())} samples")
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path
