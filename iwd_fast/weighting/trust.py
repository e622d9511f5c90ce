"""Which real instances to trust, and how strongly to weight them: out-of-sample predictions and a
per-class noise-rate estimate (METHOD.md section 4b).

The scores of the in-loop targets decide WHO is suspicious, but not HOW MANY: a softmax of z-scores or
ranks moves weight even when nothing is mislabelled, which costs accuracy on clean labels. Here the
strength comes from the data:

1. :func:`crossfit_probabilities`: every instance is predicted by a network that never trained on it
   (k folds, stratified by label; each fold's network trains on the other folds).
2. :func:`estimate_noise`: confident learning (Northcutt et al., JAIR 2021). A class's threshold t_k is
   the mean out-of-sample probability of class k over the instances labelled k; instance i is
   confidently of class k when p_ik >= t_k (the most probable such k). The confident joint C[c, k]
   counts instances labelled c that are confidently of class k; the estimated noise rate of class c is
   r_c = 1 - C[c, c] / sum_k C[c, k] (at most 1/2). The round(r_c n_c) instances of class c with the largest margin
   max_{k != c} p_ik - p_ic are the suspects (confident learning's "prune by noise rate").
3. :func:`trust_weights`: weight 0 on the suspects, the rest of each class equal (mean 1 per class).
   A class whose estimated rate is 0 keeps weights of exactly 1; the number of instances a class loses
   follows its own estimate, not a user's setting.

:func:`trusted_weights` runs the three steps in one call, with the defaults of the built-in ``auto``
(``CROSSFIT_DEFAULTS``, which ``IWDSpec`` reads): what a reference loop drops in instead of its uniform weights.

Everything is deterministic given ``seed``; the global RNG is never touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..scoring.checks import as_labels, format_indices

__all__ = ["NoiseEstimate", "crossfit_probabilities", "estimate_noise", "trust_weights", "trusted_weights",
           "stratified_folds", "CROSSFIT_DEFAULTS"]

# The cross-fit of weighting "auto": 2 folds, 600 SGD steps per fold network at lr 0.01 (batch 256, momentum
# 0.9). On the cpu pool (Fashion-MNIST, 10,000 images; benchmarks/results/detectors.jsonl) it estimates 0.07 on
# clean labels and 0.46 at 40% symmetric noise (recall 0.96); 50 steps over-estimate the clean rate by 0.10-0.14.
CROSSFIT_DEFAULTS = {"folds": 2, "steps": 600, "lr": 0.01}


@dataclass
class NoiseEstimate:
    """What :func:`estimate_noise` found.

    suspect: bool [n], the instances whose given label is judged wrong.
    rates: float64 [C], the estimated share of each class's instances whose label is wrong.
    thresholds: float64 [C], t_k (inf for a class without instances).
    confident_class: int64 [n], the class each instance is confidently of (-1: none).
    margin: float64 [n], max_{k != y_i} p_ik - p_iy (larger = more suspicious).
    runner_up: int64 [n], argmax_{k != y_i} p_ik (the label a relabelling would give).
    """

    suspect: torch.Tensor
    rates: torch.Tensor
    thresholds: torch.Tensor
    confident_class: torch.Tensor
    margin: torch.Tensor
    runner_up: torch.Tensor

    @property
    def noise_rate(self) -> float:
        """The estimated share of wrong labels over the whole set (suspects / n)."""
        return float(self.suspect.double().mean()) if self.suspect.numel() else 0.0

    def summary(self) -> Dict[str, object]:
        """JSON-ready: the overall and per-class estimated rates and the number of suspects."""
        return {"estimated_rate": self.noise_rate, "class_rates": [round(float(r), 4) for r in self.rates],
                "suspects": int(self.suspect.sum())}


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold index int64 [n] in [0, folds): each class is shuffled (seeded) and dealt round-robin."""
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    fold = torch.empty_like(labels)
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        fold[members] = torch.arange(members.numel()) % folds
    return fold


