"""Crash-safe file output for runs: atomic writes, JSON Lines, checkpoints.

Every result file of a run is either written whole through a temporary file in the same directory
followed by ``os.replace`` (so a reader - or a resumed run - never sees half a file), or appended
one complete line at a time (``metrics.jsonl``), with the resume path cutting the file back to the
rounds its checkpoint holds.

JSON written here is strict: non-finite floats (an undefined Pearson correlation, for example)
become ``null`` instead of Python's non-standard ``NaN`` token.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

CHECKPOINT_FORMAT = 1


class RunFileError(ValueError):
    """A run file is missing, unreadable or corrupt (the message says which and what to do)."""


# --------------------------------------------------------------------------------------------- JSON

def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: tensors/numpy to lists or numbers, tuples to lists, non-finite to None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    tolist = getattr(obj, "tolist", None)          # numpy arrays and scalars
    if callable(tolist):
        return to_jsonable(tolist())
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def dumps(obj: Any, *, indent: int | None = None) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


# ---------------------------------------------------------------------------------- atomic writes

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either the old or the new content."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)          # mkstemp creates 0600; result files follow the umask
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFileError(f"{path} is not valid JSON ({e})") from None


# --------------------------------------------------------------------------------------- JSON Lines

def append_line(path: str | os.PathLike, line: str, *, sync: bool = False) -> None:
    """Append ``line`` (no newline) plus a newline with a single ``write`` call."""
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def append_jsonl(path: str | os.PathLike, record: Any, *, sync: bool = False) -> str:
    """Append one record as one line; returns the line written (without the newline)."""
    line = dumps(record)
    append_line(path, line, sync=sync)
    return line


def chain_digest(previous: str, line: str) -> str:
    """Running digest of a JSON Lines file: ``sha256(previous + line)`` (hex)."""
    import hashlib

    return hashlib.sha256((previous + line).encode("utf-8")).hexdigest()


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Replace ``path`` atomically with one line per record."""
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list:
    """Records of a JSON Lines file; a torn last line (a crash mid-append) is ignored."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RunFileError(f"{path}: line {i + 1} is not valid JSON") from None
    return out


# -------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically save a checkpoint (tensors, numbers, strings, lists and dicts only)."""
    import io as _io

    buf = _io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (safe ``weights_only`` unpickling)."""
    path = Path(path)
    if not path.exists():
        raise RunFileError(f"{path} is missing: the run has no checkpoint to resume from "
                           f"(it stopped before its first checkpoint; start it again)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFileError(f"{path} is corrupt or not a fedrac checkpoint ({msg[:120]}); "
                           f"delete it and start the run again") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunFileError(f"{path} is not a fedrac checkpoint of format {CHECKPOINT_FORMAT}")
    return state


# ------------------------------------------------------------------------------------ RNG states

def rng_state() -> dict:
    """Global RNG states (Python, NumPy, torch CPU and CUDA) as checkpointable values."""
    import random

    import numpy as np

    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype("uint32"), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
