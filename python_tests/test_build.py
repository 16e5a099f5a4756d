"""The build: the CUDA toolkit is found despite a wrapper nvcc on PATH, and an install on a machine with a
toolkit and a CUDA build of torch really carries the CUDA kernels (so CI compiles them)."""
import importlib.util
import pathlib

import pytest
import torch

from candle_ext import backend

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("candle_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() itself only runs under __main__
    return mod


def test_wrapper_directory_is_not_a_toolkit(tmp_path):
    setup = _setup_module()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\nexec /usr/local/cuda/bin/nvcc \"$@\"\n")
    assert not setup._is_toolkit(str(tmp_path))  # no headers, no libcudart: torch would fail to link


def test_toolkit_found_and_cuda_kernels_built():
    setup = _setup_module()
    toolkit = setup.find_cuda_toolkit()
    if toolkit is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert setup._is_toolkit(toolkit)
    mod = backend.compiled_module()
    assert mod is not None, backend.status("cpu")[1]
    if backend.build_info("cuda_skipped", "") == "CANDLE_EXT_NO_CUDA is set":
        pytest.skip("this install was built with CANDLE_EXT_NO_CUDA=1")
    if torch.version.cuda:
        assert mod.with_cuda, "a CUDA toolkit and a CUDA build of torch are present, but _C has no CUDA kernels"
