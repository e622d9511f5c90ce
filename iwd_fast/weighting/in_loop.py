"""In-loop weights for a gradient-matching loop in one object: the held-out set, the weighter and the refresh
rule of README recipe 2, so that the loop itself changes in two lines.

    in_loop = InLoopWeights(pool_labels, num_classes, held_images, held_labels)
    for step ...:                                    # the loop's outer step (DC's ``ol``)
        in_loop.begin_step(net, step, scale=lr_net)  # rescoring step? then the held-out direction of ``net``
        for c ...:
            gw_real = in_loop.real_gradient(net, img_real, lab_real, idx, net_parameters)

``real_gradient`` is ``torch.autograd.grad`` of the batch's weighted mean cross entropy; on a rescoring step
the same backward also scores the batch against the held-out direction and folds the scores into the
weighter (``Capture.weighted_gradient``), bit for bit the recipe's long form (tested).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..scoring import capture
from ..scoring.checks import as_labels
from .dropin import weighted_cross_entropy
from .targets import validation_directions
from .weighter import InfluenceWeighter

__all__ = ["InLoopWeights", "IN_LOOP_DEFAULTS", "check_in_loop_options"]

# One set for this helper, the built-in loops (``IWDSpec`` reads them) and the README.
IN_LOOP_DEFAULTS = {"refresh": 3, "heldout_fraction": 0.1, "heldout_batch": 256, "heldout_keep": 0.7}


def check_in_loop_options(refresh, heldout_batch, heldout_keep, where: str) -> None:
    """Refuse in-loop options that cannot run, in one line; ``where`` prefixes each name ("iwd." for a run's
    config, "InLoopWeights: " for the helper), so both say the same thing."""
    def number(value, kind, name: str):
        try:
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}{name} must be a number, got {value!r}") from None

    if not number(refresh, int, "refresh") >= 1:
        raise ValueError(f"{where}refresh must be >= 1, got {refresh}")
    if not number(heldout_batch, int, "heldout_batch") >= 1:
        raise ValueError(f"{where}heldout_batch must be >= 1, got {heldout_batch}")
    if not 0.0 < number(heldout_keep, float, "heldout_keep") <= 1.0:
        raise ValueError(f"{where}heldout_keep must lie in (0, 1], got {heldout_keep}")


class InLoopWeights:
    """The validation target rescored inside the loop (METHOD.md 2c), for a pool with a held-out split.

    Args:
        labels: int64 [n], the pool's labels (batch indices ``idx`` are positions in this pool).
        num_classes: C.
        heldout_images: [m, ...] and heldout_labels: int64 [m], the held-out split, on the network's device.
        refresh: rescore every ``refresh``-th step (steps 0, refresh, 2 refresh, ...).
        heldout_batch: held-out instances per direction, drawn at random with a generator seeded by the step.
        heldout_keep: the lowest-loss share of that batch that defines the direction.
        weighter: options of the ``InfluenceWeighter`` (its defaults otherwise).
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, heldout_images: torch.Tensor,
                 heldout_labels: torch.Tensor, *, refresh: int = IN_LOOP_DEFAULTS["refresh"],
                 heldout_batch: int = IN_LOOP_DEFAULTS["heldout_batch"],
                 heldout_keep: float = IN_LOOP_DEFAULTS["heldout_keep"], **weighter):
        heldout_labels = as_labels(heldout_labels, "InLoopWeights (heldout_labels)", num_classes)
        if heldout_images.shape[0] != heldout_labels.shape[0] or heldout_labels.shape[0] == 0:
            raise ValueError(f"InLoopWeights: need as many held-out images as labels, at least one, got "
                             f"{heldout_images.shape[0]} images and {heldout_labels.shape[0]} labels")
        check_in_loop_options(refresh, heldout_batch, heldout_keep, "InLoopWeights: ")
        self.weighter = InfluenceWeighter(labels, num_classes, **weighter)
        self.heldout_images, self.heldout_labels = heldout_images, heldout_labels
        self.refresh, self.heldout_batch, self.heldout_keep = int(refresh), int(heldout_batch), float(heldout_keep)
        self.direction: Optional[Dict[str, torch.Tensor]] = None

    @property
    def scoring(self) -> bool:
        """Whether the current step rescores its real batches (a direction was computed for it)."""
        return self.direction is not None

    def begin_step(self, net: nn.Module, step: int, scale: float = 1.0) -> bool:
        """Start outer step ``step``: on a rescoring step, ``scale`` * the gradient of ``net``'s mean loss on a
        held-out batch (drawn with ``torch.Generator().manual_seed(step)``: the loop's own random stream is
        left alone). Returns whether the step rescores."""
        self.direction = None
        if step % self.refresh == 0:
            pick = torch.randperm(len(self.heldout_labels), generator=torch.Generator().manual_seed(step))
            pick = pick[:self.heldout_batch].to(self.heldout_labels.device)
            self.direction = validation_directions(net, self.heldout_images[pick], self.heldout_labels[pick],
                                                   scale=scale, keep=self.heldout_keep)
        return self.scoring

    def batch_weights(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 [B]: the batch's weights relative to its largest (``idx``: int64 [B] pool positions)."""
        return self.weighter.relative_batch_weights(idx)

    def real_gradient(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                      params: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """The gradient of the batch's weighted mean cross entropy w.r.t. ``params`` (images [B, ...], labels
        int64 [B], idx int64 [B] pool positions); on a rescoring step the batch's scores are folded in."""
        w = self.batch_weights(idx)
        if not self.scoring:
            return torch.autograd.grad(weighted_cross_entropy(net(images), labels, w), params)
        with capture(net, directions=self.direction) as cap:
            losses = F.cross_entropy(net(images), labels, reduction="none")
            grads = tuple(cap.weighted_gradient(losses, w, params))
        self.weighter.update(idx, cap.grad_dot())
        return grads
