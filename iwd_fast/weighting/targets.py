"""Influence targets: the direction v whose dot with each real instance's gradient is its score.

METHOD.md section 2, every target as <g_i, v> (or ||g_i||^2):

* "explicit"   (2a) v_c = dD/d(target_c): gradient of the class matching loss w.r.t. the real statistic.
* "implicit"   (2b) d_c = v_c - 2 alpha J_v(u): the explicit direction corrected by a one-step look-ahead
               of the synthetic set (S' = S - alpha * u, u = grad_S L); one Jacobian-vector product per
               class, by central finite difference (``jvp_fd``) or exactly by double backward (``jvp_exact``).
* "validation" (2c) v = eta * grad_theta L_V: first-order benefit of an instance for a held-out loss.
* "self"       (2e) ||g_i||^2: per-sample gradient norm (small = more trusted).
* "prototype"  DM's own signal (METHOD.md 2f): <f^_i, mu_{y_i} - mu_{k*}>, the margin by which an instance's
               normalised embedding at DM's random network agrees with its labelled class's mean over the
               iteration's real batches rather than the nearest other class's; no backward, nearly free.

Raw scores returned here are those the weighter expects (see ``iwd_fast.weighting.sign_for``):
influence on the distillation loss for explicit/implicit, benefit for validation, norm for self.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..scoring import grad_dot, grad_norm_sq

__all__ = ["TARGETS", "DISTILL_TARGETS", "check_target", "jvp_fd", "jvp_exact", "implicit_direction", "exact_influence",
           "validation_gradient", "validation_directions", "instance_scores", "matching_direction", "embedding_influence",
           "prototype_margin"]

TARGETS = ("explicit", "implicit", "validation", "self", "prototype")
DISTILL_TARGETS = ("explicit", "implicit")

VectorFn = Callable[[torch.Tensor, bool], Sequence[torch.Tensor]]  # (S, create_graph) -> direction


def check_target(name: str) -> str:
    if name not in TARGETS:
        raise ValueError(f"unknown influence target {name!r}; choose from {TARGETS}")
    return name


def matching_direction(distance: Callable[[Sequence[torch.Tensor]], torch.Tensor],
                       real_stat: Sequence[torch.Tensor], create_graph: bool = False) -> tuple:
    """(distance value, v = d distance / d real_stat) with ``real_stat`` treated as a leaf.

    ``distance(stat)`` maps the real-side statistic (list of tensors) to the scalar matching loss; the
    returned distance keeps its graph to the synthetic set.
    """
    leaves = [t.detach().requires_grad_(True) for t in real_stat]
    dist = distance(leaves)
    v = torch.autograd.grad(dist, leaves, retain_graph=True, create_graph=create_graph, allow_unused=True)
    return dist, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, v)]


def jvp_fd(v_fn: VectorFn, s: torch.Tensor, u: torch.Tensor, rel_step: float = 1e-4) -> List[torch.Tensor]:
    """J_v(u) ~ (v(S + h u) - v(S - h u)) / 2h, h = rel_step * ||S|| / ||u|| (central difference).

    A ReLU network's v is piecewise smooth: a step that moves a pre-activation across 0 makes the
    difference wrong by orders of magnitude (measured: 20x off at rel_step 1e-3, 4e-8 at 1e-4 on a
    float64 ConvNet). :func:`jvp_exact` has no such failure; the loops use it."""
    un = u.norm()
    if un == 0:
        return [torch.zeros_like(t) for t in v_fn(s, False)]
    h = rel_step * max(s.norm().item(), 1.0) / un.item()
    plus = v_fn((s + h * u).detach(), False)
    minus = v_fn((s - h * u).detach(), False)
    return [(p - m) / (2 * h) for p, m in zip(plus, minus)]


def jvp_exact(v_fn: VectorFn, s: torch.Tensor, u: torch.Tensor) -> List[torch.Tensor]:
    """J_v(u) exactly by the double-backward trick: J u = d/dr <J^T r, u> (``v_fn`` must keep its graph)."""
    s = s.detach().requires_grad_(True)
    v = v_fn(s, True)
    live = [i for i, t in enumerate(v) if t.requires_grad]  # entries that do not depend on S have J u = 0
    out = [torch.zeros_like(t).detach() for t in v]
    if not live:
        return out
    rs = [torch.zeros_like(v[i], requires_grad=True) for i in live]
    jt_r = torch.autograd.grad([v[i] for i in live], s, grad_outputs=rs, create_graph=True)[0]
    ju = torch.autograd.grad(jt_r, rs, grad_outputs=u, allow_unused=True)
    for i, g in zip(live, ju):
        if g is not None:
            out[i] = g.detach()
    return out


def implicit_direction(v: Sequence[torch.Tensor], v_fn: VectorFn, s: torch.Tensor, u: torch.Tensor,
                       alpha: float, exact: bool = True) -> List[torch.Tensor]:
    """d = v(S) - 2 alpha J_v(u) (METHOD.md 2b): the direction whose dot with phi(x_i) gives, to first order
    in alpha, d L(S'(w), w) / d w_i after one look-ahead step S' = S - alpha u, u = grad_S L(S, w). One -alpha
    J_v(u) is the look-ahead itself, the other comes from evaluating v at S' instead of S."""
    ju = jvp_exact(v_fn, s, u) if exact else jvp_fd(v_fn, s, u)
    return [a - 2.0 * alpha * b for a, b in zip(v, ju)]


def exact_influence(dots: torch.Tensor, direction: Sequence[torch.Tensor], real_statistic: Sequence[torch.Tensor],
                    weight_sum: float) -> torch.Tensor:
    """I_i = dL/dw_i from the per-instance dots s_i = <d, phi(x_i)> of one real batch (METHOD.md 2a).

    With the real statistic r = sum_j wn_j phi(x_j) (wn = w / sum w): I_i = (s_i - <d, r>) / sum_j w_j.
    Without the batch's offset <d, r> and scale 1 / sum w, scores of different batches and networks are
    not on one scale.

    Args:
        dots: [B] (or [B, K]) unweighted per-instance dots with ``direction``.
        direction: the direction d, tensors aligned with ``real_statistic`` (None entries count as 0).
        real_statistic: r, e.g. the weighted mean real gradient of gradient matching.
        weight_sum: sum of the batch's (unnormalised) weights; B for uniform weights.
    """
    offset = sum(float((d.double() * r.double()).sum()) for d, r in zip(direction, real_statistic) if d is not None)
    return (dots.double() - offset) / float(weight_sum)


def embedding_influence(real_embeddings: torch.Tensor, synthetic_embeddings: torch.Tensor,
                        weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DM's exact explicit influence I_i = dD/dw_i for D = ||sum_i wn_i f_i - mean(f_syn)||^2 (METHOD.md 2a).

    The per-instance work is an embedding dot: I_i = <2 (mu_w - mu_syn), f_i - mu_w> / sum_j w_j. No
    backward through the network (DM's reference loop freezes its parameters), nearly free.

    Args:
        real_embeddings: [B, F] embeddings of one class's real batch.
        synthetic_embeddings: [M, F] embeddings of that class's synthetic images.
        weights: [B] the batch's weights (any positive scale), None for uniform.
    Returns:
        float64 [B].
    """
    f = real_embeddings.detach().double()
    w = torch.ones(f.shape[0], dtype=f.dtype, device=f.device) if weights is None else \
        weights.detach().to(f.device, f.dtype)
    mu = (w[:, None] * f).sum(0) / w.sum()
    v = 2.0 * (mu - synthetic_embeddings.detach().double().mean(0))
    return ((f - mu) @ v) / w.sum()


def prototype_margin(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The "prototype" score: how much more an instance's embedding agrees with its own class than with any other.

    With f^_i = f_i / ||f_i|| and mu_c the mean of f^_j over the instances labelled c (the class prototypes, from
    these embeddings themselves): s_i = <f^_i, mu_{y_i}> - max_{k != y_i} <f^_i, mu_k>. A mislabelled image sits
    near its true class's prototype, so its margin is negative (measured on DM's random ConvNets, Fashion-MNIST
    with 40% symmetric noise: AUROC 0.94 from one network, benchmarks/RESULTS.md).

    Args:
        embeddings: [B, F] real embeddings of one iteration (every class's batch together).
        labels: int64 [B] in [0, num_classes); every class present at least once.
    Returns:
        float64 [B]; larger = more trusted.
    """
    f = F.normalize(embeddings.detach().double(), dim=1)
    labels = labels.to(f.device)
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"prototype_margin: classes {missing} have no embeddings in the batch")
    means = torch.zeros(num_classes, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, labels, f)
    sim = f @ (means / counts[:, None].to(f.dtype)).T
    rows = torch.arange(f.shape[0], device=f.device)
    own = sim[rows, labels]
    sim[rows, labels] = -torch.inf
    return (own - sim.max(dim=1).values).cpu() if num_classes > 1 else torch.zeros_like(own).cpu()


def validation_gradient(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        params: Sequence[torch.Tensor], scale: float = 1.0,
                        batch: int = 512, keep: float = 1.0) -> List[torch.Tensor]:
    """scale * grad_theta of the mean held-out cross entropy: one ordinary backward of the summed
    per-sample losses (never a product of summed activations and summed output gradients).

    ``keep`` < 1 keeps only that share of the held-out instances with the lowest loss at ``net``: a held-out
    split drawn from noisy labels holds mislabelled instances, and once the network fits the clean
    majority their gradient dominates the held-out gradient unless they are left out (benchmarks/RESULTS.md).
    """
    n = images.shape[0]
    if n == 0:
        raise ValueError("the held-out split is empty: raise heldout_fraction")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"validation_gradient: keep must lie in (0, 1], got {keep}")
    if keep < 1.0:
        with torch.no_grad():
            losses = torch.cat([F.cross_entropy(net(images[i:i + batch]), labels[i:i + batch], reduction="none")
                                for i in range(0, n, batch)])
        chosen = torch.argsort(losses, stable=True)[:max(1, int(round(keep * n)))]
        images, labels, n = images[chosen], labels[chosen], int(chosen.numel())
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, n, batch):
        loss = F.cross_entropy(net(images[start:start + batch]), labels[start:start + batch], reduction="sum")
        for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc.add_(g)
    return [scale * t / n for t in total]


