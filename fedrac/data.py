"""Data sets for the simulator: fully materialised, normalised tensors (ALGORITHMS.md §1.1).

``load_dataset(name)`` returns a :class:`DatasetBundle` whose ``train`` / ``test`` are
:class:`ArrayDataset` s: ``x`` float32 ``[n, C, H, W]`` normalised with the spec's per-channel
constants (``(x / 255 - mean) / std``), ``y`` int64 ``[n]``. ``train`` is the *official* training set;
:func:`server_split` cuts it into the partition pool and the server validation set ``V``; ``test`` is
the official test set ``T``.

Data sets (``DATASETS``):

========== ============================================== ======= ============ ==================
name       files looked for in ``data_dir``               classes input        train / test
========== ============================================== ======= ============ ==================
digits     none: scikit-learn's bundled 8x8 digits        10      1 x 8 x 8    1,438 / 359
cifar10    ``cifar-10-batches-py/`` or                    10      3 x 32 x 32  50,000 / 10,000
           ``cifar-10-python.tar.gz``
svhn       ``train_32x32.mat``, ``test_32x32.mat``        10      3 x 32 x 32  73,257 / 26,032
emnist     ``emnist-byclass-{train,test}-{images-idx3,    62      1 x 28 x 28  697,932 / 116,323
           labels-idx1}-ubyte.gz`` (also in ``gzip/``)
           or the official ``gzip.zip``
tinyimagenet ``tiny-imagenet-200/`` or                    200     3 x 32 x 32  100,000 / 10,000
           ``tiny-imagenet-200.zip``                                (resized)
========== ============================================== ======= ============ ==================

``data_dir`` is one folder that holds the raw files (the names above never collide, so one folder can
serve every data set); it defaults to :func:`default_data_dir` (``$FEDRAC_DATA_DIR`` or
``~/.cache/fedrac``). Archives are read in place, member by member, and never extracted, so nothing
an archive names can be written anywhere; only the members the loader knows by name are read.

``digits`` (the embedded default) needs no file and no network: the 1,797 images of
``sklearn.datasets.load_digits`` are split per class, with ``numpy.random.default_rng(0)``, into a
20 % test set (``round(0.2 * n_class)`` images of each class: 359 in all) and an 80 % train set
(1,438); pixels are divided by 16 and normalised with the mean and standard deviation of all training
pixels (one channel).

Checksums. The canonical files' md5 values are constants here. With ``verify=True`` (the default) a
file whose md5 differs raises :class:`DataError`; ``verify=False`` accepts it with a warning and the
bundle says ``canonical=False``. Sources without a published checksum (loose EMNIST ``.gz`` files, an
extracted Tiny-ImageNet folder) count as canonical when their sample counts equal the official ones.
A rebuilt archive (such as a CIFAR-10 rebuilt from JPEGs) is used either by passing its path,
``load_dataset("cifar10", data_dir, archive=PATH, verify=False)`` (the archive may live in a read-only
folder; ``data_dir`` then only receives the cache), or by placing or symlinking it in ``data_dir``
under the canonical name (``cifar-10-python.tar.gz``) and passing ``verify=False``.

Download. When the files are missing and ``download=True`` the canonical archive is fetched from its
source URL into ``data_dir`` (streamed to a temporary file, md5-checked, then renamed into place, so
an interrupted or corrupt download never leaves a file under the final name). Any failure raises a
one-line :class:`DataError` that says what is wrong and which file to put in which folder.

Cache. The decoded images (uint8, before normalisation) are saved once per source as
``<data_dir>/<name>-<key>.fedrac-cache.pt`` (written atomically; ``key`` = a hash of the loader
version and of the source files' names, sizes and modification times, so a changed source is decoded
again). A later load reads that file and skips the checksum (it was computed when the cache was made
and is stored in it). When ``data_dir`` is not writable the cache goes to :func:`default_data_dir`.
Stale cache files are never deleted automatically; they may be removed at any time.

Pickle safety: the CIFAR-10 batches are Python pickles; they are read with an unpickler that only
admits the numpy array constructors, so a tampered file cannot run code.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import io
import json
import os
import pickle
import posixpath
import struct
import sys
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "ArrayDataset",
    "DatasetBundle",
    "DatasetInfo",
    "DATASETS",
    "DataError",
    "dataset_info",
    "default_data_dir",
    "load_dataset",
    "server_split",
]

PathLike = Union[str, os.PathLike]

DATASETS = ("digits", "cifar10", "svhn", "emnist", "tinyimagenet")

_ALIASES = {
    "cifar-10": "cifar10", "cifar_10": "cifar10",
    "tiny-imagenet": "tinyimagenet", "tiny_imagenet": "tinyimagenet", "tiny-imagenet-200": "tinyimagenet",
    "tinyimagenet200": "tinyimagenet", "imagenet_tiny": "tinyimagenet",
    "emnist-byclass": "emnist", "emnist_byclass": "emnist",
}

_CACHE_VERSION = 1
_CACHE_SUFFIX = ".fedrac-cache.pt"


class DataError(ValueError):
    """A data set cannot be loaded; the one-line message says what is wrong and which file to put where."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ----------------------------------------------------------------------------------- containers

