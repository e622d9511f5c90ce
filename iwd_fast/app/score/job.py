"""``iwd-fast score``: score every training instance of a dataset against a network.

The network is a built-in one trained here for ``epochs`` on the (optionally label-noised) training set
minus a stratified held-out split, or any ``nn.Module`` from ``package.module:factory``, loaded from
``checkpoint`` when given. Targets (METHOD.md 2c, 2e):
  validation  s_i = scale * <g_i, grad of the held-out (or given validation set's) mean loss>
  self        s_i = ||g_i||^2
  direction   s_i = <g_i, v_k> for the directions in a ``.pt`` file
Scoring runs in ``iwd_fast.scoring.dataset.score_dataset`` (streamed, chunked, resumable, sharded
under torchrun). Run folder: config.json, model.pt, manifest.json + chunks/ + scores.pt (the engine's),
instances.safetensors (labels, flipped, heldout, weights; weight 0 for non-finite instances),
weights.safetensors (the InfluenceWeighter), summary.json. Every check runs before training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ...data import add_label_noise, stratified_split
from ...evaluate import EvalSpec, test_accuracy, train_network
from ...runtime import resolve_device
from ...scoring import dispatch
from ...scoring.checks import format_indices
from ...scoring.dataset import Shard, init_from_env, score_dataset
from ...weighting import InfluenceWeighter, auroc, sign_for, weight_mass_on
from ..run_folder import RunFolder
from .inputs import ScoreData, build_model, load_checkpoint, load_score_data

__all__ = ["ScoreConfig", "run_score"]

_CONFIG_KIND = "iwd_fast.score/1"


@dataclass
class ScoreConfig:
    """Every option of ``iwd-fast score`` that shapes its result (config.json of the run folder)."""

    dataset: str = "digits"
    target: str = "validation"
    direction: Optional[str] = None        # a .pt file of directions (target "direction")
    validation_data: Optional[str] = None  # a validation set instead of the held-out split
    heldout: float = 0.1
    model: str = "convnet"
    checkpoint: Optional[str] = None
    width: int = 32
    epochs: int = 20
    seed: int = 0
    noise: float = 0.0
    noise_kind: str = "symmetric"
    scale: float = 0.01
    temperature: float = 1.0
    impl: str = "auto"
    device: str = "auto"
    batch: int = 256
    chunk_batches: int = 16
    nonfinite: str = "error"
    normalize: str = "auto"
    image_size: Optional[Tuple[int, int]] = None


def _file_sha256(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _record(cfg: ScoreConfig) -> Dict[str, Any]:
    rec = dataclasses.asdict(cfg)
    rec["image_size"] = list(cfg.image_size) if cfg.image_size else None
    rec.update(kind=_CONFIG_KIND, checkpoint_sha256=_file_sha256(cfg.checkpoint),
               direction_sha256=_file_sha256(cfg.direction))
    return rec


def _resolve_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as err:  # the option's name in front
        raise ValueError(f"--{err}") from None


def _check_options(cfg: ScoreConfig, device: torch.device) -> None:
    if cfg.target not in ("validation", "self", "direction"):
        raise ValueError(f"--target must be validation, self or direction, got {cfg.target!r}")
    if (cfg.target == "direction") != (cfg.direction is not None):
        raise ValueError("--direction FILE goes with --target direction (and only with it)")
    for option, path in (("--direction", cfg.direction), ("--checkpoint", cfg.checkpoint)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{option} {path} does not exist")
    if cfg.validation_data is not None and cfg.target != "validation":
        raise ValueError("--validation-data goes with --target validation")
    if not 0.0 <= cfg.noise < 1.0:
        raise ValueError(f"--noise is a rate in [0, 1), got {cfg.noise}")
    if not 0.0 < cfg.heldout < 1.0:
        raise ValueError(f"--heldout is a fraction in (0, 1), got {cfg.heldout}")
    if not (cfg.temperature > 0):  # also refuses nan; inf gives uniform weights
        raise ValueError(f"--temperature must be > 0 (inf allowed), got {cfg.temperature}")
    if not (0 < cfg.scale < math.inf):
        raise ValueError(f"--scale must be a finite number > 0, got {cfg.scale}")
    if cfg.width < 1:
        raise ValueError(f"--width must be >= 1, got {cfg.width}")
    if cfg.epochs < 0 or cfg.batch < 1 or cfg.chunk_batches < 1:
        raise ValueError(f"--epochs >= 0, --batch >= 1 and --chunk-batches >= 1, got {cfg.epochs}, {cfg.batch}, "
                         f"{cfg.chunk_batches}")
    if cfg.impl not in dispatch.IMPLS:
        raise ValueError(f"--impl must be one of {', '.join(dispatch.IMPLS)}, got {cfg.impl!r}")
    reason = dispatch.why_not(cfg.impl, device)
    if reason is not None:
        raise ValueError(f"--impl {cfg.impl} cannot run on {device.type} here: {reason}")
    if cfg.target == "self" and cfg.impl == "jvp":
        raise ValueError("--impl jvp gives dot products only; --target self needs 'reference' or a hook impl")


def _guard(folder: Path, record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The finished summary when ``folder`` holds this very run; refuses a folder of another run.
    Reads only: nothing is written before every check has passed."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"score: --out {folder} exists and is not a folder")
    path = folder / "config.json"
    if not path.is_file():
        others = [p.name for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
        if others:
            raise ValueError(f"score: {folder} is not empty and holds no score run ({others[:3]}); choose another "
                             "--out")
        return None
    old = json.loads(path.read_text())
    if old.get("kind") != _CONFIG_KIND:
        raise ValueError(f"score: {folder} holds another kind of run (config.json is not a score config); "
                         "choose another --out")
    diff = [k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)]
    if diff:
        shown = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} there, {record.get(k)!r} now" for k in diff[:3])
        raise ValueError(f"score: {folder} holds a run with other settings ({shown}); refusing to overwrite or mix "
                         "it: choose another --out")
    summary = folder / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def run_score(cfg: ScoreConfig, out: str, *, data_root=None, download: bool = False, workers: int = 0,
              progress: bool = True) -> Dict[str, Any]:
    """Run (or resume, or report) one scoring job into ``out``; returns the summary."""
    device = _resolve_device(cfg.device)
    _check_options(cfg, device)
    shard = init_from_env(device)
    record = _record(cfg)
    done = _shared_verdict(shard, lambda: _guard(Path(out), record))
    if done is not None:
        return {**done, "already_complete": True}
    data = load_score_data(cfg.dataset, data_root, download, cfg.normalize, cfg.image_size)
    finite = None if not data.in_memory else ~data.raw_nonfinite  # as read, before any normalisation
    if finite is not None and cfg.nonfinite == "error" and not bool(finite.all()):  # before any training
        raise ValueError(f"score: non-finite images (NaN or Inf) at indices {format_indices(~finite)} of "
                         f"{cfg.dataset}; pass --nonfinite skip to give them weight 0")
    labels, flipped = data.labels, torch.zeros(len(data.labels), dtype=torch.bool)
    if cfg.noise > 0:
        labels, flipped = add_label_noise(data.labels, cfg.noise, cfg.noise_kind, data.num_classes, seed=cfg.seed)
    keep, held = stratified_split(labels, cfg.heldout, seed=cfg.seed)
    model = build_model(cfg.model, data, cfg.width, cfg.seed).to(device)
    if cfg.impl in dispatch.HOOK_IMPLS:
        model.eval()  # scored in eval mode: that is the mode whose layers must be on the hook path
        problem = dispatch.hook_path_problem(model, [n for n, p in model.named_parameters() if p.requires_grad])
        if problem is not None:
            raise ValueError(f"--impl {cfg.impl}: {problem}; use --impl auto (falls back to jvp) or jvp")
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint)
    run = _claim(out, record, shard)  # every check passed: the run folder starts here
    trainable, usable_held = keep, held
    if finite is not None:  # under --nonfinite skip, NaN/Inf images are scored NaN (weight 0), never trained on
        trainable, usable_held = keep[finite[keep]], held[finite[held]]
    train_seconds = _prepare_model(model, cfg, data, labels, trainable, run, shard, device, progress)
    validation = usable_held if cfg.validation_data is None else _validation_set(cfg, data_root, download, labels)
    images = data.train if not data.in_memory else (data.train.images, labels)
    result = score_dataset(model, images, cfg.target, validation=validation if cfg.target == "validation" else None,
                           directions=cfg.direction, scale=cfg.scale, out=out, batch_size=cfg.batch,
                           num_workers=workers, chunk_batches=cfg.chunk_batches, impl=cfg.impl,
                           nonfinite=cfg.nonfinite, progress=tqdm if progress else None)
    if not shard.leader:
        return {"rank": shard.rank, "out": out}
    return _write_outputs(run, cfg, data, labels, flipped, keep, held, result, model, device, train_seconds)


def _prepare_model(model, cfg: ScoreConfig, data: ScoreData, labels, keep, run, shard: Shard, device, progress) -> float:
    """Load --checkpoint, or the model.pt of an interrupted run, or train (rank 0) and save model.pt;
    every rank ends with rank 0's weights, bit for bit. Returns the training seconds."""
    import time

    seconds = 0.0
    if cfg.checkpoint is None and shard.leader:
        saved = run.path / "model.pt"
        if saved.is_file():
            model.load_state_dict(torch.load(saved, map_location=device, weights_only=True))
        elif cfg.epochs > 0:
            mem = data.materialised()
            started = time.perf_counter()
            train_network(model, mem.train.images[keep], labels[keep], EvalSpec(num_nets=1, epochs=cfg.epochs, dsa=False),
                          cfg.seed, None, device, progress=progress)
            seconds = time.perf_counter() - started
        tmp = run.path / ".model.pt.tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, saved)
    state = {k: v for k, v in model.state_dict().items()}
    synced = shard.broadcast(state if shard.leader else {}, state)
    if shard.active:
        model.load_state_dict(synced)
    return seconds


