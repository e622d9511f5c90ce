"""Expert buffers on disk: per-epoch parameter snapshots of expert networks, keyed by what produced them.

Layout (one folder per key, ``<root>/<key>/``)::

    key.json                    the full description the key hashes: dataset fingerprint (images, labels
                                and noise, pool indices), instance weights, expert config, parameter layout
    expert_0000.safetensors     a finished expert: tensors "epoch_0000" .. "epoch_<E>", each float32 [P]
    expert_0003.partial/        an expert in training: epoch_<k>.safetensors (float32 [P]) and
                                state.safetensors (optimizer momentum, RNG states, last finished epoch)

The key is the first 20 hex digits of sha256 over the canonical JSON of key.json, so weighted and
unweighted experts (or two noise draws, two pools, two expert configs) never share a folder. Every file
is written to a temporary name and moved into place (os.replace), so a kill leaves either the old file
or the new one. Snapshots are flat vectors in the order of ``named_parameters`` (``layout`` in key.json).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

__all__ = ["ExpertBuffer", "tensor_sha256", "buffer_key"]

_FORMAT = "iwd_fast.ExpertBuffer/1"


def tensor_sha256(t: Optional[torch.Tensor]) -> str:
    """sha256 of a tensor's bytes (CPU, contiguous, its own dtype), or "none"."""
    if t is None:
        return "none"
    arr = np.ascontiguousarray(t.detach().cpu().numpy())
    h = hashlib.sha256(str((arr.dtype.str, arr.shape)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def buffer_key(description: Dict[str, Any]) -> str:
    """20 hex digits of sha256 over the canonical JSON of ``description`` (sorted keys, no spaces)."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _save(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class ExpertBuffer:
    """The folder of one key under ``root``; created (with key.json) if missing.

    ``description`` must be JSON-serialisable; an existing folder whose key.json differs is refused (a
    hash collision or a hand-edited folder), never silently reused.
    """

    def __init__(self, root: Union[str, Path], description: Dict[str, Any]):
        self.description = json.loads(json.dumps(description, sort_keys=True))
        self.key = buffer_key(self.description)
        self.path = Path(root) / self.key
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "key.json"
        if meta.is_file():
            stored = json.loads(meta.read_text())
            if stored.get("description") != self.description:
                raise ValueError(f"expert buffer {self.path} holds experts of another description; remove it")
        else:
            tmp = meta.with_name(".key.json.tmp")
            tmp.write_text(json.dumps({"format": _FORMAT, "key": self.key, "description": self.description},
                                      indent=2, sort_keys=True) + "\n")
            os.replace(tmp, meta)

    def __repr__(self) -> str:
        return f"ExpertBuffer({str(self.path)!r})"

    # ------------------------------------------------------------------------------------- finished
    def expert_file(self, index: int) -> Path:
        return self.path / f"expert_{int(index):04d}.safetensors"

    def finished(self) -> List[int]:
        """Indices of the finished experts, sorted."""
        return sorted(int(p.stem.split("_")[1]) for p in self.path.glob("expert_*.safetensors"))

    def num_epochs(self, index: int) -> int:
        """Number of snapshots stored for finished expert ``index`` (train epochs + 1)."""
        from safetensors import safe_open

        with safe_open(str(self.expert_file(index)), framework="pt") as f:
            return len([k for k in f.keys() if k.startswith("epoch_")])

    def snapshot(self, index: int, epoch: int) -> torch.Tensor:
        """theta*_epoch of finished expert ``index``: float32 [P] (read lazily, the other epochs stay on disk)."""
        from safetensors import safe_open

        path = self.expert_file(index)
        if not path.is_file():
            raise ValueError(f"expert {index} is not finished in {self.path}")
        with safe_open(str(path), framework="pt") as f:
            name = f"epoch_{int(epoch):04d}"
            if name not in f.keys():
                raise ValueError(f"expert {index} of {self.path} has no epoch {epoch} "
                                 f"(it stores {len(list(f.keys()))} snapshots)")
            return f.get_tensor(name)

    def trajectory(self, index: int) -> torch.Tensor:
        """All snapshots of finished expert ``index``: float32 [E + 1, P]."""
        n = self.num_epochs(index)
        return torch.stack([self.snapshot(index, k) for k in range(n)])

    # ------------------------------------------------------------------------------------ in progress
    def _partial(self, index: int) -> Path:
        return self.path / f"expert_{int(index):04d}.partial"

    def save_epoch(self, index: int, epoch: int, theta: torch.Tensor, state: Dict[str, torch.Tensor]) -> None:
        """Record snapshot ``epoch`` (float [P]) of an expert in training and the state to resume after it.

        The snapshot is written before the state, so the state never points at a missing snapshot.
        """
        folder = self._partial(index)
        folder.mkdir(exist_ok=True)
        _save({"theta": theta.float()}, folder / f"epoch_{int(epoch):04d}.safetensors")
        _save(state, folder / "state.safetensors", metadata={"epoch": str(int(epoch))})

    def resume_point(self, index: int) -> Optional[Dict[str, Any]]:
        """{"epoch": last saved epoch, "theta": its snapshot, "state": tensors} of a partial expert, or None."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        state_path = self._partial(index) / "state.safetensors"
        if not state_path.is_file():
            return None
        with safe_open(str(state_path), framework="pt") as f:
            epoch = int((f.metadata() or {})["epoch"])
        theta = load_file(str(self._partial(index) / f"epoch_{epoch:04d}.safetensors"))["theta"]
        return {"epoch": epoch, "theta": theta, "state": load_file(str(state_path))}

    def finish(self, index: int, epochs: int) -> Path:
        """Gather snapshots 0..epochs of a partial expert into expert_<index>.safetensors; drop the partial."""
        from safetensors.torch import load_file

        folder = self._partial(index)
        tensors = {}
        for k in range(int(epochs) + 1):
            path = folder / f"epoch_{k:04d}.safetensors"
            if not path.is_file():
                raise ValueError(f"expert {index}: snapshot {k} missing in {folder}")
            tensors[f"epoch_{k:04d}"] = load_file(str(path))["theta"]
        target = self.expert_file(index)
        _save(tensors, target, metadata={"format": _FORMAT, "key": self.key, "epochs": str(int(epochs))})
        shutil.rmtree(folder, ignore_errors=True)
        return target

    def save_json(self, name: str, obj: Any) -> Path:
        """A JSON side file of the buffer (e.g. the experts' test accuracy), written atomically."""
        path = self.path / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    def load_json(self, name: str) -> Optional[Any]:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None
