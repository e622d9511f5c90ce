"""MTT: matching training trajectories (Cazenavette et al. 2022), on weighted or unweighted experts.

Each iteration draws an expert e and a start epoch t, starts a student at theta*_t, takes ``syn_steps``
SGD steps on (DSA-augmented) batches of the synthetic set with the learnable learning rate alpha, and
minimises L_tm = ||theta_hat - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 over the images and alpha
(SGD with momentum 0.5 on both; lr_img and tm.lr_lr). Real data enters only through the experts, so IWD
acts there (weighted experts) and on the real initialisation (METHOD.md 1 and 2d).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch

from ...evaluate import EvalSpec
from ...runtime import MethodStreams, Stream, mix_seed
from ..base import Distiller
from .prepare import check_trajectory_config, prepare_trajectory
from .student import matching_loss, unroll

__all__ = ["TrajectoryMatching"]


def _no_none(strategy):
    """A DSA strategy, or None for "none" / "" (no augmentation, no draws)."""
    return None if not strategy or strategy.lower() == "none" else strategy


class TrajectoryMatching(Distiller):
    """One MTT run's state; ``step(it)`` performs one matching iteration and returns its metrics."""

    STREAMS = MethodStreams(Stream.TM_SAMPLER, Stream.TM_AUGMENT, Stream.TM_SCHEDULE)
    USES_DSA = True
    check_config = staticmethod(check_trajectory_config)  # config.validate calls it before any work

    @classmethod
    def prepare(cls, ctx):
        """Stage hook (iwd_fast.distill.stages): expert buffers, and the two-pass IWD scheme when weighted."""
        return prepare_trajectory(dataclasses.replace(ctx, dsa_strategy=_no_none(ctx.dsa_strategy)))

    def __init__(self, cfg, pool, syn, iwd, dsa_strategy, device, timer=None, prepared=None):
        super().__init__(cfg, pool, syn, iwd, _no_none(dsa_strategy), device, timer=timer)
        if prepared is None:
            raise ValueError(f"{cfg.method} needs its prepare stage (expert buffers): run it through run_distillation")
        self.prepared = prepared
        self.buffer = prepared.state["buffer"]
        self.student = prepared.state["student"]
        self.tm = cfg.tm
        self.experts: List[int] = list(range(self.tm.num_experts))
        self.syn_lr = torch.tensor(float(self.tm.syn_lr_init or self.tm.expert_lr), device=device, requires_grad=True)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=self.tm.lr_lr, momentum=0.5)
        self.schedule = torch.Generator().manual_seed(mix_seed(cfg.seed, self.STREAMS.networks))
        self.order: List[int] = []

    # ------------------------------------------------------------------------------- what is matched
    def targets(self) -> torch.Tensor:
        """What the student trains on: hard labels int64 [M] (DATM: soft-label logits [M, C])."""
        return self.syn.labels

    def start_range(self, it: int) -> Tuple[int, int]:
        """Start epochs are drawn uniformly from [low, high)."""
        return self.tm.min_start_epoch, self.tm.max_start_epoch

    def _next_expert(self) -> int:
        if not self.order:
            self.order = [self.experts[i] for i in torch.randperm(len(self.experts), generator=self.schedule).tolist()]
        return self.order.pop()

    def student_set(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """What the student unrolls on: the frozen images of earlier stages (PDD), then the synthetic images;
        and their targets (hard labels for the frozen ones)."""
        if self.frozen is None:
            return self.syn.images, self.targets()
        return torch.cat([self.frozen.images, self.syn.images]), torch.cat([self.frozen.labels, self.targets()])

    def _batches(self, m: int) -> List[torch.Tensor]:
        """``syn_steps`` index batches into the student's set of ``m`` images; a batch holds ``tm.batch_syn``
        images, by default as many as the synthetic set (under PDD: one stage's images, the reference's)."""
        bs = self.tm.batch_syn or self.syn.images.shape[0]
        out: List[torch.Tensor] = []
        while len(out) < self.tm.syn_steps:
            out.extend(torch.randperm(m, generator=self.schedule).split(bs))
        return [b.to(self.device) for b in out[:self.tm.syn_steps]]

    def _augmenter(self):
        if not self.dsa_strategy:
            return None
        seeds = [self._next_seed() for _ in range(self.tm.syn_steps)]
        return lambda x, step: self._augment(x, seeds[step])

    def match(self, it: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        """L_tm of one draw (graph to the images, alpha and the targets) and its facts."""
        e = self._next_expert()
        low, high = self.start_range(it)
        t = int(torch.randint(low, high, (), generator=self.schedule))
        start = self.buffer.snapshot(e, t).to(self.device)
        target = self.buffer.snapshot(e, t + self.tm.expert_epochs).to(self.device)
        images, targets = self.student_set()
        batches = self._batches(images.shape[0])
        theta = unroll(self.student, start, images, targets, self.syn_lr, batches, self._augmenter())
        return matching_loss(theta, start, target), {"expert": float(e), "start_epoch": float(t)}

    def step(self, it: int) -> Dict[str, float]:
        loss, facts = self.match(it)
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        self.zero_extra_grads()
        loss.backward()
        accepted = self.accept(loss)
        if accepted:
            self.opt_img.step()
            self.opt_lr.step()
            self.step_extra()
        return {"match_loss": float(loss.detach()), "syn_lr": float(self.syn_lr.detach()),
                "accepted": float(accepted), **facts}

    # ---------------------------------------------------------------------------- DATM's extension points
    def accept(self, loss: torch.Tensor) -> bool:
        return True

    def zero_extra_grads(self) -> None:
        pass

    def step_extra(self) -> None:
        pass

    # ------------------------------------------------------------------------------------ stage hooks
    def evaluation_set(self):
        return self.syn.images.detach(), self.syn.labels

    def extra_evaluations(self) -> Dict[str, EvalSpec]:
        if not self.tm.eval_learned_lr:
            return {}
        return {"accuracy_learned_lr": dataclasses.replace(self.cfg.eval, lr=float(self.syn_lr.detach()))}

    def summary(self) -> Dict:
        return {"learned_syn_lr": float(self.syn_lr.detach()), **self.prepared.summary}

    def tensors(self) -> Dict[str, torch.Tensor]:
        """syn_lr, and with ZCA the fitted mean and matrix (the images live in the whitened space: a later
        evaluation whitens the test set with them)."""
        zca = self.prepared.state.get("zca")
        return {"syn_lr": self.syn_lr.detach().reshape(1), **(zca.tensors() if zca is not None else {})}

    # -------------------------------------------------------------------------------------- resume
    def state_dict(self) -> Dict:
        return {**super().state_dict(), "opt_lr": self.opt_lr.state_dict(), "syn_lr": self.syn_lr.detach().clone(),
                "schedule": self.schedule.get_state(), "order": list(self.order)}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self.schedule.set_state(state["schedule"])
        self.order = list(state["order"])
