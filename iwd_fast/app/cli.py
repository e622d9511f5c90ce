"""The ``iwd-fast`` command (also ``python -m iwd_fast``): distill, evaluate, score, demo, bench, report, env."""
from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import List, Optional

from ..data import DATASET_NAMES as DATASETS
from ..networks import NETWORK_NAMES
from ..scoring.dataset.score_targets import DATASET_TARGETS
from ..scoring.dispatch import IMPLS
from .cli_distill import add_common as _add_common, add_distill_parser, add_evaluate_parser, run_distill, run_evaluate
from .presets import METHODS, list_presets


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it has none (None, a store_true flag) or its help names it."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iwd-fast", formatter_class=HelpFormatter, description=(
        "Influence-weighted dataset distillation. Scores each real instance by a per-sample-gradient dot "
        "product (never materialising per-sample gradients) and turns scores into instance weights."))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=functools.partial(
        argparse.ArgumentParser, formatter_class=HelpFormatter))

    add_distill_parser(sub)
    add_evaluate_parser(sub)

    s = sub.add_parser("score", help="score every training instance of a dataset against a network", description=(
        "Score every training instance by a per-sample-gradient dot product (validation, direction) or squared "
        "norm (self), streamed in chunks into --out (rerun the same command to resume a killed run). Runs on "
        "torch.distributed when launched with `torchrun --nproc_per_node N -m iwd_fast score ...`."))
    s.add_argument("--dataset", default="digits", help="a built-in name (" + ", ".join(DATASETS) + "), a folder of "
                   "images in class subfolders, or a tensors file (.pt/.safetensors/.npz with images and labels)")
    s.add_argument("--target", choices=DATASET_TARGETS, default="validation",
                   help="validation: <g_i, grad of the held-out loss>; self: ||g_i||^2; direction: <g_i, v_k> of --direction")
    s.add_argument("--direction", default=None, help="a .pt file of directions (dict, list of dicts, or tensors "
                   "aligned with the trainable parameters) for --target direction")
    s.add_argument("--validation-data", default=None, help="a validation set (as --dataset) instead of the held-out split")
    s.add_argument("--heldout", type=float, default=0.1, help="stratified held-out fraction of the training set")
    s.add_argument("--model", default="convnet", help="a built-in network (" + ", ".join(NETWORK_NAMES) + ") or "
                   "package.module:factory (called with channels, num_classes, im_size if it takes them)")
    s.add_argument("--checkpoint", default=None, help="state_dict to load into --model instead of training it")
    s.add_argument("--width", type=int, default=32, help="width of a built-in network")
    s.add_argument("--epochs", type=int, default=20, help="training epochs of the scoring network (0: score as is)")
    s.add_argument("--noise", type=float, default=0.0, help="label-noise rate injected into the training set")
    s.add_argument("--noise-kind", choices=("symmetric", "pairflip"), default="symmetric", help="label-noise kind")
    s.add_argument("--scale", type=float, default=0.01, help="validation direction = scale * held-out gradient (lr)")
    s.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the weights")
    s.add_argument("--impl", default="auto", help="backend: " + ", ".join(IMPLS))
    s.add_argument("--batch", type=int, default=256, help="images per forward+backward (bounds memory)")
    s.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (image folders)")
    s.add_argument("--chunk-batches", type=int, default=16, help="batches per checkpointed chunk")
    s.add_argument("--nonfinite", choices=("error", "skip"), default="error",
                   help="NaN/Inf inputs or scores: error (names them) or skip (weight 0, recorded)")
    s.add_argument("--normalize", choices=("auto", "none"), default="auto",
                   help="image folders and tensors files: per-channel mean/std of the training images, or none")
    s.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="resize the images of a folder to H W")
    s.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    s.add_argument("--out", default="runs/score", help="run folder (resumable; a finished run is reported)")
    _add_common(s)

    m = sub.add_parser("demo", help="paired runs with and without IWD on label-noised data (the README's main job)")
    m.add_argument("--method", choices=METHODS, default="dc")
    m.add_argument("--dataset", choices=("auto", "digits", "fashion-mnist"), default="auto",
                   help="auto: a Fashion-MNIST subset if its files are found, else digits")
    m.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="paired seeds")
    m.add_argument("--noise", type=float, default=0.3, help="symmetric label-noise rate")
    m.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--preset", choices=list_presets(), default="demo", help="budget (smoke: seconds, for checks)")
    m.add_argument("--data-root", default=None)
    m.add_argument("--quiet", action="store_true")

    b = sub.add_parser("bench", help="run a benchmark suite (a TOML grid of cells), resumably and in parallel")
    b.add_argument("spec", help="the suite's TOML file (see iwd_fast/app/bench_spec.py; benchmarks/specs/)")
    b.add_argument("--out", required=True, help="suite folder: cells/, init_cache/, manifest.json, results.jsonl")
    b.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process")
    b.add_argument("--threads", type=int, default=1, help="torch threads per cell (jobs x threads <= cores)")
    b.add_argument("--shard", default=None, help="i/n: run only cells i, i+n, ... (a scheduler's array index)")
    b.add_argument("--variants", default=None, metavar="A,B",
                   help="run only the cells of these variants now (the others wait for a later call); results.jsonl "
                        "still holds every finished cell")
    b.add_argument("--seeds", default=None, metavar="0,1",
                   help="run only the cells of these seeds now (e.g. three seeds of every setting first)")
    b.add_argument("--data-root", default=None, help="folder with the datasets' standard files")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("report", help="markdown tables and plots from a suite's results.jsonl")
    r.add_argument("results", help="results.jsonl written by `iwd-fast bench`")
    r.add_argument("--out", default=None, help="markdown file to write (default: print)")
    r.add_argument("--into", default=None, metavar="NAME:FILE",
                   help="replace the <!-- NAME:begin --> ... <!-- NAME:end --> section of FILE (e.g. evidence:benchmarks/RESULTS.md)")
    r.add_argument("--plots", default=None, help="folder for the PNG plots (accuracy and weight on flipped vs noise)")
    r.add_argument("--baseline", default="unweighted", help="the variant that paired gains are measured against")
    r.add_argument("--allow-mixed-shas", action="store_true", help="accept rows from several git commits")

    sub.add_parser("env", help="versions and usable backends (and why the others are not)")
    return parser


