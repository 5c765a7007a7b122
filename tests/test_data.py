"""fedrac.data: loaders on tiny files in every real format (written here), checksums, errors, cache.

No test touches the network: downloads are exercised through a patched ``urllib.request.urlopen``.
The test on the rebuilt CIFAR-10 archive in /work/shared/data skips when that folder is absent.
"""
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fedrac.data as fd
from fedrac.data import (DATASETS, ArrayDataset, DataError, DatasetBundle, dataset_info, default_data_dir,
                         load_dataset, server_split)

REBUILT_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-python.REBUILT-from-jpeg-q75.tar.gz"


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    """Keep the fallback cache folder ($FEDRAC_DATA_DIR) inside the test's temporary folder."""
    monkeypatch.setenv("FEDRAC_DATA_DIR", str(tmp_path / "default-data-dir"))


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")
    monkeypatch.setattr(fd.urllib.request, "urlopen", refuse)


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------ tiny fixtures

def _cifar_arrays(seed=0, n_train_per_batch=3, n_test=4):
    rng = np.random.default_rng(seed)
    batches = {}
    for i in range(1, 6):
        batches[f"data_batch_{i}"] = (rng.integers(0, 256, (n_train_per_batch, 3072), dtype=np.uint8),
                                      rng.integers(0, 10, n_train_per_batch).tolist())
    batches["test_batch"] = (rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), rng.integers(0, 10, n_test).tolist())
    return batches


def _cifar_blobs(batches):
    blobs = {}
    for name, (data, labels) in batches.items():
        if name == "data_batch_1":   # the official files are Python 2 pickles with bytes keys
            d = {b"batch_label": b"training batch 1 of 5", b"data": data, b"labels": labels}
            blobs[name] = pickle.dumps(d, protocol=2)
        else:
            blobs[name] = pickle.dumps({"batch_label": name, "data": data, "labels": labels}, protocol=4)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    blobs["batches.meta"] = pickle.dumps({"label_names": names, "num_cases_per_batch": 3, "num_vis": 3072})
    return blobs


def _write_cifar_folder(root: Path, batches) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, blob in _cifar_blobs(batches).items():
        (folder / name).write_bytes(blob)
    return folder


def _cifar_tar_bytes(batches) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        d = tarfile.TarInfo("cifar-10-batches-py")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, blob in _cifar_blobs(batches).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _expected_cifar(batches):
    xs = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    ys = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    return xs, ys


def _normalised(x_u8, mean, std):
    x = torch.from_numpy(np.asarray(x_u8)).float() / 255
    c = x.shape[1]
    return (x - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return gzip.compress(head + arr.astype(np.uint8).tobytes())


def _emnist_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return dict(x_train=rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 62, 7),
                x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), y_test=np.array([0, 61, 35]))


def _emnist_blobs(a):
    return {fd._EMNIST_FILES[k]: _idx_bytes(v) for k, v in a.items()}


def _jpeg(color, mode="RGB", size=64) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new(mode, (size, size), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


TINY_WNIDS = ["n03000000", "n01000000", "n02000000"]   # wnids.txt is not sorted; classes are
TINY_RED = {"n01000000": 40, "n02000000": 130, "n03000000": 220}


def _tiny_tree() -> dict:
    files = {"wnids.txt": ("\n".join(TINY_WNIDS) + "\n").encode()}
    for w in TINY_WNIDS:
        for i in range(2):
            files[f"train/{w}/images/{w}_{i}.JPEG"] = _jpeg((TINY_RED[w], 10, 200))
        files[f"train/{w}/{w}_boxes.txt"] = b"ignored\n"
    files["train/n01000000/images/n01000000_9.JPEG"] = _jpeg(77, mode="L")   # grayscale image
    ann = []
    for i, w in enumerate(["n02000000", "n03000000", "n01000000", "n02000000"]):
        files[f"val/images/val_{i}.JPEG"] = _jpeg((TINY_RED[w], 10, 200))
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    files["val/val_annotations.txt"] = ("\n".join(ann) + "\n").encode()
    return files


def _write_tree(root: Path, files: dict):
    for rel, blob in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)


# -------------------------------------------------------------------------------------- basics

