"""Ahead-of-time compilation of every Triton kernel configuration of candle_ext/triton/, without a GPU.

    python python_tests/triton_aot.py [--arch 80 90] [--jobs N] [--json FILE] [--verbose]

Run with TRITON_INTERPRET unset (the kernels must be real @triton.jit functions, not interpreted ones);
python_tests/test_gpu_static.py runs it in a subprocess. What is compiled, and how the list is derived:

1. Tile configurations. Each op module lists in LAUNCH_CONFIGS the small *_config functions its launchers call
   to choose a kernel, its tile constexprs, num_warps and num_stages (candle_ext.triton.LaunchConfig, which also
   sets ptxas's register cap, maxnreg, from num_warps). Each
   function is evaluated on the cross product of its parameters: every value of a Literal or bool parameter,
   and for int parameters the sizes 1..3 and 2^k - 1, 2^k, 2^k + 1 up to 2^16 (the launchers' choices change
   at powers of two). The interpreter's tiles are never chosen here: this process is not interpreted.
2. Argument types and the other constexprs (dtypes, flags, 32/64-bit indexing). The public launchers are run
   on meta (or small CPU) tensors over their argument domain (every float dtype, with and without bias /
   scale / shift, each output dtype, NCHW and channels_last, both conv methods, a > 2^31-element conv, TF32 on
   and off, feature gradients on and off) with every kernel replaced by a recorder; each recorded launch gives a
   signature (pointer element types, 32/64-bit integers; pointers 16-byte aligned, as torch allocates them)
   and its non-tile constexprs. Device facts are taken as on a GPU: the multi-resolution head's TF32 choice is
   evaluated for a CUDA device. Every recorded launch must use a tile configuration from step 1 (a launcher
   that bypasses its config function fails here).
3. For every kernel: every recorded (signature, constexprs) x every tile configuration of that kernel, for each
   target (GPUTarget("cuda", arch, 32)): triton.compile to PTX and a cubin (Triton's ptxas), then
   `cuobjdump -res-usage` on the cubin. A configuration fails when it does not compile, uses local memory
   (LOCAL or STACK > 0: register spills or a local array), needs more registers than the register file holds
   for its threads, or needs more shared memory than the target gives one block.

Not enumerated: Triton's value specializations of integer arguments (an argument equal to 1 becomes a
constant, multiples of 16 get a divisibility hint) and unaligned pointers; those variants only drop code or
hints from the generic one compiled here.

Prints one line per (kernel, target): configurations compiled, registers per thread (min-max), shared memory
per block (max), local memory, and the configuration with the most registers; then every failure, with the
kernel, its configuration and the target. Exit status 1 when anything failed.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import typing
from collections import defaultdict
from contextlib import contextmanager

# Shared memory one block may use (the opt-in maximum), bytes, per compile target. sm_80 stands for the sm_8x
# GPUs, which Triton compiles the same way: sm_86 and sm_89 give a block 99 KB (sm_80 itself 163 KB).
SMEM_LIMIT = {80: 99 * 1024, 90: 227 * 1024}
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM (and per block) on sm_80 and sm_90
SIZES = sorted({1, 2, 3} | {2 ** k + d for k in range(2, 17) for d in (-1, 0, 1)})


def _triton_modules():
    import candle_ext.triton as pkg
    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def _jit_kernels(module):
    """Module-level @triton.jit functions named *_kernel: the kernels the launchers launch."""
    from triton.runtime.jit import JITFunction
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, JITFunction) and name.endswith("_kernel")}


def _kernel_name(kernel) -> str:
    return getattr(kernel, "name", None) or kernel.fn.__name__


# ---- 1. tile configurations ---------------------------------------------------------------------------------

def _domain(fn, name, hint):
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return list(typing.get_args(hint))
    if hint is bool:
        return [False, True]
    if hint is int:
        return SIZES
    raise TypeError(f"{fn.__module__}.{fn.__name__}: parameter {name} has type {hint!r}; a launch-config function "
                    "takes Literal[...], bool or int parameters only (so every value can be enumerated)")


def enumerate_tiles():
    """{kernel name: {LaunchConfig}} over the full domain of every LAUNCH_CONFIGS function."""
    tiles = defaultdict(set)
    for module in _triton_modules():
        for fn in getattr(module, "LAUNCH_CONFIGS", ()):
            hints = typing.get_type_hints(fn)
            hints.pop("return", None)
            names = list(hints)
            for values in itertools.product(*(_domain(fn, n, hints[n]) for n in names)):
                cfg = fn(**dict(zip(names, values)))
                tiles[_kernel_name(cfg.kernel)].add(cfg)
    return tiles


# ---- 2. recorded launches -----------------------------------------------------------------------------------

_TORCH_TO_TRITON = None


def _pointer_type(t) -> str:
    global _TORCH_TO_TRITON
    import torch
    if _TORCH_TO_TRITON is None:
        _TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                            torch.float64: "fp64", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32",
                            torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}
    return "*" + _TORCH_TO_TRITON[t.dtype]


def _scalar_type(v) -> str:
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot type the kernel argument {v!r}")


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) records the launch instead."""

    def __init__(self, kernel, calls):
        self.kernel, self.name, self.calls = kernel, _kernel_name(kernel), calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(self._describe(args, kwargs))
        return launch

    def _describe(self, args, kwargs):
        import torch
        params = self.kernel.params
        constexpr_names = {p.name for p in params if p.is_constexpr}
        signature, attrs = {}, []
        for i, (p, v) in enumerate(zip(params, args)):
            if p.is_constexpr:
                raise TypeError(f"{self.name}: constexpr {p.name} passed by position")
            if isinstance(v, torch.Tensor):
                signature[p.name] = _pointer_type(v)
                attrs.append(i)  # tensors from torch's allocators are 16-byte aligned
            else:
                signature[p.name] = _scalar_type(v)
        constexprs = {k: v for k, v in kwargs.items() if k in constexpr_names}
        options = {k: v for k, v in kwargs.items() if k not in constexpr_names}
        missing = [p.name for p in params if p.name not in signature and p.name not in constexprs]
        if missing:
            raise TypeError(f"{self.name}: launch without {missing}")
        for name in constexprs:
            signature[name] = "constexpr"
        return dict(kernel=self.name, signature=signature, constexprs=constexprs, attrs=attrs,
                    num_warps=options.get("num_warps"), num_stages=options.get("num_stages"),
                    maxnreg=options.get("maxnreg"), fp_fusion=options.get("enable_fp_fusion", True))


