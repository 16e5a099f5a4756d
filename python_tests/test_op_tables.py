"""The op tables (backend.OpTable): what they declare, that the custom ops and the frozen fast path dispatch from
them, what `python -m candle_ext.info` prints from them, and the one-way imports of the op layer."""
import ast
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

import candle_ext
from candle_ext import backend, reference as R
conv_module = importlib.import_module("candle_ext.ops.binary_conv2d")  # the module, not the function

OPS = {"sign_pack", "sign_ste", "sign_ste_backward", "binary_conv2d", "multires_head", "multires_head_backward"}


def test_every_op_has_one_table():
    assert OPS <= set(backend.TABLES)  # a new op brings its own table, checked like these
    for name, table in backend.TABLES.items():
        assert table.name == name
        assert table.backends == tuple(b for b in backend.ORDER if table.get(b) is not None)
        assert table.backends[-1] == "reference"
        for impl in table.impls:
            assert callable(impl.fn) and impl.dtypes and impl.devices == backend.DEVICES[impl.backend]


def test_a_table_refuses_unknown_duplicate_or_missing_backends():
    ref = backend.Impl("reference", (torch.float32,), lambda x: x)
    for impls in ((ref, ref), (backend.Impl("tpu", (torch.float32,), lambda x: x), ref),
                  (backend.Impl("cpu", (torch.float32,), lambda x: x),)):
        with pytest.raises(ValueError, match="distinct names"):
            backend.OpTable("test_bad_table", arg=lambda x: x, impls=impls)
    assert "test_bad_table" not in backend.TABLES


def _toy_table(monkeypatch, name):
    """A table whose cuda kernel takes float32 only; registered for this test alone."""
    monkeypatch.setattr(backend, "TABLES", dict(backend.TABLES))
    return backend.OpTable(name, arg=lambda x: x, impls=(
        backend.Impl("cuda", (torch.float32,), lambda x: "cuda"),
        backend.Impl("triton", (torch.float32, torch.float64), lambda x: "triton"),
        backend.Impl("cpu", (torch.float32, torch.float64), lambda x: "cpu"),
        backend.Impl("reference", (torch.float32, torch.float64, torch.float16), lambda x: "reference"),
    ))


@pytest.mark.parametrize("triton_ok", [True, False])
def test_a_dtype_the_chosen_kernel_lacks_goes_to_the_next_backend_of_its_devices(monkeypatch, triton_ok):
    table = _toy_table(monkeypatch, "toy")
    monkeypatch.setattr(backend, "select", lambda op, device_type, impls: "cuda")
    monkeypatch.setattr(backend, "status", lambda name: (name != "triton" or triton_ok, ""))
    assert backend.choose(table, "cuda", torch.float32).backend == "cuda"
    # float64: never the cpu kernel for a CUDA tensor, even though it is available and takes float64.
    assert backend.choose(table, "cuda", torch.float64).backend == ("triton" if triton_ok else "reference")
    assert backend.choose(table, "cuda", torch.float16).backend == "reference"
    assert backend.dispatch(table, torch.zeros(1, dtype=torch.float64)) == ("triton" if triton_ok else "reference")


def test_custom_op_bodies_dispatch_from_their_tables(monkeypatch):
    """Each public op reaches backend.dispatch with its own table, once per custom op it runs."""
    seen = []
    real = backend.dispatch

    def spy(table, *args):
        seen.append(table.name)
        return real(table, *args)

    monkeypatch.setattr(backend, "dispatch", spy)
    x = torch.randn(2, 40, 5, 6, requires_grad=True)
    candle_ext.sign_pack(x.detach())
    candle_ext.sign_ste(x).sum().backward()
    candle_ext.binary_conv2d(x.detach(), torch.randn(8, 40, 3, 3), padding=1)
    feats = [torch.randn(1, 4, s, s, requires_grad=True) for s in (4, 6, 8)]
    candle_ext.multires_head(feats, [torch.randn(3, 4) for _ in feats]).sum().backward()
    assert seen == ["sign_pack", "sign_ste", "sign_ste_backward", "sign_pack", "sign_pack", "binary_conv2d",
                    "multires_head", "multires_head_backward"]


def test_env_key_follows_the_environment(monkeypatch):
    """backend.env_key (the chain's per-call cache key) changes exactly when a named variable is set, changed or
    unset, through os.environ and through monkeypatch alike."""
    names = ("CANDLE_EXT_TEST_A", "CANDLE_EXT_TEST_B")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    unset = backend.env_key(names)
    assert backend.env_key(names) == unset
    monkeypatch.setenv("CANDLE_EXT_TEST_A", "1")
    one = backend.env_key(names)
    assert one != unset
    monkeypatch.setenv("CANDLE_EXT_TEST_A", "2")
    assert backend.env_key(names) not in (unset, one)
    os.environ["CANDLE_EXT_TEST_A"] = "1"
    assert backend.env_key(names) == one
    del os.environ["CANDLE_EXT_TEST_A"]
    assert backend.env_key(names) == unset
    monkeypatch.setenv("CANDLE_EXT_TEST_B", "")  # set but empty is not unset
    assert backend.env_key(names) != unset


