"""A whole distillation run: data, label noise, held-out split, initialisation, the loop, evaluation,
and the run folder (config, versions, metrics, synthetic set, weights, timing, plots). Resumable."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from tqdm.auto import tqdm

from ..data.augment import default_strategy
from ..distill.config import DistillConfig
from ..data import DatasetSplits, add_label_noise, load_dataset, stratified_split, stratified_subset
from ..evaluate import EvalSpec, evaluate_synthetic, train_network
from ..weighting.dropin import select_initial
from ..weighting.targets import instance_scores, validation_directions
from ..weighting import InfluenceWeighter, auroc, sign_for
from ..distill import METHODS, IWDState, RealPool, SyntheticSet
from ..distill.base import build_net
from ..distill.stages import RunContext
from ..runtime import PhaseTimer, Stream, mix_seed, resolve_device

__all__ = ["run_distillation", "prepare_pool", "initial_indices"]

CHECKPOINT_EVERY = 50  # iterations


def prepare_pool(cfg: DistillConfig, splits: DatasetSplits, device) -> RealPool:
    """Noisy labels (seeded, flips recorded) and the stratified held-out split; the same for weighted and
    unweighted runs of one seed, so they are paired."""
    train = splits.train
    labels, flipped = train.labels.clone(), torch.zeros(len(train), dtype=torch.bool)
    if cfg.noise > 0:
        labels, flipped = add_label_noise(train.labels, cfg.noise, cfg.noise_kind, train.num_classes,
                                          seed=mix_seed(cfg.seed, Stream.LABEL_NOISE))
    frac = cfg.iwd.heldout_fraction
    if frac > 0:
        keep, held = stratified_split(labels, frac, seed=mix_seed(cfg.seed, Stream.HELDOUT_SPLIT))
    else:
        keep, held = torch.arange(len(train)), torch.zeros(0, dtype=torch.long)
    if cfg.weighting == "iwd" and cfg.iwd.influence == "validation" and held.numel() == 0:
        raise ValueError("influence target 'validation' needs a held-out split: set iwd.heldout_fraction > 0")
    return RealPool(images=train.images[keep].to(device), labels=labels[keep].to(device), flipped=flipped[keep],
                    num_classes=train.num_classes, heldout_images=train.images[held].to(device),
                    heldout_labels=labels[held].to(device), source_indices=keep)


def warmup_scores(cfg: DistillConfig, pool: RealPool, device, target: str) -> torch.Tensor:
    """Raw scores [n] of every pool instance at a network trained ``warmup_steps`` steps on the pool."""
    net = build_net(cfg.net, pool, mix_seed(cfg.seed, Stream.WARMUP_NETWORK), device)
    spec = EvalSpec(num_nets=1, epochs=1, lr=cfg.lr_net, batch_size=256, dsa=False)
    train_network(net, pool.images, pool.labels, spec, mix_seed(cfg.seed, Stream.WARMUP_TRAINING), None, device,
                  steps=max(1, cfg.iwd.warmup_steps))
    net.eval()
    direction = None
    if target == "validation":
        direction = validation_directions(net, pool.heldout_images, pool.heldout_labels, scale=cfg.lr_net)
    return instance_scores(net, pool.images, pool.labels, target, direction)


def initial_indices(cfg: DistillConfig, pool: RealPool, device, timer: PhaseTimer) -> Dict[str, Any]:
    """Pool indices [C * ipc] of the real images that initialise the synthetic set, plus a report.

    "random": uniform per class. "weighted"/"proportional": a warm-up network scores the pool with
    ``iwd.init_influence`` (self-influence by default: it flags flipped labels best at a trained network,
    METHOD.md section 2; explicit and implicit scores need a synthetic set, which does not exist yet);
    then the highest-weight instances of each class ("weighted") or a draw in proportion to the weights.
    """
    mode = cfg.iwd.init
    if mode == "random" or cfg.weighting == "none":
        idx = select_initial(pool.labels.cpu(), None, pool.num_classes, cfg.ipc, "random",
                             mix_seed(cfg.seed, Stream.INITIAL_IMAGES))
        return {"indices": idx, "init": "random"}
    if mode not in ("weighted", "proportional"):
        raise ValueError(f"iwd.init must be random, weighted or proportional, got {mode!r}")
    target = cfg.iwd.init_influence
    if target not in ("self", "validation"):
        raise ValueError(f"iwd.init_influence must be 'self' or 'validation', got {target!r}")
    with timer.phase("init scoring"):
        raw = warmup_scores(cfg, pool, device, target).detach().cpu()
    weighter = InfluenceWeighter(pool.labels.cpu(), pool.num_classes, temperature=cfg.iwd.temperature,
                                 ema=0.0, sign=sign_for(target))
    weighter.update(torch.arange(raw.shape[0]), raw)
    w = weighter.weights()
    idx = select_initial(pool.labels.cpu(), w, pool.num_classes, cfg.ipc,
                         "top" if mode == "weighted" else "proportional",
                         mix_seed(cfg.seed, Stream.INITIAL_IMAGES))
    report = {"indices": idx, "init": f"{mode} ({target} scores after {cfg.iwd.warmup_steps} warm-up steps)"}
    if pool.flipped.any() and not pool.flipped.all():
        report["init_auroc_flipped"] = auroc(-w, pool.flipped)
    return report


def run_distillation(cfg: DistillConfig, splits: Optional[DatasetSplits] = None, out_dir: Optional[str] = None,
                     progress: bool = True, evaluate: bool = True, checkpoint_every: int = CHECKPOINT_EVERY,
                     until: Optional[int] = None) -> Dict[str, Any]:
    """Distil ``cfg.dataset`` with ``cfg.method``; returns a summary dict (also written to the run folder).

    With ``out_dir`` every artefact goes there and a checkpoint is written every ``checkpoint_every``
    iterations; rerunning with the same folder and config resumes from it, bit for bit. ``until``: stop
    after that many iterations (checkpointing first) and return {"stopped_at": n}; a later call resumes.
    """
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose from {sorted(METHODS)}")
    device = resolve_device(cfg.device)
    torch.manual_seed(mix_seed(cfg.seed, Stream.GLOBAL))
    splits = splits if splits is not None else load_dataset(cfg.dataset, root=cfg.data_root)
    if cfg.subset_per_class:
        splits = _subset(splits, cfg.subset_per_class)
    timer = PhaseTimer()
    run = _open_run(out_dir, cfg)
    pool = prepare_pool(cfg, splits, device)
    method_cls = METHODS[cfg.method]
    dsa_strategy = None
    if cfg.method == "dsa" or cfg.method == "dm" or getattr(method_cls, "USES_DSA", False):
        dsa_strategy = default_strategy(cfg.dataset) if cfg.dsa_strategy == "auto" else cfg.dsa_strategy
    iwd = IWDState.from_config(cfg, pool, timer)  # validates the weighting options before any work
    # Optional stage hook (iwd_fast.distill.stages): runs once before initialisation, cached by the method.
    prepared, test = None, splits.test
    if hasattr(method_cls, "prepare"):
        prepared = method_cls.prepare(RunContext(cfg, pool, splits.test, device, timer, iwd, dsa_strategy, progress,
                                                 lambda c: initial_indices(c, pool, device, timer)))
        pool, test = prepared.pool, prepared.test
    with timer.phase("init"):
        init = prepared.init if prepared is not None and prepared.init is not None else \
            initial_indices(cfg, pool, device, timer)
    start_images = init["images"].to(device) if "images" in init else pool.images[init["indices"].to(device)]
    syn = SyntheticSet(start_images, pool.num_classes, cfg.ipc)
    method = method_cls(cfg, pool, syn, iwd, dsa_strategy, device, **({"prepared": prepared} if prepared else {}))
    start, history = 0, []
    state = run.load_checkpoint() if run is not None else None
    if state is not None:
        if state["config"] != cfg.to_dict():
            raise ValueError(f"{out_dir} holds a checkpoint of a different config; use another --out folder")
        syn.load_state_dict(state["syn"])
        method.load_state_dict(state["method"])
        if iwd is not None:
            iwd.load_state_dict(state["iwd"])
        start, history, timer.seconds = state["iteration"], state["history"], state["timing"]
    init_flipped = float(pool.flipped[init["indices"]].double().mean())
    stop = cfg.iterations if until is None else min(int(until), cfg.iterations)
    bar = tqdm(range(start, stop), desc=f"{cfg.method} ipc{cfg.ipc} {cfg.weighting}", disable=not progress,
               initial=start, total=cfg.iterations)
    for it in bar:
        with timer.phase("distilling"):
            metrics = method.step(it)
        record = {"iteration": it + 1, **metrics}
        if iwd is not None:
            record.update(iwd.report(pool.flipped))
        if evaluate and cfg.eval_every and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.iterations:
            with timer.phase("evaluating"):
                ev = _evaluate(cfg, method, syn, test, dsa_strategy, device)
            record.update(acc_mean=ev["mean"], acc_std=ev["std"])
        history.append(record)
        if run is not None:
            run.log(record)
            if ((it + 1) % checkpoint_every == 0 or it + 1 == stop) and it + 1 < cfg.iterations:
                run.checkpoint({"config": cfg.to_dict(), "iteration": it + 1, "syn": syn.state_dict(),
                                "method": method.state_dict(), "history": history, "timing": dict(timer.seconds),
                                "iwd": iwd.state_dict() if iwd is not None else None})
        bar.set_postfix(loss=f"{metrics['match_loss']:.3f}")
    if stop < cfg.iterations:
        return {"stopped_at": stop}
    summary: Dict[str, Any] = {"config": cfg.to_dict(), "init": init["init"], "init_flipped_share": init_flipped}
    if "init_auroc_flipped" in init:
        summary["init_auroc_flipped"] = init["init_auroc_flipped"]
    if iwd is not None:
        summary.update(iwd.report(pool.flipped))
    if evaluate:
        with timer.phase("evaluating"):
            ev = _evaluate(cfg, method, syn, test, dsa_strategy, device)
            for name, spec in (method.extra_evaluations() if hasattr(method, "extra_evaluations") else {}).items():
                summary[name] = _evaluate(cfg, method, syn, test, dsa_strategy, device, spec)
        summary["accuracy"] = ev
        history.append({"iteration": cfg.iterations, "acc_mean": ev["mean"], "acc_std": ev["std"]})
    if hasattr(method, "summary"):
        summary["method"] = method.summary()
    summary["timing_seconds"] = dict(timer.seconds)
    loop = timer.seconds.get("distilling", 0.0) + timer.seconds.get("scoring", 0.0)
    summary["scoring_share_of_loop"] = timer.seconds.get("scoring", 0.0) / loop if loop else 0.0
    if run is not None:
        _write_outputs(run, cfg, summary, syn, iwd, pool, splits, history,
                       method.tensors() if hasattr(method, "tensors") else {})
    summary["synthetic"] = {"images": syn.images.detach().cpu(), "labels": syn.labels.cpu()}
    summary["weights"] = iwd.weighter.weights() if iwd is not None else None
    return summary


def _subset(splits: DatasetSplits, per_class: int) -> DatasetSplits:
    """cfg.subset_per_class: a stratified subset (seed 0, the same for every run) of the training set."""
    if per_class < 0:
        raise ValueError(f"subset_per_class must be >= 0, got {per_class}")
    return DatasetSplits(train=stratified_subset(splits.train, per_class * splits.train.num_classes), test=splits.test)


def _evaluate(cfg, method, syn, test, dsa_strategy, device, spec=None):
    """Evaluate what the method trains on (its ``evaluation_set`` hook, else the images and hard labels)."""
    images, targets = method.evaluation_set() if hasattr(method, "evaluation_set") else (syn.images.detach(), syn.labels)
    return evaluate_synthetic(images, targets, test, spec or cfg.eval, cfg.net,
                              seed=mix_seed(cfg.seed, Stream.EVALUATION), dsa_strategy=dsa_strategy or "auto", device=device,
                              progress=False)


def _open_run(out_dir, cfg):
    if out_dir is None:
        return None
    from .run_folder import RunFolder

    run = RunFolder(out_dir)
    run.write_config(cfg)
    run.write_env()
    return run


def _write_outputs(run, cfg, summary, syn, iwd, pool, splits, history, extra_tensors) -> None:
    from . import plots

    run.save_tensors("synthetic", {"images": syn.images.detach().cpu().contiguous(), "labels": syn.labels.cpu(),
                                   **extra_tensors})
    train = splits.train
    plots.plot_synthetic_grid(syn.images.detach().cpu(), syn.labels.cpu(), train.mean, train.std,
                              run.path / "synthetic.png")
    if iwd is not None:
        iwd.weighter.save(str(run.path / "weights.safetensors"))
        w = iwd.weighter.weights()
        plots.plot_weight_histogram(w, pool.flipped if pool.flipped.any() else None, run.path / "weights_hist.png")
        plots.plot_extreme_images(pool.images.cpu(), w, pool.labels.cpu(), train.mean, train.std,
                                  run.path / "extreme_weights.png")
    curve = [h for h in history if "acc_mean" in h]
    if curve:
        plots.plot_accuracy_curve(curve, run.path / "accuracy.png")
    run.save_json("timing.json", summary["timing_seconds"])
    run.save_json("summary.json", summary)
