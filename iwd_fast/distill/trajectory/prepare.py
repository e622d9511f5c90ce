"""The stage before trajectory matching: ZCA, expert buffers and, for ``weighting="iwd"``, the two-pass
scheme of METHOD.md 2d, each stage cached on disk:

    1. unweighted experts (``tm.score_experts`` of them)           -> buffer keyed with weights "uniform"
    2. scores of the pool along their checkpoints (validation or self target; cached in that buffer)
    3. weights from the scores (the run's InfluenceWeighter)       -> weighted experts, keyed by the weights
    4. distillation matches the weighted experts; real initialisation picks by weight (iwd.init)

With ``weighting="auto"`` the cross-fitted trust weights of the run's warm-up (0 on the suspects) train the
experts directly (no second pass), and the run's own initial selection applies.

Without weighting, step 1 trains ``tm.num_experts`` experts and distillation matches them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from ...runtime import Stream, mix_seed
from ...weighting.dropin import select_initial
from ..base import build_net
from ..config import init_mode
from ..pool import SELECT_MODE
from ..stages import Preparation, RunContext
from .buffer import ExpertBuffer, buffer_key, tensor_sha256
from .checkpoint_scores import SCORE_TARGETS, checkpoint_scores
from .experts import ExpertStart, ensure_experts, expert_description
from .student import FlatNet

__all__ = ["prepare_trajectory", "expert_stage", "check_trajectory_config", "score_epochs"]


def score_epochs(tm) -> list:
    """Expert epochs whose checkpoints are scored: 0, score_every, ... below score_until
    (default max_start_epoch + expert_epochs: the epochs whose steps the matched segments contain)."""
    until = tm.score_until or (tm.max_start_epoch + tm.expert_epochs)
    return list(range(0, min(until, tm.train_epochs), max(1, tm.score_every)))


def check_trajectory_config(cfg) -> None:
    """One-line errors for a trajectory-matching config, before any expert is trained."""
    tm = cfg.tm
    positive = {"tm.num_experts": tm.num_experts, "tm.train_epochs": tm.train_epochs, "tm.syn_steps": tm.syn_steps,
                "tm.expert_epochs": tm.expert_epochs, "tm.expert_batch": tm.expert_batch,
                "tm.score_experts": tm.score_experts, "iterations": cfg.iterations + 1}
    bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
    if bad:
        raise ValueError(f"trajectory matching needs positive values: {', '.join(bad)}")
    if not tm.expert_lr > 0:
        raise ValueError(f"tm.expert_lr must be > 0, got {tm.expert_lr}")
    if not 0 <= tm.min_start_epoch < tm.max_start_epoch:
        raise ValueError(f"need 0 <= tm.min_start_epoch < tm.max_start_epoch, got {tm.min_start_epoch} and "
                         f"{tm.max_start_epoch}")
    if tm.max_start_epoch - 1 + tm.expert_epochs > tm.train_epochs:
        raise ValueError(f"tm.max_start_epoch - 1 + tm.expert_epochs = {tm.max_start_epoch - 1 + tm.expert_epochs} "
                         f"exceeds tm.train_epochs = {tm.train_epochs}: the experts are too short")
    if cfg.weighting == "iwd":
        if cfg.iwd.influence not in SCORE_TARGETS:
            raise ValueError(f"--weighting iwd for {cfg.method} is the two-pass scheme with influence "
                             f"{' or '.join(SCORE_TARGETS)} (METHOD.md 2d), got {cfg.iwd.influence!r}")
    if tm.batch_syn < 0:
        raise ValueError(f"tm.batch_syn must be >= 0 (0: all synthetic images), got {tm.batch_syn}")


def _cached_scores(buffer: ExpertBuffer, ctx: RunContext, pool, student: FlatNet, tm) -> Dict[str, Any]:
    """Pass 2 (scores along the unweighted experts' checkpoints), cached in the unweighted buffer."""
    cfg = ctx.cfg
    experts = list(range(tm.score_experts))
    epochs = score_epochs(tm)
    target = cfg.iwd.influence
    key = buffer_key({"target": target, "experts": experts, "epochs": epochs, "eta": tm.expert_lr,
                      "heldout": [tensor_sha256(pool.heldout_images.float()), tensor_sha256(pool.heldout_labels.long())]
                      if target == "validation" else None})
    path = buffer.path / f"scores_{key}.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        meta = buffer.load_json(f"scores_{key}.json") or {}
        return {"scores": cached["scores"], "cached": True, **meta}
    out = checkpoint_scores(buffer, experts, epochs, student, pool.images, pool.labels, target, tm.expert_lr,
                            pool.heldout_images, pool.heldout_labels, progress=ctx.progress)
    meta = {"target": target, "experts": experts, "epochs": epochs, "checkpoints": out["checkpoints"],
            "seconds": out["seconds"], "dots": out["dots"]}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"scores": out["scores"].contiguous()}, str(tmp))
    tmp.replace(path)
    buffer.save_json(f"scores_{key}.json", meta)
    return {"scores": out["scores"], "cached": False, **meta}


