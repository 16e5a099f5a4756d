"""Test setup. Without a GPU, Triton kernels run under its interpreter (TRITON_INTERPRET=1 must be set before
triton is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


TRITON_AOT_TEST = "test_gpu_static.py::test_triton_kernels_compile_for_sm80_and_sm90"


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(config, items):
    _start_triton_aot(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _start_triton_aot(config, items):
    """The Triton ahead-of-time compile (test_gpu_static.py, python_tests/triton_aot.py) takes minutes of CPU:
    start it in the background at the lowest priority as soon as its test is selected, so that it uses the CPU
    the other tests leave idle, and run its test last, where it collects the results."""
    selected = [item for item in items if item.nodeid.endswith(TRITON_AOT_TEST)]
    if not selected or config.option.collectonly:
        return
    items.remove(selected[0])
    items.append(selected[0])
    import triton_aot
    if triton_aot.unavailable() is None:
        config.candle_triton_aot = triton_aot.Background(nice=19)


def pytest_unconfigure(config):
    background = getattr(config, "candle_triton_aot", None)
    if background is not None:
        background.cleanup()


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
