"""Static checks of the GPU code, on every CI run, without a GPU.

1. Triton AOT: every kernel of candle_ext/triton/ compiles for sm_80 and sm_90 (Triton's ptxas) in every tile
   configuration its launchers can choose (enumerated from their LAUNCH_CONFIGS functions) and with every
   argument type and constexpr their launches use (recorded from the launchers themselves), with no local
   memory and within the target's shared memory. python_tests/triton_aot.py does the work; see its docstring.
2. CUDA binaries: in the built candle_ext._C (CI builds sm_90), with cuobjdump/nvdisasm, the packed binary
   conv's tensor-core kernels contain the 1-bit MMA (BMMA ... AND.POPC), the multi-resolution head's GEMMs
   contain HMMA, no kernel uses local memory (spills), and every kernel's static plus most dynamic shared
   memory fits the arch's per-block limit. Prints registers and shared memory per kernel.
3. Archs below 8.0: csrc/cuda/*.cu compiled to compute_75 PTX with nvcc: every kernel either writes memory or
   traps, so no kernel compiled out for old archs can run on an sm_80+ GPU (JIT from that PTX) as a silent
   no-op; the tensor-core kernels trap.

Each test skips, with the reason, when its tools (triton, ptxas, cuobjdump, nvdisasm, nvcc, c++filt) or a
CUDA build of candle_ext._C are missing. Run `pytest -s python_tests/test_gpu_static.py` to see the tables.
"""
from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import re
import shutil
import subprocess

import pytest

import triton_aot
from candle_ext import backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent

# Shared memory one block may use (opt-in maximum, bytes), by SASS arch.
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
              100: 227 * 1024, 103: 227 * 1024, 110: 227 * 1024, 120: 99 * 1024, 121: 99 * 1024}


# ---- tools ---------------------------------------------------------------------------------------------------

def _toolkit_bin():
    toolkit = backend.build_info("cuda_toolkit", "")
    if not toolkit:
        import importlib.util
        spec = importlib.util.spec_from_file_location("candle_setup", ROOT / "setup.py")
        setup = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(setup)
        toolkit = setup.find_cuda_toolkit() or ""
    return pathlib.Path(toolkit, "bin") if toolkit else None


@functools.lru_cache(maxsize=None)
def tool(name: str):
    """A CUDA binary tool: the toolkit's, else the one shipped in the triton wheel, else PATH; None if absent."""
    bin_dir = _toolkit_bin()
    if bin_dir and (bin_dir / name).is_file():
        return str(bin_dir / name)
    try:
        from triton import knobs
        path = getattr(knobs.nvidia, name).path
        if path and os.path.isfile(path):
            return path
    except Exception:  # noqa: BLE001 - no triton, or a triton without the tool
        pass
    return shutil.which(name)


def need(*names):
    missing = [n for n in names if tool(n) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found (CUDA toolkit bin/, triton's backends/nvidia/bin/, PATH)")
    return [tool(n) for n in names]


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stderr[-3000:]}"
    return out.stdout


# ---- 1. Triton ahead-of-time compilation -----------------------------------------------------------------------

def test_triton_kernels_compile_for_sm80_and_sm90(request):
    """Runs last: conftest.py starts python_tests/triton_aot.py in the background when this test is selected
    (or, when it did not, it runs here)."""
    why = triton_aot.unavailable()
    if why:
        pytest.skip(f"cannot compile Triton kernels ahead of time: {why}")
    background = getattr(request.config, "candle_triton_aot", None)
    if background is None:
        background = triton_aot.Background()
        request.addfinalizer(background.cleanup)
    rc, log, results = background.wait(timeout=3600)
    print(log)
    assert results is not None, f"triton_aot.py gave no results (exit status {rc}):\n{log[-5000:]}"
    failed = [r for r in results if r.get("error")]
    lines = [f"{r['kernel']} {'sm_%s' % r['arch'] if r['arch'] else '-'} {r['config']} "
             f"[{r.get('pointers', '')}]: {r['error']}" for r in failed]
    assert not failed, f"{len(failed)} Triton kernel configurations fail:\n" + "\n".join(lines[:60])
    assert rc == 0, log[-5000:]
    assert {r["arch"] for r in results if r.get("registers")} == {80, 90}


# ---- 2. CUDA binaries of candle_ext._C ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_so():
    mod = backend.compiled_module()
    if mod is None:
        pytest.skip(f"candle_ext._C is not built: {backend.status('cpu')[1]}")
    if not getattr(mod, "with_cuda", False):
        why = backend.build_info("cuda_skipped", "") or "no CUDA toolkit or a CPU build of torch at build time"
        pytest.skip(f"candle_ext._C was built without CUDA kernels ({why})")
    return mod.__file__


def _demangle(names):
    if not names:
        return {}
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, out.stdout.splitlines())) if out.returncode == 0 else {n: n for n in names}


