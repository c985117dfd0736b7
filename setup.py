"""Build the compiled backends of neuraldb_kernels.

`pip install --no-build-isolation -e .` builds:
- `neuraldb_kernels._cpu` from csrc/cpu/*.cpp (always; OpenMP, AVX2 paths chosen at run time);
- `neuraldb_kernels._cuda` from csrc/cuda/*.cu + csrc/cuda/*.cpp when torch is a CUDA build and
  nvcc is found, or when FORCE_CUDA=1 (TORCH_CUDA_ARCH_LIST picks the architectures).

Build knobs (environment variables):
- FORCE_CUDA=1      build the CUDA extension even without a visible GPU.
- SKIP_CUDA=1       never build the CUDA extension.
- SKIP_CPU_EXT=1    do not build the C++ CPU extension (the "torch" backend still works).
- MAX_JOBS=N        parallel compile jobs (read by torch.utils.cpp_extension).
- NEURALDB_DEBUG=1  compile with -O0 -g.
"""

import glob
import os
import shutil

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
except ImportError as exc:  # pragma: no cover - exercised only on a machine without torch
    raise SystemExit(
        "neuraldb_kernels builds its C++ kernels against the installed torch, and torch is not "
        "installed. Install torch first (CPU build: `pip install torch==2.13.0`), then run "
        "`pip install --no-build-isolation -e .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _sources(*patterns: str) -> list:
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join("csrc", pattern)))
    return found


def _optimisation_flags() -> list:
    return ["-O0", "-g"] if _flag("NEURALDB_DEBUG") else ["-O3"]


def cpu_extension():
    sources = _sources("cpu/*.cpp")
    if _flag("SKIP_CPU_EXT") or not sources:
        return None
    return CppExtension(
        name="neuraldb_kernels._cpu",
        sources=sources,
        extra_compile_args={"cxx": _optimisation_flags() + ["-fopenmp", "-std=c++17"]},
        extra_link_args=["-fopenmp"],
    )


def _want_cuda() -> bool:
    if _flag("SKIP_CUDA"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc


def cuda_extension():
    sources = _sources("cuda/*.cu", "cuda/*.cpp")
    if not sources or not _want_cuda():
        return None
    return CUDAExtension(
        name="neuraldb_kernels._cuda",
        sources=sources,
        extra_compile_args={
            "cxx": _optimisation_flags() + ["-std=c++20"],  # torch's own headers expect C++20
            "nvcc": _optimisation_flags() + ["-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )


extensions = [ext for ext in (cpu_extension(), cuda_extension()) if ext is not None]

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
