"""The ``iwd-fast`` command (also ``python -m iwd_fast.cli``): distill, evaluate, score, demo, env."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

from ..data import DATASET_NAMES as DATASETS
from ..weighting import TARGETS
from .presets import METHODS, list_presets


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (paired runs share it)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--data-root", default=None, help="folder with the dataset's standard files")
    p.add_argument("--download", action="store_true", help="download missing dataset files (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iwd-fast", description=(
        "Influence-weighted dataset distillation. Scores each real instance by a per-sample-gradient dot "
        "product (never materialising per-sample gradients) and turns scores into instance weights."))
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="distil a dataset into a few synthetic images per class")
    d.add_argument("--method", choices=METHODS, default="dc")
    d.add_argument("--dataset", choices=DATASETS, default="digits")
    d.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    d.add_argument("--weighting", choices=("none", "iwd"), default=None,
                   help="default: iwd for dc/dsa, none for dm (IWD did not help DM in benchmarks/RESULTS.md)")
    d.add_argument("--influence", choices=TARGETS, default=None, help="influence target (default: the preset's)")
    d.add_argument("--sign", choices=("auto", "consistent", "informative"), default=None,
                   help="sign policy for explicit/implicit targets")
    d.add_argument("--init", choices=("random", "weighted", "proportional"), default=None,
                   help="real initialisation: random, highest-weight, or sampled by weight after a warm-up")
    d.add_argument("--temperature", type=float, default=None, help="softmax temperature over per-class z-scores")
    d.add_argument("--refresh", type=int, default=None, help="rescore every N outer steps")
    d.add_argument("--noise", type=float, default=0.0, help="label-noise rate injected into the training set")
    d.add_argument("--noise-kind", choices=("symmetric", "pairflip"), default="symmetric")
    d.add_argument("--preset", choices=list_presets(), default="cpu", help="budget preset (see presets.py)")
    d.add_argument("--iterations", type=int, default=None, help="override the preset's iteration count")
    d.add_argument("--eval-every", type=int, default=None, help="evaluate every N iterations (0: only at the end)")
    d.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    d.add_argument("--out", default=None, help="run folder (default runs/<method>_<dataset>_ipc<N>_<weighting>_s<seed>)")
    _add_common(d)

    e = sub.add_parser("evaluate", help="train fresh networks on a synthetic set and report test accuracy")
    e.add_argument("run", help="a run folder written by `iwd-fast distill` (config.json + synthetic.safetensors)")
    e.add_argument("--num-nets", type=int, default=None)
    e.add_argument("--epochs", type=int, default=None)
    e.add_argument("--net", default=None, help="evaluation network name (cross-architecture), e.g. resnet10")
    _add_common(e)

    s = sub.add_parser("score", help="score every training instance against a trained network")
    s.add_argument("--dataset", choices=DATASETS, default="digits")
    s.add_argument("--target", choices=("validation", "self"), default="validation")
    s.add_argument("--noise", type=float, default=0.0)
    s.add_argument("--noise-kind", choices=("symmetric", "pairflip"), default="symmetric")
    s.add_argument("--epochs", type=int, default=20, help="training epochs of the scoring network")
    s.add_argument("--model", default=None, help="state_dict of a ConvNet to score with instead of training one")
    s.add_argument("--width", type=int, default=32)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--impl", default="auto", help="grad_dot backend: auto, torch, cpu, cuda, triton, jvp, reference")
    s.add_argument("--out", default="runs/score")
    _add_common(s)

    m = sub.add_parser("demo", help="paired runs with and without IWD on label-noised data (the README's main job)")
    m.add_argument("--method", choices=METHODS, default="dc")
    m.add_argument("--dataset", choices=("auto", "digits", "fashion-mnist"), default="auto",
                   help="auto: Fashion-MNIST subset if present, else digits")
    m.add_argument("--seeds", type=int, nargs="+", default=[0])
    m.add_argument("--noise", type=float, default=0.3)
    m.add_argument("--influence", choices=TARGETS, default="validation")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--preset", choices=list_presets(), default="demo", help="budget (smoke: seconds, for checks)")
    m.add_argument("--data-root", default=None)
    m.add_argument("--quiet", action="store_true")

    sub.add_parser("env", help="versions and usable backends (and why the others are not)")
    return parser


def _distill(args) -> int:
    from ..data import load_dataset
    from .distill_job import run_distillation
    from .presets import preset_config

    cfg = preset_config(args.preset, args.method, args.dataset, args.ipc)
    iwd = cfg.iwd
    for field, value in (("influence", args.influence), ("sign", args.sign), ("init", args.init),
                         ("temperature", args.temperature), ("refresh", args.refresh)):
        if value is not None:
            iwd = dataclasses.replace(iwd, **{field: value})
    weighting = args.weighting or ("none" if args.method == "dm" else "iwd")
    cfg = cfg.replace(weighting=weighting, iwd=iwd, noise=args.noise, noise_kind=args.noise_kind,
                      seed=args.seed, device=args.device, data_root=args.data_root)
    if args.iterations is not None:
        cfg = cfg.replace(iterations=args.iterations)
    if args.eval_every is not None:
        cfg = cfg.replace(eval_every=args.eval_every)
    out = args.out or f"runs/{cfg.method}_{cfg.dataset}_ipc{cfg.ipc}_{cfg.weighting}_s{cfg.seed}"
    splits = load_dataset(cfg.dataset, root=cfg.data_root, download=args.download)
    summary = run_distillation(cfg, splits, out_dir=out, progress=not args.quiet, evaluate=not args.no_eval)
    _print_summary(summary, out)
    return 0


def _print_summary(summary, out) -> None:
    keep = {k: v for k, v in summary.items() if k not in ("config", "synthetic", "weights")}
    if "accuracy" in keep:
        acc = keep.pop("accuracy")
        keep["test_accuracy"] = f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} ({acc['protocol']['variant']})"
    print(json.dumps(keep, indent=2, default=str))
    print(f"run folder: {out}")


def _evaluate(args) -> int:
    from ..distill.config import DistillConfig
    from ..data import load_dataset
    from ..runtime import Stream, mix_seed
    from ..evaluate import evaluate_synthetic
    from .run_folder import RunFolder

    run = RunFolder(args.run)
    if not (run.path / "config.json").is_file() or not (run.path / "synthetic.safetensors").is_file():
        raise FileNotFoundError(f"{args.run} has no config.json and synthetic.safetensors: not a distill run folder")
    cfg = DistillConfig.from_dict(run.read_config())
    spec = cfg.eval
    if args.num_nets is not None:
        spec = dataclasses.replace(spec, num_nets=args.num_nets)
    if args.epochs is not None:
        spec = dataclasses.replace(spec, epochs=args.epochs)
    if args.net is not None:
        spec = dataclasses.replace(spec, net=dataclasses.replace(cfg.net, name=args.net))
    syn = run.load_tensors("synthetic")
    splits = load_dataset(cfg.dataset, root=args.data_root or cfg.data_root, download=args.download)
    # What the method trains on (IDC's decoded set, DATM's soft labels) and, for ZCA runs, the whitened test set.
    images, targets, test = syn.get("eval_images", syn["images"]), syn.get("eval_targets", syn["labels"]), splits.test
    if "zca_matrix" in syn:
        from ..data.zca import ZCATransform

        test = dataclasses.replace(test, images=ZCATransform(syn["zca_mean"], syn["zca_matrix"])(test.images))
    ev = evaluate_synthetic(images, targets, test, spec, cfg.net, seed=mix_seed(args.seed, Stream.REEVALUATION),
                            dsa_strategy="auto" if cfg.method in ("dsa", "dm", "mtt", "datm", "idc") else None,
                            device=args.device, progress=not args.quiet)
    run.save_json("evaluation.json", ev)
    print(f"test accuracy {100 * ev['mean']:.2f} ± {100 * ev['std']:.2f} over {len(ev['accs'])} nets "
          f"({ev['protocol']['variant']}); written to {run.path / 'evaluation.json'}")
    return 0


def _score(args) -> int:
    from ..distill.config import NetSpec
    from .score_job import score_dataset

    summary = score_dataset(args.dataset, args.target, noise=args.noise, noise_kind=args.noise_kind,
                            epochs=args.epochs, seed=args.seed, out=args.out, model_path=args.model,
                            net=NetSpec(width=args.width), temperature=args.temperature, impl=args.impl,
                            device=args.device, data_root=args.data_root, download=args.download,
                            progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(out=args.out, method=args.method, seeds=tuple(args.seeds), noise=args.noise,
                      influence=args.influence, prefer=args.dataset, data_root=args.data_root,
                      preset=args.preset, progress=not args.quiet)
    print(result["note"])
    print()
    print(result["table"])
    print(f"\nrun folders and plots under {args.out}/")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "env":
        from .env import main as env_main

        return env_main()
    handler = {"distill": _distill, "evaluate": _evaluate, "score": _score, "demo": _demo}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"iwd-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
