"""Compile check of the CUDA sources: every csrc/cuda/*.cu must compile to an object file with nvcc.

Runs on machines without a GPU (the CPU torch wheel ships the ATen/c10 CUDA headers); it cannot link
or run the kernels. Flags follow what torch.utils.cpp_extension.BuildExtension passes for setup.py's
CUDAExtension. Each file takes a few minutes on 2 cores.
"""
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

pytestmark = pytest.mark.nvcc

ROOT = Path(__file__).resolve().parents[2]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _cuda_home():
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            return Path(os.environ[env])
    return Path("/usr/local/cuda") if Path("/usr/local/cuda").is_dir() else None


def _nvcc():
    home = _cuda_home()
    if home is not None and (home / "bin" / "nvcc").exists():
        return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def _command(nvcc, source, obj):
    includes = [str(ROOT / "csrc"), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    home = _cuda_home()
    if home is not None and (home / "include").is_dir():
        includes.append(str(home / "include"))
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    flags = [
        "-c", str(source), "-o", str(obj),
        "-std=c++17", "-arch=sm_90", "-O3", "-lineinfo",
        "-Xcompiler", "-fPIC",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *getattr(cpp_extension, "COMMON_NVCC_FLAGS", []),
    ]
    # A CPU wheel ships the c10/cuda headers but not the file its CMake configure step generates (it only
    # says the library is shared); c10 has a switch for builds without it. A CUDA wheel has the file.
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [nvcc, *flags, *(f"-I{p}" for p in includes)]


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA_HOME, /usr/local/cuda or nvcc on PATH)")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    obj = tmp_path / (source.stem + ".o")
    cmd = _command(_nvcc(), source, obj)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"nvcc failed on {source.name} (exit {proc.returncode}):\n{' '.join(cmd)}\n\n"
                    f"{proc.stderr[-20000:]}\n{proc.stdout[-2000:]}")
    assert obj.stat().st_size > 0


def test_cuda_sources_exist():
    assert CUDA_SOURCES, "no csrc/cuda/*.cu found"
