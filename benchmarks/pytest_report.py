"""Markdown tables from a pytest-benchmark JSON: one table per group, each path's median and min time
and its ratio to the group's baseline path, measured in the same run.

    python benchmarks/pytest_report.py benchmarks/results/pytest_ext_cpu.json --baseline eager
    python benchmarks/pytest_report.py benchmarks/results/pytest_grad_dot.json --baseline "plain fwd+bwd"

A ratio > 1 means the path took longer than the baseline. Refuses a file whose rows come from more than
one git sha unless --allow-mixed.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import harness


def tables(doc: dict, baseline: str) -> str:
    groups = defaultdict(list)
    for b in doc.get("benchmarks", []):
        groups[b.get("group") or "-"].append(b)
    out = []
    for group, rows in groups.items():
        base = next((r for r in rows if r.get("extra_info", {}).get("path") == baseline), None)
        table = []
        for r in rows:
            st, info = r["stats"], r.get("extra_info", {})
            med, low = 1000.0 * st["median"], 1000.0 * st["min"]
            ratio = st["median"] / base["stats"]["median"] if base else None
            ratio_min = st["min"] / base["stats"]["min"] if base else None
            table.append([info.get("path", r["name"]), f"{med:.2f}", f"{low:.2f}", st["rounds"],
                          "-" if ratio is None else f"{ratio:.2f}", "-" if ratio_min is None else f"{ratio_min:.2f}"])
        out.append(f"#### {group}\n\n" + harness.markdown_table(
            ["path", "ms (median)", "ms (min)", "rounds", f"/ {baseline} (median)", f"/ {baseline} (min)"], table))
    return "\n\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="a --benchmark-json file")
    ap.add_argument("--baseline", required=True, help="extra_info path of each group's baseline")
    ap.add_argument("--allow-mixed", action="store_true", help="accept rows from several git shas")
    args = ap.parse_args(argv)
    doc = json.loads(open(args.json).read())
    shas = sorted({b.get("extra_info", {}).get("git_sha", "unknown") for b in doc.get("benchmarks", [])})
    if len(shas) > 1 and not args.allow_mixed:
        sys.exit(f"{args.json}: rows from {len(shas)} git shas {shas}: one table must come from one commit")
    machine = doc.get("machine_info", {})
    print(f"git {', '.join(shas)}; {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}; "
          f"{doc.get('datetime', '')}\n")
    print(tables(doc, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
