"""Expert trajectories: networks trained on the real pool with a weighted cross entropy, one snapshot per
epoch into an :class:`~iwd_fast.distill.trajectory.buffer.ExpertBuffer`, resumable after a kill.

The loss of a class-mixed batch B is the weighted mean sum_{i in B} w_i CE_i / sum_{i in B} w_i
(``weighted_cross_entropy``); w = None is the plain mean, the unweighted MTT expert. Expert e starts from
weights seeded by (expert_seed, e) and draws its batch order and DSA transforms from its own streams, so
expert e of a weighted buffer and expert e of the unweighted buffer are paired.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional

import torch
from tqdm.auto import tqdm

from ...data.augment import dsa_augment
from ...evaluate import build_eval_network, test_accuracy
from ...networks import NetSpec
from ...runtime import Stream, mix_seed
from ...weighting.dropin import weighted_cross_entropy
from .buffer import ExpertBuffer, tensor_sha256
from .student import FlatNet

__all__ = ["ExpertStart", "expert_description", "train_expert", "ensure_experts"]


@dataclass
class ExpertStart:
    """Where the experts start instead of their fresh initialisation (PDD: a network trained on the earlier
    stages' images). ``apply(net, index)`` trains expert ``index``'s fresh network in place before its epoch 0
    is stored; ``description`` (JSON) enters the buffer key, so such experts never share a folder with others."""

    description: Dict[str, Any]
    apply: Callable[[torch.nn.Module, int], None]


def expert_description(images: torch.Tensor, labels: torch.Tensor, num_classes: int, flipped: torch.Tensor,
                       weights: Optional[torch.Tensor], spec, net: NetSpec, dsa_strategy: Optional[str],
                       layout, start: Optional[ExpertStart] = None) -> Dict[str, Any]:
    """What an expert buffer's key hashes: the pool (images [n, C, H, W] after any ZCA, labels [n] with
    their noise, flipped [n]), the weights [n] ("uniform" for None), the expert recipe, the layout and, for
    experts that do not start fresh, their start's description."""
    described = {
        "dataset": {"images_sha256": tensor_sha256(images.float()), "labels_sha256": tensor_sha256(labels.long()),
                    "flipped_sha256": tensor_sha256(flipped.bool()), "shape": list(images.shape),
                    "num_classes": int(num_classes)},
        "weights": "uniform" if weights is None else tensor_sha256(weights.float()),
        "expert": {"train_epochs": spec.train_epochs, "lr": spec.expert_lr, "momentum": spec.expert_momentum,
                   "weight_decay": spec.expert_weight_decay, "batch": spec.expert_batch,
                   "dsa": dsa_strategy if spec.expert_dsa else None, "seed": spec.expert_seed, "net": asdict(net),
                   "zca": {"eps": spec.zca_eps} if spec.zca else None},
        "layout": [[name, list(shape)] for name, shape in layout],
    }
    if start is not None:
        described["start"] = start.description
    return described


def _optimizer_state(opt: torch.optim.SGD, params) -> Dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[f"momentum_{i:03d}"] = buf
    return out