@contextmanager
def _recording(modules):
    calls, saved = [], []
    for module in modules:
        for name, kernel in _jit_kernels(module).items():
            saved.append((module, name, kernel))
            setattr(module, name, _Recorder(kernel, calls))
    try:
        yield calls
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def _sign_inputs(torch):
    meta = torch.device("meta")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.empty(2, 40, 5, 6, dtype=dtype, device=meta).contiguous(memory_format=fmt)
            for bias in (None, torch.empty(40, dtype=dtype, device=meta)):
                yield x, bias


def _exercise_sign_pack(module, torch):
    for x, bias in _sign_inputs(torch):
        module.sign_pack(x, bias)


def _exercise_sign_ste(module, torch):
    for x, bias in _sign_inputs(torch):
        module.sign_ste(x, bias)
        module.sign_ste_backward(torch.empty_like(x), x, bias)


def _exercise_binary_conv2d(module, torch):
    meta = torch.device("meta")
    sizes = [((2, 9, 9, 2), (16, 3, 3, 2)),            # 32-bit offsets
             ((2, 32768, 32768, 1), (8, 3, 3, 1))]     # > 2^31 elements: 64-bit offsets (IDX)
    scale = torch.empty(16, device=meta)
    for method in module.METHODS:
        for xs, ws in sizes:
            x = torch.empty(xs, dtype=torch.int32, device=meta)
            w = torch.empty(ws, dtype=torch.int32, device=meta)
            sc = scale[:ws[0]]
            module.binary_conv2d_packed(x, w, 32 * xs[3], (1, 1), (1, 1), (1, 1), method=method)
            for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
                for s, t in itertools.product((None, sc), (None, sc)):
                    module.binary_conv2d_packed(x, w, 32 * xs[3], (1, 1), (1, 1), (1, 1), s, t, out_dtype,
                                                method=method)


