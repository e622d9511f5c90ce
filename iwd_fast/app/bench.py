"""``iwd-fast bench SPEC``: run a benchmark suite, resumably, in parallel processes, shardable.

    iwd-fast bench benchmarks/specs/evidence.toml --out runs/evidence --jobs 2 --threads 1
    iwd-fast bench SPEC --out DIR --shard 0/4      # this process runs cells 0, 4, 8, ... (a SLURM array index)
    iwd-fast report runs/evidence/results.jsonl    # tables and plots

Every cell is a run folder under DIR/cells/; a finished cell (summary.json) is skipped, an interrupted
one resumes from its checkpoint. ``--jobs`` processes run at once, each with ``--threads`` torch threads
(jobs x threads should not exceed the cores). After the cells run, DIR/results.jsonl is rewritten from
every finished cell folder (whatever shard ran it), one JSON object per cell; the initial-image
accuracies are shared through DIR/init_cache/.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from tqdm.auto import tqdm

from ..distill.config import init_mode
from .bench_spec import Cell, expand_cells, load_spec, spec_digest
from .run_folder import FolderLock

__all__ = ["run_bench", "run_cells", "collect", "parse_shard", "cell_row"]


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def _run_cell(cell_dir: str, config: Dict[str, Any], threads: int, init_cache: str) -> Dict[str, Any]:
    """Worker: one cell in this process (fresh interpreter: spawn), errors written to the cell folder."""
    import torch

    from ..distill.config import DistillConfig
    from .distill_job import run_distillation

    torch.set_num_threads(threads)
    try:
        summary = run_distillation(DistillConfig.from_dict(config), out_dir=cell_dir, progress=False,
                                   init_cache=init_cache)
        return {"cell": cell_dir, "ok": True, "skipped": bool(summary.get("already_complete"))}
    except Exception as err:  # noqa: BLE001 - one failing cell must not stop the suite
        Path(cell_dir).mkdir(parents=True, exist_ok=True)
        (Path(cell_dir) / "error.txt").write_text("".join(traceback.format_exception(err)))
        return {"cell": cell_dir, "ok": False, "error": f"{type(err).__name__}: {err}"}


def run_bench(spec_path: str, out: str, jobs: int = 1, threads: int = 1, shard: Optional[str] = None,
              progress: bool = True, data_root: Optional[str] = None, variants: Optional[List[str]] = None,
              seeds: Optional[List[int]] = None) -> Dict[str, Any]:
    """Run the cells of ``spec_path`` that belong to ``shard`` (and to ``variants`` and ``seeds``, if given) and
    are not finished; then collect."""
    notes: Dict[str, List[str]] = {}
    try:
        cells = expand_cells(load_spec(spec_path), notes)
    except (ValueError, FileNotFoundError) as err:  # every refusal names the spec file (a missing dataset too)
        raise type(err)(str(err) if str(err).startswith(str(spec_path)) else f"{spec_path}: {err}") from None
    for what, lines in notes.items():  # presets scaled to datasets of one's own, said before any cell runs
        print(f"{what}: " + "; ".join(lines))
    if data_root:
        import dataclasses

        cells = [dataclasses.replace(c, config=c.config.replace(data_root=data_root)) for c in cells]
    return run_cells(cells, out, Path(spec_path).read_text(), jobs, threads, shard, progress, variants, seeds)


def run_cells(cells: List[Cell], out: str, spec_text: str = "", jobs: int = 1, threads: int = 1,
              shard: Optional[str] = None, progress: bool = True, variants: Optional[List[str]] = None,
              seeds: Optional[List[int]] = None) -> Dict[str, Any]:
    """Run the unfinished ``cells`` of this shard (only those of ``variants`` and ``seeds``, if given: a suite's
    priorities run first) in ``jobs`` spawned processes; rewrite results.jsonl from every finished cell."""
    if jobs < 1 or threads < 1:
        raise ValueError(f"--jobs and --threads must be >= 1, got {jobs}, {threads}")
    index, count = parse_shard(shard)
    for flag, chosen, have in (("--variants", variants, {c.variant for c in cells}),
                               ("--seeds", seeds, {c.seed for c in cells})):
        unknown = sorted(set(chosen or ()) - have)
        if unknown:
            raise ValueError(f"{flag} names {unknown}, which the suite does not have (it has {sorted(have)})")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} exists and is not a folder")
    mine = [c for i, c in enumerate(cells) if i % count == index and (variants is None or c.variant in variants)
            and (seeds is None or c.seed in seeds)]
    with FolderLock(root, ".lock" if count == 1 else f".lock.shard{index}of{count}"):  # a second bench is refused
        return _run_cells(cells, mine, root, spec_text, jobs, threads, index, count, progress)


def _run_cells(cells: List[Cell], mine: List[Cell], root: Path, spec_text: str, jobs: int, threads: int,
               index: int, count: int, progress: bool) -> Dict[str, Any]:
    _write_manifest(root, spec_text, cells)
    todo = [c for c in mine if not (root / "cells" / c.key / "summary.json").is_file()]
    failures: List[Dict[str, Any]] = []
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"cells (shard {index}/{count})",
               disable=not progress)
    if todo:
        os.environ.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})  # for the workers
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_run_cell, str(root / "cells" / c.key), c.config.to_dict(), threads,
                                   str(root / "init_cache")) for c in todo]
            for fut in as_completed(futures):
                res = fut.result()
                if not res["ok"]:
                    failures.append(res)
                    bar.write(f"cell failed: {res['cell']}: {res['error']}")
                bar.update(1)
    bar.close()
    rows = collect(root, cells)
    return {"cells": len(cells), "shard_cells": len(mine), "ran": len(todo), "failed": failures,
            "finished": len(rows), "results": str(root / "results.jsonl"), "rows": rows}


def _write_manifest(root: Path, spec_text: str, cells: List[Cell]) -> None:
    """The spec's text and cell list next to the cells; a folder holding another suite is refused."""
    digest = spec_digest(cells)
    manifest = root / "manifest.json"
    if manifest.is_file():
        stored = json.loads(manifest.read_text())
        if stored["digest"] != digest:
            raise ValueError(f"{root} holds another suite (digest {stored['digest']}, this spec {digest}); "
                             "use another --out folder")
        return
    tmp = root / f".manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"digest": digest, "spec": spec_text,
                               "cells": [c.key for c in cells]}, indent=2))
    tmp.replace(manifest)


