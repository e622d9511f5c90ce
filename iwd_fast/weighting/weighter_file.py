"""The file an :class:`~iwd_fast.weighting.InfluenceWeighter` saves: safetensors tensors (scores, scored,
labels, optional prior) with the hyperparameters and a fingerprint of the labels as metadata, so a file can
never be applied to another dataset."""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

__all__ = ["labels_fingerprint", "check_fingerprint", "write_weighter", "read_weighter"]

FORMAT = "iwd_fast.InfluenceWeighter/1"


def labels_fingerprint(labels: torch.Tensor, num_classes: int) -> Dict[str, Union[int, str]]:
    """Dataset fingerprint: ``n``, ``num_classes`` and the sha256 of the labels as little-endian int64 bytes."""
    arr = np.ascontiguousarray(labels.detach().cpu().numpy(), dtype="<i8")
    return {"n": int(arr.shape[0]), "num_classes": int(num_classes),
            "labels_sha256": hashlib.sha256(arr.tobytes()).hexdigest()}


def check_fingerprint(expected: dict, got: dict, where: str) -> None:
    diffs = [f"{k} {expected[k]} vs {got[k]}" for k in ("n", "num_classes") if int(expected[k]) != int(got[k])]
    if expected["labels_sha256"] != got["labels_sha256"]:
        diffs.append("labels sha256 differs")
    if diffs:
        raise ValueError(f"{where}: saved weights belong to another dataset (saved vs given: {'; '.join(diffs)})")



def write_weighter(path, hyperparameters: Dict[str, Any], fingerprint: Dict[str, Any], scores: torch.Tensor,
                   scored: torch.Tensor, labels: torch.Tensor, prior: Optional[torch.Tensor]) -> None:
    """Scores float64 [n], scored bool [n], labels int64 [n], prior float64 [n] or None, to ``path``."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else repr(v) for k, v in hyperparameters.items()}
    meta.update({k: str(v) for k, v in fingerprint.items()})
    meta["format"] = FORMAT
    tensors = {"scores": scores.contiguous(), "scored": scored.contiguous(), "labels": labels.contiguous()}
    if prior is not None:
        tensors["prior"] = prior.contiguous()
    save_file(tensors, str(path), metadata=meta)


def read_weighter(path, labels: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """What :func:`write_weighter` wrote, as a weighter state dict plus "labels" (``labels`` if given, checked
    against the file's fingerprint; else the file's own) and "num_classes". Refuses a file of another format,
    a file whose labels do not match its own fingerprint, and given labels of another dataset."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"InfluenceWeighter.load: {path} is not an InfluenceWeighter file (format {meta.get('format')!r})")
    tensors = load_file(str(path))
    saved = {"n": int(meta["n"]), "num_classes": int(meta["num_classes"]), "labels_sha256": meta["labels_sha256"]}
    check_fingerprint(saved, labels_fingerprint(tensors["labels"], saved["num_classes"]),
                      "InfluenceWeighter.load (file integrity)")
    if labels is not None:
        check_fingerprint(saved, labels_fingerprint(torch.as_tensor(labels), saved["num_classes"]),
                          "InfluenceWeighter.load")
    hp = {k: float(meta[k]) for k in ("temperature", "ema", "floor", "eps")}
    hp.update(transform=meta.get("transform", "zscore"), standardize=meta.get("standardize") == "True")
    return {"scores": tensors["scores"], "scored": tensors["scored"], "prior": tensors.get("prior"),
            "sign": int(meta["sign"]), "labels": tensors["labels"] if labels is None else labels, **hp, **saved}
