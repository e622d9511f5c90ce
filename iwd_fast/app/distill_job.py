"""A whole distillation run: data, label noise, held-out split, warm-up scoring, initialisation, the
accuracy of the initial images, the loop, evaluation, and the run folder (config, versions, metrics,
synthetic set, weights, timing, plots). Resumable; a finished run is never repeated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from tqdm.auto import tqdm

from ..data import DatasetSplits, load_dataset, stratified_subset
from ..data.augment import default_strategy
from ..data.user_data import is_user_dataset, open_user_data
from ..distill import METHODS, IWDState, SyntheticSet
from ..distill.base import PLAIN_REAL_SIDE, SCORED_REAL_SIDE
from ..distill.config import DistillConfig, needs_warmup, validate
from ..distill.pool import initial_indices, prepare_pool
from ..distill.preflight import check_networks, check_pool
from ..distill.warmup import clean_pool, warmup_weights
from ..evaluate import evaluate_stages, evaluate_synthetic
from ..distill.stages import RunContext
from ..runtime import PhaseTimer, Stream, mix_seed, resolve_device
from .run_folder import RunFolder

__all__ = ["run_distillation", "load_splits", "scoring_overhead", "dsa_strategy_of", "evaluate_images", "LOOP_PHASES",
           "synthetic_metadata"]

CHECKPOINT_EVERY = 50  # iterations
SUBSET_SEED = 0        # the stratified train/test subsets are the same for every run seed


def load_splits(cfg: DistillConfig, download: bool = False, progress: bool = False) -> DatasetSplits:
    """The dataset of ``cfg`` with its stratified subsets (``train_size`` / ``test_size``; 0 = all): a built-in
    name, or a folder / tensors file of one's own read with ``cfg.data`` (iwd_fast.data.user_data)."""
    if is_user_dataset(cfg.dataset):
        splits = open_user_data(cfg.dataset, cfg.data).load(progress=progress)
    else:
        splits = load_dataset(cfg.dataset, root=cfg.data_root, download=download)
    return subset_splits(splits, cfg)


def subset_splits(splits: DatasetSplits, cfg: DistillConfig) -> DatasetSplits:
    train, test = splits.train, splits.test
    if cfg.train_size and cfg.train_size < len(train):
        train = stratified_subset(train, cfg.train_size, seed=SUBSET_SEED)
    if cfg.test_size and cfg.test_size < len(test):
        test = stratified_subset(test, cfg.test_size, seed=SUBSET_SEED)
    return dataclasses.replace(splits, train=train, test=test)


# The timer phases whose seconds make up the loop (one iteration's time): the rest of a step, its scoring, and
# its real side, plain or captured for scoring (evaluation is outside the loop).
LOOP_PHASES = ("distilling", "scoring", PLAIN_REAL_SIDE, SCORED_REAL_SIDE)