def test_chain_follows_the_cpu_isa_variable(monkeypatch):
    """packed_chain_available reads CANDLE_EXT_CPU_ISA on every call (the kernels do): portable turns the one-pass
    chain off and unsetting it turns it back on, without clearing any cache."""
    if backend.compiled_module() is None:
        pytest.skip("candle_ext._C is not built")
    monkeypatch.delenv("CANDLE_EXT_BACKEND", raising=False)
    monkeypatch.delenv("CANDLE_EXT_CPU_ISA", raising=False)
    x = torch.randn(1, 8, 4, 4)
    native = conv_module.packed_chain_available(x)
    assert native == (backend.compiled_module().cpu_isa() in ("avx2", "avx512"))
    monkeypatch.setenv("CANDLE_EXT_CPU_ISA", "portable")
    assert not conv_module.packed_chain_available(x)
    monkeypatch.delenv("CANDLE_EXT_CPU_ISA")
    assert conv_module.packed_chain_available(x) == native


def test_frozen_fast_path_follows_the_tables(monkeypatch):
    """packed_inference_conv / the packed chain take the cpu kernels exactly when the tables choose cpu."""
    if backend.compiled_module() is None:
        pytest.skip("candle_ext._C is not built")
    monkeypatch.setattr(conv_module, "_chain_cache", {})
    monkeypatch.delenv("CANDLE_EXT_BACKEND", raising=False)
    assert conv_module.cpu_kernels_serve(torch.float32)
    monkeypatch.setenv("CANDLE_EXT_BACKEND", "reference")
    assert not conv_module.cpu_kernels_serve(torch.float32)
    assert not conv_module.packed_chain_available(torch.randn(1, 3, 4, 4))
    # A table that no longer lists a cpu kernel for sign_pack turns the fast path off.
    monkeypatch.delenv("CANDLE_EXT_BACKEND", raising=False)
    table = conv_module.SIGN_PACK
    monkeypatch.setattr(backend, "TABLES", dict(backend.TABLES))  # the stand-in registers itself here only
    monkeypatch.setattr(conv_module, "SIGN_PACK", backend.OpTable(
        "sign_pack", arg=table.arg, impls=tuple(i for i in table.impls if i.backend != "cpu")))
    assert not conv_module.cpu_kernels_serve(torch.float32)
    # ... and the same values come from the custom ops and eager ops.
    x, thr = torch.randn(1, 40, 6, 6), torch.randn(40)
    w = R.sign_pack(torch.randn(8, 40, 3, 3))
    scale, shift = torch.rand(8) + 0.1, torch.randn(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = conv_module.packed_inference_conv(x, thr, w, 40, (1, 1), (1, 1), (1, 1), scale, shift)
    want = R.binary_conv2d_packed(R.sign_pack(x, thr), w, 40, (1, 1), (1, 1), (1, 1), scale, shift, torch.float32)
    assert torch.equal(got, want)


def test_info_prints_the_coverage_of_every_op():
    env = dict(os.environ)
    env.pop("CANDLE_EXT_BACKEND", None)
    out = subprocess.run([sys.executable, "-m", "candle_ext.info"], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(candle_ext.__file__)), check=True).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0] in backend.TABLES and parts[1] in backend.ORDER:
            rows[(parts[0], parts[1])] = (parts[2], parts[-1])
    expected = {(name, b) for name, t in backend.TABLES.items() for b in t.backends}
    assert set(rows) == expected, out
    assert rows[("multires_head", "cuda")][0] == "cuda"
    assert "f64" not in next(line for line in out.splitlines() if line.split()[:2] == ["multires_head", "cuda"])
    for (name, b), (_, here) in rows.items():
        if b in ("reference", "cpu"):  # the others depend on environment variables of the child process
            assert here == ("yes" if backend.status(b)[0] else "no"), (name, b)


def test_info_reports_a_bad_backend_variable_instead_of_dying():
    """The diagnostic tool is what a user runs when something is wrong: a bad CANDLE_EXT_BACKEND is a line of
    its report (as a bad CANDLE_EXT_CPU_ISA is), not a traceback."""
    env = dict(os.environ, CANDLE_EXT_BACKEND="bogus")
    run = subprocess.run([sys.executable, "-m", "candle_ext.info"], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(candle_ext.__file__)))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("forced by CANDLE_EXT_BACKEND"))
    assert "invalid" in line and "'bogus' is not a backend" in line, line
    assert "op coverage" in run.stdout


def _candle_imports(path):
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("candle_ext"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("candle_ext"):
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_op_layer_imports_one_way():
    """ops -> backend -> (triton | reference); backend.py and reference.py import no other candle_ext module, the
    Triton kernels never import the ops, and the ops import nothing above them."""
    pkg = os.path.dirname(candle_ext.__file__)
    assert _candle_imports(os.path.join(pkg, "backend.py")) == set()
    assert _candle_imports(os.path.join(pkg, "reference.py")) == set()
    above = ("candle_ext.nn", "candle_ext.models", "candle_ext.train", "candle_ext.data", "candle_ext.cli",
             "candle_ext.info")
    for folder, banned in (("triton", above + ("candle_ext.ops",)), ("ops", above)):
        for f in os.listdir(os.path.join(pkg, folder)):
            if f.endswith(".py"):
                bad = [m for m in _candle_imports(os.path.join(pkg, folder, f)) if m.startswith(banned)]
                assert not bad, f"candle_ext/{folder}/{f} imports {bad}"