def _exercise_multires_head(module, torch):
    real_dot_types = module._dot_types
    module._dot_types = lambda dtypes, kernel, device: real_dot_types(dtypes, kernel, torch.device("cuda"))
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        for dtype, allow_tf32 in itertools.product((torch.float16, torch.bfloat16, torch.float32, torch.float64),
                                                   (False, True)):
            torch.backends.cudnn.allow_tf32 = allow_tf32
            sizes = [(2, 3), (4, 4), (7, 9)]
            feats = [torch.zeros(2, 12, h, w, dtype=dtype) for h, w in sizes]
            weights = [torch.zeros(5, 12, dtype=dtype) for _ in sizes]
            for biases in ([None] * 3, [torch.zeros(5, dtype=dtype) for _ in sizes]):
                out = module.multires_head(feats, weights, biases, 1)
                for features_grad in (False, True):
                    module.multires_head_backward(out, feats, weights, 1, features_grad)
    finally:
        module._dot_types = real_dot_types
        torch.backends.cudnn.allow_tf32 = tf32


EXERCISE = {"sign_pack": _exercise_sign_pack, "sign_ste": _exercise_sign_ste, "binary_conv2d": _exercise_binary_conv2d,
            "multires_head": _exercise_multires_head}


def record_launches():
    import torch
    modules = _triton_modules()
    with _recording(modules) as calls:
        for module in modules:
            short = module.__name__.rsplit(".", 1)[1]
            if short not in EXERCISE:
                raise RuntimeError(f"{module.__name__} has no exercise in {__file__}: add one, so its launches "
                                   "are compiled ahead of time too")
            EXERCISE[short](module, torch)
    return calls


# ---- 3. compile ---------------------------------------------------------------------------------------------

def _freeze(d):
    return tuple(sorted((k, repr(v)) for k, v in d.items()))


def build_jobs(archs):
    """(jobs, problems): one job per kernel x signature/constexprs x tile configuration x target."""
    tiles = enumerate_tiles()
    calls = record_launches()
    modules = _triton_modules()
    kernels = {name: m.__name__ for m in modules for name in _jit_kernels(m)}
    problems = []
    for name in sorted(kernels):
        if name not in tiles:
            problems.append(dict(kernel=name, arch=None, config="-", error="no LAUNCH_CONFIGS function chooses "
                                 "this kernel's tiles"))
        if not any(c["kernel"] == name for c in calls):
            problems.append(dict(kernel=name, arch=None, config="-", error="no launch of this kernel was recorded"))
    variants = defaultdict(dict)  # kernel -> {frozen (signature, flags): (signature, flags, attrs)}
    for call in calls:
        name = call["kernel"]
        options = [cfg for cfg in tiles.get(name, ())]
        tile_keys = {k for cfg in options for k, _ in cfg.constexprs}
        used = {k: v for k, v in call["constexprs"].items() if k in tile_keys}
        chosen = [cfg for cfg in options if dict(cfg.constexprs) == used and cfg.num_warps == call["num_warps"]
                  and cfg.num_stages == call["num_stages"] and cfg.max_registers == call["maxnreg"]]
        if not chosen:
            problems.append(dict(kernel=name, arch=None, config=_label(used, call["num_warps"], call["num_stages"]),
                                 error="a launcher used a configuration that its LAUNCH_CONFIGS function never "
                                       "returns"))
        if call["fp_fusion"] is not False:
            problems.append(dict(kernel=name, arch=None, config=_label(used, call["num_warps"], call["num_stages"]),
                                 error="a launch left floating-point contraction on (enable_fp_fusion): pass "
                                       "LaunchConfig.kwargs(), so that a*b + c rounds twice as in reference.py"))
        flags = {k: v for k, v in call["constexprs"].items() if k not in tile_keys}
        sig = {k: ("constexpr" if k in tile_keys else v) for k, v in call["signature"].items()}
        variants[name][(_freeze(sig), _freeze(flags))] = (sig, flags, call["attrs"])
    jobs = []
    for name in sorted(variants):
        for (sig, flags, attrs), cfg, arch in itertools.product(
                variants[name].values(), sorted(tiles.get(name, ()), key=lambda c: repr(c.kwargs())), archs):
            jobs.append(dict(module=kernels[name], kernel=name, arch=arch, signature=sig,
                             constexprs={**flags, **dict(cfg.constexprs)}, attrs=attrs,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.max_registers))
    return jobs, problems, tiles, calls


