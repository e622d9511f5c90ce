"""Helpers shared by the Triton launchers: dtype policy, block-size choice, launching.

Dtype policy (every launcher):

* float32, float16 and bfloat16 inputs; mixed inputs are promoted to their common dtype first
  (promotion is exact). Products accumulate in float32; fp32 tiles use ``input_precision="ieee"``
  (no TF32), so results match the eager reference.
* float64 runs only under the Triton interpreter (accumulation in float64); on a GPU it raises.
* Output: float32 for half inputs, the input dtype otherwise.

Block sizes: the smallest legal tiles (16) under the interpreter, which runs every program in
Python, and shape-aware defaults on a GPU.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import triton

_HALF = (torch.float16, torch.bfloat16)
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was decorated while TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(kernel, InterpretedFunction)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def block(n: int, lo: int, hi: int) -> int:
    """Power-of-two tile edge covering ``n``, clamped to [lo, hi]."""
    return max(lo, min(hi, next_pow2(n)))


def prepare(name: str, kernel: Any, *tensors: torch.Tensor | None):
    """Validate and promote the inputs of one launch.

    Returns (tensors cast to the common dtype (None stays None), accumulation dtype,
    output dtype, dot_fp32) where ``dot_fp32`` asks the kernel to upcast its tiles to fp32 before
    ``tl.dot`` (needed for bfloat16 under the interpreter, whose numpy matmul has no bfloat16).
    """
    present = [t for t in tensors if t is not None]
    for t in present:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected tensors, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected floating-point tensors, got {t.dtype}")
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    interpreted = is_interpreted(kernel)
    device = present[0].device
    if not interpreted and device.type not in ("cuda", "meta"):
        raise ValueError(
            f"{name}: the Triton backend needs CUDA tensors (got {device.type}); "
            "set TRITON_INTERPRET=1 before importing triton to run it on CPU")
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype == torch.float64:
        if not interpreted:
            raise ValueError(f"{name}: float64 is supported by the Triton backend only under the "
                             "interpreter (TRITON_INTERPRET=1); use the torch implementation")
    elif dtype not in _SUPPORTED:
        raise ValueError(f"{name}: unsupported dtype {dtype} (float32, float16, bfloat16)")
    cast = tuple(None if t is None else t.to(dtype) for t in tensors)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.float32 if dtype in _HALF else dtype
    dot_fp32 = interpreted and dtype == torch.bfloat16
    return cast, acc, out, dot_fp32


def launch_options(kernel: Any, num_warps: int = 4) -> dict:
    """Launch keyword arguments: none under the interpreter, ``num_warps`` on a GPU."""
    return {} if is_interpreted(kernel) else {"num_warps": num_warps}


def _is_fake(t: Any) -> bool:
    if not isinstance(t, torch.Tensor):
        return False
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, FakeTensor)


def _wrap(kernel: Any) -> Any:
    """``torch.library.wrap_triton(kernel)`` where it exists, so torch.compile sees the launch."""
    wrap: Callable | None = getattr(torch.library, "wrap_triton", None)
    if wrap is None:
        return kernel
    try:
        return wrap(kernel)
    except RuntimeError as err:  # e.g. a torch that rejects interpreter kernels: they still run, eagerly
        warnings.warn(f"iwd_fast.kernels: torch.library.wrap_triton refused {getattr(kernel, '__name__', kernel)} "
                      f"({err}); it runs eagerly, invisible to torch.compile", RuntimeWarning, stacklevel=2)
        return kernel


def _plain_eager(kwargs: dict) -> bool:
    """True when nothing traces this call: dense tensors, no dispatch mode, not inside torch.compile."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return False
    stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
    if stack_len is not None and stack_len() > 0:
        return False
    return all(type(v) in (torch.Tensor, torch.nn.Parameter) for v in kwargs.values()
               if isinstance(v, torch.Tensor))


def launch(kernel: Any, grid: Sequence[int], **kwargs: Any) -> None:
    """Launch ``kernel[grid](**kwargs)``.

    * Interpreter kernels run directly; under shape-only tracing (fake or meta tensors) they are
      skipped, since they would read the tensors' memory and the launch writes only scratch buffers.
    * Compiled kernels run directly in plain eager mode, and through ``wrap_triton`` when something
      traces the call (torch.compile, make_fx, export), which then records the launch.
    """
    grid = tuple(grid)
    if is_interpreted(kernel):
        if not any(_is_fake(v) for v in kwargs.values()):
            kernel[grid](**kwargs)
        return
    if _plain_eager(kwargs):
        kernel[grid](**kwargs)
    else:
        _wrap(kernel)[grid](**kwargs)


cdiv = triton.cdiv
