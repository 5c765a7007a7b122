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
def gen():
    """A fresh, seeded generator per test (inputs are random, never all zeros)."""
    return torch.Generator().manual_seed(1234)
