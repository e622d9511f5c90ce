"""The output folder of a dataset-scoring run: chunked, atomic, resumable, refusing to mix runs.

Layout::

    manifest.json        identity of the run (dataset, model state, target, direction, settings) and status
    direction.pt         the validation direction, once computed (a resume reads it instead of recomputing)
    chunks/000000.pt     scores of one chunk of positions, each written atomically with its checksum
    scores.pt            the result once every chunk is in: scores, non-finite positions, checksum

Every file is written to a temporary name in the same folder, flushed to disk, then renamed over the
target (``os.replace``), so a process killed at any moment leaves either the old file or the new one,
never a torn one. A restarted run keeps the chunks whose identity and checksum check out and scores
the rest; the merged result is bitwise the one of an uninterrupted run. A folder holding another run
(any identity field differs) is refused; a finished run is reported, never appended to.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .fingerprint import named_tensors_sha256, tensors_sha256


def _recomputing(path: Path, why: str) -> None:
    """Say, once per file, that a stored piece of a run is discarded and computed again."""
    warnings.warn(f"score_dataset: {path} is {why}: computing it again", RuntimeWarning, stacklevel=3)

__all__ = ["ScoreStore", "Chunk", "FORMAT", "identity_sha256", "scores_checksum"]

FORMAT = "iwd_fast.scores/1"


@dataclass
class Chunk:
    """Scores of positions [start, stop): ``scores`` float64 [stop - start, K] (NaN where skipped),
    ``nonfinite`` int64 dataset positions given weight 0, ``content`` the sha256 of what was read."""

    index: int
    start: int
    stop: int
    scores: torch.Tensor
    nonfinite: torch.Tensor
    content: str


def identity_sha256(identity: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def scores_checksum(scores: torch.Tensor, nonfinite: torch.Tensor) -> str:
    return tensors_sha256([scores, nonfinite])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))  # a file object: the archive name never depends on tmp names


def _save_json(path: Path, obj: Dict[str, Any]) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


class ScoreStore:
    """One run's folder. ``open`` (every rank) checks an existing manifest against ``identity``."""

    def __init__(self, out, identity: Dict[str, Any]):
        self.path = Path(out)
        self.identity = identity
        self.identity_hash = identity_sha256(identity)
        self.chunk_dir = self.path / "chunks"

    # ------------------------------------------------------------------ manifest
    def manifest(self) -> Optional[Dict[str, Any]]:
        path = self.path / "manifest.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"score_dataset: {path} is not valid JSON ({err}); delete the folder to start over") from None

    def check(self) -> Optional[Dict[str, Any]]:
        """The existing manifest of this same run (None for a fresh folder); refuses any other run."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"score_dataset: out {self.path} exists and is not a folder")
        man = self.manifest()
        if man is None:
            if self.chunk_dir.is_dir() and any(self.chunk_dir.iterdir()):
                raise ValueError(f"score_dataset: {self.path} holds score chunks without a manifest: not a run this "
                                 "version wrote; choose another out folder")
            return None
        if man.get("format") != FORMAT:
            raise ValueError(f"score_dataset: {self.path} holds a {man.get('format')!r} folder, not {FORMAT!r}")
        if man.get("identity_hash") != self.identity_hash:
            old = man.get("identity", {})
            diff = sorted((k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k)),
                          key=lambda k: (k != "target", k))
            brief = lambda v: repr(v)[:14] + "...'" if isinstance(v, str) and len(v) > 16 else repr(v)  # noqa: E731
            shown = ", ".join(f"{k}: {brief(old.get(k))} there vs {brief(self.identity.get(k))} now" for k in diff[:3])
            raise ValueError(f"score_dataset: {self.path} holds another scoring run ({shown}); refusing to mix runs: "
                             "choose another out folder or delete this one")
        return man

    def create(self, extra: Dict[str, Any]) -> None:
        """Leader only: a fresh manifest (status "running"); stale temporary files are removed."""
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        for tmp in list(self.path.glob(".*.tmp")) + list(self.chunk_dir.glob(".*.tmp")):
            tmp.unlink()
        man = self.manifest() or {"format": FORMAT, "identity": self.identity, "identity_hash": self.identity_hash,
                                  "status": "running"}
        man.update(extra)
        _save_json(self.path / "manifest.json", man)

    def update(self, fields: Dict[str, Any]) -> None:
        man = self.manifest()
        man.update(fields)
        _save_json(self.path / "manifest.json", man)

    # ------------------------------------------------------------------ direction
    def save_direction(self, direction: Dict[str, torch.Tensor]) -> None:
        """direction.pt with its own digest (a kill before the manifest records it loses nothing)."""
        d = {k: v.detach().cpu() for k, v in direction.items()}
        _save(self.path / "direction.pt", {"identity_hash": self.identity_hash, "direction": d,
                                           "sha256": named_tensors_sha256(d)})

    def load_direction(self) -> Optional[Dict[str, torch.Tensor]]:
        """The saved direction of this run, or None (absent, unreadable, or failing its digest)."""
        path = self.path / "direction.pt"
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file: compute it again, and say so
            _recomputing(path, f"unreadable ({type(err).__name__}: {err})")
            return None
        if saved.get("identity_hash") != self.identity_hash or named_tensors_sha256(saved["direction"]) != saved["sha256"]:
            _recomputing(path, "written for another run or failing its digest")
            return None
        return saved["direction"]

    # ------------------------------------------------------------------ chunks
    def _chunk_path(self, index: int) -> Path:
        return self.chunk_dir / f"{index:06d}.pt"

    def load_chunk(self, index: int, start: int, stop: int) -> Optional[Chunk]:
        """The stored chunk if it is complete and belongs to this run; refuses one from another run."""
        path = self._chunk_path(index)
        if not path.is_file():
            return None
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file (copied half-way): score it again, and say so
            _recomputing(path, f"unreadable ({type(err).__name__}: {err})")
            return None
        if d.get("identity_hash") != self.identity_hash:
            raise ValueError(f"score_dataset: {path} was written by another scoring run; refusing to mix runs")
        if (d["start"], d["stop"]) != (start, stop) or scores_checksum(d["scores"], d["nonfinite"]) != d["checksum"]:
            _recomputing(path, "its range or checksum does not match")
            return None
        return Chunk(index, start, stop, d["scores"], d["nonfinite"], d["content"])

    def save_chunk(self, chunk: Chunk) -> None:
        self.chunk_dir.mkdir(parents=True, exist_ok=True)  # a rank on a node that does not share the folder
        _save(self._chunk_path(chunk.index), {
            "identity_hash": self.identity_hash, "start": chunk.start, "stop": chunk.stop, "scores": chunk.scores,
            "nonfinite": chunk.nonfinite, "content": chunk.content,
            "checksum": scores_checksum(chunk.scores, chunk.nonfinite)})

    # ------------------------------------------------------------------ result
    def save_result(self, result: Dict[str, Any]) -> str:
        """Leader only: scores.pt (bitwise the same for the same run, whatever the world size)."""
        checksum = scores_checksum(result["scores"], result["nonfinite"])
        _save(self.path / "scores.pt", {**result, "identity_hash": self.identity_hash, "checksum": checksum})
        return checksum

    def load_result(self) -> Dict[str, Any]:
        path = self.path / "scores.pt"
        if not path.is_file():
            raise ValueError(f"score_dataset: {self.path} says the run is complete but scores.pt is missing")
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d.get("identity_hash") != self.identity_hash or scores_checksum(d["scores"], d["nonfinite"]) != d["checksum"]:
            raise ValueError(f"score_dataset: {path} fails its checksum; delete the folder and score again")
        return d

    def remove_chunks(self, indices: List[int]) -> None:
        """After the result is written: the chunks are folded into scores.pt."""
        for i in indices:
            p = self._chunk_path(i)
            if p.exists():
                p.unlink()
