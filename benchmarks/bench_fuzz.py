"""The fuzz and fault tiers, counted: how many bad inputs were generated for each entry point and what became
of them; how many kills landed where, and how every restart ended.

    python benchmarks/bench_fuzz.py                          # tests/fuzz, long profile, fault tier included
    python benchmarks/bench_fuzz.py --examples 200 --draws 5
    python benchmarks/bench_fuzz.py --table                  # the tables of the latest run (RESULTS.md section 9)
    python benchmarks/bench_fuzz.py --table --into benchmarks/RESULTS.md

One call runs ``pytest tests/fuzz`` (slow tests included) with ``IWD_FUZZ_PROFILE=fuzz-long`` and the
tally switched on (tests/fuzz/fuzzing.py), then appends one JSON line per entry point and outcome, and per
kill, to benchmarks/results/fuzz.jsonl, each with the run's id, the pytest verdict and the environment
(git sha: commit first, then run). A case the code got wrong fails its test: the verdict says so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (REPO_ROOT, append_jsonl, environment, markdown_table, read_jsonl, results_path,  # noqa: E402
                     write_section)

RESULTS = "fuzz"
SECTION = "fuzz"


def run(examples: int, draws: int, seed: int, select: str) -> List[Dict[str, Any]]:
    env = environment(torch.device("cpu"))  # before the run: the commit that runs it
    run_id = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "tally.jsonl"
        child = dict(os.environ, IWD_FUZZ_PROFILE="fuzz-long", IWD_FUZZ_EXAMPLES=str(examples),
                     IWD_FAULT_DRAWS=str(draws), IWD_FAULT_SEED=str(seed), IWD_FUZZ_RECORD=str(record),
                     PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", select, "tests/fuzz"]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=child, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        rows = read_jsonl(record) if record.is_file() else []
    verdict = next((ln.strip("= ") for ln in reversed(proc.stdout.splitlines()) if " in " in ln and
                    ("passed" in ln or "failed" in ln)), f"pytest exit code {proc.returncode}")
    print(proc.stdout[-3000:])
    meta = {"run": run_id, "pytest": verdict, "pytest_exit_code": proc.returncode, "examples": examples,
            "draws": draws, "fault_seed": seed, "marker": select, "wall_seconds": round(seconds),
            "command": " ".join(cmd[2:]), "env": env}
    return [{**r, **meta} for r in rows]


def tables(rows: List[Dict[str, Any]]) -> str:
    latest = max(r["run"] for r in rows)
    rows = [r for r in rows if r["run"] == latest]
    meta = rows[0]
    fuzz = defaultdict(lambda: {"correct": 0, "refused": 0})
    for r in rows:
        if r["kind"] == "fuzz":
            fuzz[r["entry"]][r["outcome"]] += r["cases"]
    body = [[f"`{e}`", c["correct"] + c["refused"], c["correct"], c["refused"]] for e, c in sorted(fuzz.items())]
    total = [sum(x[i] for x in body) for i in (1, 2, 3)]
    body.append(["**all**", *total])
    out = [f"Run {latest}, git {meta['env']['git_sha'][:7]}, `{meta['command']}` with IWD_FUZZ_EXAMPLES="
           f"{meta['examples']}, IWD_FAULT_DRAWS={meta['draws']}, IWD_FAULT_SEED={meta['fault_seed']} "
           f"({meta['wall_seconds']} s, load {meta['env']['load_avg_1min']:.1f} on {meta['env']['cpu_count']} cores): "
           f"pytest {meta['pytest']}.", "",
           markdown_table(["entry point", "generated cases", "correct result (checked)",
                           "refused in one line naming the fault"], body)]
    kills = defaultdict(list)
    for r in rows:
        if r["kind"] == "fault" and "draw" in r:
            kills[r["target"]].append(r)
    if kills:
        body = []
        for target, events in sorted(kills.items()):
            landed = "; ".join(f"{e['kill_at_s']:.1f} s: {e['landed']}" for e in sorted(events, key=lambda e: e["draw"]))
            body.append([target, f"{sum(e['killed'] for e in events)} of {len(events)}", landed,
                         f"{sum(e['outcome'] == 'bitwise' for e in events)} of {len(events)}"])
        out += ["", markdown_table(["SIGKILL of", "kills that hit a running job", "where each kill landed",
                                    "restarts bitwise equal to the uninterrupted run"], body)]
    pairs = [r for r in rows if r["kind"] == "fault" and "draw" not in r]
    if pairs:
        out += ["", markdown_table(["two processes on one folder", "what happened"],
                                   [[r["target"].split(", ")[-1], r["outcome"]] for r in pairs])]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=80, help="hypothesis examples per property")
    p.add_argument("--draws", type=int, default=5, help="kills per fault-tier target")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--marker", default="slow or not slow", help="pytest -m expression (default: both tiers)")
    p.add_argument("--table", action="store_true", help="print the tables of the latest stored run, run nothing")
    p.add_argument("--into", default=None, help="with --table: replace the fuzz section of this markdown file")
    args = p.parse_args()
    path = results_path(RESULTS)
    if not args.table:
        rows = run(args.examples, args.draws, args.seed, args.marker)
        append_jsonl(path, rows)
        print(f"{len(rows)} rows appended to {path}")
    text = tables(read_jsonl(path))
    if args.into:
        write_section(args.into, SECTION, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
