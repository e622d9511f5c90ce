"""Evaluate a synthetic set the way the field does: train fresh networks on it, test on real data.

METHOD.md section 5: for each of ``num_nets`` networks (seed ``seed * 1000 + j``), SGD with lr 0.01,
momentum 0.9, weight decay 5e-4, lr x0.1 at half the epochs, batch 256, 1000 epochs with DSA augmentation
or 300 without; the score is the test accuracy after the FINAL epoch (not the best epoch), reported as
mean and population std (ddof=0) over the networks. Every random number (initialisation, shuffling, DSA
draws) comes from seeds derived from the run seed; nothing is seeded from the clock.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data import ImageSet
from .data.augment import default_strategy, dsa_augment
from .networks import NetSpec, build_network, is_factory
from .runtime import TrainingStream, mix_seed, resolve_device

__all__ = ["EvalSpec", "evaluate_synthetic", "evaluate_stages", "train_network", "train_stages", "test_accuracy",
           "build_eval_network", "describe_protocol", "FIELD_NET"]


@dataclass
class EvalSpec:
    """Evaluation protocol (METHOD.md section 5): train ``num_nets`` fresh networks on the synthetic set."""

    num_nets: int = 5
    epochs: int = 300           # 1000 with DSA augmentation in the field's protocol
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True            # augment synthetic images while training the evaluation networks
    net: Optional[NetSpec] = None  # None: the distillation network


FIELD_NET = NetSpec(name="convnet", width=128, depth=3, norm="instancenorm")
_FIELD_EPOCHS = {True: 1000, False: 300}  # with / without DSA


def build_eval_network(net_spec: NetSpec, channels: int, num_classes: int, im_size: Tuple[int, int],
                       seed: int) -> nn.Module:
    """A fresh network from ``net_spec`` whose initial weights depend only on ``seed``.

    The global RNG is forked and restored, so building a network does not disturb the caller's stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build_network(net_spec.name, channels, num_classes, im_size, width=net_spec.width,
                             depth=net_spec.depth, norm=net_spec.norm)


def _check_set(images: torch.Tensor, labels: torch.Tensor, who: str, soft_ok: bool = False) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.dtype.is_floating_point:
        raise ValueError(f"{who}: images must be a float tensor [M, C, H, W], got "
                         f"{tuple(getattr(images, 'shape', ()))} {getattr(images, 'dtype', type(images))}")
    if soft_ok and isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.dtype.is_floating_point:
        if labels.shape[0] != images.shape[0] or images.shape[0] == 0:
            raise ValueError(f"{who}: soft labels must be [{images.shape[0]}, num_classes], got {tuple(labels.shape)}")
        rows = labels.detach().double().sum(1)
        if not bool(torch.isfinite(labels).all()) or bool((labels < 0).any()) or bool(((rows - 1).abs() > 1e-4).any()):
            raise ValueError(f"{who}: soft labels must be finite probabilities (non-negative rows summing to 1)")
        return
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{who}: labels must be an integer tensor [{images.shape[0]}], got "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{who}: labels must be integer class indices, got {labels.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{who}: the image set is empty")