def parse_res_usage(text, arch=None):
    """[(arch, mangled name, {REG, STACK, SHARED, LOCAL})] from `cuobjdump -res-usage` (`arch`: for a bare cubin,
    whose listing names none)."""
    rows, name = [], None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            rows.append((arch, name, dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))))
            name = None
    return rows


def parse_sass(text):
    """{(arch, mangled name): SASS text} from `cuobjdump -sass`."""
    out, arch, name, buf = {}, None, None, []
    for line in text.splitlines():
        m = re.match(r"\s*(?:arch = |code for )sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if name:
                out[(arch, name)] = "\n".join(buf)
            name, buf = m.group(1), []
            continue
        if name:
            buf.append(line)
    if name:
        out[(arch, name)] = "\n".join(buf)
    return out


def dynamic_smem(so_path):
    """{demangled-name prefix (no spaces): most dynamic shared memory the host code requests}, from the tables
    the .cu files export for this test (candle_ext_*_dynamic_smem)."""
    lib = ctypes.CDLL(so_path)
    table = {}
    for fn in ("candle_ext_binary_conv2d_dynamic_smem", "candle_ext_multires_head_dynamic_smem"):
        f = getattr(lib, fn)
        f.restype = ctypes.c_char_p
        for item in f().decode().split(";"):
            key, value = item.rsplit("=", 1)
            table[key] = int(value)
    return table


@pytest.fixture(scope="module")
def cuda_kernels(cuda_so):
    """Every kernel of candle_ext._C: arch, names, resources, SASS, dynamic shared memory."""
    cuobjdump, _ = need("cuobjdump", "nvdisasm")
    res = parse_res_usage(_run([cuobjdump, "-res-usage", cuda_so]))
    sass = parse_sass(_run([cuobjdump, "-sass", cuda_so]))
    names = _demangle(sorted({n for _, n, _ in res}))
    table = dynamic_smem(cuda_so)
    kernels = []
    for arch, mangled, usage in res:
        if "candle" not in mangled:
            continue
        pretty = names.get(mangled, mangled)
        flat = pretty.replace(" ", "")
        dyn = [v for k, v in table.items() if k in flat]
        assert len(dyn) <= 1, (pretty, dyn)
        kernels.append(dict(arch=arch, mangled=mangled, name=pretty, usage=usage, dynamic=dyn[0] if dyn else 0,
                            sass=sass.get((arch, mangled), "")))
    assert kernels, f"no candle kernels found in {cuda_so}"
    return kernels


def _short(name):
    name = name.replace("candle::(anonymous namespace)::", "").replace("void ", "")
    return re.sub(r"\(.*\)$", "", name)


def test_cuda_tensor_core_instructions(cuda_kernels):
    """The packed conv's tensor-core kernels use the 1-bit MMA in its AND form (SASS BMMA.<shape>.AND.POPC), the
    head's GEMM kernels HMMA; none of them traps (the __trap() fallback exists only below sm_80)."""
    bmma = re.compile(r"\bBMMA\.\S*AND\.POPC\b")
    families = {"bconv_tc_kernel": re.compile(r"\bBMMA\.\S*AND\.POPC\b"),
                "mr_forward_kernel": re.compile(r"\bHMMA\."), "mr_grad_weight_kernel": re.compile(r"\bHMMA\."),
                "mr_grad_feature_kernel": re.compile(r"\bHMMA\.")}
    seen = {f: 0 for f in families}
    problems = []
    for k in cuda_kernels:
        for family, pattern in families.items():
            if f"{family}<" not in k["name"]:
                continue
            seen[family] += 1
            if not k["sass"]:
                problems.append(f"sm_{k['arch']} {_short(k['name'])}: no SASS")
                continue
            if not pattern.search(k["sass"]):
                problems.append(f"sm_{k['arch']} {_short(k['name'])}: no {pattern.pattern} instruction")
            if "BPT.TRAP" in k["sass"]:
                problems.append(f"sm_{k['arch']} {_short(k['name'])}: traps (compiled without tensor cores)")
        if "bconv_tc_kernel<" in k["name"] and k["sass"]:
            print(f"sm_{k['arch']} {_short(k['name'])}: {sorted(set(bmma.findall(k['sass'])))}")
    problems += [f"no {family} kernel in the build" for family, count in seen.items() if not count]
    assert not problems, "\n".join(problems)


def test_cuda_kernels_resources(cuda_kernels):
    """No kernel uses local memory (register spills or local arrays), and static + the most dynamic shared
    memory the host code requests fits the arch's per-block limit. Prints the table."""
    print(f"\n{'arch':<6} {'REG':>4} {'STACK':>5} {'LOCAL':>5} {'SMEM static':>11} {'dynamic':>8} {'total':>7} "
          f"{'limit':>7}  kernel")
    problems = []
    for k in sorted(cuda_kernels, key=lambda k: (k["arch"], k["name"])):
        u = k["usage"]
        total = u["SHARED"] + k["dynamic"]
        limit = SMEM_LIMIT.get(k["arch"])
        print(f"sm_{k['arch']:<3} {u['REG']:>4} {u['STACK']:>5} {u['LOCAL']:>5} {u['SHARED']:>11} {k['dynamic']:>8} "
              f"{total:>7} {limit if limit else '?':>7}  {_short(k['name'])}")
        where = f"sm_{k['arch']} {_short(k['name'])}"
        if u["LOCAL"] + u["STACK"]:
            problems.append(f"{where}: uses local memory (LOCAL={u['LOCAL']} STACK={u['STACK']} bytes per thread)")
        if limit is None:
            problems.append(f"{where}: no shared-memory limit known for sm_{k['arch']} (add it to SMEM_LIMIT)")
        elif total > limit and _short(k["name"]).startswith(OPTIN_GATED):
            print(f"   {where}: over sm_{k['arch']}'s limit, never launched there (the plan checks "
                  "sharedMemPerBlockOptin first)")
        elif total > limit:
            problems.append(f"{where}: {total} bytes of shared memory per block, sm_{k['arch']} allows {limit}")
    assert not problems, "\n".join(problems)


# Kernels whose tile the host plan chooses only when the device's opt-in shared memory holds it (sm_86/89 allow
# 99 KB, the 128x128 tensor-core tile takes 104 KB): over an arch's limit they are built but never launched there.
OPTIN_GATED = ("bconv_tc_kernel<128, 128",)


def test_optin_gated_kernels_are_gated_in_the_host_plan():
    """The exemption above holds only while binary_conv2d.cu's plan keeps its opt-in check for the 128x128 tile."""
    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda", "binary_conv2d.cu")).read()
    assert "tc_smem_bytes<128, 128>() <= smem_optin" in src


# ---- 3. archs below 8.0 -----------------------------------------------------------------------------------------

def _ptx_entries(ptx):
    """{entry name: body} of a PTX module."""
    entries = {}
    for m in re.finditer(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\w+)\s*\(", ptx, re.M):
        start = ptx.index("{", m.end())
        end = re.compile(r"^}", re.M).search(ptx, start).start()
        entries[m.group(1)] = ptx[start:end]
    return entries


_WRITES = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:st(?!\.(?:shared|local|param))\.|atom\.|red\.)", re.M)


@pytest.fixture(scope="module")
def compute75_ptx(tmp_path_factory):
    """{.cu file: {kernel entry: PTX body}} for compute_75, compiled the way setup.py compiles (torch's nvcc
    flags), device code only."""
    (nvcc,) = need("nvcc")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    out_dir = tmp_path_factory.mktemp("ptx75")
    result = {}
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        ptx = out_dir / (cu.stem + ".ptx")
        _run([nvcc, "-ptx", "-arch=compute_75", "-std=c++17", "-O3", *COMMON_NVCC_FLAGS, f"-I{ROOT / 'csrc'}",
              str(cu), "-o", str(ptx)])
        result[cu.name] = _ptx_entries(ptx.read_text())
    return result


def test_kernels_below_sm80_trap_or_work(compute75_ptx, request):
    """A build for archs < 8.0 only ships compute_7x PTX that an sm_80+ GPU JIT-compiles. Every kernel in it must
    either write memory or trap: a kernel whose body was compiled out (#if __CUDA_ARCH__ >= 800) with nothing in
    its place would return without a result and without an error. The tensor-core kernels must trap."""
    names = _demangle(sorted(n for entries in compute75_ptx.values() for n in entries))
    problems, trapping = [], []
    for cu, entries in compute75_ptx.items():
        assert entries, f"no kernels in the compute_75 PTX of {cu}"
        for entry, body in entries.items():
            pretty = _short(names.get(entry, entry))
            if "trap;" in body:
                trapping.append(pretty)
            elif not _WRITES.search(body):
                problems.append(f"{cu}: {pretty} neither writes memory nor traps when compiled for compute_75")
    print("\ntrap below sm_80:", *sorted(trapping), sep="\n  ")
    for family in ("bconv_tc_kernel<", "mr_forward_kernel<", "mr_grad_weight_kernel<", "mr_grad_feature_kernel<"):
        if not any(family in t for t in trapping):
            problems.append(f"no {family[:-1]} kernel traps in the compute_75 PTX")
    # Where the built module can be read: every kernel that uses tensor cores there must trap below sm_80.
    try:
        built = request.getfixturevalue("cuda_kernels")
    except pytest.skip.Exception:
        built = []
    tensor_core = {_short(k["name"]) for k in built if re.search(r"\b[HBI]MMA\.", k["sass"])}
    problems += [f"{name} uses tensor cores on sm_80+ but does not trap below sm_80"
                 for name in sorted(tensor_core - set(trapping))]
    assert not problems, "\n".join(problems)