class ArrayDataset(torch.utils.data.Dataset):
    """Samples held as two tensors: ``x`` float32 ``[n, *input_shape]`` (normalised), ``y`` int64 ``[n]``.

    Indexing returns ``(x[i], y[i])`` (so a ``DataLoader`` works on it); :meth:`subset` selects rows.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 2:
            raise TypeError("x must be a float32 tensor [n, *input_shape]")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
            raise TypeError("y must be an int64 tensor [n]")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x = x
        self.y = y

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index):
        return self.x[index], self.y[index]

    def subset(self, indices) -> "ArrayDataset":
        """The rows ``indices`` (an int64 tensor, array or sequence; duplicates allowed) as a new dataset."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.y.device)
        return ArrayDataset(self.x.index_select(0, idx), self.y.index_select(0, idx))

    def to(self, device) -> "ArrayDataset":
        return ArrayDataset(self.x.to(device), self.y.to(device))

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, input_shape={self.input_shape}, device={self.x.device})"


@dataclasses.dataclass(frozen=True)
class DatasetBundle:
    """A loaded data set: the official train and test sets plus what describes them.

    ``canonical`` is True when the source matched the canonical checksums (for sources without a
    published checksum: the official sample counts) and False when it was accepted with
    ``verify=False``. ``mean`` / ``std`` are the per-channel normalisation constants applied.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train: ArrayDataset
    test: ArrayDataset
    canonical: bool
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()
    source: str = ""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set (no loading): what a model or a config needs to know up front."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    num_train: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: str


_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

_INFO = {
    "digits": DatasetInfo("digits", 10, (1, 8, 8), 1438, 359, (), (), "none (scikit-learn's bundled digits)"),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), 50_000, 10_000, _CIFAR_MEAN, _CIFAR_STD,
                           "cifar-10-python.tar.gz or cifar-10-batches-py/"),
    # SVHN uses the CIFAR-10 constants (sic, as in the official code).
    "svhn": DatasetInfo("svhn", 10, (3, 32, 32), 73_257, 26_032, _CIFAR_MEAN, _CIFAR_STD,
                        "train_32x32.mat and test_32x32.mat"),
    "emnist": DatasetInfo("emnist", 62, (1, 28, 28), 697_932, 116_323, (0.1307,), (0.3081,),
                          "gzip.zip or emnist-byclass-*-ubyte.gz"),
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, (3, 32, 32), 100_000, 10_000,
                                (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
                                "tiny-imagenet-200.zip or tiny-imagenet-200/"),
}


def _resolve_name(name: str) -> str:
    if not isinstance(name, str):
        raise DataError(f"data set name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Number of classes, input shape, official sizes and normalisation of a data set, without loading it."""
    return _INFO[_resolve_name(name)]


