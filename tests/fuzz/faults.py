"""The fault tier's machinery: run a command line to the end, or SIGKILL it (its whole process group:
torchrun's workers, a suite's cell processes) at a given moment; and what a finished run folder holds,
in a form two runs can be compared with bit for bit.

Kill moments are drawn uniformly over (0, T), T the wall time of the same command uninterrupted, from
``random.Random(IWD_FAULT_SEED + hash of the target)``; ``IWD_FAULT_DRAWS`` kills per target (default 5).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[2]
DRAWS = int(os.environ.get("IWD_FAULT_DRAWS", "5"))
SEED = int(os.environ.get("IWD_FAULT_SEED", "0"))
TIMEOUT = 3 * 3600  # a shared machine may starve a job for a long time


def env() -> Dict[str, str]:
    """The worktree's package first on the path; one thread per process (bitwise runs need equal threads)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("IWD_FUZZ_RECORD", None)  # the children are not part of the tally
    return e


def iwd_fast(*args: str) -> List[str]:
    return [sys.executable, "-m", "iwd_fast", *args]


def torchrun(nproc: int, *args: str) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "iwd_fast", *args]


def moments(target: str, reference_seconds: float) -> List[float]:
    rng = random.Random(SEED * 1000003 + int(hashlib.sha256(target.encode()).hexdigest()[:8], 16))
    return [rng.uniform(0.0, reference_seconds) for _ in range(DRAWS)]


def run(argv: Sequence[str], cwd: Path) -> float:
    """Run to the end (exit code 0 required); returns its wall seconds. Past TIMEOUT the whole process tree is
    killed (a suite's cell processes included) and the test fails."""
    started = time.monotonic()
    proc = start(argv, cwd)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise AssertionError(f"{' '.join(argv)} ran past {TIMEOUT} s") from None
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{err[-4000:]}"
    return time.monotonic() - started


def start(argv: Sequence[str], cwd: Path) -> subprocess.Popen:
    """Start in a process group of its own (so that a kill reaches every process it starts)."""
    return subprocess.Popen(list(argv), cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def descendants(pid: int) -> List[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, as a machine's failure would: the tree is stopped first
    (SIGSTOP, until no new process appears), so no process sees another die and reacts (torchrun's workers
    run in sessions of their own: a process-group kill would leave them orphaned)."""
    stopped: List[int] = []
    while True:
        new = [p for p in [pid, *descendants(pid)] if p not in stopped]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.append(p)
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_at(argv: Sequence[str], cwd: Path, seconds: float) -> bool:
    """Start, SIGKILL the whole process tree ``seconds`` later; True when the kill hit a running command."""
    proc = start(argv, cwd)
    try:
        err = proc.communicate(timeout=seconds)[1]  # reads its stderr meanwhile, so it never blocks on a full pipe
        hit = False
    except subprocess.TimeoutExpired:
        hit = True
        kill_tree(proc.pid)
        err = proc.communicate()[1]
    assert hit or proc.returncode == 0, err[-4000:]
    return hit


def wait_for(predicate, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def claimed(folder: Path) -> bool:
    """True once a process holds the folder's claim (its lock file names it)."""
    lock = folder / ".lock"
    return lock.is_file() and lock.stat().st_size > 0


# ------------------------------------------------------------------------------------------- what a run holds

def _log(folder: Path) -> List[dict]:
    """metrics.jsonl without the wall-clock fields."""
    path = folder / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [{k: v for k, v in r.items() if k != "time" and "second" not in k} for r in rows]


def safetensors_content(path: Path) -> Optional[dict]:
    """{name: (dtype, shape, raw bytes)} and the metadata of a safetensors file. Its header lists the metadata
    in an order that changes from process to process (a hash map), so files are compared by content."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return {"metadata": meta, **{k: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                                 for k, t in tensors.items()}}


def _timeless(d):
    return {k: v for k, v in d.items() if "second" not in k} if isinstance(d, dict) else d


def distill_state(folder: Path) -> dict:
    """Everything of a finished distill run that must not depend on interruptions."""
    summary = json.loads((folder / "summary.json").read_text())
    return {"synthetic": safetensors_content(folder / "synthetic.safetensors"),
            "weights": safetensors_content(folder / "weights.safetensors"),
            "accuracy": summary.get("accuracy", {}).get("accs"), "init_accuracy": _timeless(summary.get("init_accuracy")),
            "log": _log(folder)}


def score_state(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    return {"scores.pt": (folder / "scores.pt").read_bytes(), "checksum": summary["checksum"],
            "n_scored": summary["n_scored"], "instances": safetensors_content(folder / "instances.safetensors"),
            "weights": safetensors_content(folder / "weights.safetensors")}


VOLATILE = ("timing_seconds", "timing_calls", "scoring_seconds", "scoring_share_of_loop")


def bench_state(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    cells = {r["cell"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}
    return {"rows": len(rows), "cells": cells,
            "synthetic": {c: safetensors_content(folder / "cells" / c / "synthetic.safetensors") for c in cells},
            "logs": {c: _log(folder / "cells" / c) for c in cells}}


def differences(a: dict, b: dict, prefix: str = "") -> List[str]:
    """The keys whose values differ (recursively into dicts)."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(prefix + k)
    return out


def where_distill(folder: Path) -> str:
    log = _log(folder)
    parts = [f"iteration {log[-1]['iteration']} logged" if log else "nothing logged"]
    if (folder / "checkpoint.pt").is_file():
        parts.append("checkpoint on disk")
    if (folder / "summary.json").is_file():
        parts.append("finished")
    return ", ".join(parts) if folder.is_dir() else "no run folder yet"


def where_score(folder: Path) -> str:
    chunks = len(list((folder / "chunks").glob("*.pt"))) if (folder / "chunks").is_dir() else 0
    parts = [f"{chunks} chunks on disk"]
    for name, what in (("model.pt", "model saved"), ("direction.pt", "direction saved"), ("scores.pt", "scores merged"),
                       ("summary.json", "finished")):
        if (folder / name).is_file():
            parts.append(what)
    return ", ".join(parts) if folder.is_dir() else "no run folder yet"


def where_bench(folder: Path) -> str:
    done = len(list((folder / "cells").glob("*/*/summary.json"))) if (folder / "cells").is_dir() else 0
    started = len(list((folder / "cells").glob("*/*/config.json"))) if (folder / "cells").is_dir() else 0
    return f"{done} cells finished, {started} started" if folder.is_dir() else "no suite folder yet"


def first_line(text: Optional[str]) -> str:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""
