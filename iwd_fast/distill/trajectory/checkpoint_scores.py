"""Influence of real instances along expert checkpoints: the scoring pass of IWD for trajectory matching
(METHOD.md 2c-2d).

For checkpoints theta_k of unweighted experts, with step size eta_k (the expert learning rate):

    validation:  s_i = sum_k eta_k < g_i(theta_k) , grad_theta L_V(theta_k) >    (benefit for the held-out loss)
    self:        s_i = sum_k eta_k || g_i(theta_k) ||^2                          (self-influence, TracIn)

g_i is the gradient of instance i's cross entropy and L_V the mean cross entropy of the held-out split.
Every term is one call of the package's streamed ``grad_dot`` / ``grad_norm_sq`` over the pool (dots
computed inside the backward, no per-sample gradient materialised).
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ...weighting.targets import instance_scores, validation_directions
from .buffer import ExpertBuffer
from .student import FlatNet

__all__ = ["checkpoint_scores", "SCORE_TARGETS"]

SCORE_TARGETS = ("validation", "self")


def checkpoint_scores(buffer: ExpertBuffer, experts: Sequence[int], epochs: Sequence[int], student: FlatNet,
                      images: torch.Tensor, labels: torch.Tensor, target: str, eta: float,
                      heldout_images: Optional[torch.Tensor] = None, heldout_labels: Optional[torch.Tensor] = None,
                      chunk_size: int = 512, impl: str = "auto", progress: bool = False) -> Dict[str, Any]:
    """Scores of every pool instance summed over the checkpoints (experts x epochs).

    images [n, C, H, W], labels int64 [n] (the pool); heldout_* the held-out split (validation target).
    The student's network (in eval mode) is loaded with each snapshot, in the network's own dtype.
    Returns {"scores": float64 [n], "checkpoints": count, "seconds": wall clock, "dots": n * checkpoints}.
    """
    if target not in SCORE_TARGETS:
        raise ValueError(f"scores along expert checkpoints support the targets {SCORE_TARGETS}, got {target!r}")
    if target == "validation" and (heldout_images is None or heldout_images.shape[0] == 0):
        raise ValueError("the validation target needs a held-out split: set iwd.heldout_fraction > 0")
    if not experts or not epochs:
        raise ValueError("checkpoint_scores: need at least one expert and one epoch")
    net = student.net.eval()
    dtype = next(net.parameters()).dtype
    total = torch.zeros(images.shape[0], dtype=torch.float64)
    started = time.perf_counter()
    pairs = [(e, k) for e in experts for k in epochs]
    for e, k in tqdm(pairs, desc=f"IWD scores ({target})", leave=False, disable=not progress):
        student.load_into_net(buffer.snapshot(e, k).to(dtype))
        direction = None
        if target == "validation":
            direction = validation_directions(net, heldout_images, heldout_labels, scale=eta)
            s = instance_scores(net, images, labels, target, direction, chunk_size=chunk_size, impl=impl)
        else:
            s = eta * instance_scores(net, images, labels, target, chunk_size=chunk_size, impl=impl)
        total += s.detach().double().cpu()
    return {"scores": total, "checkpoints": len(pairs), "seconds": time.perf_counter() - started,
            "dots": int(images.shape[0]) * len(pairs)}
