"""Build candle_ext._C: C++ CPU kernels always; CUDA kernels when a CUDA build of torch and a CUDA toolkit are
both present (never decided from a visible GPU). Environment:
  CANDLE_EXT_NO_CUDA=1    skip the CUDA sources
  TORCH_CUDA_ARCH_LIST    archs to build (default "8.0;8.6;8.9;9.0+PTX")
  CUDA_HOME / CUDA_PATH   the toolkit, if it is not found by itself
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _is_toolkit(path):
    """A real CUDA toolkit: nvcc, the runtime headers and libcudart side by side."""
    if not path:
        return False
    targets = [os.path.join("targets", t, "lib") for t in ("x86_64-linux", "aarch64-linux", "sbsa-linux")]
    libs = [os.path.join(path, d) for d in ("lib64", "lib", *targets)]
    return (os.path.isfile(os.path.join(path, "bin", "nvcc"))
            and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
            and any(glob.glob(os.path.join(d, "libcudart*")) for d in libs))


def find_cuda_toolkit():
    """The toolkit directory, or None. A `nvcc` on PATH may be a wrapper script outside the toolkit (then torch
    would guess its parent and fail to link -lcudart), so every candidate is checked for a real toolkit."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_toolkit(path):
            return os.path.realpath(path)
    return None


def cuda_library_headers():
    """Header folders of the CUDA math libraries that pip-installed torch depends on (nvidia/cu13/include ...).
    A minimal toolkit (nvcc + cudart only) lacks cusparse.h/cublas_v2.h, which ATen's CUDA headers include."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "*", "include")))
    return [d for d in found if os.path.isdir(d)]


def main():
    import torch

    want_cuda = os.environ.get("CANDLE_EXT_NO_CUDA", "0") not in ("1", "true", "yes")
    toolkit = find_cuda_toolkit() if (want_cuda and torch.version.cuda) else None
    if toolkit:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it before that import.
        os.environ["CUDA_HOME"] = toolkit
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    import torch.utils.cpp_extension as cpp

    if toolkit:
        cpp.CUDA_HOME = toolkit
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    include_dirs = [os.path.join(ROOT, "csrc")]
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # torch adds the C++ standard it needs
    macros = []
    ext_cls = cpp.CppExtension
    kwargs = {}
    archs = ""
    why = ""
    if toolkit:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("WITH_CUDA", None))
        include_dirs += [d for d in cuda_library_headers()
                         if not os.path.exists(os.path.join(toolkit, "include", "cusparse.h"))]
        ext_cls = cpp.CUDAExtension
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        print(f"candle-ext: building CUDA kernels with the toolkit in {toolkit} for {archs}", file=sys.stderr)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        why = ("CANDLE_EXT_NO_CUDA is set" if not want_cuda else
               "torch is a CPU build" if not torch.version.cuda else "no CUDA toolkit was found")
        print(f"candle-ext: building CPU kernels only ({why})", file=sys.stderr)

    with open(os.path.join(ROOT, "candle_ext", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"CUDA_ARCHS = {archs!r}\nCUDA_TOOLKIT = {toolkit or ''!r}\nCUDA_SKIPPED = {why!r}\n"
                f"TORCH = {torch.__version__!r}\n")

    ext = ext_cls("candle_ext._C", sources, define_macros=macros, extra_link_args=["-fopenmp"],
                  include_dirs=include_dirs, **kwargs)
    setup(
        packages=find_packages(include=["candle_ext", "candle_ext.*"]),
        ext_modules=[ext],
        cmdclass={"build_ext": cpp.BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
