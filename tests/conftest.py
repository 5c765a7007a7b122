"""Shared test set-up.

Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before any
module defining a @triton.jit kernel is imported, so it is set here, first thing.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))

HAS_CUDA = torch.cuda.is_available()
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """One torch CPU thread for the test (tiny shapes: a second OpenMP thread only adds stalls on a
    shared, loaded machine); restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (inputs are random, never all zeros)."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    """A CLI test's working folder: the current directory (default ./runs lands here) with its own
    data folder (FEDRAC_DATA_DIR)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDRAC_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def one_line_error(code, err, *words):
    """A usage error: exit code 2 and exactly one line ``fedrac: error: ...`` naming every word."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedrac: error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