def train_network(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: EvalSpec, seed: int,
                  dsa_strategy: Optional[str], device=None, epochs: Optional[int] = None,
                  steps: Optional[int] = None, progress: bool = False) -> Dict[str, float]:
    """Train ``net`` in place with the evaluation recipe of ``spec``; returns final-epoch statistics.

    images [M, C, H, W] float, labels [M] int64. SGD(spec.lr, spec.momentum, spec.weight_decay), batch
    spec.batch_size, reshuffled every epoch, the last partial batch kept; lr x0.1 from epoch ceil(E/2)
    on (E = ``epochs`` or spec.epochs). ``steps``: stop after that many SGD steps instead (lr x0.1 from
    step ceil(steps/2)): the short warm-up of a scoring network on real data. DSA
    (``dsa_augment(x, dsa_strategy, seed=...)``, one draw per batch) runs when ``spec.dsa`` and
    ``dsa_strategy`` are set. Shuffling and DSA seeds derive from ``seed`` alone.
    Soft labels: ``labels`` float [M, num_classes] of probabilities trains on the soft cross entropy
    -sum_c p_c log softmax(f(x))_c (DATM's evaluation); train_acc then compares with argmax p.
    Returns {"loss": mean training loss of the last epoch, "train_acc": its accuracy, "steps": n}.
    """
    _check_set(images, labels, "train_network", soft_ok=True)
    soft = labels.dim() == 2
    if steps is None:
        epochs = spec.epochs if epochs is None else int(epochs)
        if epochs < 1:
            raise ValueError(f"train_network: epochs must be >= 1, got {epochs}")
    elif steps < 1:
        raise ValueError(f"train_network: steps must be >= 1, got {steps}")
    if spec.batch_size < 1 or spec.lr <= 0:
        raise ValueError(f"train_network: need batch_size >= 1 and lr > 0, got {spec.batch_size}, {spec.lr}")
    device = resolve_device(device)
    use_dsa = bool(spec.dsa and dsa_strategy and dsa_strategy.lower() != "none")
    x_all = images.detach().to(device, torch.float32)
    y_all = labels.detach().to(device, torch.float32 if soft else torch.long)
    m, bs = x_all.shape[0], min(spec.batch_size, x_all.shape[0])
    per_epoch = -(-m // bs)
    if steps is None:
        total, decay_at = epochs * per_epoch, ((epochs + 1) // 2) * per_epoch
    else:
        total, decay_at = int(steps), (int(steps) + 1) // 2
    shuffle_gen = torch.Generator().manual_seed(mix_seed(seed, TrainingStream.SHUFFLE))
    dsa_gen = torch.Generator().manual_seed(mix_seed(seed, TrainingStream.AUGMENT))
    net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=spec.lr, momentum=spec.momentum,
                          weight_decay=spec.weight_decay)
    step, loss_sum, correct, seen = 0, 0.0, 0, 0
    bar = tqdm(total=total, desc="train net (steps)", leave=False, disable=not progress)
    while step < total:
        perm = torch.randperm(m, generator=shuffle_gen).to(device)
        loss_sum, correct, seen = 0.0, 0, 0
        for start in range(0, m, bs):
            if step >= total:
                break
            if step == decay_at:
                for group in opt.param_groups:
                    group["lr"] = spec.lr * 0.1
            idx = perm[start:start + bs]
            x, y = x_all[idx], y_all[idx]
            if use_dsa:
                x = dsa_augment(x, dsa_strategy, seed=int(torch.randint(0, 2 ** 31 - 1, (), generator=dsa_gen)))
            logits = net(x)
            loss = -(y * F.log_softmax(logits, dim=1)).sum(1).mean() if soft else F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * y.shape[0]
            correct += int((logits.detach().argmax(1) == (y.argmax(1) if soft else y)).sum())
            seen += y.shape[0]
            step += 1
            bar.update(1)
    bar.close()
    return {"loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), "steps": step}


@torch.no_grad()
def test_accuracy(net: nn.Module, test: Union[ImageSet, Tuple[torch.Tensor, torch.Tensor]], batch: int = 1024,
                  device=None) -> float:
    """Top-1 accuracy in [0, 1] of ``net`` on ``test`` (an ImageSet or (images [N, C, H, W], labels [N])).

    Runs in eval mode under no_grad, in batches of ``batch``; the module's train/eval mode is restored.
    """
    x_all, y_all = (test.images, test.labels) if isinstance(test, ImageSet) else test
    _check_set(x_all, y_all, "test_accuracy")
    if batch < 1:
        raise ValueError(f"test_accuracy: batch must be >= 1, got {batch}")
    device = resolve_device(device)
    was_training = net.training
    net.to(device).eval()
    correct = 0
    try:
        for start in range(0, x_all.shape[0], batch):
            x = x_all[start:start + batch].to(device, torch.float32)
            y = y_all[start:start + batch].to(device)
            correct += int((net(x).argmax(1) == y).sum())
    finally:
        net.train(was_training)
    return correct / x_all.shape[0]


test_accuracy.__test__ = False  # a library function, not a pytest test


def describe_protocol(spec: EvalSpec, net_spec: NetSpec, dsa_used: bool) -> str:
    """One line naming the evaluation variant: "field (...)" when it is the field's protocol, else
    "reduced budget (not the field's protocol): ..." listing every deviation."""
    aug = "DSA" if dsa_used else "no DSA"
    field_epochs = _FIELD_EPOCHS[dsa_used]
    deviations = []
    if spec.epochs != field_epochs:
        deviations.append(f"{spec.epochs} epochs (field: {field_epochs} with {aug})")
    if spec.num_nets < 5:
        deviations.append(f"{spec.num_nets} net{'s' if spec.num_nets != 1 else ''} (field: >= 5)")
    if is_factory(net_spec.name):
        deviations.append(f"network {net_spec.name}")
    elif (net_spec.name, net_spec.width, net_spec.depth, net_spec.norm) != \
            (FIELD_NET.name, FIELD_NET.width, FIELD_NET.depth, FIELD_NET.norm):
        deviations.append(f"{net_spec.name}-{net_spec.depth} width {net_spec.width} {net_spec.norm}")
    if (spec.lr, spec.momentum, spec.weight_decay, spec.batch_size) != (0.01, 0.9, 5e-4, 256):
        deviations.append(f"SGD lr {spec.lr} momentum {spec.momentum} wd {spec.weight_decay} "
                          f"batch {spec.batch_size}")
    if not deviations:
        return f"field ({spec.epochs} epochs, {aug}, {spec.num_nets} nets, ConvNet-3 width 128)"
    small = spec.epochs < field_epochs or spec.num_nets < 5 or \
        (not is_factory(net_spec.name) and net_spec.width < FIELD_NET.width)
    head = "reduced budget" if small else "non-standard"
    return f"{head} (not the field's protocol): {aug}; " + "; ".join(deviations)


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, test: ImageSet, spec: EvalSpec,
                       net_spec: NetSpec, *, seed: int, dsa_strategy: Optional[str], device=None,
                       progress: bool = True) -> Dict[str, Any]:
    """Train ``spec.num_nets`` fresh networks on the synthetic set and test each after its final epoch.

    images [M, C, H, W] float (normalised like ``test``), labels [M] int64 in [0, test.num_classes), or soft
    labels float [M, test.num_classes] of probabilities (see :func:`train_network`).
    Network j uses ``spec.net`` (or ``net_spec`` when that is None) initialised with seed
    ``seed * 1000 + j``, and the same value seeds its shuffling and DSA draws. ``dsa_strategy``: a DSA
    strategy string, "auto" (``default_strategy(test.name)``) or None; augmentation runs only when
    ``spec.dsa`` is also true.
    Returns {"mean", "std" (population std, ddof=0, over nets), "std_kind", "accs", "seeds", "seconds",
    "protocol": {spec fields, "net", "dsa", "dsa_strategy", "variant", ...}}; accuracies in [0, 1].
    """
    out = _evaluate_sets([(images, labels)], test, [spec], net_spec, seed, dsa_strategy, device, progress,
                         "evaluate_synthetic")
    out.pop("stages")
    return out


def evaluate_stages(stage_sets: Sequence[Tuple[torch.Tensor, torch.Tensor]], test: ImageSet,
                    spec: Union[EvalSpec, Sequence[EvalSpec]], net_spec: NetSpec, *, seed: int,
                    dsa_strategy: Optional[str], device=None, progress: bool = True) -> Dict[str, Any]:
    """PDD's evaluation: each network trains on the stage sets in order and is tested after each.

    ``stage_sets``: P pairs (images [M_k, C, H, W], labels [M_k]), stage k's set being the union of stages
    1..k. ``spec``: one EvalSpec, or one per stage (they may differ in the optimiser's recipe, e.g. each
    stage's learned learning rate; ``num_nets`` and ``net`` come from the first). Network j is initialised
    as in :func:`evaluate_synthetic` and trained by :func:`train_stages`, so one stage gives exactly
    ``evaluate_synthetic``'s networks and accuracy. Returns ``evaluate_synthetic``'s dict for the last stage
    (the cumulative accuracy of the whole set) plus "stages": per stage {"mean", "std", "accs"}.
    """
    specs = [spec] * len(stage_sets) if isinstance(spec, EvalSpec) else list(spec)
    if not stage_sets or len(specs) != len(stage_sets):
        raise ValueError(f"evaluate_stages: need one or more stage sets and one spec per stage, got "
                         f"{len(stage_sets)} sets and {len(specs)} specs")
    return _evaluate_sets(stage_sets, test, specs, net_spec, seed, dsa_strategy, device, progress, "evaluate_stages")


def train_stages(net: nn.Module, stage_sets: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                 specs: Sequence[EvalSpec], seed: int, dsa_strategy: Optional[str], device=None,
                 epochs: Optional[int] = None, after_stage=None) -> None:
    """Train ``net`` in place on each stage set in turn, a fresh optimiser and schedule per stage
    (:func:`train_network` with ``specs[k]``; ``epochs`` overrides every spec's). Stage 0 trains with
    ``seed`` itself, stage k >= 1 with ``mix_seed(seed, k)``. ``after_stage(k)`` runs after each stage."""
    for k, ((x, y), spec) in enumerate(zip(stage_sets, specs)):
        train_network(net, x, y, spec, int(seed) if k == 0 else mix_seed(seed, k), dsa_strategy, device, epochs=epochs)
        if after_stage is not None:
            after_stage(k)


def _evaluate_sets(stage_sets, test: ImageSet, specs: List[EvalSpec], net_spec: NetSpec, seed: int,
                   dsa_strategy: Optional[str], device, progress: bool, who: str) -> Dict[str, Any]:
    if not isinstance(test, ImageSet):
        raise ValueError(f"{who}: test must be an ImageSet, got {type(test).__name__}")
    checked = []
    for images, labels in stage_sets:
        _check_set(images, labels, who, soft_ok=True)
        soft = labels.dim() == 2
        if tuple(images.shape[1:]) != (test.channels, *test.im_size):
            raise ValueError(f"{who}: synthetic images {tuple(images.shape[1:])} do not match the "
                             f"test images {(test.channels, *test.im_size)}")
        lo, hi = (0, labels.shape[1] - 1) if soft else (int(labels.min()), int(labels.max()))
        if lo < 0 or hi >= test.num_classes or (soft and labels.shape[1] != test.num_classes):
            raise ValueError(f"{who}: labels must lie in [0, {test.num_classes}), got [{lo}, {hi}]")
        checked.append((images.detach().float().cpu(), labels.detach().cpu().float() if soft else
                        labels.detach().cpu().long()))
    spec = specs[0]
    if spec.num_nets < 1 or any(s.epochs < 1 for s in specs):
        raise ValueError(f"{who}: need num_nets >= 1 and epochs >= 1, got {spec.num_nets}, "
                         f"{[s.epochs for s in specs]}")
    if dsa_strategy is not None and dsa_strategy.lower() == "auto":
        dsa_strategy = default_strategy(test.name)
    net_spec = spec.net if spec.net is not None else net_spec
    dsa_used = bool(spec.dsa and dsa_strategy and dsa_strategy.lower() != "none")
    accs: List[List[float]] = [[] for _ in checked]
    seeds, started = [], time.perf_counter()
    for j in tqdm(range(spec.num_nets), desc="evaluate", disable=not progress):
        net_seed = int(seed) * 1000 + j
        net = build_eval_network(net_spec, test.channels, test.num_classes, test.im_size, net_seed)
        train_stages(net, checked, specs, net_seed, dsa_strategy if dsa_used else None, device,
                     after_stage=lambda k: accs[k].append(test_accuracy(net, test, device=device)))
        seeds.append(net_seed)
    stages = [{"mean": float(np.mean(a)), "std": float(np.std(a, ddof=0)), "accs": [float(v) for v in a]}
              for a in accs]
    protocol = {k: v for k, v in dataclasses.asdict(spec).items() if k != "net"}
    protocol.update(net=dataclasses.asdict(net_spec), dsa=dsa_used, dsa_strategy=dsa_strategy if dsa_used else None,
                    lr_schedule="x0.1 from epoch ceil(epochs/2)", reported="final epoch",
                    variant=describe_protocol(spec, net_spec, dsa_used))
    if len(checked) > 1:
        protocol.update(stages=len(checked), stage_lrs=[s.lr for s in specs],
                        variant=protocol["variant"] + f"; trained through {len(checked)} stages ({spec.epochs} epochs "
                                                      f"each, a fresh optimiser per stage)")
    return {"mean": stages[-1]["mean"], "std": stages[-1]["std"], "std_kind": "population (ddof=0)",
            "accs": stages[-1]["accs"], "seeds": seeds, "seconds": time.perf_counter() - started,
            "protocol": protocol, "stages": stages}