def test_public_names():
    assert DATASETS == ("digits", "cifar10", "svhn", "emnist", "tinyimagenet")
    assert issubclass(DataError, ValueError)
    assert dataset_info("emnist").num_classes == 62
    assert dataset_info("CIFAR-10").input_shape == (3, 32, 32)
    assert dataset_info("tiny-imagenet").num_classes == 200


def test_default_data_dir(monkeypatch):
    monkeypatch.setenv("FEDRAC_DATA_DIR", "/some/where")
    assert default_data_dir() == Path("/some/where")
    monkeypatch.delenv("FEDRAC_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "fedrac"


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown data set 'mnist'.*digits, cifar10"):
        load_dataset("mnist")


def test_array_dataset():
    ds = ArrayDataset(torch.zeros(5, 1, 2, 2), torch.arange(5))
    assert len(ds) == 5 and ds.input_shape == (1, 2, 2)
    x, y = ds[3]
    assert x.shape == (1, 2, 2) and int(y) == 3
    sub = ds.subset(torch.tensor([4, 4, 0]))
    assert sub.y.tolist() == [4, 4, 0]
    with pytest.raises(TypeError):
        ArrayDataset(torch.zeros(5, 2, dtype=torch.float64), torch.arange(5))
    with pytest.raises(ValueError):
        ArrayDataset(torch.zeros(4, 2), torch.arange(5))


def test_server_split():
    pool, val = server_split(50_000)
    assert pool.dtype == val.dtype == torch.int64
    assert (len(pool), len(val)) == (45_000, 5_000)
    both = torch.cat([pool, val])
    assert torch.equal(both.sort().values, torch.arange(50_000))
    p2, v2 = server_split(50_000)
    assert torch.equal(pool, p2) and torch.equal(val, v2)
    p3, _ = server_split(50_000, seed=1)
    assert not torch.equal(pool, p3)
    assert [len(t) for t in server_split(73_257)] == [65_932, 7_325]
    assert [len(t) for t in server_split(697_932)] == [628_139, 69_793]
    assert [len(t) for t in server_split(5, holdout=0.1)] == [4, 1]      # at least one validation sample
    assert [len(t) for t in server_split(10, holdout=0.0)] == [10, 0]
    with pytest.raises(ValueError, match="holdout"):
        server_split(10, holdout=1.0)
    with pytest.raises(ValueError, match="n_train"):
        server_split(1)


def test_digits_embedded():
    b = load_dataset("digits")
    assert isinstance(b, DatasetBundle)
    assert (b.name, b.num_classes, b.input_shape, b.canonical) == ("digits", 10, (1, 8, 8), True)
    assert (len(b.train), len(b.test)) == (1438, 359)
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert b.train.x.shape == (1438, 1, 8, 8)
    assert abs(float(b.train.x.mean())) < 1e-4 and abs(float(b.train.x.std()) - 1) < 1e-3
    assert torch.bincount(b.test.y).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]   # stratified 20 %
    again = load_dataset("digits")
    assert torch.equal(b.train.x, again.train.x) and torch.equal(b.test.y, again.test.y)
    with pytest.raises(DataError, match="embedded"):
        load_dataset("digits", archive="x.tar.gz")


def test_digits_fallback_through_sklearn(monkeypatch):
    import importlib.util
    direct = load_dataset("digits")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)   # the bundled CSV is not found
    via_sklearn = load_dataset("digits")
    assert torch.equal(direct.train.x, via_sklearn.train.x) and torch.equal(direct.test.y, via_sklearn.test.y)


# --------------------------------------------------------------------------------------- CIFAR-10

def test_cifar10_folder(tmp_path):
    batches = _cifar_arrays()
    _write_cifar_folder(tmp_path, batches)
    with pytest.raises(DataError, match="do not match the canonical CIFAR-10 checksums.*verify=False"):
        load_dataset("cifar10", tmp_path, download=False)
    with pytest.warns(UserWarning, match="non-canonical cifar10"):
        b = load_dataset("cifar10", tmp_path, download=False, verify=False)
    xs, ys = _expected_cifar(batches)
    assert (b.num_classes, b.input_shape, b.canonical) == (10, (3, 32, 32), False)
    assert b.train.x.shape == (15, 3, 32, 32) and b.test.x.shape == (4, 3, 32, 32)
    assert b.train.y.tolist() == ys.tolist()
    torch.testing.assert_close(b.train.x, _normalised(xs, fd._CIFAR_MEAN, fd._CIFAR_STD))
    assert b.classes[0] == "airplane"