def _train(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int, lr: float,
           momentum: float, weight_decay: float, gen: torch.Generator) -> None:
    """``steps`` SGD steps on mini-batches of reshuffled epochs (lr x0.1 for the second half)."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n, bs = images.shape[0], min(batch_size, images.shape[0])
    net.train()
    step = 0
    while step < steps:
        perm = torch.randperm(n, generator=gen).to(images.device)
        for start in range(0, n - bs + 1, bs):
            if step == (steps + 1) // 2:
                for group in opt.param_groups:
                    group["lr"] = lr * 0.1
            idx = perm[start:start + bs]
            loss = F.cross_entropy(net(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break


@torch.no_grad()
def _predict(net: nn.Module, images: torch.Tensor, chunk: int) -> torch.Tensor:
    net.eval()
    return torch.cat([F.softmax(net(images[i:i + chunk]).double(), dim=1) for i in range(0, images.shape[0], chunk)])


def crossfit_probabilities(make_net: Callable[[int], nn.Module], images: torch.Tensor, labels: torch.Tensor,
                           num_classes: int, *, folds: int = CROSSFIT_DEFAULTS["folds"],
                           steps: int = CROSSFIT_DEFAULTS["steps"], batch_size: int = 256,
                           lr: float = CROSSFIT_DEFAULTS["lr"], momentum: float = 0.9, weight_decay: float = 5e-4,
                           seed: int = 0, chunk: int = 1024) -> torch.Tensor:
    """Out-of-sample class probabilities, float64 [n, C] on the CPU.

    Args:
        make_net: ``make_net(seed) -> nn.Module`` on the device of ``images``, a fresh network whose
            initialisation depends only on ``seed``.
        images: float [n, C_in, H, W]; labels: int64 [n] in [0, num_classes) (the given, possibly noisy, labels).
        folds: k >= 2; instance i is predicted by the network that trained on the other k - 1 folds.
        steps: SGD steps per fold network (batch ``batch_size``, lr x0.1 for the second half).
        seed: seeds the folds, the networks (``seed * 1000 + fold``) and their shuffling.
    """
    labels = as_labels(labels, "crossfit_probabilities", num_classes)
    if images.dim() < 2 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"crossfit_probabilities: images [n, ...] must match labels [{labels.shape[0]}], got "
                         f"{tuple(images.shape)}")
    if int(folds) < 2 or int(steps) < 1:
        raise ValueError(f"crossfit_probabilities: need folds >= 2 and steps >= 1, got {folds}, {steps}")
    counts = torch.bincount(labels, minlength=num_classes)
    thin = torch.nonzero((counts > 0) & (counts < folds)).flatten()
    if thin.numel():
        raise ValueError(f"crossfit_probabilities: classes {format_indices(thin.tolist())} have fewer instances "
                         f"than folds={folds}")
    fold = stratified_folds(labels, folds, seed)
    device_labels = labels.to(images.device)
    probs = torch.zeros(labels.shape[0], num_classes, dtype=torch.float64)
    for k in range(folds):
        train = torch.nonzero(fold != k).flatten().to(images.device)
        held = torch.nonzero(fold == k).flatten()
        net = make_net(int(seed) * 1000 + k)
        gen = torch.Generator().manual_seed(int(seed) * 1000 + folds + k)
        _train(net, images[train], device_labels[train], int(steps), batch_size, lr, momentum, weight_decay, gen)
        probs[held] = _predict(net, images[held.to(images.device)], chunk).cpu()
    return probs


def estimate_noise(probs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   max_rate: float = 0.5) -> NoiseEstimate:
    """Confident learning on out-of-sample probabilities ``probs`` float [n, C] for given ``labels`` [n].

    See the module docstring for the rule; a class whose confident joint row is empty gets rate 0. A rate
    is capped at ``max_rate``: where most of a class's labels look wrong the given label is no longer the
    class's majority and the networks, not the labels, are what failed (an untrained network, say).
    """
    if not 0.0 <= float(max_rate) < 1.0:
        raise ValueError(f"estimate_noise: max_rate must lie in [0, 1), got {max_rate}")
    labels = as_labels(labels, "estimate_noise", num_classes)
    p = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    n = labels.shape[0]
    if p.shape != (n, num_classes):
        raise ValueError(f"estimate_noise: probs must be [{n}, {num_classes}], got {tuple(p.shape)}")
    bad = torch.nonzero(~torch.isfinite(p).all(1) | (p < 0).any(1)).flatten()
    if bad.numel():
        raise ValueError(f"estimate_noise: probabilities non-finite or negative at indices {format_indices(bad.tolist())}")
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, p[torch.arange(n), labels])
    thresholds = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("inf")))
    above = p >= thresholds[None, :]
    masked = torch.where(above, p, torch.full_like(p, -1.0))
    confident_class = torch.where(above.any(1), masked.argmax(1), torch.full((n,), -1, dtype=torch.int64))
    own = p[torch.arange(n), labels]
    others = p.clone()
    others[torch.arange(n), labels] = -1.0
    best_other = others.max(1)
    margin = best_other.values - own if num_classes > 1 else torch.zeros(n, dtype=torch.float64)
    runner_up = best_other.indices if num_classes > 1 else labels.clone()
    rates = torch.zeros(num_classes, dtype=torch.float64)
    suspect = torch.zeros(n, dtype=torch.bool)
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        assigned = confident_class[members]
        row = int((assigned >= 0).sum())
        if row == 0:
            continue
        rates[c] = min(1.0 - int((assigned == c).sum()) / row, float(max_rate))
        m = int(round(float(rates[c]) * members.numel()))
        if m:
            order = torch.sort(margin[members], descending=True, stable=True).indices
            suspect[members[order[:m]]] = True
    return NoiseEstimate(suspect, rates, thresholds, confident_class, margin, runner_up)


def trust_weights(suspect: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Weights float32 [n]: 0 on ``suspect`` (bool [n]), equal on the rest of each class, mean 1 per class.

    A class without suspects keeps weights of exactly 1. Refuses a class whose every instance is a suspect
    (nothing would be left to distil from it), naming the classes.
    """
    labels = as_labels(labels, "trust_weights", num_classes)
    suspect = torch.as_tensor(suspect).detach().to("cpu")
    if suspect.dtype != torch.bool or suspect.shape != labels.shape:
        raise ValueError(f"trust_weights: suspect must be bool {tuple(labels.shape)}, got {suspect.dtype} "
                         f"{tuple(suspect.shape)}")
    counts = torch.bincount(labels, minlength=num_classes)
    trusted = torch.bincount(labels[~suspect], minlength=num_classes)
    emptied: List[int] = torch.nonzero((counts > 0) & (trusted == 0)).flatten().tolist()
    if emptied:
        raise ValueError(f"trust_weights: every instance of classes {format_indices(emptied)} is a suspect")
    per_class = counts.double() / trusted.double().clamp(min=1)
    return torch.where(suspect, torch.zeros(()), per_class[labels]).to(torch.float32)


