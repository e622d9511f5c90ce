"""``iwd-fast report RESULTS.jsonl``: markdown tables and PNG plots from a benchmark suite's results.

One table per (grid, method, dataset, IPC, noise): a row for the undistilled initial images, one per
weighting variant, and, for noisy tables, the baseline variant on clean labels at the same budget.
Accuracies are the mean +- std over seeds of each run's mean over its evaluation networks; gains are
paired by seed (the same noise, split and networks): the gain over the run's own initial images, and
the paired difference to the baseline variant with its 95% confidence interval (t distribution) and
the paired t-test p-value (scipy.stats.ttest_rel). Rows from more than one git sha are refused unless
``allow_mixed``.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["load_rows", "paired", "won_back", "render", "plot_suite", "markdown_table", "replace_section", "main_report"]

TABLE_KEYS = ("grid", "method", "dataset", "ipc", "noise", "noise_kind", "budget")
LOOPED_METHODS = ("dc", "dsa")  # methods whose iterations are outer x inner loops (the header says so)


# what every row needs (cell_row writes them all); the numeric ones are numbers or null
ROW_KEYS = TABLE_KEYS + ("variant", "seed", "accuracy", "init_accuracy", "gain_over_init", "init_flipped_share")
_NUMERIC = ("ipc", "noise", "seed", "accuracy", "init_accuracy", "gain_over_init", "init_flipped_share",
            "weight_on_flipped", "flipped_share")


def load_rows(path: str, allow_mixed: bool = False) -> List[Dict[str, Any]]:
    """The rows of a suite's results.jsonl; a line that is not such a row is refused by its number."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the results.jsonl that `iwd-fast bench` wrote in it")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            rows.append(_row(path, number, line))
    if not rows:
        raise ValueError(f"{path} holds no finished cells")
    shas = sorted({r.get("git_sha", "unknown") for r in rows})
    if len(shas) > 1 and not allow_mixed:
        raise ValueError(f"{path}: rows come from {len(shas)} git shas {shas}; rerun the suite at one commit "
                         "(or pass --allow-mixed-shas)")
    return rows


def _row(path: Path, number: int, line: str) -> Dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {number} is not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}: line {number} is a JSON {type(row).__name__}, not a row object")
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"{path}: line {number} lacks the keys {missing}: not a row `iwd-fast bench` wrote")
    wrong = [k for k in _NUMERIC if row.get(k) is not None and (isinstance(row[k], bool) or
                                                                not isinstance(row[k], (int, float)))]
    if wrong:
        raise ValueError(f"{path}: line {number}: {wrong} must be numbers (or null), got "
                         f"{[row[k] for k in wrong]}")
    return row


