"""Scoring across processes: a run killed with SIGKILL and started again ends with bitwise the result of
an uninterrupted run; torchrun with 2 CPU processes (gloo) writes bitwise the single-process file."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = str(HERE / "score_worker.py")


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(*args, check=True):
    proc = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, env=env(),
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def started_then_killed(out, target, until):
    """Start a slow worker, SIGKILL it once ``until(out)`` holds (or it finished), return its exit code."""
    proc = subprocess.Popen([sys.executable, WORKER, str(out), target, "--slow", "0.02"], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while proc.poll() is None and not until(out) and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def chunks(out):
    d = Path(out) / "chunks"
    return len(list(d.glob("*.pt"))) if d.is_dir() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(out, "validation")
    return (out / "scores.pt").read_bytes()


def test_sigkill_at_any_moment_then_rerun_gives_bitwise_the_uninterrupted_scores(tmp_path, uninterrupted):
    rng = random.Random(0)
    moments = [lambda out: chunks(out) >= 1,                       # right after a chunk landed
               lambda out: (Path(out) / "direction.pt").exists(),  # after the direction, before any chunk
               lambda out, t=time.monotonic() + rng.uniform(3, 6): time.monotonic() > t]  # at a random moment
    for i, until in enumerate(moments):
        out = tmp_path / f"run{i}"
        code = started_then_killed(out, "validation", until)
        if i < 2:  # these moments come before the end: the kill must have hit a running job
            assert code == -signal.SIGKILL and not (out / "scores.pt").exists(), (i, code)
        again = run(out, "validation")
        assert "scored" in again.stdout or "complete" in again.stdout
        assert (out / "scores.pt").read_bytes() == uninterrupted, f"moment {i}: resumed scores differ"
    finished = run(tmp_path / "run0", "validation")
    assert "complete" in finished.stdout  # a finished folder is reported, never appended to
    refused = run(tmp_path / "run0", "self", check=False)
    assert refused.returncode != 0 and "refusing to mix runs" in refused.stderr


def torchrun(out, target, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER,
           str(out), target]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_two_torchrun_processes_write_bitwise_the_single_process_file(tmp_path, uninterrupted):
    torchrun(tmp_path / "two", "validation")
    assert (tmp_path / "two" / "scores.pt").read_bytes() == uninterrupted
    scores = torch.load(tmp_path / "two" / "scores.pt", weights_only=True)["scores"]
    assert scores.shape == (90,) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_two_torchrun_processes_self_target_and_resume_across_world_sizes(tmp_path):
    run(tmp_path / "one", "self")
    started_then_killed(tmp_path / "two", "self", lambda out: chunks(out) >= 2)
    torchrun(tmp_path / "two", "self")  # resumes a 1-process run with 2 processes
    assert (tmp_path / "two" / "scores.pt").read_bytes() == (tmp_path / "one" / "scores.pt").read_bytes()