def _claim(out: str, record: Dict[str, Any], shard: Shard) -> Optional[RunFolder]:
    """Rank 0 claims the run folder for this job (another job writing it is named in the refusal, which
    reaches every rank) and writes config.json; other ranks get None."""
    box: Dict[str, RunFolder] = {}

    def claim() -> None:
        box["run"] = RunFolder(out).lock()
        box["run"].save_json("config.json", record)

    _shared_verdict(shard, claim)
    return box.get("run")


def _shared_verdict(shard: Shard, check):
    """Rank 0 runs ``check``; its result, or its refusal, reaches every rank."""
    verdict = None
    if shard.leader:
        try:
            verdict = ("ok", check())
        except ValueError as err:
            verdict = ("error", str(err))
    verdict = shard.share(verdict)
    if verdict[0] == "error":
        raise ValueError(verdict[1])
    return verdict[1]


def _validation_set(cfg: ScoreConfig, data_root, download, labels):
    v = load_score_data(cfg.validation_data, data_root, download, cfg.normalize, cfg.image_size)
    return (v.train.images, v.labels) if v.in_memory else v.train


def _write_outputs(run: RunFolder, cfg, data: ScoreData, labels, flipped, keep, held, result, model, device,
                   train_seconds) -> Dict[str, Any]:
    scores = result.scores if result.scores.dim() == 1 else result.scores[:, 0]
    bad = torch.zeros(len(labels), dtype=torch.bool)
    bad[result.nonfinite] = True
    heldout = torch.zeros(len(labels), dtype=torch.bool)
    if cfg.target == "validation" and cfg.validation_data is None:
        heldout[held] = True
    scored = torch.nonzero(~heldout & ~bad).flatten()
    target = cfg.target if cfg.target != "direction" else "validation"  # a given direction reads like a benefit
    weighter = InfluenceWeighter(labels, data.num_classes, temperature=cfg.temperature, ema=0.0, sign=sign_for(target))
    weighter.update(scored, scores[scored])
    weights = weighter.weights().clone()
    weights[bad] = 0.0
    weighter.save(str(run.file("weights.safetensors")))
    run.save_tensors("instances", {"labels": labels, "flipped": flipped, "heldout": heldout, "weights": weights,
                                   "nonfinite": bad})
    summary: Dict[str, Any] = {
        "dataset": data.name, "target": cfg.target, "model": cfg.model, "n_train": len(labels),
        "n_scored": int(scored.numel()), "n_heldout": int(heldout.sum()), "n_nonfinite": int(bad.sum()),
        "nonfinite_policy": cfg.nonfinite, "nonfinite_positions": result.nonfinite.tolist()[:100],
        "noise": cfg.noise, "seed": cfg.seed, "train_seconds": train_seconds, "score_seconds": result.seconds,
        "scores_per_second": result.images_per_second, "resumed_chunks": result.resumed_chunks,
        "checksum": result.checksum, "dataset_sha256": result.dataset_sha256, "k": 1 if result.scores.dim() == 1
        else int(result.scores.shape[1]),
        "test_accuracy": test_accuracy(model, data.test, device=device) if data.test is not None else None,
    }
    if flipped[scored].any():
        summary["noise_share"] = float(flipped[scored].double().mean())
        summary["weight_on_flipped"] = weight_mass_on(weights[scored], flipped[scored])
        summary["auroc_flipped"] = auroc(-sign_for(target) * scores[scored], flipped[scored])
    run.save_json("summary.json", summary)
    return {**summary, "out": str(run.path), "already_complete": False}