def paired(a: Sequence[float], b: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean paired difference a - b, its 95% CI (t distribution) and the two-sided paired t-test p-value."""
    from scipy import stats

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out: Dict[str, Optional[float]] = {"mean": float(d.mean()) if d.size else None, "n": int(d.size),
                                       "ci_low": None, "ci_high": None, "p": None}
    if d.size >= 2:
        sem = d.std(ddof=1) / math.sqrt(d.size)
        half = float(stats.t.ppf(0.975, d.size - 1) * sem)
        out.update(ci_low=float(d.mean()) - half, ci_high=float(d.mean()) + half)
        out["p"] = 1.0 if sem == 0 and d.mean() == 0 else float(stats.ttest_rel(a, b).pvalue)
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt_pp(x: Optional[float], signed: bool = False) -> str:
    return "-" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")


def _fmt_p(p: float) -> str:
    """A p-value to three significant digits ("p=0.0499", never a rounded "p=0.050"); "p<0.001" below that."""
    return "p<0.001" if p < 0.001 else f"p={p:.3g}"


def _mean_std(values: Sequence[Optional[float]], pct: bool = True, digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    k = 100.0 if pct else 1.0
    arr = np.asarray(vals, dtype=np.float64) * k
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=0):.{digits}f}" if len(vals) > 1 else f"{arr[0]:.{digits}f}"


def _by_seed(rows: List[Dict[str, Any]], field: str) -> Dict[int, float]:
    return {r["seed"]: r[field] for r in rows if r.get(field) is not None}


def _table_rows(rows, baseline: str, clean: Optional[List[Dict[str, Any]]]) -> Tuple[List[List[str]], Dict]:
    variants = defaultdict(list)
    for r in rows:
        variants[r["variant"]].append(r)
    base = _by_seed(variants.get(baseline, []), "accuracy")
    out, stats = [], {}
    init_rows = variants.get(baseline) or next(iter(variants.values()))
    out.append(["initial images (" + init_rows[0].get("init", "?") + ")", _mean_std([r["init_accuracy"] for r in init_rows]),
                "-", "-", "-", _mean_std([r["init_flipped_share"] for r in init_rows], pct=False, digits=2), "-", "-",
                str(len(init_rows))])
    for name, vr in variants.items():
        acc = _by_seed(vr, "accuracy")
        seeds = sorted(set(acc) & set(base))
        diff = paired([acc[s] for s in seeds], [base[s] for s in seeds]) if name != baseline else None
        stats[name] = {"paired": diff, "acc": acc}
        gain = [r["gain_over_init"] for r in vr]
        flipped = _mean_std([r.get("weight_on_flipped") for r in vr], pct=False, digits=2)
        share = _mean_std([r.get("flipped_share") for r in vr], pct=False, digits=2)
        diff_txt = "-" if diff is None or diff["mean"] is None else (
            f"{_fmt_pp(diff['mean'], True)} [{_fmt_pp(diff['ci_low'], True)}, {_fmt_pp(diff['ci_high'], True)}]"
            + (f", {_fmt_p(diff['p'])}" if diff["p"] is not None else ""))
        out.append([name, _mean_std([r["accuracy"] for r in vr]), _mean_std(gain), diff_txt,
                    f"{flipped} (share {share})" if flipped != "-" else "-",
                    _mean_std([r.get("init_flipped_share") for r in vr], pct=False, digits=2),
                    _mean_std([r.get("auroc_flipped") for r in vr], pct=False, digits=2),
                    _mean_std([r.get("scoring_share_of_loop") for r in vr]), str(len(vr))])
    if clean:
        out.append([f"{baseline} on clean labels (reference)", _mean_std([r["accuracy"] for r in clean]),
                    _mean_std([r["gain_over_init"] for r in clean]), "-", "-", "-", "-", "-", str(len(clean))])
    return out, stats


def _stage_costs(rows: List[Dict[str, Any]]) -> List[str]:
    """Per variant whose IWD runs as a stage before the loop (the two-pass scheme of trajectory matching):
    what the stage cost beside the loop, from the runs' phase timers (their "scoring % of loop" is 0: the
    loop itself does no scoring)."""
    by_variant = defaultdict(list)
    for r in rows:
        t = r.get("timing_seconds") or {}
        if "checkpoint scoring" in t:
            by_variant[r["variant"]].append(t)
    lines = []
    for name, ts in by_variant.items():
        def sec(key):
            return _mean_std([t.get(key) for t in ts], pct=False, digits=0)
        lines.append(f"- {name}: IWD ran before the loop: scoring along expert checkpoints {sec('checkpoint scoring')} s, "
                     f"warm-up scoring {sec('warm-up scoring')} s, experts trained by the run "
                     f"{sec('experts')} s, beside {sec('distilling')} s of distillation ({len(ts)} runs)")
    return ["\n" + "\n".join(lines)] if lines else []


def _stage_lines(rows: List[Dict[str, Any]]) -> List[str]:
    """PDD: the cumulative accuracy after each stage (mean over seeds), initial images and each variant."""
    staged = [r for r in rows if r.get("stage_accuracy")]
    if not staged:
        return []

    def chain(runs, field):
        per_stage = list(zip(*[r[field] for r in runs if r.get(field)]))
        return " -> ".join(f"{100 * float(np.mean(v)):.1f}" for v in per_stage) or "-"

    by_variant = defaultdict(list)
    for r in staged:
        by_variant[r["variant"]].append(r)
    lines = [f"- cumulative test accuracy % after each stage (PDD on {staged[0].get('pdd_base', '?').upper()}, "
             f"mean over seeds): initial images {chain(staged, 'init_stage_accuracy')}"]
    lines += [f"- {name}: {chain(vr, 'stage_accuracy')} ({len(vr)} runs)" for name, vr in by_variant.items()]
    return ["\n" + "\n".join(lines)]


def won_back(won: np.ndarray, cost: np.ndarray, share: float) -> Tuple[str, float]:
    """Paired per seed: ``won`` = variant - baseline under noise, ``cost`` = baseline clean - baseline noisy
    ([n] each). Returns the share of the cost won back as text and the one-sided paired t-test p-value of
    winning back at least ``share`` of it (nan when the differences do not vary)."""
    from scipy import stats as st

    d = won - share * cost
    p = float(st.ttest_1samp(d, 0.0, alternative="greater").pvalue) if d.std() > 0 else float("nan")
    text = f"{won.mean() / cost.mean():.0%}" if cost.mean() > 0 else "n/a: the noise cost nothing here"
    return text, p


def _recovery(stats: Dict, baseline: str, clean_acc: Dict[int, float]) -> List[str]:
    """Per variant: the share of the noise cost won back, and the one-sided test of winning back half."""
    lines = []
    base = stats.get(baseline, {}).get("acc", {})
    for name, s in stats.items():
        if name == baseline:
            continue
        seeds = sorted(set(s["acc"]) & set(base) & set(clean_acc))
        if len(seeds) < 2:
            continue
        cost = np.array([clean_acc[k] - base[k] for k in seeds])
        won = np.array([s["acc"][k] - base[k] for k in seeds])
        share, p = won_back(won, cost, 0.5)
        lines.append(f"- {name}: wins back {100 * won.mean():+.1f} of a {100 * cost.mean():.1f}-point noise cost "
                     f"({share}); at least half: {'yes' if p < 0.05 else 'not shown'} "
                     f"(one-sided paired t-test {_fmt_p(p)}, {len(seeds)} seeds)")
    return lines


HEADERS = ["row", "test acc %", "gain over initial images (pp)", "paired gain over {b} (pp) [95% CI], p",
           "weight on flipped (noise share)", "flipped share of initial images", "AUROC flipped",
           "scoring % of loop", "seeds"]


def render(rows: List[Dict[str, Any]], baseline: str = "unweighted") -> str:
    shas = sorted({r.get("git_sha", "unknown") for r in rows})
    dirty = any(r.get("git_dirty") for r in rows)
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in TABLE_KEYS)].append(r)
    parts = [f"Rows from git {', '.join(s[:10] for s in shas)}" + (" (working tree dirty)" if dirty else "") +
             f"; {len(rows)} runs. Accuracy: mean ± std over seeds of each run's mean over its evaluation networks."]
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        grid, method, dataset, ipc, noise, kind, budget = key
        sel = groups[key]
        clean = None
        if noise > 0:
            clean = [r for r in rows if (r["grid"], r["method"], r["dataset"], r["ipc"], r["budget"]) ==
                     (grid, method, dataset, ipc, budget) and r["noise"] == 0 and r["variant"] == baseline] or None
        table, stats = _table_rows(sel, baseline, clean)
        eval_variant = sel[0].get("eval_variant") or "?"
        loops = sel[0].get("loops")
        structure = f" of {loops[0]} x {loops[1]} loops" if method in LOOPED_METHODS and loops else ""
        parts.append(f"\n#### {method.upper()} {dataset} IPC {ipc}, {noise:.0%} {kind} noise ({grid}; budget "
                     f"{budget}: {sel[0].get('iterations')} iterations{structure}, train "
                     f"{sel[0].get('train_size') or 'all'}; eval {eval_variant})\n")
        parts.append(markdown_table([h.format(b=baseline) for h in HEADERS], table))
        parts.extend(_stage_costs(sel))
        parts.extend(_stage_lines(sel))
        if clean:
            lines = _recovery(stats, baseline, _by_seed(clean, "accuracy"))
            if lines:
                parts.append("\n" + "\n".join(lines))
    return "\n".join(parts) + "\n"


def plot_suite(rows: List[Dict[str, Any]], folder: str, baseline: str = "unweighted") -> List[str]:
    """accuracy_vs_noise_<method>.png and weight_on_flipped_vs_noise_<method>.png per method; their paths."""
    from .plots import plot_lines

    written = []
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        for field, ylabel, name in (("accuracy", "test accuracy", "accuracy_vs_noise"),
                                    ("weight_on_flipped", "weight on flipped labels", "weight_on_flipped_vs_noise")):
            series = defaultdict(lambda: defaultdict(list))
            for r in mine:
                if r.get(field) is not None:
                    series[f"{r['variant']} ({r['noise_kind']})"][r["noise"]].append(r[field])
            if field == "weight_on_flipped":
                shares = defaultdict(list)
                for r in mine:
                    shares[r["noise"]].append(r.get("flipped_share") or 0.0)
                series["noise share (uniform weights)"] = shares
            if not series:
                continue
            lines = {label: sorted((x, float(np.mean(v)), float(np.std(v))) for x, v in pts.items())
                     for label, pts in series.items()}
            path = Path(folder) / f"{name}_{method}.png"
            plot_lines(lines, path, xlabel="label-noise rate", ylabel=ylabel,
                       title=f"{method.upper()}: {ylabel} vs noise rate (mean ± std over seeds)")
            written.append(str(path))
    return written


def replace_section(document: str, name: str, body: str) -> str:
    """``document`` with the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` replaced by ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if document.count(begin) != 1 or document.count(end) != 1 or document.index(begin) > document.index(end):
        raise ValueError(f"the document needs exactly one {begin} ... {end} pair")
    head, rest = document.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body.rstrip()}\n{end}{tail}"


def main_report(args) -> int:
    rows = load_rows(args.results, allow_mixed=args.allow_mixed_shas)
    text = render(rows, baseline=args.baseline)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    if args.into:
        name, _, path = args.into.partition(":")
        doc = Path(path)
        doc.write_text(replace_section(doc.read_text(), name, text))
        print(f"replaced the {name!r} section of {path}")
    if not args.out and not args.into:
        print(text)
    if args.plots:
        for p in plot_suite(rows, args.plots, args.baseline):
            print(f"wrote {p}")
    return 0
