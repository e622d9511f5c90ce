"""``score_dataset``: score every instance of a dataset against a model, streamed, resumable, sharded.

    result = score_dataset(net, train_set, target="validation", validation=heldout_positions,
                           out="runs/scores", batch_size=256, num_workers=4)
    result.scores                     # float64 [N] (or [N, K] for K directions), indexed by position

One forward and one backward per batch (the streamed capture computes the dots or squared norms
inside the backward), so memory is bounded by the batch size whatever the dataset size. With ``out``
the scores are written chunk by chunk (``store``): a killed run restarted with the same arguments ends
with bitwise the scores of an uninterrupted one. Under torch.distributed each rank scores its chunks
(``shard``) and every rank returns the whole result; rank 0 writes ``scores.pt``.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import dispatch
from ..api import norm_param_names, score_batch
from ..losses import LossSpec, check_labels, resolve_loss
from ..params import stack_directions
from .fingerprint import model_sha256, named_tensors_sha256, update_digest
from .shard import Shard, init_from_env
from .source import Source, as_source, describe_rows, nonfinite_rows, split_batch
from .score_targets import Target, mean_loss_gradient, resolve_target
from .store import FORMAT, Chunk, ScoreStore, identity_sha256, scores_checksum

__all__ = ["score_dataset", "ScoreResult", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("error", "skip")


@dataclass
class ScoreResult:
    """What a scoring run produced. ``scores`` float64 [N] ([N, K] for K directions), NaN at
    ``nonfinite`` (int64 positions given weight 0 under nonfinite="skip"). ``dataset_sha256`` digests
    every input and label read, in order. ``already_complete``: ``out`` held this finished run and
    nothing was scored again."""

    scores: torch.Tensor
    target: str
    nonfinite: torch.Tensor
    validation_positions: Optional[torch.Tensor]
    identity: Dict[str, Any]
    checksum: str
    dataset_sha256: str
    seconds: float
    images_per_second: Optional[float]
    resumed_chunks: int
    already_complete: bool
    out: Optional[str]


def score_dataset(model: torch.nn.Module, data, target: str = "validation", *, validation=None, directions=None,
                  scale: float = 1.0, out=None, batch_size: int = 256, num_workers: int = 0, chunk_batches: int = 16,
                  loss: LossSpec = "cross_entropy", impl: str = "auto", eval_mode: bool = True,
                  nonfinite: str = "error", progress: Optional[Callable] = None) -> ScoreResult:
    """Score every instance of ``data`` against ``model``.

    Args:
        model: any nn.Module, on the device to score on (batches are moved there).
        data: a map-style Dataset of (input, label) items, a DataLoader reading in order (its batch
            size, workers, collate_fn and pin_memory are used), (inputs, labels) tensors, or an ImageSet.
        target: "validation" (needs ``validation``), "self", or "direction" (needs ``directions``).
        validation: positions of a held-out split of ``data`` (int tensor or list; those instances are
            scored too and reported in ``validation_positions``), or a validation set in any ``data`` form.
        directions: for "direction": a dict, list of dicts, tensors aligned with the trainable
            parameters, or the path of a ``.pt`` file holding one of those.
        scale: validation direction = scale * grad of the mean validation loss (e.g. the learning rate).
        out: folder for chunked, atomic, resumable output (None: in memory only).
        batch_size, num_workers: the DataLoader's (ignored for a DataLoader or in-memory tensors).
        chunk_batches: batches per checkpointed chunk (a kill loses at most one chunk per process).
        loss: "cross_entropy" or a callable (outputs, labels) -> per-sample losses [B].
        impl: "auto" or an explicit impl (see ``iwd_fast.scoring.dispatch``), checked before any work.
        eval_mode: score in eval mode (restored afterwards); False: the model's mode as is.
        nonfinite: "error" (default) refuses NaN/Inf inputs or scores naming their positions; "skip"
            scores them NaN, records them in ``nonfinite`` (weight 0) and goes on.
        progress: a tqdm-like factory ``progress(total=, desc=, unit=)`` (``iwd_fast.score_dataset``
            passes tqdm); None: silent.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"score_dataset: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if isinstance(chunk_batches, bool) or int(chunk_batches) < 1:
        raise ValueError(f"score_dataset: chunk_batches must be >= 1, got {chunk_batches}")
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError("score_dataset: the model has no parameters")
    device = first.device
    src = as_source(data, batch_size, num_workers, pin_memory=device.type == "cuda")
    if src.n == 0:
        raise ValueError("score_dataset: the dataset is empty")
    shard = init_from_env(device)
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        return _run(model, src, target, validation, directions, scale, out, int(chunk_batches), loss, impl,
                    eval_mode, nonfinite, progress, shard, device, num_workers)
    finally:
        model.train(was_training)