def test_cifar10_archive_in_data_dir_and_cache(tmp_path, monkeypatch):
    batches = _cifar_arrays(seed=1)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(_cifar_tar_bytes(batches))
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", tmp_path, download=False)
    msg = _one_line(ei.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg and "md5" in msg and "verify=False" in msg
    with pytest.warns(UserWarning):
        b = load_dataset("cifar10", tmp_path, download=False, verify=False)
    xs, ys = _expected_cifar(batches)
    assert b.train.y.tolist() == ys.tolist()
    torch.testing.assert_close(b.train.x, _normalised(xs, fd._CIFAR_MEAN, fd._CIFAR_STD))
    assert not (tmp_path / "cifar-10-batches-py").exists()            # read in place, never extracted
    caches = list(tmp_path.glob("cifar10-*.fedrac-cache.pt"))
    assert len(caches) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded again instead of using the cache")
    monkeypatch.setattr(fd._Cifar10, "decode", no_decode)
    with pytest.warns(UserWarning):
        b2 = load_dataset("cifar10", tmp_path, download=False, verify=False)
    assert torch.equal(b.train.x, b2.train.x) and torch.equal(b.test.y, b2.test.y)
    with pytest.raises(DataError, match="verify=False"):                # the cache remembers the mismatch
        load_dataset("cifar10", tmp_path, download=False)
    os.utime(tmp_path / "cifar-10-python.tar.gz", ns=(1, 1))            # a changed source is decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("cifar10", tmp_path, download=False, verify=False)


def test_cifar10_explicit_archive_path(tmp_path):
    batches = _cifar_arrays(seed=2)
    src = tmp_path / "elsewhere" / "my-rebuilt-cifar.tar.gz"
    src.parent.mkdir()
    src.write_bytes(_cifar_tar_bytes(batches))
    data_dir = tmp_path / "data"
    with pytest.warns(UserWarning, match="my-rebuilt-cifar.tar.gz"):
        b = load_dataset("cifar10", data_dir, archive=src, verify=False, download=False)
    assert b.train.y.tolist() == _expected_cifar(batches)[1].tolist()
    assert len(list(data_dir.glob("cifar10-*.fedrac-cache.pt"))) == 1   # data_dir only receives the cache
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", data_dir, archive=tmp_path / "nope.tar.gz")


def test_cifar10_symlinked_under_canonical_name(tmp_path):
    src = tmp_path / "rebuilt.tar.gz"
    src.write_bytes(_cifar_tar_bytes(_cifar_arrays(seed=3)))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cifar-10-python.tar.gz").symlink_to(src)
    with pytest.warns(UserWarning):
        b = load_dataset("cifar10", data_dir, verify=False, download=False)
    assert len(b.train) == 15


def test_cifar10_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))
    folder = _write_cifar_folder(tmp_path, _cifar_arrays())
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DataError, match="data_batch_3.*refusing to load builtins.print"):
        load_dataset("cifar10", tmp_path, download=False, verify=False)


def test_cifar10_malformed_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar archive at all")
    with pytest.raises(DataError, match="not a readable tar archive"):
        load_dataset("cifar10", tmp_path, download=False, verify=False)


# ------------------------------------------------------------------------------------------ SVHN

def test_svhn_mat(tmp_path):
    import scipy.io
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8)
    y_tr = np.array([[1], [10], [3], [10], [9], [2]], dtype=np.uint8)
    x_te = rng.integers(0, 256, (32, 32, 3, 2), dtype=np.uint8)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x_tr, "y": y_tr})
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x_te, "y": np.array([[10], [5]], dtype=np.uint8)})
    with pytest.raises(DataError, match="train_32x32.mat and test_32x32.mat.*verify=False"):
        load_dataset("svhn", tmp_path, download=False)
    with pytest.warns(UserWarning):
        b = load_dataset("svhn", tmp_path, download=False, verify=False)
    assert b.train.y.tolist() == [1, 0, 3, 0, 9, 2] and b.test.y.tolist() == [0, 5]   # label 10 is digit 0
    assert b.train.x.shape == (6, 3, 32, 32)
    expected = _normalised(np.transpose(x_tr, (3, 2, 0, 1)), fd._CIFAR_MEAN, fd._CIFAR_STD)  # CIFAR constants
    torch.testing.assert_close(b.train.x, expected)
    # pixel (row 5, column 7, channel 2) of image 4 lands at [4, 2, 5, 7]
    assert abs(float(b.train.x[4, 2, 5, 7]) - (x_tr[5, 7, 2, 4] / 255 - 0.4465) / 0.2010) < 1e-5
    with pytest.raises(DataError, match="no archive"):
        load_dataset("svhn", tmp_path, archive=tmp_path / "x.zip")