def _label(constexprs, num_warps, num_stages):
    parts = [f"{k}={getattr(v, 'name', v)}" for k, v in sorted(constexprs.items())]
    parts.append(f"warps={num_warps}")
    if num_stages is not None:
        parts.append(f"stages={num_stages}")
    return " ".join(parts)


def _cuobjdump():
    from triton import knobs
    try:
        path = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - a triton without the tool
        path = None
    return path or shutil.which("cuobjdump")


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# A float fused multiply-add in PTX (integer multiply-adds are mad.*, not matched). Checked in the kernels whose
# float results reference.py rounds step by step (the conv epilogue acc * scale + shift); elsewhere fma is how
# Triton lowers a float32 tl.dot without tensor cores, and the tolerances there are stated.
_FMA = re.compile(r"\bfma\.rn\.(?:ftz\.)?(?:f16x2|bf16x2|f16|bf16|f32|f64)\b")
_ROUNDED_STEP_BY_STEP = ("_conv_popc_kernel", "_conv_dot_kernel")


def compile_one(job):
    """Compile one job; returns its result (registers, memory, error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = _jit_kernels(importlib.import_module(job["module"]))[job["kernel"]]
    label = _label(job["constexprs"], job["num_warps"], job["num_stages"])
    types = " ".join(f"{k}:{v}" for k, v in job["signature"].items() if v != "constexpr" and v.startswith("*"))
    res = dict(kernel=job["kernel"], arch=job["arch"], config=label, pointers=types, error=None)
    options = {"num_warps": job["num_warps"], "maxnreg": job["maxnreg"], "enable_fp_fusion": False}  # as launched
    if job["num_stages"] is not None:
        options["num_stages"] = job["num_stages"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in job["attrs"]}
    start = time.time()
    try:
        src = ASTSource(kernel, job["signature"], job["constexprs"], attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=options)
    except Exception as e:  # noqa: BLE001 - every compile error is a test failure, reported with the config
        res["error"] = f"does not compile: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        return res
    res["seconds"] = round(time.time() - start, 2)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True)
    m = _RES.search(out.stdout)
    if out.returncode != 0 or not m:
        res["error"] = f"cuobjdump -res-usage failed: {out.stderr.strip() or out.stdout.strip()}"
        return res
    regs, stack, static_smem, local = map(int, m.groups())
    threads = compiled.metadata.num_warps * 32
    shared = compiled.metadata.shared + static_smem
    res.update(registers=regs, stack=stack, local=local, shared=shared, threads=threads,
               smem_limit=SMEM_LIMIT[job["arch"]])
    errors = []
    fused = sorted(set(_FMA.findall(compiled.asm["ptx"]))) if job["kernel"] in _ROUNDED_STEP_BY_STEP else []
    if fused:
        errors.append(f"contracts a*b + c into {', '.join(fused)} (rounds once where reference.py rounds twice)")
    if local or stack:
        errors.append(f"uses local memory: LOCAL={local} STACK={stack} bytes per thread (register spills or a "
                      "local array)")
    if regs * threads > REGISTER_FILE:
        errors.append(f"{regs} registers x {threads} threads exceed the {REGISTER_FILE}-register file")
    if shared > SMEM_LIMIT[job["arch"]]:
        errors.append(f"needs {shared} bytes of shared memory, sm_{job['arch']} gives a block at most "
                      f"{SMEM_LIMIT[job['arch']]}")
    res["error"] = "; ".join(errors) or None
    return res


def run(archs, jobs_n, verbose=False, kernels=None):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("triton_aot.py compiles real kernels: run it with TRITON_INTERPRET unset")
    why = unavailable()
    if why:
        raise SystemExit(f"cannot compile Triton kernels here: {why}")
    start = time.time()
    jobs, problems, tiles, calls = build_jobs(archs)
    if kernels:  # a subset, while retuning one kernel's tiles
        jobs = [j for j in jobs if j["kernel"] in kernels]
        problems = [p for p in problems if p["kernel"] in kernels]
    print(f"{len(calls)} launches recorded, {sum(len(v) for v in tiles.values())} tile configurations, "
          f"{len(jobs)} compilations for sm_{', sm_'.join(map(str, archs))} "
          f"({time.time() - start:.1f} s to enumerate)", flush=True)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(jobs_n) as pool:
        results = pool.map(compile_one, jobs, chunksize=4)
    results += problems
    summarize(results, verbose)
    print(f"triton AOT: {len(jobs)} compilations in {time.time() - start:.0f} s with {jobs_n} processes")
    return results


def summarize(results, verbose=False):
    groups = defaultdict(list)
    for r in results:
        if r.get("registers") is not None:
            groups[(r["kernel"], r["arch"])].append(r)
    print(f"{'kernel':<22} {'target':<6} {'configs':>7} {'regs':>8} {'smem max':>9} {'local':>5}  most registers")
    for (kernel, arch), rs in sorted(groups.items()):
        top = max(rs, key=lambda r: (r["registers"], r["shared"]))
        regs = f"{min(r['registers'] for r in rs)}-{top['registers']}"
        print(f"{kernel:<22} sm_{arch:<3} {len(rs):>7} {regs:>8} {max(r['shared'] for r in rs):>9} "
              f"{max(r['local'] + r['stack'] for r in rs):>5}  {top['config']} [{top['pointers']}]")
    if verbose:
        for r in sorted(results, key=lambda r: (r["kernel"], str(r["arch"]), r["config"])):
            if r.get("registers") is not None:
                print(f"  {r['kernel']} sm_{r['arch']} regs={r['registers']} smem={r['shared']} "
                      f"local={r['local']} {r['config']} [{r['pointers']}]")
    failed = [r for r in results if r.get("error")]
    for r in failed:
        target = f"sm_{r['arch']}" if r["arch"] else "-"
        print(f"FAIL {r['kernel']} {target} {r['config']} [{r.get('pointers', '')}]: {r['error']}")
    return failed


def unavailable():
    """Why this machine cannot compile Triton kernels ahead of time, or None when it can."""
    try:
        from triton import knobs
    except ImportError:
        return "the triton package is not installed"
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001 - triton raises when it finds no ptxas
        return f"triton finds no ptxas: {e}"
    if not ptxas:
        return "triton finds no ptxas"
    if not _cuobjdump():
        return "no cuobjdump (neither in the triton wheel nor on PATH)"
    return None


class Background:
    """This script running in a subprocess (its own process group), results in a temporary folder. Triton's
    cache goes there too (so every run compiles everything, and leaves nothing behind) unless
    CANDLE_TRITON_AOT_CACHE names a folder to keep it in (quick reruns)."""

    def __init__(self, archs=(80, 90), nice=0):
        self.dir = tempfile.mkdtemp(prefix="candle-triton-aot-")
        self.json = os.path.join(self.dir, "results.json")
        self.log = os.path.join(self.dir, "log.txt")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = os.environ.get("CANDLE_TRITON_AOT_CACHE") or os.path.join(self.dir, "cache")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--json", self.json, "--arch", *map(str, archs)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=(lambda: os.nice(nice)) if nice else None)

    def wait(self, timeout=None):
        """(exit status, printed output, results or None)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            rc = "timeout"
        with open(self.log) as f:
            log = f.read()
        results = None
        if os.path.exists(self.json):
            with open(self.json) as f:
                results = json.load(f)
        return rc, log, results

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--verbose", action="store_true", help="one line per compiled configuration")
    ap.add_argument("--kernel", action="append", help="compile only this kernel (repeatable)")
    args = ap.parse_args(argv)
    results = run(args.arch, max(1, args.jobs), args.verbose, args.kernel)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    # The checkout this file belongs to, not another install of candle_ext.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
