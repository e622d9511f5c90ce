"""A tensors file holding images and labels: ``.pt``/``.pth`` (torch.save), ``.safetensors`` or ``.npz``.

Keys: ``images`` (or ``x``, ``inputs``, ``data``) [N, C, H, W], [N, H, W] (one channel) or channels-last
[N, H, W, C] (recognised when C is 1, 3 or 4 and the second dimension is not); uint8 pixels are scaled to [0, 1], floats are taken as they are.
``labels`` (or ``y``, ``targets``) integer [N]. Optional ``test_images`` / ``test_labels`` give a test
split. Optional class names: ``class_names`` (a list of strings in a ``.pt`` file, a string array in a
``.npz``, a JSON list under the ``class_names`` metadata key of a ``.safetensors`` file). A ``.pt`` file
may also hold the pair ``(images, labels)``. Files are read with ``weights_only=True``: no code runs when
loading; a file that cannot be read is refused in one line naming it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..scoring.checks import as_labels

__all__ = ["read_tensor_file", "load_tensor_file", "TensorFile", "image_batch", "TENSOR_FILE_SUFFIXES"]

TENSOR_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")
_IMAGE_KEYS = ("images", "x", "inputs", "data")
_LABEL_KEYS = ("labels", "y", "targets")


def _read_raw(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[List[str]]]:
    """(tensors by key, class names or None) of one file; any reading failure is one line naming the file."""
    suffix = path.suffix.lower()
    if suffix not in TENSOR_FILE_SUFFIXES:
        raise ValueError(f"tensor file {path}: unknown suffix {suffix!r}; use one of {', '.join(TENSOR_FILE_SUFFIXES)}")
    try:
        return _read_by_suffix(path, suffix)
    except ValueError as err:
        if str(err).startswith(f"tensor file {path}"):
            raise
        raise ValueError(f"tensor file {path}: cannot read it ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or not this format: the readers' errors vary
        raise ValueError(f"tensor file {path}: cannot read it, truncated or not a {suffix} file "
                         f"({type(err).__name__}: {_first_line(err)})") from None


def _read_by_suffix(path: Path, suffix: str) -> Tuple[Dict[str, torch.Tensor], Optional[List[str]]]:
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            obj = {"images": obj[0], "labels": obj[1]}
        if not isinstance(obj, dict):
            raise ValueError(f"tensor file {path}: expected a dict of tensors or an (images, labels) pair, "
                             f"got {type(obj).__name__}")
        names = obj.get("class_names")
        tensors = {k: torch.as_tensor(v) for k, v in obj.items()
                   if k != "class_names" and isinstance(v, (torch.Tensor, np.ndarray, list))}
        return tensors, _names(names, path)
    if suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        names = json.loads(meta["class_names"]) if "class_names" in meta else None
        return load_file(str(path)), _names(names, path)
    with np.load(path, allow_pickle=False) as z:
        names = z["class_names"].tolist() if "class_names" in z.files else None
        return {k: torch.from_numpy(np.array(z[k])) for k in z.files if k != "class_names"}, _names(names, path)


def _names(names, path: Path) -> Optional[List[str]]:
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"tensor file {path}: class_names must be a list of strings")
    return [str(n) for n in names]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no detail"


def _pick(raw: Dict[str, torch.Tensor], keys, path: Path, what: str, prefix: str = "") -> Optional[torch.Tensor]:
    for k in keys:
        if prefix + k in raw:
            return raw[prefix + k]
    if prefix:
        return None
    raise ValueError(f"tensor file {path}: no {what} (looked for keys {', '.join(keys)}; found {sorted(raw)[:8]})")


def image_batch(t: torch.Tensor, where: str) -> torch.Tensor:
    """Images as float32 [N, C, H, W]: [N, H, W] gains a channel, channels-last [N, H, W, C] is permuted
    (C in 1, 3, 4 and the second dimension not), uint8 pixels are divided by 255, floats kept as they are.
    ``where`` starts the error message (e.g. "tensor file x.pt: images")."""
    t = torch.as_tensor(t)
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)  # channels-last
    if t.dim() != 4:
        raise ValueError(f"{where} must be [N, C, H, W], [N, H, W] or [N, H, W, C], got shape {tuple(t.shape)}")
    if min(t.shape[1:]) == 0:
        raise ValueError(f"{where} of shape {tuple(t.shape)} have an empty channel or side")
    if t.dtype == torch.uint8:
        return t.float().div_(255.0).contiguous()
    if not t.is_floating_point():
        raise ValueError(f"{where} must be uint8 pixels or floats, got {t.dtype}")
    return t.float().contiguous()


@dataclass
class TensorFile:
    """What a tensors file holds: images float32 [N, C, H, W], labels int64 [N], the optional test split
    (images, labels) and the optional class names."""

    images: torch.Tensor
    labels: torch.Tensor
    test: Optional[Tuple[torch.Tensor, torch.Tensor]]
    class_names: Optional[List[str]]


def load_tensor_file(path) -> TensorFile:
    """Read a tensors file (module docstring); refuses a missing, unreadable or malformed file in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tensor file {path} does not exist")
    raw, names = _read_raw(path)
    images = image_batch(_pick(raw, _IMAGE_KEYS, path, "images"), f"tensor file {path}: images")
    labels = as_labels(_pick(raw, _LABEL_KEYS, path, "labels"), f"tensor file {path}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"tensor file {path}: {images.shape[0]} images but {labels.shape[0]} labels")
    test_x, test_y = _pick(raw, _IMAGE_KEYS, path, "", "test_"), _pick(raw, _LABEL_KEYS, path, "", "test_")
    test = None
    if test_x is not None and test_y is not None:
        test = (image_batch(test_x, f"tensor file {path}: test_images"), as_labels(test_y, f"tensor file {path} (test)"))
        if test[0].shape[0] != test[1].shape[0]:
            raise ValueError(f"tensor file {path}: {test[0].shape[0]} test images but {test[1].shape[0]} test labels")
    return TensorFile(images, labels, test, names)


def read_tensor_file(path) -> Tuple[torch.Tensor, torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """(images float32 [N, C, H, W], labels int64 [N], (test images, test labels) or None)."""
    f = load_tensor_file(path)
    return f.images, f.labels, f.test
