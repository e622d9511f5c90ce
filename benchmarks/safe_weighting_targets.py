"""The safe-weighting targets, checked on a suite's rows: is a candidate setting safe to turn on by default?

Reads the rows `iwd-fast bench benchmarks/specs/safe_weighting.toml` wrote (DC grid) and prints one line per
target with the measured value, the paired statistic it rests on and a verdict (reported, never asserted):

- clean labels: the candidate not behind unweighted by more than 0.3 points, and the 95% CI of the paired gain
  reaching 0 or above;
- 40% symmetric: a paired gain of at least +4.6 points, and at least 60% of the noise cost won back
  (one-sided paired t-test of gain - 0.6 * cost > 0, cost = unweighted on clean labels - unweighted noisy, per seed);
- 20% / 40% pair-flip: not behind unweighted (paired mean >= 0); at 40% pair-flip at least half won back;
- against the pool-cleaning baselines users try instead (every variant whose name starts with "prune" or is
  "relabel"): ahead of the best of them under 40% noise by at least 1 point, and not behind the best on clean
  labels by more than 0.3.

A target whose rows are missing says so instead of a verdict. Every number comes from the rows of one
commit (``report.load_rows`` refuses mixed shas).

    python benchmarks/safe_weighting_targets.py benchmarks/results/safe_weighting.jsonl
    python benchmarks/safe_weighting_targets.py benchmarks/results/safe_weighting.jsonl --into benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Tuple

import numpy as np

from harness import write_section
from iwd_fast.app.report import load_rows, markdown_table, paired, won_back

BASELINE = "unweighted"
SECTION = "safe-weighting-targets"
Cell = Tuple[float, str]  # (noise rate, noise kind)


def accuracy_by_seed(rows: List[dict], variant: str, cell: Cell) -> Dict[int, float]:
    """{seed: accuracy} of ``variant`` in the DC grid at ``cell``."""
    return {r["seed"]: r["accuracy"] for r in rows
            if r["grid"] == "safe-weighting" and r["variant"] == variant
            and (r["noise"], r["noise_kind"]) == cell}


def _common(*series: Dict[int, float]) -> List[int]:
    seeds = set(series[0])
    for s in series[1:]:
        seeds &= set(s)
    return sorted(seeds)


def _pp(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def _ci(d: dict) -> str:
    if d["ci_low"] is None:
        return f"{_pp(d['mean'])} (n={d['n']}, no CI)"
    return f"{_pp(d['mean'])} [{_pp(d['ci_low'])}, {_pp(d['ci_high'])}], p={d['p']:.3g}, n={d['n']}"


def _met(d: dict, floor: float) -> bool:
    """A paired difference meets ``floor`` when its mean is >= ``floor``; a floor of 0 or below ("not behind")
    also needs the CI's upper end to reach 0."""
    return d["mean"] >= floor and (floor > 0 or d["ci_high"] >= 0)


def gain_row(rows, candidate: str, cell: Cell, label: str, floor: float) -> List[str]:
    """Paired gain over unweighted at ``cell`` against ``floor`` (``_met``)."""
    a, b = accuracy_by_seed(rows, candidate, cell), accuracy_by_seed(rows, BASELINE, cell)
    seeds = _common(a, b)
    if len(seeds) < 2:
        return [label, "-", f"rows missing ({len(seeds)} paired seeds)", "not measured"]
    d = paired([a[s] for s in seeds], [b[s] for s in seeds])
    return [label, _pp(d["mean"]), _ci(d), "MET" if _met(d, floor) else "NOT MET"]


def recovery_row(rows, candidate: str, cell: Cell, label: str, share: float) -> List[str]:
    """At least ``share`` of the noise cost won back, one-sided paired t-test at 0.05."""
    a, b = accuracy_by_seed(rows, candidate, cell), accuracy_by_seed(rows, BASELINE, cell)
    clean = accuracy_by_seed(rows, BASELINE, (0.0, "symmetric"))
    seeds = _common(a, b, clean)
    if len(seeds) < 2:
        return [label, "-", f"rows missing ({len(seeds)} paired seeds)", "not measured"]
    won = np.array([a[s] - b[s] for s in seeds])
    cost = np.array([clean[s] - b[s] for s in seeds])
    measured, p = won_back(won, cost, share)
    return [label, measured, f"won {_pp(won.mean())} of a {100 * cost.mean():.1f}-point cost; one-sided p={p:.3g}, "
                             f"n={len(seeds)}", "MET" if p < 0.05 else "NOT MET"]


def baseline_row(rows, candidate: str, cell: Cell, label: str, margin: float) -> List[str]:
    """The candidate against the best pool-cleaning baseline at ``cell`` (best by mean over common seeds),
    against ``margin`` (``_met``)."""
    names = sorted({r["variant"] for r in rows if r["variant"].startswith("prune") or r["variant"] == "relabel"})
    a = accuracy_by_seed(rows, candidate, cell)
    scored = []
    for name in names:
        b = accuracy_by_seed(rows, name, cell)
        seeds = _common(a, b)
        if len(seeds) >= 2:
            scored.append((float(np.mean([b[s] for s in seeds])), name, seeds, b))
    if not scored:
        return [label, "-", "rows missing", "not measured"]
    _, best, seeds, b = max(scored)
    d = paired([a[s] for s in seeds], [b[s] for s in seeds])
    return [label, _pp(d["mean"]), f"against {best}: {_ci(d)}", "MET" if _met(d, margin) else "NOT MET"]


def targets(rows, candidate: str) -> List[List[str]]:
    clean, sym40, pf20, pf40 = (0.0, "symmetric"), (0.4, "symmetric"), (0.2, "pairflip"), (0.4, "pairflip")
    return [
        gain_row(rows, candidate, clean, "clean labels: not behind unweighted by > 0.3", -0.003),
        gain_row(rows, candidate, sym40, "40% symmetric: paired gain >= +4.6", 0.046),
        recovery_row(rows, candidate, sym40, "40% symmetric: >= 60% of the noise cost won back", 0.6),
        gain_row(rows, candidate, pf20, "20% pair-flip: not behind unweighted", 0.0),
        gain_row(rows, candidate, pf40, "40% pair-flip: not behind unweighted", 0.0),
        recovery_row(rows, candidate, pf40, "40% pair-flip: >= half the noise cost won back", 0.5),
        baseline_row(rows, candidate, sym40, "40% symmetric: >= 1 point ahead of the best pool-cleaning baseline", 0.01),
        baseline_row(rows, candidate, clean, "clean labels: not behind the best pool-cleaning baseline by > 0.3", -0.003),
    ]


def render(rows, candidate: str) -> str:
    sha = rows[0].get("git_sha", "unknown")[:10]
    table = markdown_table(["target", "measured (pp)", "paired statistic", "verdict"], targets(rows, candidate))
    return (f"Targets of `{candidate}` (DC, `cpu` preset, Fashion-MNIST IPC 10; CPU budget), rows from git {sha}, "
            f"checked by `benchmarks/safe_weighting_targets.py`:\n\n{table}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the suite's results.jsonl")
    ap.add_argument("--candidate", default="auto", help="the variant checked against the targets")
    ap.add_argument("--into", default=None, help=f"also replace the {SECTION!r} section of this markdown file")
    args = ap.parse_args()
    text = render(load_rows(args.results), args.candidate)
    print(text)
    if args.into:
        write_section(args.into, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
