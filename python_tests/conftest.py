"""Test setup. Without a GPU, Triton kernels run under its interpreter (TRITON_INTERPRET=1 must be set before
triton is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def force_backend(monkeypatch):
    """force_backend('cpu') sets CANDLE_EXT_BACKEND for one test."""
    def _force(name):
        monkeypatch.setenv("CANDLE_EXT_BACKEND", name)
    return _force


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster, and kinder to a shared 2-core machine. Training test
    modules use it for all their tests (pytestmark = pytest.mark.usefixtures("one_thread"))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
