"""Lazy loader of the compiled extension ``iwd_fast._C`` (optional; never raises at import).

``load()`` imports ``iwd_fast._C`` once, which registers the ``torch.ops.iwd_fast.*`` kernels (CPU,
and CUDA when built with nvcc), and returns the module or None. ``status()`` says which backends of
the extension can run here and, if not, why.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

import torch

__all__ = ["load", "status", "build_info", "has_cuda_kernels"]

_module = None
_error: Optional[str] = None
_tried = False


def load():
    """Import ``iwd_fast._C`` once; return the module, or None if it is not built or fails to load."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("iwd_fast._C")
        except (ImportError, OSError) as exc:  # not built, or built against another torch
            _error = f"{type(exc).__name__}: {exc}"
    return _module


def build_info() -> Optional[Dict[str, object]]:
    """How the loaded extension was built ({"cuda_kernels", "openmp", "torch_version"}), or None."""
    module = load()
    return None if module is None else dict(module.build_info())


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA kernels (it was built with nvcc)."""
    info = build_info()
    return bool(info and info["cuda_kernels"])


def status() -> Dict[str, Tuple[bool, str]]:
    """{"cpu": (usable, reason), "cuda": (usable, reason)} for the compiled ops."""
    if load() is None:
        why = f"iwd_fast._C not built (IWD_FAST_BUILD_EXT=0 or build failed): {_error}"
        return {"cpu": (False, why), "cuda": (False, why)}
    built_for = build_info()["torch_version"]
    if built_for != torch.__version__:
        why = f"iwd_fast._C was built for torch {built_for}, this is torch {torch.__version__}: reinstall iwd_fast"
        return {"cpu": (False, why), "cuda": (False, why)}
    cpu = (True, "iwd_fast._C loaded")
    if not has_cuda_kernels():
        cuda = (False, "built without CUDA (torch without CUDA or no nvcc at build time)")
    elif not torch.cuda.is_available():
        cuda = (False, "no CUDA device")
    else:
        cuda = (True, "iwd_fast._C loaded with CUDA kernels")
    return {"cpu": cpu, "cuda": cuda}
