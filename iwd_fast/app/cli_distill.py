"""``iwd-fast distill`` and ``iwd-fast evaluate``: their options and handlers."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import List, Optional, Tuple

from ..data.user_data import UserData, UserDataSpec, dataset_label, describe_sources, is_user_dataset, open_user_data
from ..distill.config import INIT_MODES, NOISE_KINDS, WARMUP_INFLUENCES, WEIGHTINGS, DistillConfig
from ..networks import NETWORK_NAMES
from ..distill.pdd import PDD_BASES
from ..weighting import TARGETS, TRANSFORMS
from .presets import METHODS, default_weighting, list_presets

__all__ = ["add_distill_parser", "add_evaluate_parser", "config_from_args", "run_distill", "run_evaluate"]

# CLI flag -> IWDSpec field (None: keep the preset's)
IWD_FLAGS = ("influence", "sign", "init", "temperature", "transform", "refresh", "floor", "heldout_keep",
             "warmup_influence", "warmup_steps")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (paired runs share it)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--data-root", default=None, help="folder with the dataset's standard files")
    p.add_argument("--download", action="store_true", help="download missing dataset files (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_distill_parser(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("distill", help="distil a dataset into a few synthetic images per class")
    d.add_argument("--method", choices=METHODS, default="dc")
    d.add_argument("--dataset", default="digits", help=f"{describe_sources()}; your own data's test set, image "
                   "size and class names are inferred (see --test, --image-size), its normalisation statistics "
                   "computed on the training part")
    d.add_argument("--ipc", type=int, default=None, help="synthetic images per class (default: 10; on your own "
                   "data 10 while that is at most a tenth of the smallest class, else 1)")
    d.add_argument("--model", default=None, help="distillation and evaluation network: a built-in name "
                   f"({', '.join(NETWORK_NAMES)}) or package.module:factory (called with channels, num_classes, "
                   "im_size if it takes them); default: the preset's ConvNet")
    d.add_argument("--test", default=None, help="your own data: a test folder or tensors file (default: a tensors "
                   "file's test arrays, else a stratified split of --test-fraction)")
    d.add_argument("--test-fraction", type=float, default=0.2, help="your own data without a test set: share of "
                   "each class held out as the test set")
    d.add_argument("--split-seed", type=int, default=0, help="seed of that split (recorded; paired runs share it)")
    d.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="your own data: resize every image to H W (needed when sizes differ)")
    d.add_argument("--weighting", choices=WEIGHTINGS, default=None,
                   help="none; iwd (scores refreshed in the loop); static (warm-up scores held fixed). "
                        "Default: the method's measured default (presets.default_weighting)")
    d.add_argument("--influence", choices=TARGETS, default=None, help="in-loop influence target (default: preset's)")
    d.add_argument("--sign", choices=("auto", "consistent", "informative"), default=None,
                   help="sign policy of the explicit/implicit targets")
    d.add_argument("--init", choices=INIT_MODES, default=None,
                   help="initial real images: random, highest warm-up weight, or drawn by weight (any --weighting)")
    d.add_argument("--warmup-influence", choices=WARMUP_INFLUENCES, default=None,
                   help="the warm-up network's score (initial images and static weights)")
    d.add_argument("--warmup-steps", type=int, default=None, help="SGD steps of the warm-up network")
    d.add_argument("--temperature", type=float, default=None, help="softmax temperature of the weights")
    d.add_argument("--transform", choices=TRANSFORMS, default=None, help="rank (bounded) or zscore")
    d.add_argument("--floor", type=float, default=None, help="mix the weights with uniform: (1 - f) w + f")
    d.add_argument("--refresh", type=int, default=None, help="rescore every N outer steps (weighting iwd)")
    d.add_argument("--heldout-keep", type=float, default=None,
                   help="validation target: share of the held-out batch (lowest loss) defining the direction")
    d.add_argument("--noise", type=float, default=0.0, help="label-noise rate injected into the training set")
    d.add_argument("--noise-kind", choices=NOISE_KINDS, default="symmetric")
    d.add_argument("--pdd-base", choices=sorted(PDD_BASES), default=None,
                   help="--method pdd: the base method each stage runs (default: mtt)")
    d.add_argument("--stages", type=int, default=None, help="--method pdd: number of stages (default: the preset's)")
    d.add_argument("--preset", choices=list_presets(), default="cpu", help="budget preset (see app/presets.py)")
    d.add_argument("--iterations", type=int, default=None, help="override the preset's iteration count")
    d.add_argument("--train-size", type=int, default=None, help="class-stratified training subset (0: all)")
    d.add_argument("--eval-every", type=int, default=None, help="evaluate every N iterations (0: only at the end)")
    d.add_argument("--no-eval", action="store_true", help="skip the evaluations")
    d.add_argument("--config", default=None, help="a config.json to run as is (the other options are ignored)")
    d.add_argument("--out", default=None, help="run folder (default runs/<method>_<dataset>_ipc<N>_<weighting>_s<seed>)")
    add_common(d)
    return d


def add_evaluate_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("evaluate", help="train fresh networks on a run's synthetic set and report test accuracy")
    e.add_argument("run", help="a run folder written by `iwd-fast distill` (config.json + synthetic.safetensors)")
    e.add_argument("--num-nets", type=int, default=None, help="default: the run's")
    e.add_argument("--epochs", type=int, default=None, help="default: the run's")
    e.add_argument("--net", default=None, help="evaluation network name (cross-architecture), e.g. resnet10")
    e.add_argument("--seed", type=int, default=None,
                   help="seed of other evaluation networks (default: the run's own, which reproduces its accuracy)")
    e.add_argument("--device", default="auto")
    e.add_argument("--data-root", default=None)
    e.add_argument("--download", action="store_true")
    e.add_argument("--quiet", action="store_true")
    return e


def config_from_args(args, data: Optional[UserData] = None) -> Tuple[DistillConfig, List[str]]:
    """The config a `distill` command line describes (a --config file wins), and what scaling the preset to
    ``data`` (the opened dataset of one's own named by --dataset; ``scaling.scaled_config``) chose, as lines."""
    if args.config:
        with open(args.config) as fh:
            try:
                return DistillConfig.from_dict(json.load(fh)), []
            except ValueError as err:  # not JSON, or not a config: name the file
                raise ValueError(f"--config {args.config}: {err}") from None
    from .presets import preset_config

    if (args.pdd_base is not None or args.stages is not None) and args.method != "pdd":
        raise ValueError("--pdd-base and --stages are settings of --method pdd")
    notes: List[str] = []
    if data is None:
        ipc = 10 if args.ipc is None else args.ipc  # 0 is refused by validate, not taken for the default
        cfg = preset_config(args.preset, args.method, args.dataset, ipc, base=args.pdd_base)
    else:
        from .scaling import scaled_config

        fixed = {f for f, given in (("train_size", args.train_size), ("net", args.model)) if given is not None}
        cfg, notes = scaled_config(args.preset, args.method, str(Path(args.dataset).resolve()), data, args.ipc, fixed,
                                   base=args.pdd_base)
        cfg = cfg.replace(data=user_data_spec(args))
    if args.model is not None:
        cfg = cfg.replace(net=dataclasses.replace(cfg.net, name=args.model))
    if args.stages is not None:
        cfg = cfg.replace(pdd=dataclasses.replace(cfg.pdd, stages=args.stages))
    changes = {f: getattr(args, f) for f in IWD_FLAGS if getattr(args, f) is not None}
    cfg = cfg.replace(weighting=args.weighting or default_weighting(args.method),
                      iwd=dataclasses.replace(cfg.iwd, **changes), noise=args.noise, noise_kind=args.noise_kind,
                      seed=args.seed, device=args.device, data_root=args.data_root)
    for field in ("iterations", "eval_every", "train_size"):
        if getattr(args, field) is not None:
            cfg = cfg.replace(**{field: getattr(args, field)})
    return cfg, notes


def user_data_spec(args) -> UserDataSpec:
    """--test, --test-fraction, --split-seed, --image-size as the config's data spec (paths made absolute)."""
    return UserDataSpec(image_size=list(args.image_size) if args.image_size else None,
                        test=str(Path(args.test).resolve()) if args.test else None,
                        test_fraction=args.test_fraction, split_seed=args.split_seed)


def run_distill(args) -> int:
    from ..data import load_dataset
    from ..distill.config import validate
    from .distill_job import run_distillation
    from .presets import describe_preset

    data = None
    if not args.config and is_user_dataset(args.dataset):
        data = open_user_data(args.dataset, user_data_spec(args))  # labels, sizes, classes checked; not decoded
    elif args.test or args.image_size:
        raise ValueError("--test and --image-size apply to a dataset of your own (a folder or tensors file), "
                         f"not to the built-in {args.dataset!r}")
    cfg, notes = config_from_args(args, data)
    validate(cfg)  # before the dataset is read or a folder written
    out = args.out or f"runs/{cfg.method}_{dataset_label(cfg.dataset)}_ipc{cfg.ipc}_{cfg.weighting}_s{cfg.seed}"
    if data is not None:
        print(f"{data.name}: {len(data.train_labels())} training and {data.test_size()} test images, "
              f"{data.num_classes} classes, {data.channels}x{data.im_size[0]}x{data.im_size[1]}; "
              f"preset {cfg.preset!r} scaled to it:")
        for line in notes:
            print(f"  {line}")
        splits = data.load(progress=not args.quiet)
    elif is_user_dataset(cfg.dataset):  # a --config file naming one's own data
        splits = open_user_data(cfg.dataset, cfg.data).load(progress=not args.quiet)
    else:
        splits = load_dataset(cfg.dataset, root=cfg.data_root, download=args.download)
    if not args.quiet:
        print(f"preset {cfg.preset!r}: {describe_preset(cfg.preset)}")
    summary = run_distillation(cfg, splits, out_dir=out, progress=not args.quiet, evaluate=not args.no_eval)
    print_summary(summary, out)
    return 0


def print_summary(summary, out) -> None:
    keep = {k: v for k, v in summary.items()
            if k not in ("config", "synthetic", "weights", "init_accuracy", "class_names")}
    names = summary.get("class_names") or []
    if names:
        keep["classes"] = f"{len(names)}: " + ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    if summary.get("already_complete"):
        print(f"{out} holds a finished run of this config: nothing to do (its summary follows)")
    if "accuracy" in keep:
        acc, init = keep.pop("accuracy"), summary["init_accuracy"]
        keep["test_accuracy"] = f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} ({acc['protocol']['variant']})"
        keep["initial_images_accuracy"] = f"{100 * init['mean']:.2f} ± {100 * init['std']:.2f}"
    print(json.dumps(keep, indent=2, default=str))
    print(f"run folder: {out}")