def _score(args) -> int:
    import torch

    from .score import ScoreConfig, run_score

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cfg = ScoreConfig(dataset=args.dataset, target=args.target, direction=args.direction,
                      validation_data=args.validation_data, heldout=args.heldout, model=args.model,
                      checkpoint=args.checkpoint, width=args.width, epochs=args.epochs, seed=args.seed,
                      noise=args.noise, noise_kind=args.noise_kind, scale=args.scale, temperature=args.temperature,
                      impl=args.impl, device=args.device, batch=args.batch, chunk_batches=args.chunk_batches,
                      nonfinite=args.nonfinite, normalize=args.normalize,
                      image_size=tuple(args.image_size) if args.image_size else None)
    summary = run_score(cfg, args.out, data_root=args.data_root, download=args.download, workers=args.workers,
                        progress=not args.quiet)
    if "rank" in summary:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    if summary.get("already_complete"):
        print(f"score: {args.out} already holds this finished run (checksum {summary.get('checksum', '?')[:16]}); "
              "nothing was scored again", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(out=args.out, method=args.method, seeds=tuple(args.seeds), noise=args.noise,
                      prefer=args.dataset, data_root=args.data_root, preset=args.preset, jobs=args.jobs,
                      progress=not args.quiet)
    print(result["note"])
    print()
    print(result["table"])
    print()
    print(result["verdict"])
    print(f"\nrun folders, demo.json, demo_table.md and demo_accuracy.png under {args.out}/")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "env":
        from .env import main as env_main

        return env_main()
    if args.command in ("bench", "report"):
        from .bench import main_bench
        from .report import main_report

        handler = {"bench": main_bench, "report": main_report}[args.command]
    else:
        handler = {"distill": run_distill, "evaluate": run_evaluate, "score": _score, "demo": _demo}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"iwd-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