def validation_directions(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          scale: float = 1.0, keep: float = 1.0) -> Dict[str, torch.Tensor]:
    """{parameter name: scale * grad of the mean held-out loss}: the validation target's direction
    (``keep``: see :func:`validation_gradient`)."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    grads = validation_gradient(net, images, labels, [p for _, p in named], scale=scale, keep=keep)
    return {n: g for (n, _), g in zip(named, grads)}


def instance_scores(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, target: str,
                    direction: Optional[Dict[str, torch.Tensor]] = None, chunk_size: Optional[int] = 512,
                    impl: str = "auto") -> torch.Tensor:
    """Raw scores [n] of instances at one network: "validation" <g_i, direction> (from
    :func:`validation_directions`), "self" ||g_i||^2. The network's mode is used as is."""
    if target == "validation":
        if direction is None:
            raise ValueError("instance_scores: target 'validation' needs the direction (validation_directions)")
        return grad_dot(net, images, labels, direction, chunk_size=chunk_size, impl=impl)
    if target == "self":
        return grad_norm_sq(net, images, labels, chunk_size=chunk_size, impl=impl)
    raise ValueError(f"instance_scores: target must be 'validation' or 'self' (explicit and implicit need a "
                     f"synthetic set: they are scored inside a distillation loop), got {target!r}")


def scores_from_capture(cap, target: str, names: Sequence[str], direction: Optional[Sequence[torch.Tensor]],
                        impl: str = "auto") -> torch.Tensor:
    """Raw per-sample dots [B] of a batch captured through ``Capture.weighted_gradient``: ||g_i||^2 for
    "self", else <g_i, direction> (``direction`` aligned with ``names``; a capture built with the direction
    streamed its dots: pass ``direction=None``)."""
    if target == "self":
        return cap.grad_norm_sq(impl=impl)
    if direction is None:
        return cap.grad_dot()
    dirs = {n: d for n, d in zip(names, direction) if d is not None and bool(d.abs().sum() > 0)}
    if not dirs:
        return torch.zeros(cap.calls[0].record.x.shape[0], device=cap.calls[0].record.x.device)
    return cap.grad_dot(dirs, impl=impl)