def _run(model, src: Source, target, validation, directions, scale, out, chunk_batches, loss, impl, eval_mode,
         nonfinite, progress, shard: Shard, device, num_workers) -> ScoreResult:
    loss_fn = resolve_loss(loss)
    tgt = resolve_target(model, target, src, validation, directions, scale, src.batch_size, num_workers,
                         device.type == "cuda")
    names = norm_param_names(model, None) if tgt.name == "self" else (
        list(tgt.stacked.tensors) if tgt.stacked is not None else list(dict(model.named_parameters())))
    if tgt.name == "self" and impl == "jvp":
        raise dispatch.ImplUnavailableError("score_dataset: target 'self' needs squared norms; impl='jvp' gives dots "
                                            "only: use 'reference' or a hook impl")
    concrete = dispatch.resolve_model_impl(impl, model, names, device, allow_jvp=tgt.name != "self")
    if src.tensors is not None and nonfinite == "error":
        _refuse_nonfinite_tensors(src)
    chunk_size = src.batch_size * chunk_batches
    identity = {"format": FORMAT, "n": src.n, "dataset": src.fingerprint(), "model": model_sha256(model),
                **tgt.descriptor, "impl": concrete, "loss": loss if isinstance(loss, str) else
                f"{getattr(loss, '__module__', '?')}.{getattr(loss, '__qualname__', repr(loss))}",
                "batch_size": src.batch_size, "chunk_size": chunk_size, "eval_mode": bool(eval_mode),
                "nonfinite": nonfinite, "dtype": str(next(model.parameters()).dtype), "device": device.type}
    shard.agree(identity_sha256(identity), "run identity (data, model, target, settings)")
    store = ScoreStore(out, identity) if out is not None else None
    if _open(store, shard, chunk_size, src.n, create=False) == "complete":
        return _reported(store, shard, identity, tgt)
    num_classes = _probe(model, src, loss, device)
    _open(store, shard, chunk_size, src.n, create=True)  # nothing is written before every check passed
    stacked = _directions(model, tgt, store, shard, loss_fn, device, progress)
    n_chunks = -(-src.n // chunk_size)
    chunks, resumed, seconds, scored = _score_chunks(model, src, stacked, tgt, store, shard, concrete, loss, loss_fn,
                                                     num_classes, nonfinite, chunk_size, n_chunks, device, progress)
    single = stacked is None or stacked.single
    return _finish(chunks, resumed, seconds, scored, store, shard, identity, tgt, n_chunks, single)


def _probe(model, src: Source, loss, device) -> Optional[int]:
    """Classes of a cross-entropy model, from one forward of the first items (buffers untouched)."""
    if callable(loss):
        return None
    x, y = split_batch(next(iter(src.loader(range(min(2, src.n))))), 0)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        with torch.no_grad():
            shape = torch.func.functional_call(model, buffers, (x.to(device),), strict=False).shape
    except (RuntimeError, TypeError, IndexError) as err:
        text = str(err).strip()
        raise ValueError(f"score_dataset: the model cannot run on the dataset's inputs ({x.dtype} "
                         f"{tuple(x.shape[1:])} per item): {type(err).__name__}: "
                         f"{text.splitlines()[0] if text else 'no detail'}") from err
    if src.tensors is not None and len(shape) > 1:  # every label at once, named by dataset position
        _check_label_range(src.tensors[1], int(shape[1]), 0)
    check_labels(loss, shape, y.to(device), x.shape[0])
    return int(shape[1])


def _refuse_nonfinite_tensors(src: Source) -> None:
    """In-memory data: refuse non-finite rows before any forward (datasets are checked batch by batch)."""
    bad = nonfinite_rows(src.tensors[0]) | nonfinite_rows(src.tensors[1])
    if bool(bad.any()):
        raise ValueError(f"score_dataset: non-finite inputs (NaN or Inf) at dataset positions {describe_rows(bad, 0)}"
                         "; pass nonfinite='skip' to give them weight 0 and go on")


def _check_label_range(y: torch.Tensor, num_classes: Optional[int], first: int) -> None:
    if num_classes is None or y.is_floating_point():
        return
    bad = (y < 0) | (y >= num_classes)
    if bad.dim() > 1:
        bad = bad.flatten(1).any(dim=1)
    if bool(bad.any()):
        raise ValueError(f"score_dataset: labels outside [0, {num_classes}) at dataset positions "
                         f"{describe_rows(bad, first)}")


def _open(store: Optional[ScoreStore], shard: Shard, chunk_size: int, n: int, create: bool) -> str:
    """"fresh", "resume" or "complete"; the leader checks the folder (and with ``create`` writes the
    manifest of a fresh or resumed run); refusals reach every rank."""
    verdict = "fresh"
    if store is not None and shard.leader:
        try:
            man = store.check()
            verdict = "fresh" if man is None else ("complete" if man.get("status") == "complete" else "resume")
            if verdict != "complete" and create:
                store.create({"n_chunks": -(-n // chunk_size), "chunk_size": chunk_size})
        except ValueError as err:
            verdict = f"error:{err}"
    verdict = shard.share(verdict)
    if verdict.startswith("error:"):
        raise ValueError(verdict[len("error:"):])
    return verdict


def _reported(store: ScoreStore, shard: Shard, identity, tgt: Target) -> ScoreResult:
    d = shard.share(store.load_result() if shard.leader else None)
    return ScoreResult(d["scores"], tgt.name, d["nonfinite"], d.get("validation_positions"), identity, d["checksum"],
                       d["dataset_sha256"], 0.0, None, 0, True, str(store.path))


def _directions(model, tgt: Target, store, shard: Shard, loss_fn, device, progress):
    """The stacked directions to score with (None for "self"); the validation one computed once by rank 0,
    saved with the run (a resume reads it back) and broadcast bit for bit."""
    if tgt.name != "validation":
        return tgt.stacked
    like = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    d = None
    if shard.leader:
        saved = store.load_direction() if store is not None else None
        if saved is not None:
            d = {n: t.to(device) for n, t in saved.items()}
        else:
            d = mean_loss_gradient(model, tgt.validation, loss_fn, device, tgt.scale, progress)
            if store is not None:
                store.save_direction(d)
        if store is not None:
            store.update({"direction_sha256": named_tensors_sha256(d)})
    d = shard.broadcast(d, like)
    return stack_directions(model, d)


def _score_chunks(model, src: Source, stacked, tgt: Target, store, shard: Shard, impl, loss, loss_fn, num_classes,
                  nonfinite, chunk_size, n_chunks, device, progress):
    """This rank's chunks: stored ones read back, the others scored and stored one by one."""
    mine = shard.chunks(n_chunks)
    bounds = {c: (c * chunk_size, min(src.n, (c + 1) * chunk_size)) for c in mine}
    done: Dict[int, Chunk] = {}
    if store is not None:
        for c in mine:
            ch = store.load_chunk(c, *bounds[c])
            if ch is not None:
                done[c] = ch
    resumed = len(done)
    todo = [c for c in mine if c not in done]
    positions = [p for c in todo for p in range(*bounds[c])]
    norm_names = norm_param_names(model, None) if tgt.name == "self" else None
    bar = progress(total=len(positions), desc=f"score ({tgt.name})" + (f", rank 0 of {shard.world}"
                   if shard.active else ""), unit="img") if progress and shard.leader and positions else None
    started = time.perf_counter()
    pending: List[torch.Tensor] = []
    bad_positions: List[int] = []
    digest = hashlib.sha256()
    cursor, ci = 0, 0
    pin = device.type == "cuda" and src.tensors is not None
    for batch in src.loader(positions):
        first = positions[cursor]
        x, y = split_batch(batch, first)
        update_digest(digest, x)
        update_digest(digest, y)
        pending.append(_score_one(model, x, y, first, stacked, norm_names, impl, loss, loss_fn, num_classes, nonfinite,
                                  device, pin, bad_positions))
        cursor += x.shape[0]
        if bar is not None:
            bar.update(x.shape[0])
        c = todo[ci]
        if first + x.shape[0] >= bounds[c][1]:  # the chunk is complete: store it
            ch = Chunk(c, *bounds[c], torch.cat(pending), torch.tensor(bad_positions, dtype=torch.long),
                       digest.hexdigest())
            if ch.scores.shape[0] != ch.stop - ch.start:
                raise RuntimeError(f"score_dataset: chunk {c} got {ch.scores.shape[0]} scores for "
                                   f"{ch.stop - ch.start} positions (the loader did not read whole batches)")
            if store is not None:
                store.save_chunk(ch)
            done[c] = ch
            pending, bad_positions, digest, ci = [], [], hashlib.sha256(), ci + 1
    if bar is not None:
        bar.close()
    return [done[c] for c in mine], resumed, time.perf_counter() - started, len(positions)


def _score_one(model, x, y, first, stacked, norm_names, impl, loss, loss_fn, num_classes, nonfinite, device, pin,
               bad_positions) -> torch.Tensor:
    """float64 [B, K] scores of one batch (NaN rows where non-finite under "skip")."""
    bad = nonfinite_rows(x) | nonfinite_rows(y)
    if bool(bad.any()) and nonfinite == "error":
        raise ValueError(f"score_dataset: non-finite inputs (NaN or Inf) at dataset positions {describe_rows(bad, first)}"
                         "; pass nonfinite='skip' to give them weight 0 and go on")
    _check_label_range(y, num_classes, first)
    k = 1 if stacked is None else stacked.k
    out = torch.full((x.shape[0], k), float("nan"), dtype=torch.float64)
    good = ~bad
    if bool(good.any()):
        xg, yg = (x, y) if not bool(bad.any()) else (x[good], y[good])
        if pin:
            xg, yg = xg.pin_memory(), yg.pin_memory()
        dots, norms = score_batch(model, xg.to(device, non_blocking=True), yg.to(device, non_blocking=True), impl,
                                  loss, loss_fn, stacked=stacked, norm_names=norm_names)
        s = (dots if dots is not None else norms.unsqueeze(1)).detach().to("cpu", torch.float64)
        out[good] = s
    broken = nonfinite_rows(out) & good
    if bool(broken.any()):
        if nonfinite == "error":
            raise ValueError(f"score_dataset: non-finite scores at dataset positions {describe_rows(broken, first)} "
                             "although their inputs are finite (the loss or its gradient overflowed); pass "
                             "nonfinite='skip' to give them weight 0 and go on")
        out[broken] = float("nan")
    bad_positions += (torch.nonzero(bad | broken).flatten() + first).tolist()
    return out


def _finish(chunks: List[Chunk], resumed, seconds, scored, store, shard: Shard, identity, tgt: Target,
            n_chunks, single: bool) -> ScoreResult:
    gathered = [ch for part in shard.gather(chunks) for ch in part]
    gathered.sort(key=lambda ch: ch.index)
    if [ch.index for ch in gathered] != list(range(n_chunks)):
        raise RuntimeError(f"score_dataset: chunks {sorted(set(range(n_chunks)) - {c.index for c in gathered})} "
                           "are missing after every rank finished")
    scores = torch.cat([ch.scores for ch in gathered])
    scores = scores[:, 0] if single else scores
    nonfinite = torch.cat([ch.nonfinite for ch in gathered])
    content = hashlib.sha256("".join(ch.content for ch in gathered).encode()).hexdigest()
    counts = shard.gather((scored, seconds, resumed))
    total_scored, wall = sum(c[0] for c in counts), max(c[1] for c in counts)
    rate = total_scored / wall if wall > 0 and total_scored else None
    result = {"scores": scores, "nonfinite": nonfinite, "dataset_sha256": content,
              "validation_positions": tgt.validation_positions}
    checksum = scores_checksum(scores, nonfinite)
    if store is not None and shard.leader:
        store.save_result(result)
        store.update({"status": "complete", "checksum": checksum, "dataset_sha256": content,
                      "n_nonfinite": int(nonfinite.numel()), "nonfinite_positions": nonfinite.tolist()[:1000],
                      "last_call": {"seconds": wall, "images_scored": total_scored, "images_per_second": rate,
                                    "resumed_chunks": sum(c[2] for c in counts), "world_size": shard.world,
                                    "threads_per_process": torch.get_num_threads(),
                                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__}})
        store.remove_chunks(list(range(n_chunks)))
    shard.barrier()
    return ScoreResult(scores, tgt.name, nonfinite, tgt.validation_positions, identity, checksum, content, wall, rate,
                       sum(c[2] for c in counts), False, None if store is None else str(store.path))
