"""``python -m iwd_fast.env`` / ``iwd-fast env``: versions and which backends can run here, and why not."""
from __future__ import annotations

import platform
from typing import Dict

import torch

from ..scoring import dispatch
from ..scoring.backends import compiled_ext

__all__ = ["report", "main"]


def report() -> Dict[str, object]:
    """{"versions": {...}, "backends": {device: {impl: "ok" | reason}}}."""
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torch_cuda": torch.version.cuda or "none", "platform": platform.platform()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    from .. import __version__

    versions["iwd_fast"] = __version__
    info = compiled_ext.build_info()
    versions["iwd_fast._C"] = "not built" if info is None else ", ".join(f"{k}={v}" for k, v in info.items())
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    backends = {}
    for dev in devices:
        backends[dev.type] = {impl: "ok" if why is None else why for impl, why in dispatch.availability(dev).items()}
        backends[dev.type]["auto picks (hook path)"] = dispatch.auto_hook_impl(dev)
    if not torch.cuda.is_available():
        backends["cuda"] = {"all": "no CUDA device visible to torch"}
    return {"versions": versions, "backends": backends}


def format_report(rep: Dict[str, object]) -> str:
    lines = ["iwd_fast environment", ""]
    lines += [f"  {k:<12} {v}" for k, v in rep["versions"].items()]
    for dev, table in rep["backends"].items():
        lines += ["", f"backends for {dev} tensors:"]
        lines += [f"  {impl:<22} {why}" for impl, why in table.items()]
    return "\n".join(lines)


def main() -> int:
    print(format_report(report()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
