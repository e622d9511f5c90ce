"""Optional hooks a distiller class may define, so that the run loop needs no method-specific branches.

``run_distillation`` (iwd_fast.app.distill_job) calls them when present:

- ``USES_DSA`` (class attribute, bool): the method draws DSA transforms during distillation, so the run
  resolves its DSA strategy (as for "dsa" and "dm"). A classmethod ``uses_dsa(cfg)`` decides per config
  instead (PDD: as its base method).
- ``prepare(ctx: RunContext) -> Preparation`` (classmethod): runs ONCE, after the pool and the weighting
  state exist and before the synthetic set is initialised (also on resume: its stages must be cached).
  Trajectory matching trains or loads its expert buffers here (and the two-pass IWD scoring). It may
  replace the pool and the test set (ZCA whitening) and choose the initial images. The Preparation is
  passed to the constructor as ``prepared=``.
- ``evaluation_set() -> (images [M, C, H, W], targets)``: what evaluation trains on (default: the
  synthetic images and their hard labels). IDC returns its decoded images, DATM its soft labels
  (probabilities [M, num_classes]).
- ``evaluation_stages() -> int64 [M]``: the stage of each image of the evaluation set (PDD); the evaluation
  networks then train on the union of stages 0..k for each k in turn, and the accuracy holds each stage's
  cumulative accuracy ("stages").
- ``extra_evaluations() -> {name: EvalSpec}``: further evaluations reported beside the default one
  (e.g. MTT's evaluation with the learned synthetic learning rate; with stages, a list of one EvalSpec per
  stage).
- ``wants_checkpoint(iteration) -> bool``: a checkpoint after that many iterations besides the periodic ones
  (PDD: at the end of every stage, so that a killed run resumes at its stage).
- ``summary() -> dict``: method facts for the run summary (learned lr, expert buffers, scoring cost).
- ``tensors() -> {name: tensor}``: extra tensors saved beside the synthetic images in
  synthetic.safetensors. Reserved names: "eval_images" / "eval_targets" (what evaluation trains on,
  when it differs from "images" / "labels": IDC's decoded set, DATM's soft labels) and "zca_mean" /
  "zca_matrix" (the images live in a ZCA-whitened space; ``iwd_fast.data.zca.ZCATransform`` whitens
  the test set with them). ``iwd-fast evaluate`` reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from ..data import ImageSet
from ..runtime import PhaseTimer
from .base import RealPool

__all__ = ["RunContext", "Preparation"]


@dataclass
class RunContext:
    """What a ``prepare`` stage may use: the run's config, pool, test set, device, timer and weighting."""

    cfg: Any                        # DistillConfig
    pool: RealPool
    test: ImageSet
    device: torch.device
    timer: PhaseTimer
    iwd: Any = None                 # IWDState or None
    dsa_strategy: Optional[str] = None
    progress: bool = True
    initial_indices: Optional[Callable[[Any], Dict[str, Any]]] = None  # the run's own initial selection, for a
    # config (random, or by IWD weights after a warm-up): {"indices": int64 [C * cfg.ipc], "init": ...}


@dataclass
class Preparation:
    """The outcome of a ``prepare`` stage.

    ``pool``/``test``: the (possibly transformed) pool and test set the rest of the run uses; ``init``:
    {"indices": int64 [C * ipc] pool indices, "init": description, ...} or None for the run's default
    initialisation; ``state``: method-specific objects handed to the constructor; ``summary``: facts
    for the run summary.
    """

    pool: RealPool
    test: ImageSet
    init: Optional[Dict[str, Any]] = None
    state: Dict[str, Any] = field(default_factory=dict)
    summary: Dict[str, Any] = field(default_factory=dict)