def run_evaluate(args) -> int:
    from ..distill.config import DistillConfig
    from ..runtime import Stream, mix_seed
    from .distill_job import evaluate_images, load_splits
    from .run_folder import RunFolder

    run = RunFolder(args.run, create=False)
    if not run.file("config.json").is_file() or not run.file("synthetic.safetensors").is_file():
        raise FileNotFoundError(f"{args.run} has no config.json and synthetic.safetensors: not a finished distill run")
    cfg = DistillConfig.from_dict(run.read_config())
    cfg = cfg.replace(data_root=args.data_root or cfg.data_root)
    spec = cfg.eval
    if args.num_nets is not None:
        spec = dataclasses.replace(spec, num_nets=args.num_nets)
    if args.epochs is not None:
        spec = dataclasses.replace(spec, epochs=args.epochs)
    if args.net is not None:
        spec = dataclasses.replace(spec, net=dataclasses.replace(cfg.net, name=args.net))
    syn = run.load_tensors("synthetic")
    splits = load_splits(cfg, download=args.download, progress=not args.quiet)
    if run.file("data.json").is_file():  # the run recorded its data: refuse data that changed since
        stored, now = json.loads(run.file("data.json").read_text())["fingerprint"], splits.record()["fingerprint"]
        if stored != now:
            raise ValueError(f"{cfg.dataset}: the data differs from what run {args.run} was distilled from "
                             f"(fingerprint {now}, recorded {stored}); evaluate it on the same data")
    # What the method trains on (IDC's decoded set, DATM's soft labels) and, for ZCA runs, the whitened test set.
    images, targets, test = syn.get("eval_images", syn["images"]), syn.get("eval_targets", syn["labels"]), splits.test
    if "zca_matrix" in syn:
        from ..data.zca import ZCATransform

        test = dataclasses.replace(test, images=ZCATransform(syn["zca_mean"], syn["zca_matrix"])(test.images))
    seed = None if args.seed is None else mix_seed(args.seed, Stream.REEVALUATION)
    ev = evaluate_images(cfg, images, targets, test, args.device, eval_spec=spec, seed=seed, progress=not args.quiet,
                         stages=syn.get("eval_stage"))  # PDD: through its stages
    run.save_json("evaluation.json", ev)
    print(f"test accuracy {100 * ev['mean']:.2f} ± {100 * ev['std']:.2f} over {len(ev['accs'])} nets "
          f"({ev['protocol']['variant']}); written to {run.path / 'evaluation.json'}")
    return 0
