"""Build script: packages plus the optional compiled extension iwd_fast._C (metadata is in pyproject.toml).

What gets built:
* IWD_FAST_BUILD_EXT=0           -> no extension (pure Python install; the ops fall back to eager PyTorch).
* torch without CUDA, or no nvcc -> CppExtension from csrc/ops.cpp + csrc/cpu/*.cpp (CPU ops).
* torch with CUDA and nvcc       -> CUDAExtension adding csrc/cuda/*.cu (CPU and CUDA ops).
* FORCE_CUDA=1 on a torch without CUDA (or without nvcc) fails with an error saying why.

Install with ``pip install --no-build-isolation -e .`` (build isolation would fetch another torch).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    """Paths relative to this file (setuptools refuses absolute source paths)."""
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _say(message):
    print(f"iwd_fast: {message}", flush=True)


def _extensions():
    """(ext_modules, cmdclass) for this build, and one printed line saying what and why."""
    if os.environ.get("IWD_FAST_BUILD_EXT", "1") == "0":
        _say("building no extension (IWD_FAST_BUILD_EXT=0): pure Python install")
        return [], {}

    import torch
    from torch.utils import cpp_extension

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    cuda_sources = _sources("csrc/cuda/*.cu")
    if torch.version.cuda is None:
        no_cuda = f"torch {torch.__version__}: torch.version.cuda is None"
    elif cpp_extension.CUDA_HOME is None:
        no_cuda = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    elif not cuda_sources:
        no_cuda = "no csrc/cuda/*.cu sources"
    else:
        no_cuda = None
    if force_cuda and no_cuda is not None:
        raise RuntimeError(f"iwd_fast: FORCE_CUDA=1 but the CUDA ops cannot be built: {no_cuda}. "
                           "Install a CUDA build of torch and the CUDA toolkit, or unset FORCE_CUDA.")

    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    # The sources are C++17 (tests/test_nvcc.py compiles the CUDA file with -std=c++17). No -std here: torch's
    # BuildExtension adds the standard its own headers need (c++17 up to torch 2.8, c++20 from 2.9 on).
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP region compiled into this library: without -fopenmp it runs serially.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    include_dirs = [os.path.join(HERE, "csrc")]
    cxx.append(f'-DIWD_FAST_TORCH_VERSION="{torch.__version__}"')

    if no_cuda is None:
        _say(f"building _C with CPU and CUDA ops (torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"nvcc under {cpp_extension.CUDA_HOME})")
        ext = cpp_extension.CUDAExtension(
            "iwd_fast._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DIWD_FAST_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        _say(f"building _C with CPU ops (no CUDA: {no_cuda})")
        ext = cpp_extension.CppExtension(
            "iwd_fast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["iwd_fast", "iwd_fast.*"]) + ["iwd_fast.kernels"],
    package_dir={"iwd_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