def train_expert(buffer: ExpertBuffer, index: int, make_net: Callable[[int], torch.nn.Module], images: torch.Tensor,
                 labels: torch.Tensor, weights: Optional[torch.Tensor], spec, dsa_strategy: Optional[str],
                 progress: bool = False, after_epoch: Optional[Callable[[int], None]] = None,
                 start: Optional[ExpertStart] = None) -> float:
    """Train expert ``index`` (or finish it from its last saved epoch) and store it; returns seconds spent.

    images [n, C, H, W] and labels int64 [n] on the training device; weights float [n] or None.
    ``make_net(seed)`` builds the network on that device; ``start.apply`` (if given) moves it to where the
    expert starts before epoch 0 is stored. ``after_epoch(epoch)`` runs after each saved epoch (tests use it
    to interrupt).
    """
    started = time.perf_counter()
    net = make_net(mix_seed(spec.expert_seed, Stream.EXPERT_NETWORK, index)).train()
    flat = FlatNet(net)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=spec.expert_lr, momentum=spec.expert_momentum,
                          weight_decay=spec.expert_weight_decay)
    shuffle_gen = torch.Generator().manual_seed(mix_seed(spec.expert_seed, Stream.EXPERT_TRAINING, index, 1))
    aug_gen = torch.Generator().manual_seed(mix_seed(spec.expert_seed, Stream.EXPERT_TRAINING, index, 2))
    use_dsa = bool(spec.expert_dsa and dsa_strategy)
    resume = buffer.resume_point(index)
    if resume is None:
        first = 1
        if start is not None:
            start.apply(net, index)
        buffer.save_epoch(index, 0, flat.flatten(), {"shuffle": shuffle_gen.get_state(), "augment": aug_gen.get_state()})
    else:
        first = resume["epoch"] + 1
        flat.load_into_net(resume["theta"])
        shuffle_gen.set_state(resume["state"]["shuffle"])
        aug_gen.set_state(resume["state"]["augment"])
        for i, p in enumerate(params):
            buf = resume["state"].get(f"momentum_{i:03d}")
            if buf is not None:
                opt.state[p]["momentum_buffer"] = buf.to(p.device, p.dtype).clone()
    n = images.shape[0]
    bs = min(spec.expert_batch, n)
    w_all = None if weights is None else weights.to(images.device, torch.float32)
    bar = tqdm(range(first, spec.train_epochs + 1), desc=f"expert {index}", leave=False, disable=not progress,
               initial=first - 1, total=spec.train_epochs)
    for epoch in bar:
        perm = torch.randperm(n, generator=shuffle_gen).to(images.device)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            x = images[idx]
            if use_dsa:
                x = dsa_augment(x, dsa_strategy, seed=int(torch.randint(0, 2 ** 31 - 1, (), generator=aug_gen)))
            w = None if w_all is None else w_all[idx]
            loss = weighted_cross_entropy(net(x), labels[idx], w, validate=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        state = {"shuffle": shuffle_gen.get_state(), "augment": aug_gen.get_state(), **_optimizer_state(opt, params)}
        buffer.save_epoch(index, epoch, flat.flatten(), state)
        if after_epoch is not None:
            after_epoch(epoch)
    buffer.finish(index, spec.train_epochs)
    return time.perf_counter() - started


def ensure_experts(buffer: ExpertBuffer, count: int, net_spec: NetSpec, channels: int, num_classes: int, im_size,
                   images: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor], spec,
                   dsa_strategy: Optional[str], device, test=None, progress: bool = True,
                   label: str = "experts", start: Optional[ExpertStart] = None) -> Dict[str, Any]:
    """Make experts 0..count-1 exist in ``buffer`` (training the missing ones, finishing partial ones; each
    from ``start`` when given, see :func:`train_expert`).

    ``test``: an ImageSet (or (images, labels)) to record each new expert's final test accuracy in
    experts.json. Returns {"trained": [indices], "seconds": training seconds this call, "available": n,
    "test_acc": {index: accuracy}}.
    """
    if count < 1:
        raise ValueError(f"tm.num_experts must be >= 1, got {count}")

    def make_net(seed: int) -> torch.nn.Module:
        return build_eval_network(net_spec, channels, num_classes, im_size, seed).to(device)

    record = buffer.load_json("experts.json") or {}
    done = set(buffer.finished())
    todo = [e for e in range(count) if e not in done]
    seconds = 0.0
    for e in tqdm(todo, desc=label, disable=not progress or not todo):
        spent = train_expert(buffer, e, make_net, images, labels, weights, spec, dsa_strategy, progress=progress,
                             start=start)
        seconds += spent
        entry: Dict[str, Any] = {"seconds": spent}
        if test is not None:
            net = make_net(0)
            FlatNet(net).load_into_net(buffer.snapshot(e, spec.train_epochs))
            entry["test_acc"] = test_accuracy(net, test, device=device)
        record[str(e)] = entry
        buffer.save_json("experts.json", record)
    accs = {k: v["test_acc"] for k, v in record.items() if "test_acc" in v and int(k) < count}
    return {"trained": todo, "seconds": seconds, "available": len(buffer.finished()), "test_acc": accs,
            "seconds_per_expert": {k: v["seconds"] for k, v in record.items() if int(k) < count}}
