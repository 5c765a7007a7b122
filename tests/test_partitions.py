"""fedrac.partitions: POW / CLA / DIR / IID exactly per ALGORITHMS.md §2, parsing, errors, IO, plots."""
import json
import random

import numpy as np
import pytest
import torch

from fedrac.data import server_split
from fedrac.partitions import (PartitionError, PartitionSpec, load_partition, make_partition, parse_partition,
                               partition_counts, plot_partition, save_partition)

POW_SIZES_K10 = [236, 628, 1020, 1412, 1804, 2197, 2589, 2981, 3373, 3760]


@pytest.fixture(scope="module")
def cifar_like():
    """50,000 official-train labels (balanced, in a scrambled order) and the 45,000 / 5,000 server split."""
    labels = torch.from_numpy(np.random.default_rng(123).permutation(np.arange(50_000) % 10))
    pool, val = server_split(50_000, seed=0)
    return labels, pool, val


def _inside(indices, allowed, n=50_000):
    """Whether every index is in ``allowed`` (a boolean-mask test: torch.isin is slow on CPU)."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[allowed] = True
    return bool(mask[indices].all())


def _outside(indices, forbidden, n=50_000):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[forbidden] = True
    return not bool(mask[indices].any())


def _assert_disjoint(parts):
    cat = torch.cat(parts)
    assert cat.unique().numel() == cat.numel()


# ------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, kind, alpha", [
    ("pow", "pow", None), ("POW", "pow", None), (" cla ", "cla", None), ("iid", "iid", None),
    ("dir:3.0", "dir", 3.0), ("dir(3.0)", "dir", 3.0), ("DIR(7)", "dir", 7.0), ("dir: 0.5", "dir", 0.5),
    ("dir( 1e-1 )", "dir", 0.1),
])
def test_parse_valid(text, kind, alpha):
    spec = parse_partition(text)
    assert (spec.kind, spec.alpha) == (kind, alpha)
    assert parse_partition(spec) == spec
    assert parse_partition(str(spec)) == spec


@pytest.mark.parametrize("text", ["", "dir", "dir:", "dir()", "dir:0", "dir:-1", "dir:nan", "dir:inf", "dir(3",
                                  "dir:3)", "dir:3.0x", "pow2", "dirichlet:3", "shards", None, 3])
def test_parse_invalid(text):
    with pytest.raises(PartitionError) as ei:
        parse_partition(text)
    msg = str(ei.value)
    assert "\n" not in msg and "'pow', 'cla', 'iid', 'dir:<alpha>'" in msg


def test_spec_names():
    assert str(parse_partition("dir(3.0)")) == "dir:3" and parse_partition("dir:3").title == "DIR(3.0)"
    assert parse_partition("cla").title == "CLA"
    with pytest.raises(PartitionError):
        parse_partition(PartitionSpec("dir"))


# ----------------------------------------------------------------------------------------- POW

def test_pow_sizes_k10():
    labels = torch.zeros(45_000, dtype=torch.long)
    pool = torch.arange(45_000)
    parts = make_partition("pow", labels, pool, 10, 10, seed=0)
    assert [len(p) for p in parts] == POW_SIZES_K10
    assert sum(POW_SIZES_K10) == 20_000
    _assert_disjoint(parts)


def test_pow_iid_labels_and_official_indices(cifar_like):
    labels, pool, val = cifar_like
    parts = make_partition("pow", labels, pool, 10, 10, seed=0)
    assert [len(p) for p in parts] == POW_SIZES_K10
    _assert_disjoint(parts)
    cat = torch.cat(parts)
    assert _inside(cat, pool) and _outside(cat, val)
    share = partition_counts(parts, labels, 10)[-1] / POW_SIZES_K10[-1]
    assert np.abs(share - 0.1).max() < 0.03                          # pure quantity skew


def test_pow_other_k_and_cap():
    labels = torch.zeros(45_000, dtype=torch.long)
    parts = make_partition("pow", labels, torch.arange(45_000), 5, 10, seed=1)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 10_000 and sizes == sorted(sizes)
    # a small pool (digits: 1,295) caps the total at the pool size
    parts = make_partition("pow", torch.zeros(1438, dtype=torch.long), torch.arange(1295), 10, 10, seed=0)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1295 and sizes == sorted(sizes) and sizes[0] >= 1
    _assert_disjoint(parts)
    parts = make_partition("pow", torch.zeros(100, dtype=torch.long), torch.arange(100), 10, 10, seed=0,
                           samples_per_client=3)
    assert sum(len(p) for p in parts) == 30


def test_pow_too_many_clients():
    with pytest.raises(PartitionError, match="20 clients but only 10 pool samples"):
        make_partition("pow", torch.zeros(10, dtype=torch.long), torch.arange(10), 20, 10, seed=0)
    with pytest.raises(PartitionError, match="POW cannot give 10 clients"):
        make_partition("pow", torch.zeros(12, dtype=torch.long), torch.arange(12), 10, 10, seed=0)


# ----------------------------------------------------------------------------------------- CLA

CLA_K10 = [(1, 2000, 0), (2, 1000, 0), (3, 666, 2), (4, 500, 0), (5, 400, 0), (6, 333, 2), (7, 285, 5),
           (8, 250, 0), (9, 222, 2), (10, 200, 0)]


def test_cla_counts_k10(cifar_like):
    labels, pool, val = cifar_like
    parts = make_partition("cla", labels, pool, 10, 10, seed=0)
    assert [len(p) for p in parts] == [2000] * 10
    counts = partition_counts(parts, labels, 10)
    for k, (c, each, topup) in enumerate(CLA_K10):
        expected = [each] * (c - 1) + [each + topup] + [0] * (10 - c)
        assert counts[k].tolist() == expected, k
    cat = torch.cat(parts)
    assert _inside(cat, pool) and _outside(cat, val)
    assert cat.unique().numel() < cat.numel()                        # drawn with replacement


def test_cla_topups_are_removed_from_the_class_list(cifar_like):
    labels, pool, _ = cifar_like
    parts = make_partition("cla", labels, pool, 10, 10, seed=0)
    pool_labels = labels[pool]

    def class_list(c):                                                # the class's pool-order list
        return pool[pool_labels == c].tolist()
    assert parts[2][-2:].tolist() == class_list(2)[:2]                # client 2 tops up with the first two
    assert parts[5][-2:].tolist() == class_list(5)[:2]                # client 5: the first two of class 5
    assert parts[6][-5:].tolist() == class_list(6)[:5]                # client 6: five of class 6


def test_cla_emnist_62_classes():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 62, 30_000))
    pool = torch.arange(30_000)
    parts = make_partition("cla", labels, pool, 10, 62, seed=0)
    held = (partition_counts(parts, labels, 62) > 0).sum(axis=1)
    assert held.tolist() == [1, 7, 14, 21, 28, 34, 41, 48, 55, 62]   # int(linspace(1, 62, 10))
    assert [len(p) for p in parts] == [2000] * 10


def test_cla_more_classes_than_exist():
    labels = torch.arange(1000) % 5
    with pytest.raises(PartitionError, match="no sample of class 5.*num_classes"):
        make_partition("cla", labels, torch.arange(1000), 10, 10, seed=0)
    with pytest.raises(PartitionError, match="labels outside 0..3"):
        make_partition("cla", labels, torch.arange(1000), 10, 4, seed=0)


def test_cla_uses_its_own_random_stream(cifar_like):
    labels, pool, _ = cifar_like
    a = make_partition("cla", labels, pool, 10, 10, seed=5)
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)
    state = random.getstate()
    b = make_partition("cla", labels, pool, 10, 10, seed=5)
    assert random.getstate() == state                                 # global stream untouched
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------- DIR

@pytest.mark.parametrize("alpha", [3.0, 7.0])
def test_dir_sizes_skew_and_official_indices(cifar_like, alpha):
    labels, pool, val = cifar_like
    parts = make_partition(f"dir:{alpha}", labels, pool, 10, 10, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 45_000                                       # DIR divides the whole pool
    assert np.abs(sizes - 4500).max() < 0.15 * 4500                    # ~ pool / K each
    _assert_disjoint(parts)
    cat = torch.cat(parts)
    assert torch.equal(cat.sort().values, pool.sort().values)          # official indices of the pool ...
    assert _outside(cat, val)                                          # ... never the validation set
    share = partition_counts(parts, labels, 10) / sizes[:, None]
    # label skew, read through the official labels (positions used as indices would look i.i.d.)
    assert share.max(axis=1).mean() > 0.2
    assert (share < 0.02).sum() >= 3


def test_dir_more_skew_with_smaller_alpha(cifar_like):
    labels, pool, _ = cifar_like

    def spread(alpha):
        parts = make_partition(f"dir:{alpha}", labels, pool, 10, 10, seed=0)
        share = partition_counts(parts, labels, 10) / np.array([len(p) for p in parts])[:, None]
        return share.std()
    assert spread(0.5) > spread(3.0) > spread(100.0)


def test_dir_shuffled_within_client(cifar_like):
    labels, pool, _ = cifar_like
    parts = make_partition("dir:3.0", labels, pool, 10, 10, seed=0)
    first = labels[parts[0][:200]]
    assert first.unique().numel() > 1                                  # not grouped by label


def test_dir_imbalance(cifar_like):
    labels, pool, _ = cifar_like
    parts = make_partition("dir:3.0", labels, pool, 10, 10, seed=0, imbalance=0.5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 45_000 and sizes.std() > 500


# ----------------------------------------------------------------------------------------- IID

def test_iid(cifar_like):
    labels, pool, val = cifar_like
    parts = make_partition("iid", labels, pool, 10, 10, seed=0)
    assert [len(p) for p in parts] == [4500] * 10
    _assert_disjoint(parts)
    assert _outside(torch.cat(parts), val)
    parts = make_partition("iid", labels, pool[:103], 10, 10, seed=0)
    assert [len(p) for p in parts] == [11, 11, 11] + [10] * 7
    parts = make_partition("iid", labels, pool, 10, 10, seed=0, imbalance=0.3)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 45_000 and len(set(sizes)) > 1


def test_imbalance_only_for_dir_and_iid(cifar_like):
    labels, pool, _ = cifar_like
    with pytest.raises(PartitionError, match="imbalance applies to dir and iid"):
        make_partition("pow", labels, pool, 10, 10, seed=0, imbalance=0.5)


# --------------------------------------------------------------------------- seeds and validation

@pytest.mark.parametrize("spec", ["pow", "cla", "dir:3.0", "iid"])
def test_seed_reproducible_and_independent(cifar_like, spec):
    labels, pool, _ = cifar_like
    a = make_partition(spec, labels, pool, 10, 10, seed=0)
    # the global random streams (training seeds) neither influence the partition nor are advanced by it
    np.random.seed(1)
    torch.manual_seed(1)
    random.seed(1)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    b = make_partition(spec, labels, pool, 10, 10, seed=0)
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = make_partition(spec, labels, pool, 10, 10, seed=1)
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    assert all(p.dtype == torch.int64 and p.dim() == 1 for p in a)


def test_accepts_numpy_and_lists(cifar_like):
    labels, pool, _ = cifar_like
    a = make_partition("iid", labels, pool, 4, 10, seed=3)
    b = make_partition("iid", labels.numpy(), pool.numpy().tolist(), 4, 10, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bad_requests():
    labels, pool = torch.zeros(100, dtype=torch.long), torch.arange(100)
    with pytest.raises(PartitionError, match="num_clients must be >= 1"):
        make_partition("iid", labels, pool, 0, 10, seed=0)
    with pytest.raises(PartitionError, match="num_clients must be an integer"):
        make_partition("iid", labels, pool, 2.5, 10, seed=0)
    with pytest.raises(PartitionError, match="101 clients but only 100 pool samples: use at most 100"):
        make_partition("dir:3", labels, pool, 101, 10, seed=0)
    with pytest.raises(PartitionError, match="outside 0..99"):
        make_partition("iid", labels, torch.tensor([5, 100]), 1, 10, seed=0)
    with pytest.raises(PartitionError, match="duplicate"):
        make_partition("iid", labels, torch.tensor([5, 5]), 1, 10, seed=0)
    with pytest.raises(PartitionError, match="empty"):
        make_partition("iid", labels, torch.tensor([], dtype=torch.long), 1, 10, seed=0)
    with pytest.raises(PartitionError, match="invalid partition"):
        make_partition("dirichlet", labels, pool, 2, 10, seed=0)


# ---------------------------------------------------------------------------------- IO and plots

def test_counts_save_load_roundtrip(tmp_path, cifar_like):
    labels, pool, _ = cifar_like
    parts = make_partition("dir:3.0", labels, pool, 10, 10, seed=0)
    counts = partition_counts(parts, labels, 10)
    assert counts.dtype == np.int64 and counts.shape == (10, 10) and counts.sum() == 45_000
    path = save_partition(parts, tmp_path / "sub" / "part.json", meta={"spec": "dir:3", "seed": 0})
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["part.json"]   # no temporary left
    back, meta = load_partition(path, return_meta=True)
    assert meta == {"spec": "dir:3", "seed": 0}
    assert all(torch.equal(a, b) and b.dtype == torch.int64 for a, b in zip(parts, back))
    doc = json.loads(path.read_text())
    assert doc["format"] == "fedrac-partition" and doc["num_clients"] == 10


def test_load_partition_errors(tmp_path):
    with pytest.raises(PartitionError, match="does not exist"):
        load_partition(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PartitionError, match="not a readable partition file"):
        load_partition(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"clients": [[1, 2]]}))
    with pytest.raises(PartitionError, match="not a fedrac partition file"):
        load_partition(tmp_path / "other.json")


@pytest.mark.parametrize("num_classes", [10, 62])
def test_plot_partition(tmp_path, num_classes):
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, num_classes, 5000))
    parts = make_partition("cla", labels, torch.arange(5000), 10, num_classes, seed=0, samples_per_client=100)
    path = plot_partition(parts, labels, num_classes, tmp_path / "p.png", title="CLA")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