def cell_row(cell: Cell, folder: Path) -> Optional[Dict[str, Any]]:
    """One results.jsonl row for a finished cell, else None."""
    path = folder / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    env = json.loads((folder / "env.json").read_text()) if (folder / "env.json").is_file() else {}
    acc, init = s.get("accuracy") or {}, s.get("init_accuracy") or {}
    row = {**cell.coordinates(), "cell": cell.key, "git_sha": env.get("git_sha", "unknown"),
           "git_dirty": env.get("git_dirty"), "torch": env.get("torch"), "device": env.get("device_name"),
           "accuracy": acc.get("mean"), "accuracy_std_nets": acc.get("std"), "accuracy_nets": acc.get("accs"),
           "eval_variant": (acc.get("protocol") or {}).get("variant"), "init_accuracy": init.get("mean"),
           "gain_over_init": s.get("gain_over_init"), "init": s.get("init"),
           "init_flipped_share": s.get("init_flipped_share"), "flipped_share": s.get("flipped_share"),
           "weight_on_flipped": s.get("weight_on_flipped"), "auroc_flipped": s.get("auroc_flipped"),
           "warmup_auroc_flipped": s.get("warmup_auroc_flipped"), "weight_max": s.get("weight_max"),
           "scoring_share_of_loop": s.get("scoring_share_of_loop"), "scoring_seconds": s.get("scoring_seconds"),
           "timing_seconds": s.get("timing_seconds"), "timing_calls": s.get("timing_calls"),
           "noise_estimate": s.get("noise_estimate"), "pool_size": s.get("pool_size"),
           "pool_cleaning": cell.config.iwd.pool_cleaning,
           "weighting": cell.config.weighting, "init_mode": init_mode(cell.config),
           "influence": cell.config.iwd.influence, "budget": cell.config.preset,
           "iterations": cell.config.iterations, "loops": [cell.config.outer_loop, cell.config.inner_loop],
           "train_size": cell.config.train_size, "test_size": cell.config.test_size}
    if acc.get("stages"):  # PDD: the cumulative accuracy after each stage, distilled and initial images
        row.update(stage_accuracy=[st["mean"] for st in acc["stages"]],
                   init_stage_accuracy=[st["mean"] for st in init.get("stages") or []],
                   pdd_base=cell.config.pdd.base)
    return row


def collect(root: Path, cells: List[Cell]) -> List[Dict[str, Any]]:
    """Rewrite root/results.jsonl from every finished cell folder (atomic); returns the rows."""
    rows = [r for r in (cell_row(c, root / "cells" / c.key) for c in cells) if r is not None]
    tmp = root / f".results.jsonl.{os.getpid()}.tmp"  # shards sharing the folder never write one temporary
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    tmp.replace(root / "results.jsonl")
    return rows


def main_bench(args) -> int:
    res = run_bench(args.spec, args.out, jobs=args.jobs, threads=args.threads, shard=args.shard,
                    progress=not args.quiet, data_root=args.data_root,
                    variants=args.variants.split(",") if args.variants else None,
                    seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None)
    print(f"{res['finished']}/{res['cells']} cells finished ({res['ran']} run now, {len(res['failed'])} failed); "
          f"results: {res['results']}")
    for f in res["failed"]:
        print(f"  failed: {f['cell']}: {f['error']}", file=sys.stderr)
    return 1 if res["failed"] else 0
