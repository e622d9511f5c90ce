"""``iwd-fast score``: score every training instance of a dataset against a trained network.

Trains a ConvNet for a few epochs on the (optionally label-noised) training split minus a stratified
held-out split, or loads one, then scores every training instance with a target:
  validation  s_i = eta * <g_i, grad L_heldout>  (METHOD.md 2c: positive = helps the held-out loss)
  self        s_i = ||g_i||^2                    (METHOD.md 2e: small = more trusted)
and writes scores, weights (InfluenceWeighter file) and a summary.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from tqdm.auto import tqdm

from ..data import add_label_noise, load_dataset, stratified_split
from ..evaluate import EvalSpec, build_eval_network, test_accuracy, train_network
from ..networks import NetSpec
from ..runtime import resolve_device
from ..weighting.targets import instance_scores, validation_directions
from ..weighting import InfluenceWeighter, auroc, sign_for, weight_mass_on

__all__ = ["score_dataset"]


def score_dataset(dataset: str = "digits", target: str = "validation", *, noise: float = 0.0,
                  noise_kind: str = "symmetric", epochs: int = 20, seed: int = 0, out: Optional[str] = None,
                  model_path: Optional[str] = None, net: NetSpec = NetSpec(width=32), heldout_fraction: float = 0.1,
                  temperature: float = 1.0, batch: int = 256, impl: str = "auto", device: str = "auto",
                  data_root: Optional[str] = None, download: bool = False, progress: bool = True) -> Dict[str, Any]:
    """Score ``dataset``'s training instances; returns the summary (also written to ``out``/summary.json)."""
    if target not in ("validation", "self"):
        raise ValueError(f"score: target must be 'validation' or 'self' (explicit/implicit need a distillation "
                         f"loop: use `iwd-fast distill`), got {target!r}")
    dev = resolve_device(device)
    splits = load_dataset(dataset, root=data_root, download=download)
    train = splits.train
    labels, flipped = train.labels, torch.zeros(len(train), dtype=torch.bool)
    if noise > 0:
        labels, flipped = add_label_noise(train.labels, noise, noise_kind, train.num_classes, seed=seed)
    keep, held = stratified_split(labels, heldout_fraction, seed=seed)
    model = build_eval_network(net, train.channels, train.num_classes, train.im_size, seed).to(dev)
    started = time.perf_counter()
    if model_path:
        model.load_state_dict(torch.load(model_path, map_location=dev))
    else:
        spec = EvalSpec(num_nets=1, epochs=epochs, dsa=False)
        train_network(model, train.images[keep], labels[keep], spec, seed, None, dev, progress=progress)
    train_seconds = time.perf_counter() - started
    model.eval()
    direction = None
    if target == "validation":
        direction = validation_directions(model, train.images[held].to(dev), labels[held].to(dev), scale=0.01)
    scores = torch.empty(len(train), dtype=torch.float64)
    started = time.perf_counter()
    for start in tqdm(range(0, len(train), batch), desc=f"score ({target})", disable=not progress):
        x = train.images[start:start + batch].to(dev)
        y = labels[start:start + batch].to(dev)
        s = instance_scores(model, x, y, target, direction, chunk_size=None, impl=impl)
        scores[start:start + batch] = s.detach().double().cpu()
    score_seconds = time.perf_counter() - started
    weighter = InfluenceWeighter(labels, train.num_classes, temperature=temperature, ema=0.0, sign=sign_for(target))
    scored = keep  # held-out instances define the target; they are not weighted
    weighter.update(scored, scores[scored])
    summary: Dict[str, Any] = {
        "dataset": dataset, "target": target, "n_train": len(train), "n_scored": int(scored.numel()),
        "n_heldout": int(held.numel()), "noise": noise, "seed": seed,
        "test_accuracy": test_accuracy(model, splits.test, device=dev),
        "train_seconds": train_seconds, "score_seconds": score_seconds,
        "scores_per_second": len(train) / max(score_seconds, 1e-9),
    }
    if flipped[keep].any():
        summary["noise_share"] = float(flipped[keep].double().mean())
        summary["weight_on_flipped"] = weight_mass_on(weighter.weights()[keep], flipped[keep])
        summary["auroc_flipped"] = auroc(-sign_for(target) * scores[keep], flipped[keep])
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"scores": scores, "labels": labels, "flipped": flipped, "heldout": held}, folder / "scores.pt")
        weighter.save(str(folder / "weights.safetensors"))
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["out"] = str(folder)
    return summary

