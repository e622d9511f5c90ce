"""DATM: difficulty-aligned trajectory matching (Guo et al., ICLR 2024) on top of MTT.

Three changes to MTT:

- the window of start epochs moves with progress: the upper end grows linearly from
  ``tm.datm_initial_max_start`` to ``tm.max_start_epoch`` over ``tm.datm_expansion_end`` iterations
  (early iterations match easy, early trajectory segments);
- soft labels: learnable logits [M, C], initialised from the experts' logits of the initial images at
  epoch ``tm.datm_label_epoch`` (mean over the experts that classify the image correctly), trained by SGD
  (``datm_lr_labels``, ``datm_momentum_labels``) through the student's soft cross entropy; an update is
  skipped when the matching loss exceeds ``datm_threshold``;
- initialisation from real images that an expert classifies correctly. With IWD the weights choose among
  them (iwd.init: highest weight or drawn in proportion to the weights); without, a uniform draw.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ...runtime import Stream, mix_seed
from ...weighting.dropin import select_initial
from ..config import init_mode
from ..pool import SELECT_MODE
from .mtt import TrajectoryMatching

__all__ = ["DATM", "correct_initial_indices"]


def correct_initial_indices(logits: torch.Tensor, labels: torch.Tensor, weights, num_classes: int, ipc: int,
                            mode: str, seed: int) -> Dict:
    """Pool indices [C * ipc] among the instances whose logits [n, C] predict their label [n].

    Within class c the ipc images are drawn from the correct ones by ``mode`` ("random", "trusted" =
    uniform among positive weights, "weighted" = top weight, "proportional" = in proportion to ``weights`` [n]); if fewer than ipc are correct the
    rest are drawn the same way from the incorrect ones. Returns {"indices", "correct_pool_fraction",
    "filled_from_incorrect"}.
    """
    correct = logits.argmax(1).cpu() == labels.cpu()
    gen_seed = int(seed)
    picked, filled = [], 0
    select_mode = SELECT_MODE[mode]
    for c in range(num_classes):
        members = torch.nonzero(labels.cpu() == c).flatten()
        good, bad = members[correct[members]], members[~correct[members]]
        take = []
        for group, k in ((good, min(ipc, good.numel())), (bad, ipc - min(ipc, good.numel()))):
            if k == 0:
                continue
            sub_labels = torch.zeros(group.numel(), dtype=torch.long)
            sub_w = None if weights is None else weights.cpu()[group]
            local = select_initial(sub_labels, sub_w if select_mode != "random" else None, 1, k, select_mode,
                                   mix_seed(gen_seed, c, k))
            take.append(group[local])
        filled += ipc - min(ipc, good.numel())
        picked.append(torch.cat(take))
    return {"indices": torch.cat(picked), "correct_pool_fraction": float(correct.double().mean()),
            "filled_from_incorrect": filled}


class DATM(TrajectoryMatching):
    """One DATM run's state (see the module docstring)."""

    @classmethod
    def prepare(cls, ctx):
        """MTT's stage, then (``tm.datm_init_correct``) the initial images among correctly classified ones."""
        prepared = super().prepare(ctx)
        cfg, tm = ctx.cfg, ctx.cfg.tm
        if not tm.datm_init_correct:
            return prepared
        buffer, student, pool = prepared.state["buffer"], prepared.state["student"], prepared.pool
        epoch = tm.datm_label_epoch if tm.datm_label_epoch >= 0 else tm.train_epochs
        with torch.no_grad():
            net = student.load_into_net(buffer.snapshot(0, epoch)).eval()
            logits = torch.cat([net(pool.images[i:i + 1024]) for i in range(0, pool.images.shape[0], 1024)])
        weights = prepared.state.get("weights")
        mode = init_mode(cfg) if weights is not None else "random"
        chosen = correct_initial_indices(logits, pool.labels, weights, pool.num_classes, cfg.ipc, mode,
                                         mix_seed(cfg.seed, Stream.TM_INITIAL))
        how = "uniform" if weights is None else f"{mode} by IWD weights"
        chosen["init"] = f"correctly classified by expert 0 at epoch {epoch}, {how}"
        prepared.init = chosen
        prepared.summary["datm_init"] = {k: v for k, v in chosen.items() if k != "indices"}
        return prepared

    def __init__(self, cfg, pool, syn, iwd, dsa_strategy, device, timer=None, prepared=None):
        super().__init__(cfg, pool, syn, iwd, dsa_strategy, device, timer=timer, prepared=prepared)
        self.label_logits = self._initial_logits().requires_grad_(True)
        self.opt_labels = torch.optim.SGD([self.label_logits], lr=self.tm.datm_lr_labels,
                                          momentum=self.tm.datm_momentum_labels)
        self.skipped = 0

    def _initial_logits(self) -> torch.Tensor:
        """Mean expert logits [M, C] of the initial images at datm_label_epoch, over the experts that predict
        the image's class (over all experts where none does)."""
        tm = self.tm
        epoch = tm.datm_label_epoch if tm.datm_label_epoch >= 0 else tm.train_epochs
        images, labels = self.syn.images.detach(), self.syn.labels
        total = torch.zeros(images.shape[0], self.pool.num_classes, device=self.device)
        every = torch.zeros_like(total)
        hits = torch.zeros(images.shape[0], 1, device=self.device)
        with torch.no_grad():
            for e in self.experts:
                net = self.student.load_into_net(self.buffer.snapshot(e, epoch)).eval()
                logits = net(images)
                right = (logits.argmax(1) == labels).float().unsqueeze(1)
                total += logits * right
                hits += right
                every += logits
        self.label_init_accuracy = float((hits > 0).float().mean())
        return torch.where(hits > 0, total / hits.clamp_min(1), every / len(self.experts)).detach().clone()

    def targets(self) -> torch.Tensor:
        return self.label_logits

    def start_range(self, it: int) -> Tuple[int, int]:
        tm = self.tm
        high = tm.max_start_epoch
        if tm.datm_sequential:
            grow = (tm.max_start_epoch - tm.datm_initial_max_start) * it / max(1, tm.datm_expansion_end)
            high = min(tm.max_start_epoch, tm.datm_initial_max_start + int(grow))
        return tm.min_start_epoch, max(high, tm.min_start_epoch + 1)

    def accept(self, loss: torch.Tensor) -> bool:
        ok = bool(loss.detach() <= self.tm.datm_threshold)
        self.skipped += int(not ok)
        return ok

    def zero_extra_grads(self) -> None:
        self.opt_labels.zero_grad(set_to_none=True)

    def step_extra(self) -> None:
        self.opt_labels.step()

    def evaluation_set(self):
        """Images and soft targets: probabilities softmax(label logits) [M, C]."""
        return self.syn.images.detach(), F.softmax(self.label_logits.detach(), dim=1)

    def summary(self) -> Dict:
        return {**super().summary(), "datm_skipped_updates": self.skipped,
                "datm_label_init_accuracy": self.label_init_accuracy,
                "soft_label_agreement": float((self.label_logits.detach().argmax(1) == self.syn.labels).float().mean())}

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {**super().tensors(), "label_logits": self.label_logits.detach(),
                "eval_targets": F.softmax(self.label_logits.detach(), dim=1)}

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "label_logits": self.label_logits.detach().clone(),
                "opt_labels": self.opt_labels.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.label_logits.copy_(state["label_logits"])
        self.opt_labels.load_state_dict(state["opt_labels"])
        self.skipped = int(state["skipped"])
