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

An unchanged rebuild is a no-op: after compiling an extension we record a fingerprint of its
inputs (every file in its source directories, setup.py, the compile and link flags, the compiler
environment, torch's and Python's versions) and the SHA-256 of the library built, under build/. A
later build whose inputs hash the same and whose in-place library is still that file reuses it
instead of compiling (pip's editable builds compile in a fresh temporary directory every time).
Delete build/ or the library to force a rebuild.
"""

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig

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


def _sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# compiler environment that changes the library without changing any file we hash
_BUILD_ENVIRONMENT = ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME")


def _input_fingerprint(ext) -> str:
    """SHA-256 over everything that decides what `ext` compiles to."""
    source_dirs = sorted({os.path.dirname(os.path.abspath(source)) for source in ext.sources})
    files = sorted(path for directory in source_dirs for path in glob.glob(os.path.join(directory, "*"))
                   if os.path.isfile(path))
    record = {
        "files": {os.path.relpath(path, ROOT): _sha256_of_file(path) for path in files},
        "setup.py": _sha256_of_file(os.path.join(ROOT, "setup.py")),
        "name": ext.name,
        "compile_args": ext.extra_compile_args,
        "link_args": ext.extra_link_args,
        "macros": ext.define_macros,
        "include_dirs": ext.include_dirs,
        "environment": {name: os.environ.get(name) for name in _BUILD_ENVIRONMENT},
        "torch": [torch.__version__, torch.version.cuda, os.path.dirname(torch.__file__)],
        "python": [sys.version, sysconfig.get_config_var("EXT_SUFFIX")],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


class SkipUnchangedBuildExtension(BuildExtension):
    """torch's BuildExtension that reuses an extension's in-place library when neither its inputs
    (see `_input_fingerprint`) nor the library changed since we built it."""

    def _stamp_path(self, ext) -> str:
        return os.path.join(ROOT, "build", "extension-stamps", f"{ext.name}.json")

    def _in_place_library(self, ext) -> str:
        return os.path.join(ROOT, *ext.name.split(".")[:-1], os.path.basename(self.get_ext_filename(ext.name)))

    def _reusable_library(self, ext, fingerprint: str):
        """The in-place library built from exactly these inputs, or None."""
        library = self._in_place_library(ext)
        try:
            with open(self._stamp_path(ext)) as file:
                stamp = json.load(file)
        except (OSError, ValueError):
            return None
        if not (isinstance(stamp, dict) and stamp.get("inputs") == fingerprint and os.path.isfile(library)):
            return None
        return library if stamp.get("library_sha256") == _sha256_of_file(library) else None

    def build_extension(self, ext) -> None:
        fingerprint = _input_fingerprint(ext)
        output = self.get_ext_fullpath(ext.name)
        library = self._reusable_library(ext, fingerprint)
        if library is not None:
            print(f"{ext.name}: sources, flags and torch unchanged since the last build; reusing {library}")
            if os.path.abspath(library) != os.path.abspath(output):
                os.makedirs(os.path.dirname(output), exist_ok=True)
                shutil.copyfile(library, output)
            return
        super().build_extension(ext)
        stamp_path = self._stamp_path(ext)
        os.makedirs(os.path.dirname(stamp_path), exist_ok=True)
        with open(stamp_path, "w") as file:
            json.dump({"inputs": fingerprint, "library_sha256": _sha256_of_file(output)}, file)


extensions = [ext for ext in (cpu_extension(), cuda_extension()) if ext is not None]

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": SkipUnchangedBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
