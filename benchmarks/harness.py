"""Shared benchmark helpers: environment metadata, timing, peak memory, JSON lines, markdown tables.

Every ``bench_<topic>.py`` script imports this module (it sits next to them; scripts are run as
``python benchmarks/bench_<topic>.py``, so this directory is on ``sys.path``).

Timing (CPU micro-benchmarks are timed by pytest-benchmark, ``test_bench_*.py``; these timers serve
the GPU check and whole-job benchmarks that pytest-benchmark does not fit)
    CPU: ``warmup`` untimed calls, then ``repeats`` calls timed with ``time.perf_counter``; the median is
    reported. ``time_interleaved`` runs the paths of one comparison round-robin (path A, B, C, C, B, A,
    ...) so that load changes on a shared machine hit every path alike; ratios of paths timed side by
    side in one run are the quantity to read, absolute times are not.
    CUDA: ``triton.testing.do_bench`` (median) when triton imports, else CUDA events around each call.

Peak memory (see ``measure_peak``)
    CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``torch.cuda.max_memory_allocated`` after the call
    (every live tensor counts, the model and the batch included).
    CPU: the growth of the process's peak resident set during the call, read from the kernel: glibc is
    told to serve every allocation >= 64 KiB with its own mmap (``mallopt(M_MMAP_THRESHOLD)``) so freed
    tensors go back to the OS at once, ``malloc_trim(0)`` returns what is already free, the peak RSS
    ("VmHWM") is reset by writing 5 to /proc/self/clear_refs, and growth = VmHWM after - VmRSS before.
    The reported peak is that growth plus the bytes of the tensors alive before the call (model,
    batch, directions), so it means the same as the CUDA number. Call ``enter_cpu_memory_mode`` only
    after all timing: it makes large allocations slower (a fresh mmap each time).
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["environment", "time_call", "time_interleaved", "measure_peak", "enter_cpu_memory_mode",
           "cpu_memory_method", "tensor_bytes", "append_jsonl", "markdown_table", "results_path", "MB"]

MB = 1024.0 * 1024.0


# ------------------------------------------------------------------------------------------ metadata

def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def environment(device: torch.device) -> Dict[str, object]:
    """Metadata stored with every measurement: code version, library versions, machine."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": sha or "unknown (git rev-parse HEAD failed: no commit yet or not a git checkout)",
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": _version("numpy"),
        "triton": _version("triton"),
        "iwd_fast": _version("iwd_fast") or "not installed (source tree)",
        "opacus": _version("opacus"),
        "backpack": _version("backpack-for-pytorch"),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------------------------------------ timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_times_ms(fn: Callable[[], object], warmup: int, repeats: int) -> List[float]:
    try:
        from triton.testing import do_bench  # noqa: WPS433 (lazy: triton is optional)
    except Exception:  # noqa: BLE001 - any import failure means "use CUDA events"
        do_bench = None
    if do_bench is not None:
        return [float(do_bench(fn, warmup=25, rep=100, return_mode="median"))]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_timer_name() -> str:
    try:
        importlib.import_module("triton.testing")
        return "triton.testing.do_bench (median)"
    except Exception:  # noqa: BLE001
        return "CUDA events (median)"


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 5) -> Dict[str, object]:
    """Median wall time of ``fn()`` in ms: {"median_ms", "times_ms", "timer"}."""
    if device.type == "cuda":
        times = _cuda_times_ms(fn, warmup, repeats)
        return {"median_ms": statistics.median(times), "times_ms": times, "timer": cuda_timer_name()}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "times_ms": times, "timer": "time.perf_counter (median)"}


def time_interleaved(fns: Mapping[str, Callable[[], object]], repeats: Mapping[str, int], device: torch.device,
                     warmup: int = 0, progress=None) -> Dict[str, Dict[str, object]]:
    """Time several paths side by side; {name: time_call-like dict}.

    CPU: round r runs every path that still needs a repeat, in the given order on even rounds and reversed
    on odd ones, so a burst of load on a shared machine lands on all paths of the comparison. CUDA: each path through ``time_call``.
    ``progress`` (optional) is called with no argument after every timed call.
    """
    if device.type == "cuda":
        out = {}
        for name, fn in fns.items():
            out[name] = time_call(fn, device, warmup, repeats[name])
            if progress:
                progress()
        return out
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(max(repeats.values(), default=0)):
        for name, fn in (order if r % 2 == 0 else order[::-1]):  # A B C, C B A, ...: no path always first
            if r >= repeats[name]:
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            if progress:
                progress()
    return {name: {"median_ms": statistics.median(ts) if ts else None, "times_ms": ts,
                   "timer": "time.perf_counter (median, interleaved)"} for name, ts in times.items()}