def run_distillation(cfg: DistillConfig, splits: Optional[DatasetSplits] = None, out_dir: Optional[str] = None,
                     progress: bool = True, evaluate: bool = True, checkpoint_every: int = CHECKPOINT_EVERY,
                     until: Optional[int] = None, init_cache: Optional[str] = None) -> Dict[str, Any]:
    """Distil ``cfg.dataset`` with ``cfg.method``; returns a summary dict (also written to the run folder).

    The config is checked first (nothing is written for a config that cannot run). With ``out_dir`` every
    artefact goes there and a checkpoint is written every ``checkpoint_every`` iterations; rerunning with
    the same folder and config resumes from it, bit for bit, and a finished run returns its stored
    summary without running again; another config in that folder is refused. ``until``: stop after that
    many iterations (checkpointing first) and return {"stopped_at": n}. ``splits``: the full dataset
    (its ``train_size`` / ``test_size`` subsets are taken here). ``init_cache``: a folder where the accuracy
    of initial image sets is kept, so runs that start from the same images evaluate them once.
    """
    validate(cfg)
    finished = _finished_summary(out_dir, cfg)
    if finished is not None:
        return finished
    device = resolve_device(cfg.device)
    torch.manual_seed(mix_seed(cfg.seed, Stream.GLOBAL))
    splits = subset_splits(splits, cfg) if splits is not None else load_splits(cfg)
    timer = PhaseTimer()
    pool = prepare_pool(cfg, splits, device)  # refuses non-finite pixels, by index, before anything is written
    check_pool(cfg, pool, splits.train.class_names)  # enough images per class for the initial synthetic set
    check_networks(cfg, pool.channels, pool.num_classes, pool.im_size)  # usable by the method (factories)
    run = _open_run(out_dir, cfg, splits)
    dsa_strategy = dsa_strategy_of(cfg)
    warmup = warmup_weights(cfg, pool, device, timer) if needs_warmup(cfg) else None
    pool = clean_pool(cfg, pool, warmup)  # the pool-cleaning baselines (unchanged without one)
    iwd = IWDState.from_config(cfg, pool, timer, warmup)
    method_cls, prepared, test = METHODS[cfg.method], None, splits.test
    if hasattr(method_cls, "prepare"):  # optional stage hook (iwd_fast.distill.stages), cached by the method
        prepared = method_cls.prepare(RunContext(cfg, pool, splits.test, device, timer, iwd, dsa_strategy, progress,
                                                 lambda c: initial_indices(c, pool, warmup)))
        pool, test = prepared.pool, prepared.test
    init = prepared.init if prepared is not None and prepared.init is not None else initial_indices(cfg, pool, warmup)
    start_images = init["images"].to(device) if "images" in init else pool.images[init["indices"].to(device)]
    syn = SyntheticSet(start_images, pool.num_classes, cfg.ipc)
    method = method_cls(cfg, pool, syn, iwd, dsa_strategy, device, timer=timer,
                        **({"prepared": prepared} if prepared is not None else {}))
    init_acc = None
    if evaluate:
        with timer.phase("evaluating"):
            init_acc = _initial_accuracy(cfg, method, test, device, init, init_cache)
    start, history = 0, ([{"iteration": 0, "acc_mean": init_acc["mean"], "acc_std": init_acc["std"]}]
                         if init_acc else [])
    state = run.load_checkpoint() if run is not None else None
    if state is not None:
        syn.load_state_dict(state["syn"])
        method.load_state_dict(state["method"])
        if iwd is not None:
            iwd.load_state_dict(state["iwd"])
        start, history = state["iteration"], state["history"]
        timer.seconds, timer.calls = state["timing"], state.get("timing_calls", {})
    if run is not None:
        run.truncate_log(start)  # records a killed run logged after its checkpoint (or without one) are recomputed
    stop = cfg.iterations if until is None else min(int(until), cfg.iterations)
    bar = tqdm(range(start, stop), desc=f"{cfg.method} ipc{cfg.ipc} {cfg.weighting}", disable=not progress,
               initial=start, total=cfg.iterations)
    for it in bar:
        with timer.phase("distilling"):
            metrics = method.step(it)
        record = {"iteration": it + 1, **metrics}
        if iwd is not None and iwd.in_loop:
            record.update(iwd.report(pool.flipped))
        if evaluate and cfg.eval_every and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.iterations:
            with timer.phase("evaluating"):
                ev = _evaluate(cfg, method, test, device)
            record.update(acc_mean=ev["mean"], acc_std=ev["std"])
        history.append(record)
        if run is not None:
            run.log(record)
            boundary = hasattr(method, "wants_checkpoint") and method.wants_checkpoint(it + 1)  # PDD: a stage ends
            if ((it + 1) % checkpoint_every == 0 or it + 1 == stop or boundary) and it + 1 < cfg.iterations:
                run.checkpoint({"config": cfg.to_dict(), "iteration": it + 1, "syn": syn.state_dict(),
                                "method": method.state_dict(), "history": history, "timing": dict(timer.seconds),
                                "timing_calls": dict(timer.calls),
                                "iwd": iwd.state_dict() if iwd is not None else None})
        bar.set_postfix(loss=f"{metrics['match_loss']:.3f}")
    if stop < cfg.iterations:
        return {"stopped_at": stop}
    summary = _summary(cfg, init, pool, warmup, iwd, timer)
    summary["class_names"] = splits.train.class_names
    if evaluate:
        with timer.phase("evaluating"):
            ev = _evaluate(cfg, method, test, device)
            for name, spec in (method.extra_evaluations() if hasattr(method, "extra_evaluations") else {}).items():
                summary[name] = _evaluate(cfg, method, test, device, spec)
        summary.update(accuracy=ev, init_accuracy=init_acc, gain_over_init=ev["mean"] - init_acc["mean"])
        history.append({"iteration": cfg.iterations, "acc_mean": ev["mean"], "acc_std": ev["std"]})
    if hasattr(method, "summary"):
        summary["method"] = method.summary()
    summary["timing_seconds"], summary["timing_calls"] = dict(timer.seconds), dict(timer.calls)
    summary.update(scoring_overhead(timer))
    if run is not None:
        _write_outputs(run, summary, syn, iwd, pool, splits, history,
                       method.tensors() if hasattr(method, "tensors") else {})
    summary["synthetic"] = {"images": syn.images.detach().cpu(), "labels": syn.labels.cpu()}
    summary["weights"] = iwd.weighter.weights() if iwd is not None else None
    return summary


