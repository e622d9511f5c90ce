"""One tiny round of every CPU micro-benchmark, so the benchmark scripts cannot rot (timings are not read).

Runs the pytest-benchmark files of benchmarks/ with --bench-quick on one model, then bench_grad_dot.py's
correctness gate and memory pass joined with those timings, and checks that every timed path passed the
gate and the report names every path.
"""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_round_of_the_cpu_benchmarks(tmp_path):
    timings = tmp_path / "pytest.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                          "--bench-quick", "--bench-models", "convnet3-28", "--bench-threads", "1",
                          f"--benchmark-json={timings}", "benchmarks/test_bench_grad_dot.py",
                          "benchmarks/test_bench_ext_cpu.py"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(timings.read_text())
    paths = {b["extra_info"]["path"] for b in doc["benchmarks"] if b["extra_info"].get("model")}
    assert {"plain fwd+bwd", "capture+torch", "capture streamed+torch", "grad_dot reference"} <= paths
    assert all(b["extra_info"]["gate"] == "ok" for b in doc["benchmarks"] if b["extra_info"].get("model"))
    assert {b["extra_info"]["path"] for b in doc["benchmarks"] if b["extra_info"].get("op")} == {"eager", "ext"}

    out = tmp_path / "gd.jsonl"
    report = subprocess.run([sys.executable, "benchmarks/bench_grad_dot.py", "--quick", "--models", "convnet3-28",
                             "--threads", "1", "--no-anchors", "--timings", str(timings), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    timed = {r["path"]: r for r in rows if r.get("kind") not in ("target",) and r.get("median_ms") is not None}
    assert timed["plain fwd+bwd"]["ratio_vs_plain"] == 1.0
    assert timed["capture+torch"]["ratio_vs_plain"] > 0 and timed["capture+torch"]["status"] == "ok"


def test_quick_round_of_the_scoring_cost_benchmark(tmp_path):
    """bench_scoring_cost.py refuses a scored-step count that disagrees with the loop's own scoring calls,
    so a run to the end means its per-step overhead divides by the steps the loop really scored."""
    out = tmp_path / "cost.jsonl"
    run = subprocess.run([sys.executable, "benchmarks/bench_scoring_cost.py", "--quick", "--threads", "1",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"dc", "dsa", "idc", "dm"}
    assert all(len(r["overhead_ms_per_step"]) == 1 and r["floor"]["heldout_ms"] > 0 for r in rows.values())
