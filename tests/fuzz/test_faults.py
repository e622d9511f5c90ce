"""The fault tier (slow): SIGKILL at random moments, then the same command again, must end bitwise where an
uninterrupted run ends, with no iteration, chunk or row lost or repeated; and a second process started on
a folder another one is writing refuses in one line naming the first (or both end with the one result).

    distill   every method (smoke preset, digits, 55 iterations: a checkpoint at 50), in-loop weighting
    score     one process, and torchrun with 2 processes (compared with the 1-process reference)
    bench     a suite of 4 cells run with --jobs 2

IWD_FAULT_DRAWS kills per target (default 5), IWD_FAULT_SEED their seed (faults.py). Every kill and its
outcome is recorded for benchmarks/results/fuzz.jsonl (fuzzing.record).
"""
import json

import pytest

from iwd_fast.app.presets import preset_config

import faults
from faults import claimed, differences, iwd_fast, kill_at, moments, run, start, torchrun, wait_for
from fuzzing import record

pytestmark = [pytest.mark.slow, pytest.mark.fuzz]

METHODS = ["dc", "dsa", "dm", "mtt", "datm", "idc"]
ITERATIONS = 55


def distill_config(folder, method):
    cfg = preset_config("smoke", method, "digits", 1).replace(iterations=ITERATIONS, noise=0.2, weighting="iwd")
    path = folder / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def distill_argv():
    return iwd_fast("distill", "--config", "../config.json", "--out", "run", "--quiet")


def faulted(target, reference_state, reference_seconds, argv, folder, state, where):
    """Kill ``argv`` at each drawn moment in a fresh folder, rerun it to the end, compare with the reference."""
    for draw, t in enumerate(moments(target, reference_seconds)):
        cwd = folder / f"draw{draw}"
        cwd.mkdir()
        hit = kill_at(argv, cwd, t)
        landed = where(cwd / "run") if hit else "finished before the kill"
        run(argv, cwd)
        diff = differences(state(cwd / "run"), reference_state)
        record({"target": target, "draw": draw, "kill_at_s": round(t, 2), "reference_s": round(reference_seconds, 1),
                "killed": hit, "landed": landed, "outcome": "bitwise" if not diff else "differs", "differs": diff,
                "seed": faults.SEED})
        assert not diff, f"{target}, kill at {t:.2f} s ({landed}): the resumed run differs in {diff}"


@pytest.mark.parametrize("method", METHODS)
def test_distill_killed_at_random_moments_resumes_bitwise(tmp_path, method):
    distill_config(tmp_path, method)
    (tmp_path / "ref").mkdir()
    seconds = run(distill_argv(), tmp_path / "ref")
    reference = faults.distill_state(tmp_path / "ref" / "run")
    assert [r["iteration"] for r in reference["log"]] == list(range(1, ITERATIONS + 1))
    faulted(f"distill {method}", reference, seconds, distill_argv(), tmp_path, faults.distill_state,
            faults.where_distill)


SCORE = ("score", "--dataset", "digits", "--epochs", "2", "--width", "8", "--batch", "64", "--chunk-batches", "1",
         "--noise", "0.2", "--threads", "1", "--quiet", "--out", "run")


@pytest.fixture(scope="module")
def score_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("score_ref")
    seconds = run(iwd_fast(*SCORE), folder)
    return faults.score_state(folder / "run"), seconds


@pytest.mark.parametrize("processes", [1, 2])
def test_score_killed_at_random_moments_resumes_bitwise(tmp_path, score_reference, processes):
    """Under torchrun the resumed 2-process run must end with the 1-process run's files, bit for bit."""
    reference, seconds = score_reference
    argv = iwd_fast(*SCORE) if processes == 1 else torchrun(2, *SCORE)
    if processes == 2:
        (tmp_path / "timing").mkdir()
        seconds = run(argv, tmp_path / "timing")
        assert not differences(faults.score_state(tmp_path / "timing" / "run"), reference)
    faulted(f"score, {processes} process{'es' if processes > 1 else ''}", reference, seconds, argv, tmp_path,
            faults.score_state, faults.where_score)


SPEC = """
name = "faults"
preset = "smoke"
methods = ["dc"]
datasets = ["digits"]
ipc = [1]
seeds = [0, 1]
noise = [[0.2, "symmetric"]]

[config]
iterations = 55

[variants.unweighted]
weighting = "none"

[variants.in-loop]
weighting = "iwd"
"""


def bench_argv():
    return iwd_fast("bench", "../spec.toml", "--out", "run", "--jobs", "2", "--threads", "1", "--quiet")


def test_bench_killed_at_random_moments_loses_and_repeats_no_row(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC)
    (tmp_path / "ref").mkdir()
    seconds = run(bench_argv(), tmp_path / "ref")
    reference = faults.bench_state(tmp_path / "ref" / "run")
    assert reference["rows"] == 4 == len(reference["cells"])
    faulted("bench, 2 jobs", reference, seconds, bench_argv(), tmp_path, faults.bench_state, faults.where_bench)


@pytest.mark.parametrize("command", ["distill", "score", "bench"])
def test_two_processes_on_one_folder(tmp_path, command):
    """The second process refuses in one line naming the first, or (the first already gone) ends with the
    same result; the first ends with the uninterrupted result either way."""
    if command == "distill":
        distill_config(tmp_path, "dc")
        argv, state = distill_argv(), faults.distill_state
    elif command == "score":
        argv, state = iwd_fast(*SCORE), faults.score_state
    else:
        (tmp_path / "spec.toml").write_text(SPEC)
        argv, state = bench_argv(), faults.bench_state
    (tmp_path / "ref").mkdir()
    run(argv, tmp_path / "ref")
    reference = state(tmp_path / "ref" / "run")
    cwd = tmp_path / "both"
    cwd.mkdir()
    first = start(argv, cwd)
    wait_for(lambda: claimed(cwd / "run") or first.poll() is not None)
    second = start(argv, cwd)
    err = second.communicate(timeout=faults.TIMEOUT)[1]
    first_err = first.communicate(timeout=faults.TIMEOUT)[1]
    assert first.returncode == 0, first_err[-3000:]
    if second.returncode == 2:
        line = err.strip()
        assert "\n" not in line and f"is in use by pid {first.pid} on host " in line, line
        outcome = "second refused, naming the first"
    else:
        assert second.returncode == 0, err[-3000:]
        outcome = "both ended with the one result"
    diff = differences(state(cwd / "run"), reference)
    record({"target": f"two processes, {command}", "outcome": outcome if not diff else "differs", "differs": diff,
            "killed": False})
    assert not diff, diff