# ------------------------------------------------------------------------------------------ memory

_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 64 * 1024
_libc = None
_memory_mode = False


def _load_libc():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only; musl has no malloc_trim
            _libc.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_memory_method() -> Optional[str]:
    """Description of the CPU peak-memory method, or None when this machine cannot do it (with why)."""
    if _load_libc() is None:
        return None
    if not os.path.exists("/proc/self/status") or not _reset_hwm():
        return None
    return ("peak RSS growth during the call (glibc mmap threshold 64 KiB + malloc_trim(0) before, VmHWM reset "
            "via /proc/self/clear_refs; growth = VmHWM after - VmRSS before) + bytes of tensors alive before")


def enter_cpu_memory_mode() -> bool:
    """Make freed memory leave the process at once (see module docstring). Call after all timing."""
    global _memory_mode
    libc = _load_libc()
    if libc is None:
        return False
    if not _memory_mode:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        _memory_mode = True
    return True


def measure_peak(fn: Callable[[], object], device: torch.device, resident_bytes: int = 0) -> Dict[str, object]:
    """Run ``fn()`` once and return {"peak_bytes", "growth_bytes", "method"}; None values if not measurable.

    ``resident_bytes``: bytes of the tensors alive before the call (used on CPU, where the process RSS
    also holds the interpreter and libraries and cannot serve as the baseline).
    """
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak, "growth_bytes": peak - before,
                "method": "torch.cuda.max_memory_allocated after reset_peak_memory_stats"}
    method = cpu_memory_method()
    if method is None or not enter_cpu_memory_mode():
        fn()
        return {"peak_bytes": None, "growth_bytes": None,
                "method": "unavailable (needs Linux /proc/self/clear_refs and glibc)"}
    _libc.malloc_trim(0)
    _reset_hwm()
    before_kb = _proc_status_kb("VmRSS")
    fn()
    growth = max(0, _proc_status_kb("VmHWM") - before_kb) * 1024
    return {"peak_bytes": resident_bytes + growth, "growth_bytes": growth, "method": method}


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct tensors in modules (parameters and buffers), tensors, dicts and sequences."""
    seen, total = set(), 0

    def visit(obj) -> None:
        nonlocal total
        if isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                visit(t)
        elif isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.device)
            if key not in seen:
                seen.add(key)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, Mapping):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for o in objs:
        visit(o)
    return total


# ------------------------------------------------------------------------------------------ output

def apply_overrides(cfg: Dict[str, Any], overrides: Sequence[str]) -> None:
    """Set dotted ``KEY=VALUE`` overrides (JSON values, else strings) in a config dict; unknown keys refused."""
    for item in overrides:
        dotted, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node, keys = cfg, dotted.split(".")
        for key in keys[:-1]:
            node = node[key]
        if keys[-1] not in node:
            raise SystemExit(f"--set: unknown config key {dotted!r}")
        node[keys[-1]] = value


def results_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}.jsonl"


def append_jsonl(path: os.PathLike, records: Iterable[Mapping[str, object]]) -> int:
    """Append one JSON object per line; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
            n += 1
    return n


def read_jsonl(path: os.PathLike) -> List[Dict[str, object]]:
    """The JSON objects of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers are printed as given (format them before)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_section(document: os.PathLike, section: str, text: str) -> None:
    """Replace the ``<!-- section:begin/end -->`` part of a markdown file with ``text``, and say so."""
    from iwd_fast.app.report import replace_section

    doc = Path(document)
    doc.write_text(replace_section(doc.read_text(), section, text))
    print(f"replaced the {section!r} section of {doc}")


def impl_reasons(device: torch.device) -> Dict[str, Optional[str]]:
    """{impl: None if usable else why} for every concrete impl; a backend failing to import is unavailable."""
    from iwd_fast.scoring import dispatch as _dispatch

    out = {}
    for impl in _dispatch.IMPLS:
        if impl == "auto":
            continue
        try:
            out[impl] = _dispatch.why_not(impl, device)
        except Exception as err:  # noqa: BLE001 - report any backend failure as its reason
            out[impl] = f"{type(err).__name__}: {err}"
    return out