# ---------------------------------------------------------------------------------------- EMNIST

def _check_emnist(b, a):
    assert (b.num_classes, b.input_shape) == (62, (1, 28, 28))
    assert b.train.x.shape == (7, 1, 28, 28) and b.test.x.shape == (3, 1, 28, 28)
    assert b.train.y.tolist() == a["y_train"].tolist() and b.test.y.tolist() == [0, 61, 35]
    torch.testing.assert_close(b.train.x, _normalised(a["x_train"][:, None], (0.1307,), (0.3081,)))
    assert b.classes[61] == "z" and b.classes[10] == "A"


def test_emnist_loose_gz(tmp_path):
    a = _emnist_arrays()
    for name, blob in _emnist_blobs(a).items():
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match="7 train / 3 test samples, not the official 697932 / 116323"):
        load_dataset("emnist", tmp_path, download=False)
    with pytest.warns(UserWarning):
        b = load_dataset("emnist", tmp_path, download=False, verify=False)
    _check_emnist(b, a)


def test_emnist_in_gzip_zip(tmp_path):
    a = _emnist_arrays(seed=1)
    with zipfile.ZipFile(tmp_path / "gzip.zip", "w") as zf:
        for name, blob in _emnist_blobs(a).items():
            zf.writestr(f"gzip/{name}", blob)
        zf.writestr("gzip/emnist-letters-train-images-idx3-ubyte.gz", b"unused")
    with pytest.raises(DataError, match="gzip.zip.*md5"):
        load_dataset("emnist", tmp_path, download=False)
    with pytest.warns(UserWarning):
        b = load_dataset("emnist", tmp_path, download=False, verify=False)
    _check_emnist(b, a)


def test_emnist_bad_idx(tmp_path):
    a = _emnist_arrays()
    blobs = _emnist_blobs(a)
    blobs["emnist-byclass-train-labels-idx1-ubyte.gz"] = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 9) + b"\x01")
    for name, blob in blobs.items():
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match="header promises 9 bytes, file holds 1"):
        load_dataset("emnist", tmp_path, download=False, verify=False)


# ---------------------------------------------------------------------------------- Tiny-ImageNet

def _check_tiny(b):
    assert (b.num_classes, b.input_shape) == (200, (3, 32, 32))
    assert b.classes == ("n01000000", "n02000000", "n03000000")       # sorted wnids, like ImageFolder
    assert b.train.x.shape == (7, 3, 32, 32) and b.test.x.shape == (4, 3, 32, 32)
    assert b.train.y.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert b.test.y.tolist() == [1, 2, 0, 1]
    mean, std = fd._INFO["tinyimagenet"].mean, fd._INFO["tinyimagenet"].std
    red = b.train.x[:, 0] * std[0] + mean[0]                            # back to [0, 1]
    for i, cls in enumerate(b.train.y.tolist()):
        if i == 2:      # the grayscale image: R = G = B = 77
            assert abs(float(red[i].mean()) * 255 - 77) < 3
            continue
        assert abs(float(red[i].mean()) * 255 - TINY_RED[b.classes[cls]]) < 3


def test_tinyimagenet_folder(tmp_path):
    _write_tree(tmp_path / "tiny-imagenet-200", _tiny_tree())
    with pytest.raises(DataError, match="7 train / 4 test samples"):
        load_dataset("tinyimagenet", tmp_path, download=False)
    with pytest.warns(UserWarning):
        b = load_dataset("tinyimagenet", tmp_path, download=False, verify=False)
    _check_tiny(b)


