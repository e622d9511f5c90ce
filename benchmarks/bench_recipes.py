"""The README's recipes as a newcomer applies them: the table of results/recipes.jsonl (RESULTS.md 3b).

    python benchmarks/bench_recipes.py --table
    python benchmarks/bench_recipes.py --table --into benchmarks/RESULTS.md

The rows are written by a reader who had only the README and unmodified copies of the authors' repositories
(one JSON line per recipe: weights against the flipped labels, cost with and without the recipe's lines, and
every place the reader had to guess); this script only tabulates them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, read_jsonl, results_path, write_section  # noqa: E402

RESULTS = "recipes"
SECTION = "recipes"

# (label, seconds-with key, seconds-without key) of the unit each recipe was timed in
UNITS = [("outer step", "s_per_ol_with", "s_per_ol_without"),
         ("iteration", "s_per_iteration_with", "s_per_iteration_without"),
         ("expert epoch", "s_per_expert_epoch_with", "s_per_expert_epoch_without")]


def _timing(r: Dict[str, Any]) -> str:
    for unit, with_key, without_key in UNITS:
        if r.get(with_key) is not None:
            return f"{r[with_key]:.0f} / {r[without_key]:.0f} per {unit}"
    return "-"


def _accuracy(r: Dict[str, Any]) -> str:
    if r.get("expert_test_acc_with") is not None:
        return f"expert {100 * r['expert_test_acc_with']:.1f} / {100 * r['expert_test_acc_without']:.1f}"
    return "not evaluated"


def _name(r: Dict[str, Any]) -> str:
    refresh: Optional[str] = r.get("refresh")
    return r["recipe"] + ("" if refresh is None else f" (refresh {str(refresh).replace('default (3)', '3, default')})")


def table(rows: List[Dict[str, Any]]) -> str:
    body = [[_name(r), r["pool_size"], f"{r['weight_on_flipped']:.3f} ({r['flipped_share']:.2f})", f"{r['auroc']:.2f}",
             f"{r['weight_max']:.1f}", "-" if r.get("one_off_s") is None else f"{r['one_off_s']:.0f}", _timing(r),
             _accuracy(r), len(r["guesses"])] for r in rows]
    return markdown_table(["recipe", "pool", "weight on flipped (share)", "AUROC", "max weight", "one-off s",
                           "s with / without the lines", "test acc % with / without", "guesses"], body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", action="store_true", help="print the table of results/recipes.jsonl")
    p.add_argument("--into", default=None, help="with --table: replace the recipes section of this markdown file")
    args = p.parse_args()
    if not args.table:
        p.error("give --table (the rows come from a newcomer's runs, not from this script)")
    text = table(read_jsonl(results_path(RESULTS)))
    if args.into:
        write_section(args.into, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
