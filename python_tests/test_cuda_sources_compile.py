"""The CUDA backend's sources keep compiling on machines without a GPU.

Every csrc/cuda/*.cu is compiled by nvcc to an object for sm_80 and sm_90 with the flags of
.ci/run (warnings are errors), without any torch header; csrc/cuda/bindings.cpp, the only file
that sees torch, is syntax-checked by the host compiler against the installed torch's headers.
"""

import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest

CUDA_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "--expt-relaxed-constexpr",
    "-Werror",
    "all-warnings",
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=sm_90",
]


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    return nvcc


def test_there_are_cuda_sources():
    assert CU_SOURCES, f"no .cu files in {CUDA_DIR}"


def torch_includes(path: pathlib.Path) -> list:
    """The headers of torch (torch/, ATen/, c10/, caffe2/) that `path` #includes."""
    includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
    return [inc for inc in includes if inc.split("/")[0] in ("torch", "ATen", "c10", "caffe2")]


DEVICE_CODE = sorted(p for p in CUDA_DIR.glob("*") if p.name != "bindings.cpp")


@pytest.mark.parametrize("path", DEVICE_CODE, ids=lambda p: p.name)
def test_device_code_includes_no_torch_headers(path):
    assert not torch_includes(path), f"{path.name} includes torch headers {torch_includes(path)}; only bindings.cpp may"


def test_bindings_is_where_torch_comes_in():
    # the check above must be able to see a torch include: bindings.cpp has them
    assert torch_includes(CUDA_DIR / "bindings.cpp")


@pytest.mark.slow
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_source_compiles_for_sm80_and_sm90(source, tmp_path):
    result = subprocess.run(
        [_nvcc(), *NVCC_FLAGS, "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
    assert (tmp_path / f"{source.stem}.o").stat().st_size > 0


@pytest.mark.slow
def test_bindings_compile_against_torch_headers():
    torch_cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler (c++/g++) on PATH")
    includes = [f"-isystem{p}" for p in torch_cpp_extension.include_paths()]
    includes.append(f"-isystem{sysconfig.get_paths()['include']}")
    result = subprocess.run(
        [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", *includes,
         "-DTORCH_EXTENSION_NAME=_cuda", str(CUDA_DIR / "bindings.cpp")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, f"bindings.cpp does not compile:\n{result.stderr[-4000:]}"
