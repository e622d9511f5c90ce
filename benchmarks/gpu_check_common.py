"""Shared pieces of the GPU check: constants, TF32 switches, the Report every stage writes into."""
from __future__ import annotations

import traceback
import time
import warnings
from typing import Dict, List, Optional

import torch

U32 = 2.0 ** -24
U64 = 2.0 ** -53
HALF = (torch.float16, torch.bfloat16)
PASS, FAIL, ERROR = "PASS", "FAIL", "ERROR"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}

warnings.filterwarnings("ignore", message="Full backward hook is firing")


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for cuDNN convolutions and CUDA matmuls: the legacy flags (honoured by torch 2.11),
    or the fp32_precision settings of newer torch if the legacy ones are refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.backends.cudnn.allow_tf32 = enabled
            torch.backends.cuda.matmul.allow_tf32 = enabled
        except Exception:  # noqa: BLE001 - torch that only takes the new API
            torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
            torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"


def tf32_state() -> Dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out: Dict[str, object] = {}
        for name, get in (("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                          ("cuda.matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                          ("cudnn.conv.fp32_precision", lambda: torch.backends.cudnn.conv.fp32_precision),
                          ("cuda.matmul.fp32_precision", lambda: torch.backends.cuda.matmul.fp32_precision)):
            try:
                out[name] = get()
            except Exception as exc:  # noqa: BLE001
                out[name] = f"unreadable: {type(exc).__name__}"
        return out


def _err_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}"[:600] + " | " + "".join(tb[-3:])[-900:]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(x, spec=".3g"):
    return "" if x is None else format(x, spec)


class Report:
    """Everything the run finds; written as one JSON object."""

    def __init__(self, plan, budget_s: float):  # plan: gpu_check.Plan
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.plan = plan
        self.checks: List[dict] = []
        self.timings: List[dict] = []
        self.targets: List[dict] = []
        self.models: Dict[str, dict] = {}
        self.micro_rows: Dict[str, dict] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def header(self, text: str) -> None:
        print(f"\n## {text}   [t = {self.elapsed():.1f} s]", flush=True)

    def over_budget(self) -> bool:
        return time.monotonic() > self.deadline

    def check(self, entry: dict) -> dict:
        self.checks.append(entry)
        tag = entry["status"]
        nums = "" if entry.get("err") is None else (f" err {entry['err']:.3e} <= allowed {entry['allowed']:.3e}"
                                                     if tag == PASS else f" err {entry['err']:.3e} > allowed "
                                                     f"{entry['allowed']:.3e}")
        why = f"  {(entry.get('error') or '')[:300]}" if tag != PASS else ""
        print(f"  [{tag}] {entry['name']}{nums}{why}", flush=True)
        return entry

    def target(self, name: str, value: Optional[float], threshold: Optional[float] = None, op: str = "",
               **extra) -> None:
        """A ratio with its target (PASS/MISS, or n/a when not measured); threshold None: "info"."""
        if threshold is None:
            status = "info"
        elif value is None:
            status = "n/a"
        else:
            status = PASS if (value <= threshold if op == "<=" else value >= threshold) else "MISS"
        self.targets.append(dict(name=name, value=value, threshold=threshold, op=op, status=status, **extra))