def scoring_overhead(timer: PhaseTimer) -> Dict[str, Optional[float]]:
    """What in-loop scoring cost: its own phase plus, per scored real batch, the captured real side's
    extra time over a plain one (measured in the same run; None when the run had no plain real side).

    Returns {"scoring_seconds", "scoring_share_of_loop"}: the share is of the whole loop (distilling +
    scoring phases, i.e. the iteration time).
    """
    sec, calls = timer.seconds, timer.calls
    loop = sum(sec.get(k, 0.0) for k in LOOP_PHASES)
    scored_n, plain_n = calls.get(SCORED_REAL_SIDE, 0), calls.get(PLAIN_REAL_SIDE, 0)
    extra = 0.0
    if scored_n:
        if not plain_n:
            return {"scoring_seconds": None, "scoring_share_of_loop": None}
        extra = sec[SCORED_REAL_SIDE] - scored_n * sec[PLAIN_REAL_SIDE] / plain_n
    spent = sec.get("scoring", 0.0) + max(extra, 0.0)
    return {"scoring_seconds": spent, "scoring_share_of_loop": spent / loop if loop else 0.0}


def _summary(cfg, init, pool, warmup, iwd, timer) -> Dict[str, Any]:
    summary: Dict[str, Any] = {"config": cfg.to_dict(), "init": init["init"],
                               "init_flipped_share": float(pool.flipped[init["indices"]].double().mean()),
                               "flipped_share": float(pool.flipped.double().mean())}
    if warmup is not None and warmup.auroc_flipped is not None:
        summary["warmup_auroc_flipped"] = warmup.auroc_flipped
    if warmup is not None and warmup.noise is not None:
        summary["noise_estimate"] = warmup.noise.summary()
    if cfg.iwd.pool_cleaning != "none":
        summary["pool_size"] = int(pool.labels.shape[0])
    if iwd is not None:
        summary.update(iwd.report(pool.flipped))
    return summary


def dsa_strategy_of(cfg: DistillConfig) -> Optional[str]:
    """The DSA strategy a run distils (and, when its eval spec says so, evaluates) with; None for DC."""
    cls = METHODS[cfg.method]
    uses_dsa = cls.uses_dsa(cfg) if hasattr(cls, "uses_dsa") else getattr(cls, "USES_DSA", False)
    if cfg.method not in ("dsa", "dm") and not uses_dsa:
        return None
    return default_strategy(cfg.dataset) if cfg.dsa_strategy == "auto" else cfg.dsa_strategy


def evaluate_images(cfg: DistillConfig, images: torch.Tensor, labels: torch.Tensor, test, device,
                    eval_spec=None, seed: Optional[int] = None, progress: bool = False,
                    stages: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Evaluate a synthetic set the way run ``cfg`` does: with ``seed=None`` and the run's own eval spec,
    exactly the networks (hence the accuracy) the run reported. ``stages`` (int64 [M], PDD): the stage of
    each image; the networks then train on the union of stages 0..k for every k in turn (``eval_spec`` may
    be one EvalSpec per stage) and the result holds each stage's cumulative accuracy."""
    seed = mix_seed(cfg.seed, Stream.EVALUATION) if seed is None else seed
    strategy = dsa_strategy_of(cfg) or "auto"
    if stages is None:
        return evaluate_synthetic(images.detach(), labels, test, eval_spec or cfg.eval, cfg.net, seed=seed,
                                  dsa_strategy=strategy, device=device, progress=progress)
    stages = stages.to(images.device)
    sets = [(images.detach()[stages <= k], labels[stages <= k]) for k in range(int(stages.max()) + 1)]
    return evaluate_stages(sets, test, eval_spec or cfg.eval, cfg.net, seed=seed, dsa_strategy=strategy, device=device,
                           progress=progress)


def _evaluate(cfg, method, test, device, spec=None) -> Dict[str, Any]:
    """Evaluate what the method trains on (its ``evaluation_set`` hook, else the images and hard labels),
    through its stages when it has an ``evaluation_stages`` hook (PDD)."""
    images, targets = (method.evaluation_set() if hasattr(method, "evaluation_set")
                       else (method.syn.images, method.syn.labels))
    stages = method.evaluation_stages() if hasattr(method, "evaluation_stages") else None
    return evaluate_images(cfg, images, targets, test, device, eval_spec=spec, stages=stages)


def _initial_accuracy(cfg, method, test, device, init, cache: Optional[str]) -> Dict[str, Any]:
    """The evaluation of the undistilled initial images (cached by what determines it)."""
    key_parts = {"dataset": cfg.dataset, "train_size": cfg.train_size, "test_size": cfg.test_size,
                 "noise": cfg.noise, "noise_kind": cfg.noise_kind, "seed": cfg.seed, "ipc": cfg.ipc,
                 "indices": init["indices"].tolist(), "eval": cfg.to_dict()["eval"], "net": cfg.to_dict()["net"],
                 "dsa": dsa_strategy_of(cfg), "method_eval": cfg.method in ("dsa", "dm")}
    if hasattr(METHODS[cfg.method], "prepare"):  # its stage shapes the initial set (experts, ZCA, IDC tiles)
        key_parts.update(method=cfg.method, tm=cfg.to_dict()["tm"], idc=cfg.to_dict()["idc"])
    if hasattr(method, "evaluation_stages"):  # evaluated through its stages (PDD)
        key_parts.update(pdd=cfg.to_dict()["pdd"])
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache) / f"init_{key}.json" if cache else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    ev = _evaluate(cfg, method, test, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ev))
        tmp.replace(path)
    return ev