def trusted_weights(make_net: Callable[[int], nn.Module], images: torch.Tensor, labels: torch.Tensor,
                    num_classes: int, *, seed: int = 0, folds: int = CROSSFIT_DEFAULTS["folds"],
                    steps: int = CROSSFIT_DEFAULTS["steps"],
                    lr: float = CROSSFIT_DEFAULTS["lr"]) -> Tuple[torch.Tensor, NoiseEstimate]:
    """The weights of weighting "auto" for any loop: cross-fit, confident learning, trust weights.

    Args:
        make_net: ``make_net(seed) -> nn.Module`` on the device of ``images``, a fresh network of the loop's
            architecture whose initialisation depends only on ``seed``.
        images: float [n, C_in, H, W] (the loop's real pool); labels: int64 [n] (the given labels).
        seed: seeds the folds, the networks and their shuffling (pass the loop's own seed).
    Returns:
        (weights float32 [n]: 0 on the suspects, equal on the rest of each class, mean 1 per class;
        exactly 1 in a class without suspects, the estimate: suspects, per-class rates, margins).
    """
    probs = crossfit_probabilities(make_net, images, labels, num_classes, folds=folds, steps=steps, lr=lr, seed=seed)
    labels = torch.as_tensor(labels).cpu()
    noise = estimate_noise(probs, labels, num_classes)
    return trust_weights(noise.suspect, labels, num_classes), noise