def default_data_dir() -> Path:
    """``$FEDRAC_DATA_DIR`` when set (and not empty), else ``~/.cache/fedrac``."""
    env = os.environ.get("FEDRAC_DATA_DIR", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedrac"


def server_split(n_train: int, holdout: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random split of the official train set into the partition pool and the server validation set.

    ``|V| = floor(holdout * n_train)`` (at least 1 when ``holdout > 0``), the pool is the rest
    (50,000 -> 45,000 / 5,000; 73,257 -> 65,932 / 7,325). Both are int64 tensors of indices into the
    train set, in random order (like ``torch.utils.data.random_split``), drawn with
    ``numpy.random.default_rng(seed)`` only.
    """
    if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)) or n_train < 2:
        raise ValueError(f"n_train must be an integer >= 2, got {n_train!r}")
    holdout = float(holdout)
    if not (0.0 <= holdout < 1.0):
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    n_train = int(n_train)
    n_val = int(holdout * n_train)
    if holdout > 0 and n_val == 0:
        n_val = 1
    perm = np.random.default_rng(int(seed)).permutation(n_train)
    pool, val = perm[: n_train - n_val], perm[n_train - n_val:]
    return torch.from_numpy(pool.astype(np.int64)), torch.from_numpy(val.astype(np.int64))


# ------------------------------------------------------------------------------ file utilities

def _file_mode() -> int:
    """Permissions a plainly created file would get (mkstemp makes 0600 files; caches are shared)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, md5: str, hint: str) -> None:
    """Fetch ``url`` into ``dest`` through a temporary file; md5-check it before renaming it into place."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DataError(f"cannot write to {dest.parent} ({e.strerror or e}): {hint}") from None
    h = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out:
            print(f"fedrac: downloading {url} -> {dest}", file=sys.stderr, flush=True)
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "fedrac"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        out.write(chunk)
                        h.update(chunk)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise DataError(f"downloading {url} failed ({reason}): {hint}") from None
        got = h.hexdigest()
        if got != md5:
            raise DataError(f"the download of {url} is corrupt (md5 {got}, expected {md5}): try again, or {hint}")
        os.chmod(tmp, _file_mode())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Source:
    """Where a data set's raw files are: an archive, a folder, or a set of loose files."""

    def __init__(self, kind: str, path: Path, files: Sequence[Path], label: str):
        self.kind = kind          # "tar" | "zip" | "folder" | "files"
        self.path = path          # the archive, the folder, or the folder of the loose files
        self.files = list(files)  # files whose names/sizes/mtimes identify the source
        self.label = label        # for messages

    def fingerprint(self, key: str) -> str:
        entries = []
        for f in self.files:
            st = f.stat()
            try:
                rel = f.relative_to(self.path).as_posix()
            except ValueError:
                rel = f.name
            entries.append((rel if rel != "." else f.name, st.st_size, st.st_mtime_ns))
        entries.sort()
        blob = json.dumps([_CACHE_VERSION, key, self.kind, entries]).encode()
        return hashlib.sha256(blob).hexdigest()


def _safe_member_name(name: str) -> Optional[str]:
    """The member's base name if its path is harmless (relative, no '..'), else None."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or "/../" in norm:
        return None
    return posixpath.basename(norm)


# ------------------------------------------------------------------------------------ the cache

def _cache_dirs(root: Path) -> list[Path]:
    dirs = [root]
    fallback = default_data_dir()
    if fallback.resolve() != root.resolve():
        dirs.append(fallback)
    return dirs


def _cache_name(key: str, fingerprint: str) -> str:
    return f"{key}-{fingerprint[:20]}{_CACHE_SUFFIX}"


def _read_cache(root: Path, key: str, fingerprint: str) -> Optional[dict]:
    for d in _cache_dirs(root):
        path = d / _cache_name(key, fingerprint)
        if not path.is_file():
            continue
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True)
            ok = (isinstance(rec, dict) and rec.get("format") == "fedrac-dataset-cache"
                  and rec.get("version") == _CACHE_VERSION and rec.get("fingerprint") == fingerprint)
        except Exception:  # a damaged cache is rebuilt, never trusted
            ok = False
        if ok:
            return rec
        warnings.warn(f"fedrac: ignoring the unreadable cache file {path}; it will be rebuilt", stacklevel=3)
    return None


def _write_cache(root: Path, key: str, fingerprint: str, rec: dict) -> None:
    rec = dict(rec, format="fedrac-dataset-cache", version=_CACHE_VERSION, fingerprint=fingerprint)
    errors = []
    for d in _cache_dirs(root):
        tmp = None
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{key}-", suffix=".part")
            with os.fdopen(fd, "wb") as f:
                torch.save(rec, f)
            os.chmod(tmp, _file_mode())
            os.replace(tmp, d / _cache_name(key, fingerprint))
            return
        except OSError as e:
            errors.append(f"{d}: {e.strerror or e}")
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    warnings.warn(f"fedrac: could not cache the decoded {key} data ({'; '.join(errors)}); "
                  "the next load decodes it again", stacklevel=3)


# ------------------------------------------------------------------------------------- CIFAR-10

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
_CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_MAX_MEMBER = 256 << 20


def _numpy_core_module(module: str) -> str:
    # Pickles written with numpy 1.x name numpy.core.*; numpy 2 moved it to numpy._core.*.
    if module.startswith("numpy.core") and hasattr(np, "_core"):
        return "numpy._core" + module[len("numpy.core"):]
    return module


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(_numpy_core_module(module), name)


def _get(d: dict, key: str):
    if key in d:
        return d[key]
    return d.get(key.encode())


def _cifar_batch(blob: bytes, member: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    bad = f"{member} in {where} is not a CIFAR-10 python batch"
    try:
        d = _ArrayOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{bad} ({e}): replace it with the official file") from None
    if not isinstance(d, dict):
        raise DataError(f"{bad} (not a dict): replace it with the official file")
    data, labels = _get(d, "data"), _get(d, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{bad} (data is not uint8 [n, 3072]): replace it with the official file")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{bad} (labels are not {data.shape[0]} values in 0..9): replace it with the official file")
    return data.reshape(-1, 3, 32, 32), labels


class _Cifar10:
    label = "CIFAR-10"

    @staticmethod
    def missing_hint(root: Path) -> str:
        return (f"put {_CIFAR_ARCHIVE} (from {_CIFAR_URL}) or its extracted {_CIFAR_FOLDER}/ folder in {root}, "
                f"or pass archive=PATH (with verify=False for a rebuilt archive)")

    def locate(self, root: Path, archive: Optional[Path], download: bool) -> _Source:
        if archive is not None:
            if archive.is_dir():
                folder = archive / _CIFAR_FOLDER if (archive / _CIFAR_FOLDER).is_dir() else archive
                return self._folder(folder, f"archive={archive}")
            if not archive.is_file():
                raise DataError(f"archive {archive} does not exist: pass the path of {_CIFAR_ARCHIVE} or of a rebuilt copy")
            return _Source("tar", archive, [archive], str(archive))
        folder = root / _CIFAR_FOLDER
        if folder.is_dir() and all((folder / b).is_file() for b in _CIFAR_BATCH_MD5):
            return self._folder(folder, str(folder))
        tar = root / _CIFAR_ARCHIVE
        if tar.is_file():
            return _Source("tar", tar, [tar], str(tar))
        if not download:
            missing = [b for b in _CIFAR_BATCH_MD5 if not (folder / b).is_file()] if folder.is_dir() else []
            detail = f" ({_CIFAR_FOLDER}/ lacks {', '.join(missing)})" if missing else ""
            raise DataError(f"CIFAR-10 not found in {root}{detail} and download=False: {self.missing_hint(root)}")
        _download(_CIFAR_URL, tar, _CIFAR_ARCHIVE_MD5, self.missing_hint(root))
        return _Source("tar", tar, [tar], str(tar))

    def _folder(self, folder: Path, label: str) -> _Source:
        missing = [b for b in _CIFAR_BATCH_MD5 if not (folder / b).is_file()]
        if missing:
            raise DataError(f"{folder} lacks {', '.join(missing)}: put the complete {_CIFAR_FOLDER}/ folder there")
        files = [folder / b for b in _CIFAR_BATCH_MD5]
        if (folder / "batches.meta").is_file():
            files.append(folder / "batches.meta")
        return _Source("folder", folder, files, label)

    def check(self, src: _Source) -> str:
        if src.kind == "tar":
            got = _md5(src.path)
            if got != _CIFAR_ARCHIVE_MD5:
                return f"{src.path.name} in {src.path.parent} has md5 {got}, not the canonical {_CIFAR_ARCHIVE_MD5}"
            return ""
        bad = [b for b, m in _CIFAR_BATCH_MD5.items() if _md5(src.path / b) != m]
        if bad:
            return f"{', '.join(bad)} in {src.path} do not match the canonical CIFAR-10 checksums"
        return ""

    def decode(self, src: _Source) -> dict:
        wanted = set(_CIFAR_BATCH_MD5) | {"batches.meta"}
        blobs: dict[str, bytes] = {}
        if src.kind == "tar":
            try:
                with tarfile.open(src.path, "r:*") as tf:
                    for m in tf:  # sequential: one pass over the compressed stream
                        base = _safe_member_name(m.name)
                        if base in wanted and base not in blobs and m.isfile():
                            if m.size > _CIFAR_MAX_MEMBER:
                                raise DataError(f"{m.name} in {src.path} is implausibly large ({m.size} bytes)")
                            f = tf.extractfile(m)
                            blobs[base] = f.read() if f is not None else b""
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                raise DataError(f"{src.path} is not a readable tar archive ({e}): "
                                f"replace it with the official {_CIFAR_ARCHIVE}") from None
            missing = [b for b in _CIFAR_BATCH_MD5 if b not in blobs]
            if missing:
                raise DataError(f"{src.path} lacks {_CIFAR_FOLDER}/{', '.join(missing)}: "
                                f"it is not a CIFAR-10 python archive")
        else:
            for b in wanted:
                p = src.path / b
                if p.is_file():
                    blobs[b] = p.read_bytes()
        xs, ys = [], []
        for b in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
            x, y = _cifar_batch(blobs[b], b, src.label)
            xs.append(x)
            ys.append(y)
        x_test, y_test = _cifar_batch(blobs["test_batch"], "test_batch", src.label)
        classes = _CIFAR_CLASSES
        if "batches.meta" in blobs:
            try:
                meta = _ArrayOnlyUnpickler(io.BytesIO(blobs["batches.meta"]), encoding="bytes").load()
                names = _get(meta, "label_names") if isinstance(meta, dict) else None
                if isinstance(names, list) and len(names) == 10:
                    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
            except Exception:
                pass  # the names are cosmetic; the canonical ones are used
        return dict(x_train=np.concatenate(xs), y_train=np.concatenate(ys), x_test=x_test, y_test=y_test,
                    classes=classes)


# ------------------------------------------------------------------------------------------ SVHN

_SVHN_FILES = {
    "train_32x32.mat": ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test_32x32.mat": ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
}


def _svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    bad = f"{path.name} in {path.parent} is not an SVHN .mat file"
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:
        raise DataError(f"{bad} ({e}): replace it with the official file") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{bad} (X is not [32, 32, 3, n]): replace it with the official file")
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3] or (y.size and (y.min() < 0 or y.max() > 10)):
        raise DataError(f"{bad} (y is not {x.shape[3]} labels in 0..10): replace it with the official file")
    y[y == 10] = 0  # SVHN writes digit 0 as label 10
    x = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))  # [H, W, C, n] -> [n, C, H, W]
    if x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{bad} (X values outside 0..255): replace it with the official file")
        x = x.astype(np.uint8)
    return x, y


class _Svhn:
    label = "SVHN"

    @staticmethod
    def missing_hint(root: Path, names) -> str:
        urls = ", ".join(_SVHN_FILES[n][0] for n in names)
        return f"put {' and '.join(names)} (from {urls}) in {root}"

    def locate(self, root: Path, archive: Optional[Path], download: bool) -> _Source:
        if archive is not None:
            raise DataError(f"svhn has no archive: put train_32x32.mat and test_32x32.mat in data_dir ({root})")
        missing = [n for n in _SVHN_FILES if not (root / n).is_file()]
        if missing and not download:
            raise DataError(f"SVHN files missing and download=False: {self.missing_hint(root, missing)}")
        for n in missing:
            url, md5 = _SVHN_FILES[n]
            _download(url, root / n, md5, self.missing_hint(root, [n]))
        return _Source("files", root, [root / n for n in _SVHN_FILES], str(root))

    def check(self, src: _Source) -> str:
        bad = [n for n, (_, m) in _SVHN_FILES.items() if _md5(src.path / n) != m]
        if bad:
            return f"{' and '.join(bad)} in {src.path} do not match the canonical SVHN checksums"
        return ""

    def decode(self, src: _Source) -> dict:
        x_train, y_train = _svhn_mat(src.path / "train_32x32.mat")
        x_test, y_test = _svhn_mat(src.path / "test_32x32.mat")
        return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                    classes=tuple(str(i) for i in range(10)))


# ---------------------------------------------------------------------------------------- EMNIST

_EMNIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"
_EMNIST_ZIP = "gzip.zip"
_EMNIST_ZIP_MD5 = "58c8d27c78d21e728a6bc7b3cc06412e"
_EMNIST_FILES = {
    "x_train": "emnist-byclass-train-images-idx3-ubyte.gz",
    "y_train": "emnist-byclass-train-labels-idx1-ubyte.gz",
    "x_test": "emnist-byclass-test-images-idx3-ubyte.gz",
    "y_test": "emnist-byclass-test-labels-idx1-ubyte.gz",
}
_EMNIST_CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _parse_idx(blob: bytes, ndim: int, name: str, where: str) -> np.ndarray:
    """An idx file (big-endian header: 0, 0, type 0x08 = uint8, ndim, then ndim uint32 sizes) as an array."""
    bad = f"{name} in {where} is not an idx file"
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0:
        raise DataError(f"{bad} (bad magic number): replace it with the official file")
    if blob[2] != 0x08 or blob[3] != ndim:
        raise DataError(f"{bad} (expected uint8 data with {ndim} dimensions, header says type "
                        f"0x{blob[2]:02x} with {blob[3]}): replace it with the official file")
    head = 4 + 4 * ndim
    if len(blob) < head:
        raise DataError(f"{bad} (truncated header): replace it with the official file")
    dims = struct.unpack(">" + "I" * ndim, blob[4:head])
    count = int(np.prod(dims, dtype=np.int64))
    if len(blob) - head != count:
        raise DataError(f"{bad} (header promises {count} bytes, file holds {len(blob) - head}): "
                        f"replace it with the official file")
    return np.frombuffer(blob, dtype=np.uint8, count=count, offset=head).reshape(dims)


class _Emnist:
    label = "EMNIST"

    @staticmethod
    def missing_hint(root: Path) -> str:
        return (f"put {_EMNIST_ZIP} (from {_EMNIST_URL}) or its four emnist-byclass-*-ubyte.gz files in {root}, "
                f"or pass archive=PATH to gzip.zip")

    def locate(self, root: Path, archive: Optional[Path], download: bool) -> _Source:
        if archive is not None:
            if archive.is_dir():
                for folder in (archive, archive / "gzip"):
                    src = self._loose(folder)
                    if src is not None:
                        return src
                raise DataError(f"archive={archive} holds none or not all of the four emnist-byclass-*-ubyte.gz "
                                f"files: pass the path of the EMNIST {_EMNIST_ZIP} or of a folder holding them")
            if not archive.is_file():
                raise DataError(f"archive {archive} does not exist: pass the path of the EMNIST {_EMNIST_ZIP}")
            return _Source("zip", archive, [archive], str(archive))
        for folder in (root, root / "gzip"):
            src = self._loose(folder)
            if src is not None:
                return src
        z = root / _EMNIST_ZIP
        if z.is_file():
            return _Source("zip", z, [z], str(z))
        if not download:
            raise DataError(f"EMNIST (byclass) not found in {root} and download=False: {self.missing_hint(root)}")
        _download(_EMNIST_URL, z, _EMNIST_ZIP_MD5, self.missing_hint(root))
        return _Source("zip", z, [z], str(z))

    def _loose(self, folder: Path) -> Optional[_Source]:
        files = [folder / f for f in _EMNIST_FILES.values()]
        if all(f.is_file() for f in files):
            return _Source("files", folder, files, str(folder))
        return None

    def check(self, src: _Source) -> str:
        if src.kind == "zip":
            got = _md5(src.path)
            if got != _EMNIST_ZIP_MD5:
                return f"{src.path.name} in {src.path.parent} has md5 {got}, not the canonical {_EMNIST_ZIP_MD5}"
        return ""  # loose .gz files have no published checksums: the sample counts are checked instead

    def decode(self, src: _Source) -> dict:
        blobs: dict[str, bytes] = {}
        if src.kind == "zip":
            try:
                with zipfile.ZipFile(src.path) as zf:
                    by_name = {}
                    for info in zf.infolist():
                        base = _safe_member_name(info.filename)
                        if base is not None and not info.is_dir():
                            by_name.setdefault(base, info)
                    for k, f in _EMNIST_FILES.items():
                        if f not in by_name:
                            raise DataError(f"{src.path} lacks {f}: it is not the EMNIST {_EMNIST_ZIP}")
                        blobs[k] = zf.read(by_name[f])
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                raise DataError(f"{src.path} is not a readable zip archive ({e}): "
                                f"replace it with the official {_EMNIST_ZIP}") from None
        else:
            for k, f in _EMNIST_FILES.items():
                blobs[k] = (src.path / f).read_bytes()
        out = {}
        for k, f in _EMNIST_FILES.items():
            try:
                raw = gzip.decompress(blobs[k])
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{f} in {src.label} is not gzip data ({e}): replace it with the official file") from None
            arr = _parse_idx(raw, 3 if k.startswith("x") else 1, f, src.label)
            out[k] = arr[:, None, :, :] if k.startswith("x") else arr.astype(np.int64)
        for split in ("train", "test"):
            n_x, n_y = out[f"x_{split}"].shape[0], out[f"y_{split}"].shape[0]
            if n_x != n_y:
                raise DataError(f"EMNIST {split} images ({n_x}) and labels ({n_y}) in {src.label} disagree: "
                                f"replace them with the official files")
            y = out[f"y_{split}"]
            if y.size and y.max() >= 62:
                raise DataError(f"EMNIST {split} labels in {src.label} exceed 61: these are not byclass files")
        out["classes"] = _EMNIST_CLASSES
        return out


# ---------------------------------------------------------------------------------- Tiny-ImageNet

_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_ZIP = "tiny-imagenet-200.zip"
_TINY_ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_TINY_FOLDER = "tiny-imagenet-200"


class _TinyReader:
    """Uniform access to the tiny-imagenet-200 tree, in a folder or in a zip (paths relative to its root)."""

    def __init__(self, src: _Source):
        self.src = src
        self.zip = None
        self._local = threading.local()   # one ZipFile handle per decoding thread
        self._handles: list[zipfile.ZipFile] = []
        self._lock = threading.Lock()
        if src.kind == "zip":
            try:
                self.zip = zipfile.ZipFile(src.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{src.path} is not a readable zip archive ({e}): "
                                f"replace it with the official {_TINY_ZIP}") from None
            self.members = {}
            for info in self.zip.infolist():
                name = info.filename.replace("\\", "/")
                if info.is_dir() or _safe_member_name(name) is None:
                    continue
                if name.startswith(_TINY_FOLDER + "/"):
                    name = name[len(_TINY_FOLDER) + 1:]
                self.members[name] = info

    def close(self):
        for h in self._handles:
            h.close()
        if self.zip is not None:
            self.zip.close()

    def _zip_handle(self) -> zipfile.ZipFile:
        handle = getattr(self._local, "zip", None)
        if handle is None:
            handle = zipfile.ZipFile(self.src.path)
            self._local.zip = handle
            with self._lock:
                self._handles.append(handle)
        return handle

    def read(self, rel: str) -> bytes:
        if self.zip is not None:
            info = self.members.get(rel)
            if info is None:
                raise DataError(f"{self.src.path} lacks {_TINY_FOLDER}/{rel}: it is not the Tiny-ImageNet {_TINY_ZIP}")
            return self._zip_handle().read(info)
        path = self.src.path / rel
        if not path.is_file():
            raise DataError(f"{self.src.path} lacks {rel}: put the complete {_TINY_FOLDER}/ folder there")
        return path.read_bytes()

    def train_images(self, wnid: str) -> list[str]:
        prefix = f"train/{wnid}/images/"
        if self.zip is not None:
            names = [n for n in self.members if n.startswith(prefix) and "/" not in n[len(prefix):]]
        else:
            folder = self.src.path / prefix
            names = [prefix + e.name for e in os.scandir(folder) if e.is_file()] if folder.is_dir() else []
        return sorted(n for n in names if n.lower().endswith((".jpeg", ".jpg")))


def _tiny_decode_one(blob: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        im = im.convert("RGB")
        if im.size != (32, 32):
            im = im.resize((32, 32), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


class _TinyImageNet:
    label = "Tiny-ImageNet"

    @staticmethod
    def missing_hint(root: Path) -> str:
        return (f"put {_TINY_ZIP} (from {_TINY_URL}) or its extracted {_TINY_FOLDER}/ folder in {root}, "
                f"or pass archive=PATH")

    def locate(self, root: Path, archive: Optional[Path], download: bool) -> _Source:
        if archive is not None:
            if archive.is_dir():
                folder = archive / _TINY_FOLDER if (archive / _TINY_FOLDER).is_dir() else archive
                return self._folder(folder)
            if not archive.is_file():
                raise DataError(f"archive {archive} does not exist: pass the path of {_TINY_ZIP} or of the folder")
            return _Source("zip", archive, [archive], str(archive))
        for folder in (root / _TINY_FOLDER, root):
            if (folder / "wnids.txt").is_file():
                return self._folder(folder)
        z = root / _TINY_ZIP
        if z.is_file():
            return _Source("zip", z, [z], str(z))
        if not download:
            raise DataError(f"Tiny-ImageNet not found in {root} and download=False: {self.missing_hint(root)}")
        _download(_TINY_URL, z, _TINY_ZIP_MD5, self.missing_hint(root))
        return _Source("zip", z, [z], str(z))

    def _folder(self, folder: Path) -> _Source:
        for need in ("wnids.txt", "val/val_annotations.txt"):
            if not (folder / need).is_file():
                raise DataError(f"{folder} lacks {need}: put the complete {_TINY_FOLDER}/ folder there")
        files = [folder / "wnids.txt", folder / "val" / "val_annotations.txt"]
        for sub in ("train", "val/images"):
            for dirpath, _, names in os.walk(folder / sub):
                files.extend(Path(dirpath) / n for n in names)
        return _Source("folder", folder, files, str(folder))

    def check(self, src: _Source) -> str:
        if src.kind == "zip":
            got = _md5(src.path)
            if got != _TINY_ZIP_MD5:
                return f"{src.path.name} in {src.path.parent} has md5 {got}, not the canonical {_TINY_ZIP_MD5}"
        return ""  # an extracted folder has no published checksum: the sample counts are checked instead

    def decode(self, src: _Source) -> dict:
        reader = _TinyReader(src)
        try:
            wnids = reader.read("wnids.txt").decode("utf-8", "replace").split()
            classes = sorted(set(wnids))  # ImageFolder's class order: sorted folder names
            if not classes:
                raise DataError(f"wnids.txt in {src.label} is empty: put the complete {_TINY_FOLDER}/ there")
            index = {w: i for i, w in enumerate(classes)}
            train_names, train_labels = [], []
            for w in classes:
                names = reader.train_images(w)
                train_names.extend(names)
                train_labels.extend([index[w]] * len(names))
            test_names, test_labels = [], []
            for line in reader.read("val/val_annotations.txt").decode("utf-8", "replace").splitlines():
                parts = line.split("\t") if "\t" in line else line.split()
                if len(parts) < 2:
                    continue
                if parts[1] not in index or _safe_member_name(parts[0]) != parts[0]:
                    raise DataError(f"val_annotations.txt in {src.label} names {parts[1]!r} for {parts[0]!r}, "
                                    f"which is not a class of wnids.txt: replace it with the official file")
                test_names.append(f"val/images/{parts[0]}")
                test_labels.append(index[parts[1]])
            if not train_names or not test_names:
                raise DataError(f"{src.label} holds no train or no val images: put the complete {_TINY_FOLDER}/ there")

            def decode_all(names):
                def one(rel):
                    try:
                        return _tiny_decode_one(reader.read(rel))
                    except DataError:
                        raise
                    except Exception as e:
                        raise DataError(f"{rel} in {src.label} is not a readable image ({e}): "
                                        f"replace it with the official file") from None
                # Pillow releases the GIL while decoding and resizing, so threads help
                with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
                    imgs = list(ex.map(one, names))
                return np.ascontiguousarray(np.stack(imgs).transpose(0, 3, 1, 2))

            return dict(x_train=decode_all(train_names), y_train=np.asarray(train_labels, dtype=np.int64),
                        x_test=decode_all(test_names), y_test=np.asarray(test_labels, dtype=np.int64),
                        classes=tuple(classes))
        finally:
            reader.close()


_LOADERS = {"cifar10": _Cifar10(), "svhn": _Svhn(), "emnist": _Emnist(), "tinyimagenet": _TinyImageNet()}


# ---------------------------------------------------------------------------------------- digits

def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits: scikit-learn's bundled CSV read directly (importing sklearn costs seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            try:
                table = np.loadtxt(path, delimiter=",")
            except (OSError, ValueError):
                break
            if table.shape == (1797, 65):
                return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
            break
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the embedded digits data set needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return np.asarray(d.images, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def _load_digits() -> DatasetBundle:
    images, labels = _digits_arrays()
    images = images / 16.0
    rng = np.random.default_rng(0)
    test = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test.append(rng.permutation(idx)[: int(round(0.2 * idx.size))])
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[test_idx] = False
    train_idx = np.flatnonzero(train_mask)
    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())

    def make(idx):
        x = torch.from_numpy(((images[idx] - mean) / std).astype(np.float32)).unsqueeze(1)
        return ArrayDataset(x.contiguous(), torch.from_numpy(labels[idx]))

    return DatasetBundle("digits", 10, (1, 8, 8), make(train_idx), make(test_idx), True,
                         (mean,), (std,), tuple(str(i) for i in range(10)), "sklearn.datasets.load_digits")


# ------------------------------------------------------------------------------------- load_dataset

def _normalise(x_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = x_u8.to(torch.float32)
    x.div_(255.0)
    c = x.shape[1]
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
    return x


def load_dataset(name: str, data_dir: Optional[PathLike] = None, *, download: bool = True,
                 verify: bool = True, archive: Optional[PathLike] = None) -> DatasetBundle:
    """Load a data set as normalised in-memory tensors (see the module docstring for files and options).

    ``data_dir``: the folder holding the raw files (default :func:`default_data_dir`).
    ``download``: fetch missing files from the canonical URL (md5-checked).
    ``verify``: require the canonical checksums; ``False`` accepts other copies with a warning.
    ``archive``: an explicit source (``cifar10``: the ``.tar.gz`` or the batches folder; ``emnist``:
    ``gzip.zip`` or a folder of the ``.gz`` files; ``tinyimagenet``: the ``.zip`` or the folder),
    read in place; ``data_dir`` then only receives the cache.
    Raises :class:`DataError` (one line: what is wrong, which file to put where).
    """
    key = _resolve_name(name)
    if key == "digits":
        if archive is not None:
            raise DataError("digits is embedded (scikit-learn's bundled digits): it takes no archive")
        return _load_digits()
    info = _INFO[key]
    loader = _LOADERS[key]
    root = Path(data_dir).expanduser() if data_dir not in (None, "") else default_data_dir()
    arch = Path(archive).expanduser() if archive not in (None, "") else None
    src = loader.locate(root, arch, download)
    try:
        fingerprint = src.fingerprint(key)
    except OSError as e:
        raise DataError(f"cannot read {src.label} ({e.strerror or e}): {loader.missing_hint(root)}") from None
    rec = _read_cache(root, key, fingerprint)
    if rec is None:
        problem = loader.check(src)
        if problem and verify:
            raise DataError(_verify_message(problem, key))
        try:
            raw = loader.decode(src)
        except OSError as e:
            raise DataError(f"cannot read {src.label} ({e}): check the files' permissions, or "
                            f"{loader.missing_hint(root)}") from None
        n_train, n_test = len(raw["y_train"]), len(raw["y_test"])
        if not problem and (n_train, n_test) != (info.num_train, info.num_test):
            problem = (f"{src.label} holds {n_train} train / {n_test} test samples, "
                       f"not the official {info.num_train} / {info.num_test}")
            if verify:
                raise DataError(_verify_message(problem, key))
        rec = dict(name=key, x_train=torch.from_numpy(np.ascontiguousarray(raw["x_train"])),
                   y_train=torch.from_numpy(np.asarray(raw["y_train"], dtype=np.int64)),
                   x_test=torch.from_numpy(np.ascontiguousarray(raw["x_test"])),
                   y_test=torch.from_numpy(np.asarray(raw["y_test"], dtype=np.int64)),
                   classes=list(raw["classes"]), problem=problem, source=src.label)
        _write_cache(root, key, fingerprint, rec)
    elif rec["problem"] and verify:
        raise DataError(_verify_message(rec["problem"], key))
    if rec["problem"]:
        warnings.warn(f"fedrac: using a non-canonical {key} source ({rec['problem']}); "
                      "results can differ from published ones", stacklevel=2)
    train = ArrayDataset(_normalise(rec["x_train"], info.mean, info.std), rec["y_train"])
    test = ArrayDataset(_normalise(rec["x_test"], info.mean, info.std), rec["y_test"])
    return DatasetBundle(key, info.num_classes, info.input_shape, train, test, not rec["problem"],
                         info.mean, info.std, tuple(rec["classes"]), src.label)


def _verify_message(problem: str, key: str) -> str:
    return (f"{problem}: the file is corrupt or not the official one; replace it with the official file "
            f"(delete it and {key} is downloaded again), or pass verify=False to use it anyway "
            f"(e.g. a rebuilt archive)")