def _check_same_config(folder: Path, cfg: DistillConfig) -> bool:
    """True when ``folder`` holds a run of ``cfg``, False when it holds none; refuses another config."""
    path = folder / "config.json"
    if not path.is_file():
        return False
    stored, mine = json.loads(path.read_text()), json.loads(cfg.to_json())
    if stored != mine:
        changed = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        raise ValueError(f"{folder} holds a run of a different config (differs in {changed}); use another --out folder")
    return True


def _finished_summary(out_dir, cfg: DistillConfig) -> Optional[Dict[str, Any]]:
    """The stored summary of a finished run of ``cfg`` in ``out_dir`` (marked already_complete), else None."""
    if out_dir is None or not _check_same_config(Path(out_dir), cfg):
        return None
    path = Path(out_dir) / "summary.json"
    return {**json.loads(path.read_text()), "already_complete": True} if path.is_file() else None


def _open_run(out_dir, cfg, splits: DatasetSplits) -> Optional[RunFolder]:
    """The run folder: a new one gets env and data.json (the data's names, shapes, normalisation statistics and
    fingerprint: ``DatasetSplits.record``), then config.json, which marks the run as started; an existing one
    holds the same config (checked) and gets whichever of the other two a kill kept from being written. The
    folder is claimed for this process: a second process on it refuses, naming this one."""
    if out_dir is None:
        return None
    run = RunFolder(out_dir).lock()
    started = _check_same_config(run.path, cfg)
    if not started or not (run.path / "env.json").is_file():
        run.write_env()
    if not started or not (run.path / "data.json").is_file():
        run.save_json("data.json", splits.record())
    if not started:
        run.write_config(cfg)
    return run


def synthetic_metadata(train) -> Dict[str, str]:
    """The string metadata of synthetic.safetensors: the class names (a JSON list; label c is entry c)."""
    return {"class_names": json.dumps(train.class_names)} if train.class_names else {}


def _write_outputs(run, summary, syn, iwd, pool, splits, history, extra_tensors) -> None:
    from . import plots

    train = splits.train
    run.save_tensors("synthetic", {"images": syn.images.detach().cpu().contiguous(), "labels": syn.labels.cpu(),
                                   **extra_tensors}, metadata=synthetic_metadata(train))
    plots.plot_synthetic_grid(syn.images.detach().cpu(), syn.labels.cpu(), train.mean, train.std,
                              run.path / "synthetic.png", class_names=train.class_names)
    if iwd is not None:
        iwd.weighter.save(str(run.path / "weights.safetensors"))
        w = iwd.weighter.weights()
        plots.plot_weight_histogram(w, pool.flipped if pool.flipped.any() else None, run.path / "weights_hist.png")
        plots.plot_extreme_images(pool.images.cpu(), w, pool.labels.cpu(), train.mean, train.std,
                                  run.path / "extreme_weights.png", class_names=train.class_names)
    curve = [h for h in history if "acc_mean" in h]
    if curve:
        plots.plot_accuracy_curve(curve, run.path / "accuracy.png")
    run.save_json("timing.json", {"seconds": summary["timing_seconds"], "calls": summary["timing_calls"]})
    run.save_json("summary.json", summary)