def test_tinyimagenet_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "tiny-imagenet-200.zip", "w") as zf:
        for rel, blob in _tiny_tree().items():
            zf.writestr(f"tiny-imagenet-200/{rel}", blob)
    with pytest.warns(UserWarning):
        b = load_dataset("tinyimagenet", tmp_path, download=False, verify=False)
    _check_tiny(b)


# -------------------------------------------------------------------------- missing / download

MISSING = {"cifar10": "cifar-10-python.tar.gz", "svhn": "train_32x32.mat", "emnist": "gzip.zip",
           "tinyimagenet": "tiny-imagenet-200.zip"}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_files_name_file_and_folder(tmp_path, name, monkeypatch):
    _no_network(monkeypatch)
    empty = tmp_path / "empty"
    with pytest.raises(DataError) as ei:
        load_dataset(name, empty, download=False)
    msg = _one_line(ei.value)
    assert MISSING[name] in msg and str(empty) in msg and "download=False" in msg
    with pytest.raises(DataError) as ei:
        load_dataset(name, empty, download=True)
    msg = _one_line(ei.value)
    assert "failed" in msg and "network is unreachable" in msg and MISSING[name] in msg and str(empty) in msg
    assert not any(empty.rglob("*.part")) if empty.exists() else True


def test_download_writes_verified_file(tmp_path, monkeypatch):
    blob = _cifar_tar_bytes(_cifar_arrays(seed=4))
    monkeypatch.setattr(fd, "_CIFAR_ARCHIVE_MD5", hashlib.md5(blob).hexdigest())
    urls = []

    def fake_urlopen(request, timeout=None):
        urls.append(request.full_url)
        return io.BytesIO(blob)
    monkeypatch.setattr(fd.urllib.request, "urlopen", fake_urlopen)
    with pytest.warns(UserWarning, match="15 train / 4 test"):        # a tiny stand-in: counts differ
        b = load_dataset("cifar10", tmp_path / "d", verify=False)
    assert urls == [fd._CIFAR_URL]
    assert (tmp_path / "d" / "cifar-10-python.tar.gz").read_bytes() == blob
    assert len(b.train) == 15
    assert not list((tmp_path / "d").glob(".*.part"))


def test_download_corrupt_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(fd.urllib.request, "urlopen", lambda request, timeout=None: io.BytesIO(b"truncated"))
    with pytest.raises(DataError) as ei:
        load_dataset("cifar10", tmp_path)
    msg = _one_line(ei.value)
    assert "corrupt" in msg and fd._CIFAR_ARCHIVE_MD5 in msg and "cifar-10-python.tar.gz" in msg
    assert list(tmp_path.iterdir()) == []                               # nothing left behind


# ------------------------------------------------------------------------ the rebuilt CIFAR-10

@pytest.mark.slow
@pytest.mark.skipif(not REBUILT_CIFAR.is_file(), reason="the shared rebuilt CIFAR-10 archive is absent")
def test_rebuilt_cifar10_archive(request, tmp_path):
    # A persistent cache folder, so only the first run decodes the archive (a few seconds).
    # (no cache with `-p no:cacheprovider`, as gpu_session.sh runs pytest: then a fresh tmp_path)
    cache = getattr(request.config, "cache", None)
    data_dir = Path(cache.mkdir("fedrac-rebuilt-cifar10")) if cache is not None else tmp_path
    with pytest.raises(DataError, match="cf1121135ddaf878337296b3a233e2fd.*verify=False"):
        load_dataset("cifar10", data_dir, archive=REBUILT_CIFAR, download=False)
    with pytest.warns(UserWarning, match="non-canonical"):
        b = load_dataset("cifar10", data_dir, archive=REBUILT_CIFAR, verify=False, download=False)
    assert list(data_dir.glob("cifar10-*.fedrac-cache.pt"))
    assert (b.name, b.num_classes, b.canonical) == ("cifar10", 10, False)
    assert (len(b.train), len(b.test)) == (50_000, 10_000)
    assert b.train.x.shape == (50_000, 3, 32, 32) and b.train.x.dtype == torch.float32
    assert torch.bincount(b.train.y).tolist() == [5000] * 10
    assert torch.bincount(b.test.y).tolist() == [1000] * 10
    # normalised with the CIFAR-10 constants: channel means near 0
    assert b.train.x[:5000].mean(dim=(0, 2, 3)).abs().max() < 0.1
