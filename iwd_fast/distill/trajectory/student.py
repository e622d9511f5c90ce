"""The student of trajectory matching: a network run on ONE flat parameter vector, its inner unroll on
the synthetic set, and the matching loss (METHOD.md 2d).

    L_tm = ||theta_hat - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2,
    theta_hat = theta_N,  theta_{k+1} = theta_k - alpha * grad_theta CE(f(aug(S_k); theta_k), Y_k)

with alpha the learnable synthetic learning rate and S_k the k-th batch of synthetic images. The unroll
keeps its graph (create_graph) so that L_tm is differentiable in S, alpha and soft labels Y.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

__all__ = ["FlatNet", "soft_cross_entropy", "unroll", "matching_loss"]


class FlatNet:
    """``net`` evaluated at a flat parameter vector theta [P] (float, the order of ``named_parameters``).

    ``layout`` is [(name, shape)], the order the expert buffer stores snapshots in. Buffers (e.g.
    BatchNorm running statistics) are the module's own and are not trained by the student.
    """

    def __init__(self, net: nn.Module):
        self.net = net
        self.layout: List[Tuple[str, Tuple[int, ...]]] = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
        self.sizes = [int(torch.Size(s).numel()) for _, s in self.layout]
        self.numel = sum(self.sizes)

    def flatten(self, tensors: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """Parameters (default: the network's own) -> theta [P], detached."""
        tensors = [p for p in self.net.parameters()] if tensors is None else tensors
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def unflatten(self, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        """theta [P] -> {name: view of theta with the parameter's shape} (differentiable)."""
        if theta.shape != (self.numel,):
            raise ValueError(f"FlatNet: theta must have shape ({self.numel},), got {tuple(theta.shape)}")
        return {name: chunk.view(shape) for (name, shape), chunk in zip(self.layout, theta.split(self.sizes))}

    def load_into_net(self, theta: torch.Tensor) -> nn.Module:
        """Copy theta into the network's own parameters (for scoring and logits) and return it."""
        with torch.no_grad():
            for p, value in zip(self.net.parameters(), self.unflatten(theta.to(next(self.net.parameters()).device))
                                .values()):
                p.copy_(value)
        return self.net

    def __call__(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of x [B, ...] at theta [P]."""
        return functional_call(self.net, self.unflatten(theta), (x,), strict=False)


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """DATM's soft-label loss: mean over the batch of -sum_c softmax(target)_c * log_softmax(logits)_c.

    logits, target_logits: float [B, C]; a scalar. Gradients reach both.
    """
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def unroll(student: FlatNet, theta0: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
           syn_lr: torch.Tensor, batches: Sequence[torch.Tensor],
           augment: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
           loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """theta_N after N = len(batches) SGD steps on the synthetic set, with the graph kept.

    Args:
        theta0: float [P], the expert's snapshot theta*_t (no gradient needed).
        images: float [M, C, H, W] synthetic images (leaf with requires_grad for distillation).
        targets: int64 [M] labels or float [M, C] soft-label logits (DATM).
        syn_lr: float scalar tensor alpha (learnable).
        batches: N index tensors into [0, M): the synthetic batch of each step.
        augment: (x, step) -> augmented x (differentiable), or None.
        loss_fn: (logits, targets) -> scalar; default cross entropy (soft_cross_entropy for float targets).
    """
    if loss_fn is None:
        loss_fn = soft_cross_entropy if targets.dtype.is_floating_point else F.cross_entropy
    theta = theta0.detach().requires_grad_(True)
    for step, idx in enumerate(batches):
        x = images[idx]
        if augment is not None:
            x = augment(x, step)
        loss = loss_fn(student(x, theta), targets[idx])
        grad = torch.autograd.grad(loss, theta, create_graph=True)[0]
        theta = theta - syn_lr * grad
    return theta


def matching_loss(theta_hat: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||theta_hat - target||^2 / ||start - target||^2 (MTT's normalised parameter distance), a scalar."""
    denom = (start - target).pow(2).sum()
    if not bool(denom > 0):
        raise ValueError("matching_loss: the expert did not move between the start and target epochs")
    return (theta_hat - target).pow(2).sum() / denom
