"""PDD: progressive dataset distillation (Chen et al., ICLR 2024) on MTT or IDC, with influence weighting.

The synthetic set of ``ipc`` images per class is distilled in ``pdd.stages`` stages of ``ipc / stages``
new images per class each. Stage k runs the base method for ``iterations / stages`` iterations on its own
new images, conditioned on the images of stages 1..k-1, which are frozen:

- the student trains on the union of the stages so far: MTT's inner unroll runs on the frozen images and
  the new ones (a batch holds one stage's worth of images, the reference's ``batch_syn``); IDC decodes and
  matches each class's frozen and new images together. Only the new images move.
- the networks the stage matches start where training on the earlier stages leaves them: a network is
  trained on the union U_1 of stage 1, then on U_2 = stages 1..2, ..., U_{k-1}, ``pdd.condition_epochs``
  epochs each with the evaluation's recipe (a fresh optimiser and schedule per union). MTT's experts of
  stage k start there and then train on the real data (an expert buffer of their own, keyed by the frozen
  images); IDC trains every iteration's fresh network this way before matching.

Evaluation (PDD's): each evaluation network trains on U_1, then U_2, ..., U_P, and is tested after each
union: the summary's accuracy is the last (the whole set's), ``accuracy["stages"]`` holds every stage's
cumulative accuracy. With one stage PDD is its base method, bit for bit.

IWD enters through the base method, per stage: IDC weights its real side in the loop as DC does; MTT's
two-pass scheme scores the stage's own (conditioned) unweighted experts and trains the stage's weighted
experts from the refreshed weights; weighting "auto" trains every stage's experts on the trust weights.
``iwd.init`` picks the initial real images of all stages at once (the run's selection at the total IPC,
the very images the base method at that IPC starts from); stage k takes its share of each class.

Resume: the run folder's checkpoint holds the union of all stages (frozen stages final, the current stage
as far as it got), this object's stage, the base method's state and, for MTT's two-pass weights, the
weighter as it was when the stage began; a stage's experts live in their own cached buffers.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..evaluate import EvalSpec, train_stages
from ..runtime import PhaseTimer, Stream, mix_seed
from .base import FrozenImages, SyntheticSet
from .idc import IDC, check_idc_config, decoded_set
from .stages import Preparation, RunContext
from .trajectory import TrajectoryMatching
from .trajectory.buffer import tensor_sha256
from .trajectory.experts import ExpertStart
from .trajectory.prepare import check_trajectory_config, expert_stage

__all__ = ["PDD", "PDD_BASES", "check_pdd_config", "stage_config"]

PDD_BASES = {"mtt": TrajectoryMatching, "idc": IDC}


def check_pdd_config(cfg) -> None:
    """One-line errors for a PDD config (its stages and its base method's options), before any work."""
    spec = cfg.pdd
    if spec.base not in PDD_BASES:
        raise ValueError(f"pdd.base must be one of {sorted(PDD_BASES)}, got {spec.base!r}")
    if spec.stages < 1 or cfg.ipc % spec.stages or cfg.iterations % spec.stages:
        raise ValueError(f"pdd: need stages >= 1 dividing ipc and iterations (each stage distils ipc / stages images "
                         f"per class for iterations / stages iterations); got stages {spec.stages}, ipc {cfg.ipc}, "
                         f"iterations {cfg.iterations}")
    if spec.condition_epochs < 1 or spec.stage_expert_epochs < 0:
        raise ValueError(f"pdd: need condition_epochs >= 1 and stage_expert_epochs >= 0, got {spec.condition_epochs}, "
                         f"{spec.stage_expert_epochs}")
    if spec.base == "idc":
        check_idc_config(cfg)
        return
    for k in range(min(spec.stages, 2)):  # stage 0's experts and, when there are later stages, theirs
        check_trajectory_config(stage_config(cfg, k))


def stage_config(cfg, k: int):
    """The base method's config for stage k: ``ipc / stages`` images per class, ``iterations / stages``
    iterations, the run seed for stage 0 and ``mix_seed(seed, PDD_STAGE, k)`` after it, and (MTT, k >= 1)
    ``pdd.stage_expert_epochs`` real-data epochs for the conditioned experts."""
    spec = cfg.pdd
    tm = cfg.tm
    if k >= 1 and spec.stage_expert_epochs:
        tm = dataclasses.replace(tm, train_epochs=spec.stage_expert_epochs)
    return cfg.replace(method=spec.base, ipc=cfg.ipc // spec.stages, iterations=cfg.iterations // spec.stages,
                       seed=cfg.seed if k == 0 else mix_seed(cfg.seed, Stream.PDD_STAGE, k), tm=tm)


class PDD:
    """One PDD run: the union of all stages (the run's SyntheticSet, class-major: each class's images stage by
    stage) and the base distiller of the current stage; ``step(it)`` runs global iteration ``it``."""

    check_config = staticmethod(check_pdd_config)  # config.validate calls it before any work

    @classmethod
    def uses_dsa(cls, cfg) -> bool:
        """Stage hook: whether the run resolves a DSA strategy; as the base method does."""
        return bool(getattr(PDD_BASES[cfg.pdd.base], "USES_DSA", False))

    @classmethod
    def prepare(cls, ctx: RunContext) -> Preparation:
        """Stage hook: checks the config and runs the base method's own preparation at the total IPC (ZCA and
        stage 1's experts for MTT, IDC's "mix" initial images), so that the initial images of all stages are the
        base method's at that IPC."""
        check_pdd_config(ctx.cfg)
        base_cls = PDD_BASES[ctx.cfg.pdd.base]
        base = base_cls.prepare(dataclasses.replace(ctx, cfg=ctx.cfg.replace(method=ctx.cfg.pdd.base)))
        state = {"base": base, "progress": ctx.progress, "initial_indices": ctx.initial_indices}
        return Preparation(pool=base.pool, test=base.test, init=base.init, state=state, summary=dict(base.summary))

    def __init__(self, cfg, pool, syn: SyntheticSet, iwd, dsa_strategy, device, timer: Optional[PhaseTimer] = None,
                 prepared: Optional[Preparation] = None):
        if prepared is None:
            raise ValueError("pdd needs its prepare stage: run it through run_distillation")
        self.cfg, self.pool, self.syn, self.iwd, self.device = cfg, pool, syn, iwd, device
        self.dsa_strategy = dsa_strategy
        self.timer = timer if timer is not None else PhaseTimer()
        self.prepared = prepared
        self.spec = cfg.pdd
        self.per_stage = cfg.ipc // self.spec.stages
        self.stage_iterations = cfg.iterations // self.spec.stages
        self.base = None
        self.stage = -1
        self.facts: List[Dict[str, Any]] = [{} for _ in range(self.spec.stages)]
        self.weighter_at_stage: Dict[int, Dict] = {}  # MTT two-pass: the weighter before stage k refreshed it
        self.pending: Optional[Dict] = None  # a loaded base state, applied when its stage is rebuilt

    # ------------------------------------------------------------------------------------- the union
    def stage_of(self) -> torch.Tensor:
        """int64 [C * ipc]: the stage of every image of the union (class-major, each class stage by stage)."""
        per_class = torch.arange(self.spec.stages).repeat_interleave(self.per_stage)
        return per_class.repeat(self.pool.num_classes)

    def _rows(self, low: int, high: int) -> torch.Tensor:
        """Rows of the union holding stages low..high-1, class-major."""
        return torch.nonzero((self.stage_of() >= low) & (self.stage_of() < high)).flatten().to(self.syn.images.device)

    def _union(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stored images and labels of stages 0..k (U_{k+1}), class-major, detached."""
        rows = self._rows(0, k + 1)
        return self.syn.images.detach()[rows].clone(), self.syn.labels[rows]

    def _trained_on(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """What a network trains on for stored images: IDC's decoded set, MTT's images themselves."""
        if self.spec.base == "idc":
            return decoded_set(images, self.pool.num_classes, self.cfg.idc.factor)
        return images, labels

    # --------------------------------------------------------------------------------- conditioning
    def _condition_specs(self, k: int) -> List[EvalSpec]:
        specs = []
        for j in range(k):
            lr = self.facts[j].get("learned_syn_lr") if self.spec.condition_learned_lr else None
            specs.append(self.cfg.eval if lr is None else dataclasses.replace(self.cfg.eval, lr=lr))
        return specs

    def _conditioner(self, k: int, seed: int):
        """(net, index) -> train net in place on U_1 .. U_k (``condition_epochs`` each); its description."""
        sets = [self._trained_on(*self._union(j)) for j in range(k)]
        specs = self._condition_specs(k)
        dsa = self.dsa_strategy if self.cfg.eval.dsa else None
        dsa = None if dsa is None or dsa.lower() == "none" else dsa

        def apply(net, index: int) -> None:
            started = time.perf_counter()
            train_stages(net, sets, specs, mix_seed(seed, Stream.PDD_CONDITION, k, index), dsa, self.device,
                         epochs=self.spec.condition_epochs)
            self.facts[k]["conditioning_seconds"] = self.facts[k].get("conditioning_seconds", 0.0) + \
                time.perf_counter() - started

        description = {"pdd_stage": k, "frozen_images": tensor_sha256(sets[-1][0].float()),
                       "frozen_labels": tensor_sha256(sets[-1][1].long()), "epochs": self.spec.condition_epochs,
                       "recipe": [dataclasses.asdict(dataclasses.replace(s, net=None)) for s in specs], "dsa": dsa}
        return apply, description

    # ----------------------------------------------------------------------------------- the stages
    def _stage_preparation(self, k: int, stage_cfg) -> Optional[Preparation]:
        """MTT: stage 1 uses the run's preparation; stage k >= 2 trains (or loads) experts that start from a
        network trained on the earlier stages, refreshing two-pass weights from their own scores."""
        if self.spec.base != "mtt":
            return None
        base = self.prepared.state["base"]
        if k == 0:
            return base
        if self.iwd is not None and self.cfg.weighting != "auto":  # two-pass: the stage's weights, one refresh
            if k in self.weighter_at_stage:
                self.iwd.weighter.load_state_dict(self.weighter_at_stage[k])
            else:
                self.weighter_at_stage[k] = self.iwd.weighter.state_dict()
        apply, description = self._conditioner(k, stage_cfg.tm.expert_seed)
        ctx = RunContext(stage_cfg, self.pool, self.prepared.test, self.device, self.timer, self.iwd,
                         _no_none(self.dsa_strategy), self.prepared.state["progress"],
                         self.prepared.state["initial_indices"])
        return expert_stage(ctx, self.pool, self.prepared.test, base.state.get("zca"), ExpertStart(description, apply))

    def _enter(self, k: int) -> None:
        stage_cfg = stage_config(self.cfg, k)
        prepared = self._stage_preparation(k, stage_cfg)
        stage_syn = SyntheticSet(self.syn.images.detach()[self._rows(k, k + 1)], self.pool.num_classes, self.per_stage)
        extra = {"prepared": prepared} if prepared is not None else {}
        base = PDD_BASES[self.spec.base](stage_cfg, self.pool, stage_syn, self.iwd, self.dsa_strategy, self.device,
                                         timer=self.timer, **extra)
        if k > 0:
            images, labels = self._union(k - 1)
            base.frozen = FrozenImages(images, labels, k * self.per_stage)
            if self.spec.base == "idc":
                apply, _ = self._conditioner(k, stage_cfg.seed)
                base.condition = apply
        if prepared is not None and k > 0:
            self.facts[k]["experts"] = prepared.summary.get("experts")
            if "iwd_two_pass" in prepared.summary:
                self.facts[k]["iwd_two_pass"] = prepared.summary["iwd_two_pass"]
        if self.pending is not None and self.pending["stage"] == k:
            base.load_state_dict(self.pending["base"])
        self.pending = None
        self.base, self.stage = base, k

    def step(self, it: int) -> Dict[str, float]:
        k, local = divmod(it, self.stage_iterations)
        if k != self.stage:
            self._enter(k)
        metrics = self.base.step(local)
        with torch.no_grad():
            self.syn.images[self._rows(k, k + 1)] = self.base.syn.images.detach()
        if isinstance(self.base, TrajectoryMatching):
            self.facts[k]["learned_syn_lr"] = float(self.base.syn_lr.detach())
        return {**metrics, "stage": float(k)}

    # ------------------------------------------------------------------------------------ stage hooks
    def wants_checkpoint(self, iteration: int) -> bool:
        """A checkpoint at the end of every stage: a killed run resumes at its stage."""
        return self.stage_iterations > 0 and iteration % self.stage_iterations == 0

    def evaluation_set(self):
        """What evaluation trains on: the union, stored (MTT) or decoded (IDC), class-major."""
        return self._trained_on(self.syn.images.detach(), self.syn.labels)

    def evaluation_stages(self) -> torch.Tensor:
        """int64 [M]: the stage of each image of :meth:`evaluation_set` (evaluation trains through the unions)."""
        if self.spec.base != "idc":
            return self.stage_of()
        decoded = self.cfg.idc.factor ** 2 * self.per_stage  # decoded images per class and stage
        per_class = torch.arange(self.spec.stages).repeat_interleave(decoded)
        # decoded_set orders each class tile by tile, each tile over the class's stored images (stage by stage)
        return per_class.view(self.spec.stages, self.cfg.idc.factor ** 2, self.per_stage).transpose(0, 1) \
            .reshape(-1).repeat(self.pool.num_classes)

    def extra_evaluations(self) -> Dict[str, Any]:
        """MTT with ``tm.eval_learned_lr``: the evaluation at each stage's own learned lr (the reference's)."""
        if self.spec.base != "mtt" or not self.cfg.tm.eval_learned_lr:
            return {}
        return {"accuracy_learned_lr": [dataclasses.replace(self.cfg.eval, lr=f.get("learned_syn_lr", self.cfg.eval.lr))
                                        for f in self.facts]}

    def summary(self) -> Dict[str, Any]:
        return {"pdd": {"base": self.spec.base, "stages": self.spec.stages, "ipc_per_stage": self.per_stage,
                        "iterations_per_stage": self.stage_iterations, "stage_facts": self.facts},
                **self.prepared.summary}

    def tensors(self) -> Dict[str, torch.Tensor]:
        images, targets = self.evaluation_set()
        out = {"eval_images": images.clone(), "eval_targets": targets.clone(), "eval_stage": self.evaluation_stages()}
        zca = self.prepared.state["base"].state.get("zca")
        if zca is not None:
            out.update(zca.tensors())
        if self.spec.base == "mtt":
            out["stage_syn_lr"] = torch.tensor([f.get("learned_syn_lr", float("nan")) for f in self.facts])
        return out

    # -------------------------------------------------------------------------------------- resume
    def state_dict(self) -> Dict:
        return {"stage": self.stage, "base": self.base.state_dict() if self.base is not None else None,
                "facts": [dict(f) for f in self.facts], "weighter_at_stage": dict(self.weighter_at_stage)}

    def load_state_dict(self, state: Dict) -> None:
        """The stage's base distiller is rebuilt (from the restored union) when the next step runs."""
        self.facts = [dict(f) for f in state["facts"]]
        self.weighter_at_stage = dict(state["weighter_at_stage"])
        self.pending = {"stage": state["stage"], "base": state["base"]} if state["base"] is not None else None
        self.base, self.stage = None, -1


def _no_none(strategy):
    return None if not strategy or strategy.lower() == "none" else strategy