def _zca(ctx: RunContext, pool, test):
    from ...data.zca import fit_zca

    with ctx.timer.phase("zca"):
        transform = fit_zca(pool.images, ctx.cfg.tm.zca_eps)
        pool = dataclasses.replace(pool, images=transform(pool.images), heldout_images=transform(pool.heldout_images))
        test = dataclasses.replace(test, images=transform(test.images))
    return pool, test, transform


def prepare_trajectory(ctx: RunContext) -> Preparation:
    """The ``prepare`` stage of MTT and DATM (see the module docstring): ZCA when ``tm.zca``, then
    :func:`expert_stage`."""
    check_trajectory_config(ctx.cfg)
    pool, test, zca = ctx.pool, ctx.test, None
    if ctx.cfg.tm.zca:
        pool, test, zca = _zca(ctx, pool, test)
    return expert_stage(ctx, pool, test, zca)


def expert_stage(ctx: RunContext, pool, test, zca=None, start: Optional[ExpertStart] = None) -> Preparation:
    """The experts of one distillation (and, for ``weighting="iwd"``, the two-pass scheme) on ``pool`` (already
    whitened when ``zca`` is given). ``start``: where the experts start (PDD's later stages), else fresh.
    Returns the Preparation whose ``state`` holds "buffer" (the ExpertBuffer distillation matches), "student"
    (a FlatNet), "weights" and "zca"."""
    cfg, tm = ctx.cfg, ctx.cfg.tm
    student = FlatNet(build_net(cfg.net, pool, 0, ctx.device))
    common = dict(net_spec=cfg.net, channels=pool.channels, num_classes=pool.num_classes, im_size=pool.im_size,
                  images=pool.images, labels=pool.labels, spec=tm, dsa_strategy=ctx.dsa_strategy, device=ctx.device,
                  test=test, progress=ctx.progress, start=start)

    def buffer_for(weights: Optional[torch.Tensor]) -> ExpertBuffer:
        return ExpertBuffer(tm.buffer_dir, expert_description(pool.images, pool.labels, pool.num_classes, pool.flipped,
                                                              weights, tm, cfg.net, ctx.dsa_strategy, student.layout,
                                                              start))

    summary: Dict[str, Any] = {}
    weights = None
    init = None
    if ctx.iwd is not None and cfg.weighting == "auto":  # the cross-fitted trust weights train the experts
        weights = ctx.iwd.weighter.weights()
        init = ctx.initial_indices(cfg)
    elif ctx.iwd is not None:
        base = buffer_for(None)
        with ctx.timer.phase("experts"):
            first = ensure_experts(base, tm.score_experts, weights=None, label="unweighted experts", **common)
        with ctx.timer.phase("checkpoint scoring"):  # not "scoring": that phase is the in-loop share
            scored = _cached_scores(base, ctx, pool, student, tm)
        ctx.iwd.update(torch.arange(pool.labels.shape[0]), scored["scores"])
        weights = ctx.iwd.weighter.weights()
        summary["iwd_two_pass"] = {
            "unweighted_buffer": str(base.path), "unweighted_experts_trained_now": first["trained"],
            "unweighted_expert_seconds": first["seconds_per_expert"], "unweighted_expert_test_acc": first["test_acc"],
            "target": scored["target"], "scored_experts": scored["experts"], "scored_epochs": scored["epochs"],
            "checkpoints": scored["checkpoints"], "instances": int(pool.labels.shape[0]), "dots": scored["dots"],
            "scoring_seconds": scored["seconds"], "scores_cached": scored["cached"],
            "weights_sha256": tensor_sha256(weights.float()),
        }
        mode = init_mode(cfg)
        idx = select_initial(pool.labels.cpu(), weights, pool.num_classes, cfg.ipc, SELECT_MODE[mode],
                             mix_seed(cfg.seed, Stream.INITIAL_IMAGES))
        init = {"indices": idx, "init": f"{mode} (weights from {scored['target']} scores along expert checkpoints)"}
    buffer = buffer_for(weights)
    with ctx.timer.phase("experts"):
        experts = ensure_experts(buffer, tm.num_experts, weights=weights,
                                 label="weighted experts" if weights is not None else "experts", **common)
    accs = list(experts["test_acc"].values())
    summary["experts"] = {"buffer": str(buffer.path), "key": buffer.key, "count": tm.num_experts,
                          "trained_now": experts["trained"], "seconds_this_run": experts["seconds"],
                          "seconds_per_expert": experts["seconds_per_expert"],
                          "test_acc_mean": sum(accs) / len(accs) if accs else None, "weighted": weights is not None}
    return Preparation(pool=pool, test=test, init=init, state={"buffer": buffer, "student": student,
                                                                "weights": weights, "zca": zca}, summary=summary)
